"""Packed low-bit experts at inference: no float copy in memory, logits of the dequantized model, round trips.

Reference model = the stock forward with the dequantized weights written into the float parameters.
Tolerances: float32 models compare at rtol 1e-5 (the packed kernels compute in float32 there, the
int4pack kernel included); bfloat16 models at 2% of the largest logit (torch's int4pack kernel and the
float reference round differently in bfloat16).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, sample_ids, tiny_model

import moeslim.io
import moeslim.runtime.packed as packed_module
from moeslim.evaluate.cost import param_bytes
from moeslim.methods.quant.fused import LowBitTensor, quantize_fused
from moeslim.methods.quant.layout_bytes import expert_extra_bytes, layout_format, map_bytes
from moeslim.models import find_moe_layers
from moeslim.models.expert_math import expert_weight_views
from moeslim.runtime.lowbit_forward import IMPLEMENTATION
from moeslim.runtime.lowbit_io import install_lowbit, load_quantized, lowbit_tensors, packed_experts, save_quantized
from moeslim.runtime.packed import PackedExperts, _Compiled, int8_dequant, planes_dequant, planes_matmul
from moeslim.runtime.skipping import install_skipping

PROBE = sample_ids(7, 2, 16)
# Widths cycled over experts: with group 16 every layout but int4pack; with group 32 int4pack too
# (inputs that are not a multiple of 32 padded to whole groups).
MIXES = {16: [2, 3, 16, 4, 8, 1, 5, 2], 32: [4, 8, 2, 3]}


def _quantize(model: torch.nn.Module, group_size: int) -> dict[str, LowBitTensor]:
    """RTN-quantize every MoE layer at mixed widths through install_lowbit; returns what was installed."""
    widths = MIXES[group_size]
    installed = {}
    for layer in find_moe_layers(model):
        views = expert_weight_views(layer)
        prefix = next(n for n, m in model.named_modules() if m is layer.experts)
        for name, w in ((views.up_name, views.up), (views.down_name, views.down)):
            bits = [widths[(i + layer.layer_idx) % len(widths)] for i in range(w.shape[0])]
            packed = quantize_fused(w.detach(), bits, group_size, None, "rtn", transposed=views.transposed)
            install_lowbit(layer.experts, name, packed)
            installed[f"{prefix}.{name}"] = packed
    model.config.moeslim = {"quantize": {"group_size": group_size}}
    return installed


def _reference(model: torch.nn.Module, installed: dict[str, LowBitTensor]) -> torch.nn.Module:
    with torch.no_grad():
        for name, packed in installed.items():
            model.get_parameter(name).copy_(packed.dequantize())
    return model


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()))


def _check_resident(model: torch.nn.Module, installed: dict[str, LowBitTensor]) -> None:
    names = {n for n, _ in model.named_parameters()}
    assert not names & set(installed), "float expert parameters must be gone"
    for name, packed in installed.items():
        module_name, _, attr = name.rpartition(".")
        placeholder = getattr(model.get_submodule(module_name), attr)
        assert placeholder.is_meta and tuple(placeholder.shape) == packed.shape
    packed_bytes = sum(p.nbytes() for p in installed.values())  # the canonical packed format = bytes on disk
    storages = packed_experts(model)
    assert sum(s.canonical_bytes for s in storages.values()) == packed_bytes
    held = sum(s.nbytes() for s in storages.values())
    assert held == packed_bytes + sum(_layout_extra(storages[n], p) for n, p in installed.items())
    packed_ptrs = {b.untyped_storage().data_ptr() for s in storages.values() for b in s.buffers()}
    others = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
              for t in [*model.parameters(), *model.buffers()] if t.untyped_storage().data_ptr() not in packed_ptrs}
    sizes = param_bytes(model)
    assert sizes["quantized"] == held
    assert sizes["total"] == sum(others.values()) + held


def _layout_extra(storage: PackedExperts, packed: LowBitTensor) -> int:
    """Bytes the runtime layouts hold beyond the canonical format, as ``methods/quant/layout_bytes`` states them
    (the joint planner counts with it): padded codes, int4pack's (scale, zero) pairs, the expert -> group maps.
    The layouts the runtime chose must be the ones that module names."""
    n_out, n_in = packed.out_in
    extra = map_bytes(packed.shape[0])
    for e, fmt in storage.formats().items():
        assert fmt == layout_format(packed.bits[e], n_out, n_in, packed.group_size, "cpu")
        extra += expert_extra_bytes(packed.bits[e], n_out, n_in, packed.group_size, packed.dtype.itemsize, "cpu")
    return extra


@pytest.mark.parametrize("group_size", [16, 32])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_model_matches_dequantized_reference(family: str, group_size: int) -> None:
    model = tiny_model(family)
    installed = _quantize(model, group_size)
    assert model.config._experts_implementation == IMPLEMENTATION
    _check_resident(model, installed)
    ref = _reference(tiny_model(family), installed)
    _close(model(PROBE).logits, ref(PROBE).logits)
    # saving rebuilds the canonical format bit-exactly from whatever layout is held
    rebuilt = lowbit_tensors(model)
    for name, packed in installed.items():
        assert rebuilt[name].to_state_dict("p").keys() == packed.to_state_dict("p").keys()
        for key, t in packed.to_state_dict("p").items():
            assert torch.equal(rebuilt[name].to_state_dict("p")[key], t), (name, key)


def test_layouts_cover_every_width() -> None:
    model = tiny_model("mixtral")
    _quantize(model, 32)
    formats = {f for s in packed_experts(model).values() for f in s.formats().values()}
    assert formats == {"int4pack", "int8", "planes"}  # inputs not a multiple of 32 are padded, not canonical
    padded = [g for s in packed_experts(model).values() for g in s.groups if g.k_pad != g.n_in]
    assert padded and {g.fmt for g in padded} == {"int4pack", "int8", "planes"}
    model = tiny_model("mixtral")
    _quantize(model, 16)
    assert {f for s in packed_experts(model).values() for f in s.formats().values()} == {"int8", "planes", "dense"}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_save_load_gives_identical_logits_and_stays_packed(family: str, tmp_path: Path) -> None:
    model = tiny_model(family)
    installed = _quantize(model, 32)
    ref = model(PROBE).logits
    save_quantized(model, tmp_path)
    loaded, _ = load_quantized(tmp_path)
    loaded.set_attn_implementation("eager")  # a model rebuilt from config.json would pick sdpa
    _check_resident(loaded, installed)
    assert torch.equal(loaded(PROBE).logits, ref)


def test_bfloat16_model_uses_int4pack_within_stated_tolerance() -> None:
    model = tiny_model("mixtral").to(torch.bfloat16)
    installed = _quantize(model, 32)
    assert "int4pack" in {f for s in packed_experts(model).values() for f in s.formats().values()}
    ref = _reference(tiny_model("mixtral").to(torch.bfloat16), installed)
    _close(model(PROBE).logits.float(), ref(PROBE).logits.float(), rel=2e-2)


@pytest.mark.parametrize("order", ["skip_then_quantize", "quantize_then_skip"])
def test_skipping_composes_with_packed_experts(order: str) -> None:
    model = tiny_model("olmoe")
    betas = {layer.layer_idx: 0.3 for layer in find_moe_layers(model)}
    if order == "skip_then_quantize":
        install_skipping(model, betas, "top2")
        installed = _quantize(model, 16)
    else:
        installed = _quantize(model, 16)
        install_skipping(model, betas, "top2")
    assert all(layer.experts.moeslim_inner == IMPLEMENTATION for layer in find_moe_layers(model))
    ref = _reference(tiny_model("olmoe"), installed)
    install_skipping(ref, betas, "top2")
    out, expected = model(PROBE).logits, ref(PROBE).logits
    _close(out, expected)
    calls = [layer.experts.moeslim_counters["expert_calls"] for layer in find_moe_layers(model)]
    assert calls == [layer.experts.moeslim_counters["expert_calls"] for layer in find_moe_layers(ref)]
    assert sum(calls) < PROBE.numel() * 2 * len(calls)  # some pairs really skipped


def test_odp_and_pruning_compose_with_packed_experts() -> None:
    from moeslim.runtime.odp import install_odp

    def pruned() -> torch.nn.Module:
        from moeslim.models import select_experts

        model = tiny_model("mixtral")
        select_experts(model, {layer.layer_idx: [0, 2, 3, 5, 6, 7] for layer in find_moe_layers(model)})
        return model

    model = pruned()
    installed = _quantize(model, 16)
    assert all(layer.num_experts == 6 for layer in find_moe_layers(model))
    ref = _reference(pruned(), installed)
    _close(model(PROBE).logits, ref(PROBE).logits)
    betas = {layer.layer_idx: 0.3 for layer in find_moe_layers(model)}
    install_odp(model, betas, "top2", 0.1)
    install_odp(ref, betas, "top2", 0.1)
    _close(model(PROBE).logits, ref(PROBE).logits)


@pytest.fixture(scope="module")
def compiled() -> _Compiled:
    """One set of compiled kernels shared by the tests below: each width compiles once per file (~1 s each)."""
    return _Compiled()


@pytest.mark.parametrize("transposed", [False, True])
def test_decode_kernels_match_dequantized_weights_all_widths(transposed: bool, compiled: _Compiled,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The compiled gathered decode kernels (bit planes for 1-3 and 5-7 bits, int8 for 8, int4pack for 4) through
    # PackedExperts.matmul at 1 and 3 rows, in both stored layouts (gpt-oss keeps experts as (in, out)), against
    # x @ W^T with W = LowBitTensor.dequantize. float32 everywhere: rtol 1e-5 of the largest output (only the
    # summation order differs). The float32 native kernel is held back (the path of CPUs without AVX512-BF16;
    # test_planes_native checks it).
    monkeypatch.setattr(packed_module, "native_planes_rows_xf", lambda: None)
    widths = [1, 2, 3, 4, 5, 6, 7, 8]
    gen = torch.Generator().manual_seed(len(widths) + transposed)
    n_out, n_in = 64, 256  # COMPILE_MIN_WEIGHTS: large enough to compile
    w = torch.randn(len(widths), *((n_in, n_out) if transposed else (n_out, n_in)), generator=gen)
    packed = quantize_fused(w, widths, 128, None, "rtn", transposed=transposed)
    storage = PackedExperts(packed)
    storage.compiled = compiled
    assert storage.formats() == {e: {4: "int4pack", 8: "int8"}.get(b, "planes") for e, b in enumerate(widths)}
    weights = packed.dequantize()
    for e in range(len(widths)):
        w_e = weights[e].T if transposed else weights[e]  # (out, in)
        for rows in (1, 3) if widths[e] in (3, 8) else (1,):  # one row, and the dynamic-rows form
            x = torch.randn(rows, n_in, generator=gen)
            _close(storage.matmul(e, x), x @ w_e.T)
    if compiled.failed:
        pytest.skip("torch.compile is not available on this machine (the eager fallback was checked)")
    assert {"planes_rows_kernel", "int8_rows_kernel"} <= compiled.kernels()
    group = storage.groups[storage.slot[2][0]]  # the eager form of the planes kernel (3 bits) agrees too
    planes = tuple(getattr(group, f"p{j}")[0] for j in range(group.n_planes))
    zplanes = tuple(getattr(group, f"zp{j}")[0] for j in range(group.n_zplanes))
    x = torch.randn(2, n_in, generator=gen)
    _close(planes_matmul(x, planes, zplanes, group.scales[0].view(torch.float16), 3, 128), x @ (
        weights[2].T if transposed else weights[2]).T)


@pytest.mark.parametrize("bits", [3, 8])
def test_long_inputs_dequantize_once_exactly(bits: int, compiled: _Compiled) -> None:
    # More rows than FUSED_MAX_ROWS: the compiled dequantization (planes, int8) then a float matmul; the
    # dequantized matrix equals LowBitTensor.dequantize bit for bit.
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(1, 64, 256, generator=gen)
    packed = quantize_fused(w, [bits], 128, None, "rtn")
    storage = PackedExperts(packed)
    storage.compiled = compiled
    group = storage.groups[0]
    assert group.fmt == ("planes" if bits == 3 else "int8")
    zplanes = tuple(getattr(group, f"zp{j}")[0] for j in range(group.n_zplanes))
    scales = group.scales[0].view(torch.float16)
    weights = packed.dequantize()[0]
    x = torch.randn(packed_module.FUSED_MAX_ROWS + 1, 256, generator=gen)
    _close(storage.matmul(0, x), x @ weights.T)
    if bits == 3:
        planes = tuple(getattr(group, f"p{j}")[0] for j in range(group.n_planes))
        dequant = compiled(planes_dequant, planes, zplanes, scales, bits, 128, torch.float32)
    else:
        dequant = compiled(int8_dequant, group.w8[0], zplanes, scales, torch.float32)
    if dequant is None:
        pytest.skip("torch.compile is not available on this machine")
    assert torch.equal(dequant, weights)


def test_pure_kernels_compile_once_for_every_layer_and_copy() -> None:
    # Two layers' experts of the same shapes and widths (different weights) and a deepcopy of one (a model
    # variant): long inputs dequantize through one compiled planes_dequant graph per key for all of them (a
    # compile per layer and per copy was most of a cold start), each with its own experts' weights.
    gen = torch.Generator().manual_seed(5)
    packs = [quantize_fused(torch.randn(2, 64, 256, generator=gen), [3, 5], 128, None, "rtn") for _ in range(2)]
    a, b = PackedExperts(packs[0]), PackedExperts(packs[1])
    c = copy.deepcopy(a)
    assert c.compiled is not a.compiled and not c.compiled.fns  # a copy's own set, sharing what it calls
    x = torch.randn(packed_module.FUSED_MAX_ROWS + 1, 256, generator=gen)
    for storage, packed in ((a, packs[0]), (b, packs[1]), (c, packs[0])):
        weights = packed.dequantize()
        for e in range(2):
            _close(storage.matmul(e, x), x @ weights[e].T)
    if a.compiled.failed:
        pytest.skip("torch.compile is not available on this machine")
    fns = [{k: f for k, f in s.compiled.fns.items() if k[0] == "planes_dequant"} for s in (a, b, c)]
    assert len(fns[0]) == 2 and fns[0].keys() == fns[1].keys() == fns[2].keys()  # one key per width
    for key, f in fns[0].items():
        assert fns[1][key] is f and fns[2][key] is f


_FRESH = textwrap.dedent("""
    import json, sys, torch
    import moeslim
    from moeslim.evaluate.cost import param_bytes
    from moeslim.models import find_moe_layers
    torch.set_num_threads(1)  # the test process's count (conftest): the same reduction order, bit-equal logits
    model, _ = moeslim.load(sys.argv[1])
    model.set_attn_implementation("eager")
    ids = torch.tensor(json.loads(sys.argv[2]))
    layers = find_moe_layers(model)
    print(json.dumps({
        "logits": model(ids).logits.tolist(),
        "bytes": param_bytes(model),
        "float_expert_params": [n for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))],
        "impl": model.config._experts_implementation,
        "inner": sorted({getattr(layer.experts, "moeslim_inner", "") for layer in layers}),
    }))
