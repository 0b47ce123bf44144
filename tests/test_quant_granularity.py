"""PMQ at engine granularity (``granularity="layer"``: one width per MoE layer) and its compressed-tensors export.

The allocator's optimum is checked against enumeration in test_quant_allocate.py; here: the plan (one width per
layer, the model-wide budget, never cheaper than per-expert PMQ), the config errors, and the export with one config
group per width whose per-layer targets compressed-tensors' matcher resolves as vLLM does. The folder, decompressed
layer by layer with the scheme its targets give, has moeslim's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_export_gguf import export_model
from tiny_models import sample_ids
from transformers import AutoModelForCausalLM

import moeslim
from moeslim.config import ConfigError
from moeslim.export import UnsupportedExportError, export_compressed_tensors
from moeslim.export.compressed_tensors import check_ct_plan, ct_layer_schemes
from moeslim.methods.quant.config import QuantizeConfig
from moeslim.methods.quant.driver import plan_quantize
from moeslim.plans import Plan
from moeslim.runtime.lowbit_io import lowbit_tensors

IDS = sample_ids(0, 4, 16)
PROJ = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}


def _pmq(granularity: str, bits: float = 3.0) -> QuantizeConfig:
    return QuantizeConfig(method="pmq", bits=bits, candidates=(2, 4), group_size=16, symmetric=True, scope="global",
                          granularity=granularity)


def test_layer_plan_has_one_width_per_layer_within_the_model_budget() -> None:
    model = export_model("qwen3_moe", 128)
    tied, free = (plan_quantize(model, IDS, _pmq(g)) for g in ("layer", "expert"))
    widths = {idx: entry["bits"] for idx, entry in tied.layers.items()}
    assert all(len(set(w)) == 1 for w in widths.values())
    assert len({w[0] for w in widths.values()}) == 2  # 3 bits over three layers of 2 or 4: both widths used
    assert tied.summary["avg_bits"] <= 3.0 and free.summary["avg_bits"] <= 3.0
    # the same program with tied variables: its optimum can only be higher
    objective = [sum(p.summary["layers"][str(i)]["objective"] for i in widths) for p in (tied, free)]
    assert objective[0] >= objective[1]
    assert tied.provenance.config["granularity"] == "layer"


def test_layer_granularity_config_errors() -> None:
    with pytest.raises(ConfigError, match="scope='global'"):
        QuantizeConfig(method="pmq", bits=3, candidates=(2, 4), granularity="layer")
    with pytest.raises(ConfigError, match="method='pmq'"):
        QuantizeConfig(method="random", bits=3, candidates=(2, 4), scope="global", granularity="layer")
    with pytest.raises(ConfigError, match="cost='paper'"):
        QuantizeConfig(bits=3, candidates=(2, 4), scope="global", granularity="layer", cost="authors")


def _decompressed_folder(ct: Path, out: Path) -> dict[str, int]:
    """``ct`` with every per-expert projection decompressed by compressed-tensors with the scheme its targets give
    (as vLLM resolves a layer's scheme) into a plain float folder ``out``; returns {layer prefix: num_bits}."""
    from compressed_tensors.compressors import BaseCompressor

    config = json.loads((ct / "config.json").read_text())
    quant = config.pop("quantization_config")
    tensors = load_file(str(ct / "model.safetensors"))
    modules = sorted({k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")})
    schemes = ct_layer_schemes(quant, modules)
    assert sorted(schemes) == modules  # every packed projection has exactly one scheme
    compressor = BaseCompressor.get_value_from_registry(quant["format"])
    for name in modules:
        local = {k.removeprefix(f"{name}."): tensors.pop(k) for k in list(tensors) if k.startswith(f"{name}.")}
        tensors[f"{name}.weight"] = compressor.decompress(local, schemes[name])["weight"].float()
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return {name.split(".experts.")[0]: schemes[name].weights.num_bits for name in modules}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_layer_widths_export_one_group_per_width_with_moeslims_logits(family: str, tmp_path: Path) -> None:
    model = export_model(family, 128)
    base = plan_quantize(model, IDS, QuantizeConfig(method="uniform", bits=4, group_size=16, symmetric=True))
    n_layers = model.config.num_hidden_layers
    widths = {0: 4, 1: 2, 2: 16}  # a layer at 16 bits stays dense (in no group)
    widths = {i: widths[i] for i in range(n_layers)}
    plan = Plan("quantize", {i: {"bits": [widths[i]] * 8} for i in range(n_layers)}, base.provenance, base.summary)
    check_ct_plan(plan, "plan")
    moeslim.apply(model, plan, calibration=IDS)
    out = export_compressed_tensors(model, None, tmp_path / "ct")
    assert out.bits is None and out.layers == {0: (4, 4), 1: (2, 2)} and out.quantized_tensors == 2 * 8 * 3
    assert "2 bits stored as 2 in layers [1]; 4 bits stored as 4 in layers [0]" in out.describe()
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [(g["weights"]["num_bits"], len(g["targets"])) for g in groups.values()] == [(2, 1), (4, 1)]
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    if n_layers > 2:  # layer 2 kept: plain weights
        assert not any(".layers.2." in k and "packed" in k for k in tensors)
        assert any(".layers.2." in k and ".experts.0." in k and k.endswith(".weight") for k in tensors)
    bits = _decompressed_folder(tmp_path / "ct", tmp_path / "dense")
    assert {k.split(".layers.")[1].split(".")[0]: b for k, b in bits.items()} == {"0": 4, "1": 2}
    # vLLM asks for expert 0's three projection names of each fused-MoE layer: all resolve to the layer's width
    names = [f"model.layers.{i}.{'mlp' if family == 'qwen3_moe' else 'block_sparse_moe'}.experts.0.{p}"
             for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")]
    quant = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert [s.weights.num_bits for s in ct_layer_schemes(quant, names).values()] == [4, 4, 4, 2, 2, 2]
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    for name, t in lowbit_tensors(model).items():
        assert torch.equal(dense.get_parameter(name), t.dequantize())
    with torch.no_grad():
        torch.testing.assert_close(dense(IDS).logits, model(IDS).logits, rtol=1e-3, atol=1e-5)
    assert PROJ[family][0] in " ".join(tensors)


def test_per_expert_widths_are_refused_naming_the_granularity(tmp_path: Path) -> None:
    model = export_model("qwen3_moe", 128)
    plan = plan_quantize(model, IDS, _pmq("expert"))
    assert any(len(set(e["bits"])) > 1 for e in plan.layers.values())
    with pytest.raises(UnsupportedExportError, match="--granularity layer --scope global"):
        check_ct_plan(plan, "p.json")
    moeslim.apply(model, plan, calibration=IDS)
    with pytest.raises(UnsupportedExportError, match="--granularity layer --scope global"):
        export_compressed_tensors(model, None, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_cli_plans_layer_widths_and_exports_them(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from moeslim.cli import main

    plan = tmp_path / "layer.json"
    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    assert main(["plan", "quantize", str(tiny_model_dir), "--method", "pmq", "--bits", "3", "--candidates", "2,4",
                 "--group-size", "16", "--symmetric", "--scope", "global", "--granularity", "layer", *calib,
                 "--out", str(plan)]) == 0
    layers = json.loads(plan.read_text())["layers"]
    assert all(len(set(e["bits"])) == 1 for e in layers.values())
    out = tmp_path / "ct"
    assert main(["export", str(tiny_model_dir), "--format", "compressed-tensors", "--plan", str(plan),
                 "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "compressed-tensors pack-quantized" in printed and "symmetric groups of 16" in printed
    assert "one width per layer: 2 bits stored as 2 in layers [0]; 4 bits stored as 4 in layers [1]" in printed
    assert "transformers 5.24 cannot" in printed
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [2, 4]
    # --stream: the plan applied one layer at a time, the same groups, tensors and line
    assert main(["export", str(tiny_model_dir), "--format", "compressed-tensors", "--plan", str(plan), "--stream",
                 "--out", str(tmp_path / "ct-stream")]) == 0
    assert "one width per layer: 2 bits stored as 2 in layers [0]; 4 bits stored as 4 in layers [1]" in " ".join(
        capsys.readouterr().out.split())
    streamed = json.loads((tmp_path / "ct-stream" / "config.json").read_text())["quantization_config"]
    assert streamed == json.loads((out / "config.json").read_text())["quantization_config"]
    ref, got = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "ct-stream" / "model.safetensors"))
    packed = sorted(k for k in ref if "weight_packed" in k)
    assert packed and packed == sorted(k for k in got if "weight_packed" in k)
    assert all(torch.equal(ref[k], got[k]) for k in packed)
