"""Symmetric GPTQ / RTN (``QuantizeConfig.symmetric``): the grid, no zero points stored, the runtime, the export.

The grid is compressed-tensors' (llm-compressor's) symmetric int grid: same scales (``calculate_qparams``) and the
same signed codes; a symmetric plan stores no zero points (moeslim files, runtime buffers, the CT folder) and is
exported in exactly b bits, which stock ``from_pretrained`` loads with the logits of ``moeslim.load``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_export_gguf import export_model
from test_lowbit_runtime import _check_resident, _close, _reference
from tiny_models import sample_ids, tiny_model
from transformers import AutoModelForCausalLM

import moeslim
from moeslim.config import ConfigError
from moeslim.export import export_compressed_tensors
from moeslim.methods.quant.config import QuantizeConfig
from moeslim.methods.quant.driver import plan_quantize
from moeslim.methods.quant.fused import LowBitTensor, quantize_fused
from moeslim.methods.quant.gptq import dequantize, gptq_quantize, rtn_quantize, symmetric_params
from moeslim.methods.quant.pack import bits_accounting
from moeslim.models import find_moe_layers
from moeslim.models.expert_math import expert_weight_views
from moeslim.runtime.lowbit_io import LOWBIT_FILE, install_lowbit, load_quantized, lowbit_tensors, packed_experts

IDS = sample_ids(0, 4, 16)
PROBE = sample_ids(7, 2, 16)


def _w(seed: int, shape: tuple[int, int] = (24, 64)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grid_is_compressed_tensors_symmetric_grid(bits: int) -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    w = _w(bits)
    w[3] = 0.0  # an all-zero group row
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=16)
    q = rtn_quantize(w, bits, 16, symmetric=True)
    mid = 1 << (bits - 1)
    assert q.symmetric and bool((q.zeros == mid).all())
    for g in range(4):
        chunk = w[:, 16 * g: 16 * (g + 1)]
        s, _ = symmetric_params(chunk, bits)
        ct_scale, ct_zero = calculate_qparams(chunk.amin(1, keepdim=True), chunk.amax(1, keepdim=True), args)
        nonzero = chunk.abs().amax(1) > 0  # CT gives an all-zero row eps, moeslim the reference's [-1, 1]
        torch.testing.assert_close(s[nonzero], ct_scale[:, 0][nonzero], rtol=1e-6, atol=0)
        assert bool((ct_zero == 0).all())
        ct_codes = torch.clamp(torch.round(chunk / s[:, None]), -mid, mid - 1)  # CT's signed codes at our scale
        assert torch.equal(q.codes[:, 16 * g: 16 * (g + 1)].float() - mid, ct_codes)
    assert torch.equal(q.weight, dequantize(q.codes, q.scales, q.zeros, 16))
    assert float(q.weight[3].abs().max()) == 0.0


def test_symmetric_gptq_with_identity_hessian_is_rtn_and_beats_it_otherwise() -> None:
    w = _w(0)
    for act_order in (False, True):
        g = gptq_quantize(w, torch.eye(64), 4, 16, act_order=act_order, symmetric=True)
        r = rtn_quantize(w, 4, 16, symmetric=True)
        assert torch.equal(g.codes, r.codes) and torch.equal(g.scales, r.scales)
    x = _w(1, (256, 64)) @ _w(2, (64, 64))  # correlated inputs
    h = x.T @ x
    g = gptq_quantize(w, h, 3, 16, symmetric=True)
    r = rtn_quantize(w, 3, 16, symmetric=True)
    assert bool((g.zeros == 4).all())
    assert torch.equal(g.weight, dequantize(g.codes, g.scales, g.zeros, 16))

    def loss(q: torch.Tensor) -> float:
        return float(((x @ (w - q).T) ** 2).sum())

    assert loss(g.weight) < 0.8 * loss(r.weight)


def test_symmetric_needs_two_bits() -> None:
    with pytest.raises(ValueError, match="at least 2 bits"):
        rtn_quantize(_w(0), 1, 16, symmetric=True)
    with pytest.raises(ConfigError, match="1-bit"):
        QuantizeConfig(method="pmq", bits=2.5, symmetric=True)  # default candidates 1,2,3
    with pytest.raises(ConfigError, match="1-bit"):
        QuantizeConfig(method="uniform", bits=1, symmetric=True)
    with pytest.raises(ConfigError, match="gguf"):
        QuantizeConfig(method="pmq", bits=4, scope="gguf", candidates=(2, 4, 8), symmetric=True)
    assert QuantizeConfig(method="pmq", bits=2.5, candidates=(2, 3, 4), symmetric=True).symmetric


def test_fused_tensor_stores_no_zero_points_and_round_trips() -> None:
    w = torch.stack([_w(e) for e in range(4)])
    t = quantize_fused(w, [2, 4, 16, 8], 16, None, "rtn", symmetric=True)
    assert t.symmetric and t.zeros == [None] * 4
    sd = t.to_state_dict("p")
    assert not any(".qzeros." in k for k in sd)
    back = LowBitTensor.from_state_dict(sd, "p")
    assert back.symmetric and torch.equal(back.dequantize(), t.dequantize())
    asym = quantize_fused(w, [2, 4, 16, 8], 16, None, "rtn")
    zero_bytes = sum(z.numel() for z in asym.zeros if z is not None)
    assert asym.nbytes() - t.nbytes() == zero_bytes  # the same codes and scales, minus the zero points
    acc = bits_accounting([4], 24 * 64, 16, zero_bits=0, in_features=64)
    assert acc.avg_bits_with_overhead == 4 + 16 / 16  # scales only


def _symmetric_runtime(model: torch.nn.Module, group: int, widths: list[int]) -> dict[str, LowBitTensor]:
    installed = {}
    for layer in find_moe_layers(model):
        views = expert_weight_views(layer)
        prefix = next(n for n, m in model.named_modules() if m is layer.experts)
        for name, w in ((views.up_name, views.up), (views.down_name, views.down)):
            bits = [widths[(i + layer.layer_idx) % len(widths)] for i in range(w.shape[0])]
            packed = quantize_fused(w.detach(), bits, group, None, "rtn", transposed=views.transposed, symmetric=True)
            install_lowbit(layer.experts, name, packed)
            installed[f"{prefix}.{name}"] = packed
    model.config.moeslim = {"quantize": {"group_size": group}}
    return installed


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_runtime_computes_symmetric_experts_in_every_layout(family: str) -> None:
    model = tiny_model(family)
    installed = _symmetric_runtime(model, 32, [4, 8, 2, 3])
    formats = {f for s in packed_experts(model).values() for f in s.formats().values()}
    assert {"int4pack", "int8", "planes"} <= formats
    if family == "mixtral":  # an input dimension that is not a multiple of 32: padded to whole groups
        assert any(g.k_pad != g.n_in for s in packed_experts(model).values() for g in s.groups)
    _check_resident(model, installed)  # canonical bytes + layout extras: no zero points counted
    ref = _reference(tiny_model(family), installed)
    _close(model(PROBE).logits, ref(PROBE).logits)
    for name, t in lowbit_tensors(model).items():
        assert t.symmetric and torch.equal(t.dequantize(), installed[name].dequantize())


def _applied(family: str, bits: int, group: int = 16, **kwargs: object) -> torch.nn.Module:
    model = export_model(family, 128)
    config = QuantizeConfig(method="uniform", bits=bits, group_size=group, symmetric=True, **kwargs)  # type: ignore[arg-type]
    plan = plan_quantize(model, IDS, config)
    assert plan.summary["symmetric"] is True
    model = moeslim.apply(model, plan, calibration=IDS)
    assert model.config.moeslim["quantize"]["symmetric"] is True
    return model


# act-order is GPTQ's static order (compressed-tensors' actorder "weight"): groups stay contiguous, no g_idx
@pytest.mark.parametrize(("family", "bits", "act_order"), [("qwen3_moe", 4, False), ("mixtral", 4, False),
                                                           ("qwen3_moe", 8, False), ("mixtral", 4, True)])
def test_symmetric_plan_exports_native_bits_and_loads_in_transformers(family: str, bits: int, act_order: bool,
                                                                      tmp_path: Path) -> None:
    model = _applied(family, bits, act_order=act_order)
    moeslim.save(model, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / LOWBIT_FILE), framework="pt") as handle:
        keys = list(handle.keys())  # noqa: SIM118
    assert keys and not any(".qzeros." in k for k in keys)  # a symmetric plan stores no zero points
    ours, _ = load_quantized(tmp_path / "q")
    ours.set_attn_implementation("eager")
    out = export_compressed_tensors(ours, None, tmp_path / "ct")
    assert (out.bits, out.stored_bits, out.symmetric) == (bits, bits, True)
    weights = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"][
        "config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["group_size"]) == (bits, True, 16)
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert not any("zero_point" in k for k in tensors)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    stock.set_attn_implementation("eager")
    with torch.no_grad():
        got, want = stock(IDS).logits, ours(IDS).logits
    assert float((got - want).norm() / want.norm()) <= 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_symmetric_gptq_rtn_plan_and_pmq(tmp_path: Path) -> None:
    model = tiny_model("mixtral")
    config = QuantizeConfig(method="pmq", bits=3, candidates=(2, 3, 4), group_size=16, symmetric=True,
                            quantizer="rtn")
    plan = plan_quantize(model, IDS, config)
    moeslim.apply(model, plan)
    tensors = lowbit_tensors(model)
    assert all(t.symmetric for t in tensors.values())
    assert {b for t in tensors.values() for b in t.bits} <= {2, 3, 4}
    assert model.config.moeslim["quantize"]["symmetric"] is True
    expected = plan.summary["avg_bits_with_overhead"]
    assert expected == pytest.approx(plan.summary["avg_bits"] + 16 / 16)  # scales only, no zero points


def test_cli_flag_is_derived_and_recorded(tiny_model_dir: Path, tmp_path: Path) -> None:
    from moeslim.cli import main

    plan = tmp_path / "s4.json"
    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    assert main(["plan", "quantize", str(tiny_model_dir), "--method", "uniform", "--bits", "4", "--group-size",
                 "16", "--symmetric", *calib, "--out", str(plan)]) == 0
    data = json.loads(plan.read_text())
    assert data["summary"]["symmetric"] is True and data["provenance"]["config"]["symmetric"] is True
    out = tmp_path / "ct"
    assert main(["export", str(tiny_model_dir), "--format", "compressed-tensors", "--plan", str(plan),
                 "--out", str(out)]) == 0
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"]
    assert (weights["num_bits"], weights["symmetric"]) == (4, True)