""")


def test_fresh_process_load_holds_experts_packed_with_skipping(tmp_path: Path) -> None:
    model = tiny_model("gpt_oss")
    _quantize(model, 32)
    betas = {layer.layer_idx: 0.2 for layer in find_moe_layers(model)}
    install_skipping(model, betas, "top2")
    model.config.moeslim["skip"] = {"rule": "top2", "betas": {str(k): v for k, v in betas.items()}}
    expected = model(PROBE).logits
    out = moeslim.io.save(model, tmp_path / "ckpt")
    proc = subprocess.run([sys.executable, "-c", _FRESH, str(out), json.dumps(PROBE.tolist())],
                          capture_output=True, text=True, check=True, timeout=120)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["float_expert_params"] == []
    assert got["bytes"]["quantized"] == sum(s.nbytes() for s in packed_experts(model).values())
    assert got["bytes"]["total"] == param_bytes(model)["total"]
    assert got["impl"] == "moeslim_skip" and got["inner"] == [IMPLEMENTATION]
    torch.testing.assert_close(torch.tensor(got["logits"]), expected, rtol=0, atol=0)


_PEAK = textwrap.dedent("""
    import gc, json, sys
    from moeslim.evaluate.cost import peak_memory
    from moeslim.runtime.lowbit_io import load_quantized
    model, _ = load_quantized(sys.argv[1])  # warm-up: imports and one-time allocations are not the load's cost
    del model
    gc.collect()
    (model, _), peak = peak_memory(load_quantized, sys.argv[1], interval_s=0.001)
    print(json.dumps(peak))
""")


def test_loading_never_materialises_float_experts(tmp_path: Path) -> None:
    # 2 layers x 8 experts of 256 x 1024 in float32: 48 MiB of experts; packed at 2 bits they are ~3.3 MiB.
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(hidden_size=256, intermediate_size=1024, num_local_experts=8, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    float_experts = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    for layer in find_moe_layers(model):
        views = expert_weight_views(layer)
        for name, w in ((views.up_name, views.up), (views.down_name, views.down)):
            install_lowbit(layer.experts, name, quantize_fused(w.detach(), [2] * 8, 128, None, "rtn"))
    model.config.moeslim = {"quantize": {"group_size": 128}}
    save_quantized(model, tmp_path)
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path)], capture_output=True, text=True, check=True,
                          timeout=120)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # Below the float model's experts alone (the float model is larger still): a float copy of the experts,
    # or the old dequantize-at-load, would exceed it. (Unpacking temporaries take the rest.)
    assert got["peak_bytes"] < float_experts, got


def test_gathered_kernels_on_inputs_padded_to_whole_groups(compiled: _Compiled, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    # 320 inputs at group 128: the last group is padded at pack time (to 384) and both layouts still run their
    # fused kernels; one call per width group computes 5 rows, each through its own routed expert (rows padded
    # to the 8-row bucket), equal to x @ W^T of the dequantized experts (float32, rtol 1e-5); saving drops
    # the padding (the canonical tensor comes back bit-exactly). The float32 native kernel is held back (the
    # compiled kernel is the path of CPUs without AVX512-BF16).
    monkeypatch.setattr(packed_module, "native_planes_rows_xf", lambda: None)
    widths = [3, 4, 3, 4]  # bit planes (compiled) and int4pack
    gen = torch.Generator().manual_seed(23)
    w = torch.randn(len(widths), 64, 320, generator=gen)
    packed = quantize_fused(w, widths, 128, None, "rtn")
    storage = PackedExperts(packed)
    storage.compiled = compiled
    assert set(storage.formats().values()) == {"planes", "int4pack"}
    assert all(g.k_pad == 384 for g in storage.groups)
    weights = packed.dequantize()
    for gi, group in enumerate(storage.groups):
        rows = torch.randint(0, len(group.experts), (5,), generator=gen)
        x = torch.randn(5, 320, generator=gen)
        expected = torch.stack([x[i] @ weights[group.experts[int(r)]].T for i, r in enumerate(rows)])
        _close(storage.group_matmul(gi, rows, x), expected)
    if compiled.failed:
        pytest.skip("torch.compile is not available on this machine (the eager fallback was checked)")
    assert "planes_rows_kernel" in compiled.kernels()
    for key, t in packed.to_state_dict("p").items():
        assert torch.equal(storage.to_lowbit().to_state_dict("p")[key], t), key


class _PlainExperts(torch.nn.Module):
    """The attributes the routed forwards read: no gate, no bias, an activation."""

    has_gate = False
    has_bias = False

    def __init__(self) -> None:
        super().__init__()
        self.act_fn = torch.nn.SiLU()


def test_masked_decode_matches_dequantized_experts(compiled: _Compiled) -> None:
    # Decode (T * k <= FUSED_MAX_ROWS pairs) runs as two compiled graphs per layer, every width group on every
    # pair, masked: equal to the routed experts from the dequantized weights (float32, rtol 1e-5), with three
    # width groups (3 and 2 bits as planes, 8 as int8), 320 inputs to the down projection (padded to whole
    # groups of 128) and a placeholder pair (index = num_experts) that adds nothing.
    from moeslim.runtime.lowbit_forward import _masked_decode, grouped_forward

    widths = [3, 2, 8, 3]
    gen = torch.Generator().manual_seed(31)
    up_w, down_w = torch.randn(4, 320, 256, generator=gen), torch.randn(4, 256, 320, generator=gen)
    up_p, down_p = (quantize_fused(w, widths, 128, None, "rtn") for w in (up_w, down_w))
    up, down = PackedExperts(up_p), PackedExperts(down_p)
    up.compiled = down.compiled = compiled
    experts = _PlainExperts()
    w_up, w_down = up_p.dequantize(), down_p.dequantize()
    for n_tokens in (1, 3):
        x = torch.randn(n_tokens, 256, generator=gen)
        index = torch.randint(0, 4, (n_tokens, 2), generator=gen)
        index[0, 1] = 4  # the placeholder: no expert
        weights = torch.rand(n_tokens, 2, generator=gen)
        expected = torch.zeros(n_tokens, 256)
        for t in range(n_tokens):
            for j in range(2):
                e = int(index[t, j])
                if e < 4:
                    expected[t] += weights[t, j] * (torch.nn.functional.silu(x[t] @ w_up[e].T) @ w_down[e].T)
        assert up.fuses_decode(index.numel()) and down.fuses_decode(index.numel())
        got = _masked_decode(experts, x, index, weights, up, down)
        if compiled.failed:
            pytest.skip("torch.compile is not available on this machine")
        assert got is not None
        _close(got, expected)
        _close(grouped_forward(experts, x, index, weights, up, down), expected)
    assert {"masked_up", "masked_down"} <= compiled.kernels()


class _GatedExperts(_PlainExperts):
    """A gated experts module: gate and up halves of one projection, as transformers' default ``_apply_gate``."""

    has_gate = True

    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up


@pytest.mark.parametrize("gated", [False, True])
def test_sorted_decode_matches_dequantized_experts(compiled: _Compiled, gated: bool) -> None:
    # Decode of at most SORTED_MAX_PAIRS routed pairs runs as one compiled graph per pattern of pairs per width
    # group (up, activation, down and the weighted sum): for every pattern of two pairs over three width
    # groups (3 and 2 bits as planes, 8 as int8) and the placeholder (index = num_experts, adds nothing),
    # on one token (k = 2) and two tokens (k = 1), equal to the routed experts from the dequantized weights.
    from moeslim.runtime.lowbit_forward import SORTED_MAX_PAIRS, _sorted_decode, grouped_forward

    assert SORTED_MAX_PAIRS >= 2
    widths = [3, 2, 8, 3]
    n_mid = 320
    gen = torch.Generator().manual_seed(37)
    up_w = torch.randn(4, 2 * n_mid if gated else n_mid, 256, generator=gen)
    down_w = torch.randn(4, 256, n_mid, generator=gen)
    up_p, down_p = (quantize_fused(w, widths, 128, None, "rtn") for w in (up_w, down_w))
    up, down = PackedExperts(up_p), PackedExperts(down_p)
    up.compiled = down.compiled = compiled
    experts = _GatedExperts() if gated else _PlainExperts()
    act = experts._apply_gate if gated else experts.act_fn
    w_up, w_down = up_p.dequantize(), down_p.dequantize()
    masked_before = {k for k in compiled.fns if k[0].startswith("masked")}
    seen = set()
    every_pair = [(a, b) for a in range(5) for b in range(5)]
    for shape, pairs in (((1, 2), every_pair), ((2, 1), [(0, 1), (2, 2), (4, 3)])):
        for pair in pairs:
            index = torch.tensor(pair).reshape(shape)
            x = torch.randn(shape[0], 256, generator=gen)
            weights = torch.rand(shape, generator=gen)
            expected = torch.zeros(shape[0], 256)
            for t in range(shape[0]):
                for j in range(shape[1]):
                    e = int(index[t, j])
                    if e < 4:
                        expected[t] += weights[t, j] * (act(x[t:t + 1] @ w_up[e].T) @ w_down[e].T)[0]
            got = _sorted_decode(experts, x, index, weights, up, down)
            if compiled.failed:
                pytest.skip("torch.compile is not available on this machine")
            assert got is not None
            _close(got, expected)
            _close(grouped_forward(experts, x, index, weights, up, down), expected)
            seen.add(tuple(sorted(up.slot[e][0] for e in pair if e < 4)))
    assert len(seen) == 10  # no pair; one in each of the 3 groups; two in one group (3) or in two groups (3)
    assert "sorted_experts" in compiled.kernels()
    # two pairs never take the masked graphs (the fixture's compiled kernels are shared with the test above)
    assert {k for k in compiled.fns if k[0].startswith("masked")} == masked_before
