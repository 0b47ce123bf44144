"""GGUF export (moeslim.export.gguf) and the GGUF PMQ scope (methods/quant/gguf_types.py).

The files are read back with gguf-py (GGUFReader, gguf.quants.dequantize): expert count, types, tokenizer
metadata, and tensors equal to moeslim's within each type's rounding error. llama.cpp itself runs in
benchmarks/engines.py (it builds from source, so it is not part of the test install).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tiny_models import _reinit, sample_ids, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeslim.config import ConfigError
from moeslim.export import GGUF_FAMILIES, UnsupportedExportError, export_gguf, read_gguf_types
from moeslim.export.gguf_arch import permute_rotary
from moeslim.methods.quant.config import QuantizeConfig
from moeslim.methods.quant.driver import plan_quantize
from moeslim.methods.quant.gguf_types import (
    GGUF_BLOCKS,
    allocate_types,
    gguf_tensor_factors,
    gguf_type_for,
    plan_gguf_types,
    tensor_bytes,
)
from moeslim.models import resolve_model_path, select_experts
from moeslim.outputs import OutputError
from moeslim.plans import PlanError


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("demo"))


def export_model(family: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    """A tiny model llama.cpp can run: every layer MoE, expert rows divisible by 32 (Q8_0/Q4_0 blocks)."""
    config = tiny_config(family, vocab)
    if family == "qwen3_moe":
        config.mlp_only_layers = []
    if family == "mixtral":
        config.intermediate_size = 64
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    _reinit(model, seed)
    return model.eval()


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def _tensor(reader: GGUFReader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
        [int(d) for d in reversed(t.shape.tolist())])


def _moe(model: torch.nn.Module, idx: int):
    return model.model.layers[idx].mlp


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_f16_gguf_holds_the_model(family: str, tokenizer, tmp_path: Path) -> None:
    model = export_model(family, len(tokenizer))
    out = export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype="F16")
    reader = GGUFReader(str(out.path))
    arch = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}[family]
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, f"{arch}.expert_count") == 8 and _field(reader, f"{arch}.expert_used_count") == 2
    assert _field(reader, f"{arch}.block_count") == model.config.num_hidden_layers
    # tokenizer metadata: gpt2-style BPE with the demo vocabulary, merges and special ids
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(tokenizer) and tokens[tokenizer.eos_token_id] == tokenizer.eos_token
    assert len(_field(reader, "tokenizer.ggml.merges")) > 1000
    assert _field(reader, "tokenizer.ggml.token_type")[tokenizer.eos_token_id] == 3  # CONTROL
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    n_layers = model.config.num_hidden_layers
    assert out.tensor_types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert out.tensor_types["blk.0.ffn_gate_exps.weight"] == "F16"
    moe = _moe(model, 1)
    half = moe.experts.gate_up_proj.shape[1] // 2
    gate_up = moe.experts.gate_up_proj.detach()
    tol = dict(rtol=1e-3, atol=1e-4)  # float16 storage
    np.testing.assert_allclose(_tensor(reader, "blk.1.ffn_gate_exps.weight"), gate_up[:, :half].numpy(), **tol)
    np.testing.assert_allclose(_tensor(reader, "blk.1.ffn_up_exps.weight"), gate_up[:, half:].numpy(), **tol)
    np.testing.assert_allclose(_tensor(reader, "blk.1.ffn_down_exps.weight"),
                               moe.experts.down_proj.detach().numpy(), **tol)
    np.testing.assert_array_equal(_tensor(reader, "blk.1.ffn_gate_inp.weight"), moe.gate.weight.detach().numpy())
    q = model.model.layers[1].self_attn.q_proj.weight.detach()
    expect_q = permute_rotary(q, model.config.num_attention_heads) if family == "mixtral" else q
    np.testing.assert_allclose(_tensor(reader, "blk.1.attn_q.weight"), expect_q.numpy(), **tol)
    names = {t.name for t in reader.tensors}
    assert {f"blk.{i}.ffn_down_exps.weight" for i in range(n_layers)} <= names
    assert ("blk.0.attn_q_norm.weight" in names) == (family == "qwen3_moe")


def test_rotary_permutation_is_the_pairwise_layout() -> None:
    """Rows [x0, x1, x2, x3 | y0..y3] of one head become [x0, y0, x1, y1, ...]: halves -> adjacent pairs."""
    rows = torch.arange(16.0).reshape(16, 1)  # 2 heads of dim 8
    out = permute_rotary(rows, 2).flatten().tolist()
    assert out == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def _block_bound(w: np.ndarray, qtype: str) -> np.ndarray:
    """Per-weight error bound of a round trip: half a quantization step of the weight's 32-block."""
    blocks = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True)
    steps = {"Q8_0": 127.0, "Q4_0": 8.0}[qtype]
    # Q4_0's step is max/8 with codes in [-8, 7]: the largest magnitude can be off by a full step. The step is
    # stored in float16 (relative error 2^-11), which shifts a code q by up to |q| * 2^-11 steps.
    factor = 0.5 + 127 * 2**-11 if qtype == "Q8_0" else 1.0 + 8 * 2**-11
    return np.broadcast_to(blocks * factor / steps + 1e-7, (blocks.shape[0], 32)).reshape(w.shape)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantized_gguf_is_within_the_types_error(qtype: str, tokenizer, tmp_path: Path) -> None:
    model = export_model("qwen3_moe", len(tokenizer))
    out = export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype=qtype)
    reader = GGUFReader(str(out.path))
    assert out.tensor_types["blk.0.ffn_up_exps.weight"] == qtype and out.fallbacks == []
    w = _moe(model, 0).experts.down_proj.detach().numpy()
    got = _tensor(reader, "blk.0.ffn_down_exps.weight")
    err = np.abs(got - w)
    assert (err <= _block_bound(w, qtype)).all()
    assert err.max() > 0  # really quantized


def test_pruned_model_exports_fewer_experts(tokenizer, tmp_path: Path) -> None:
    model = export_model("mixtral", len(tokenizer))
    keep = [0, 2, 5, 7]
    want = _moe(model, 1).experts.down_proj.detach()[keep].clone()
    select_experts(model, {i: keep for i in range(model.config.num_hidden_layers)})
    out = export_gguf(model, tokenizer, tmp_path / "pruned.gguf", qtype="F32")
    reader = GGUFReader(str(out.path))
    assert out.expert_count == 4 and _field(reader, "llama.expert_count") == 4
    np.testing.assert_array_equal(_tensor(reader, "blk.1.ffn_down_exps.weight"), want.numpy())
    assert _tensor(reader, "blk.1.ffn_gate_inp.weight").shape == (4, model.config.hidden_size)


def test_gguf_scope_plan_sets_tensor_types_and_size(tokenizer, tmp_path: Path) -> None:
    model = export_model("qwen3_moe", len(tokenizer))
    ids = sample_ids(0, 4, 16)
    plan = plan_quantize(model, ids, QuantizeConfig(scope="gguf", bits=6.0, candidates=(2, 4, 8)))
    # widths map to Q2_K/Q4_K/Q8_0; rows of 32 are not 256-blocks, so llama.cpp's fallbacks apply
    assert plan.summary["layers"]["0"]["candidates"]["gate"] == ["Q4_0", "Q5_0", "Q8_0"]
    types = [t for entry in plan.layers.values() for t in entry["gguf_types"].values()]
    assert len(set(types)) > 1  # a real mix at this budget
    assert plan.summary["avg_bits_with_overhead"] <= 6.0
    path = tmp_path / "plan.json"
    plan.save(path)
    from moeslim.plans import Plan

    out = export_gguf(model, tokenizer, tmp_path / "pmq.gguf", qtype="Q8_0", plan=Plan.load(path))
    for idx, entry in plan.layers.items():
        for proj, qtype in entry["gguf_types"].items():
            assert out.tensor_types[f"blk.{idx}.ffn_{proj}_exps.weight"] == qtype
    reader = GGUFReader(str(out.path))
    expert_bytes = sum(int(t.n_bytes) for t in reader.tensors if "_exps." in t.name)
    assert expert_bytes == plan.summary["expert_bytes"]


def test_gguf_scope_costs_rank_types_by_error() -> None:
    model = export_model("qwen3_moe", 128)
    ids = sample_ids(0, 4, 16)
    config = QuantizeConfig(scope="gguf", bits=8.5, candidates=(2, 4, 8))
    plan = plan_quantize(model, ids, config)
    reused = plan_gguf_types(model, ids, config, factors=gguf_tensor_factors(model, ids, config))
    assert reused.layers == plan.layers and reused.summary["layers"] == plan.summary["layers"]
    for entry in plan.summary["layers"].values():
        for costs in entry["costs"].values():
            assert costs[0] > costs[1] > costs[2] > 0  # Q4_0 > Q5_0 > Q8_0 error
    # at 8.5 bits per weight (Q8_0's size) every tensor fits the best type
    assert {t for e in plan.layers.values() for t in e["gguf_types"].values()} == {"Q8_0"}


def test_allocate_types_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, j = 4, 3
        costs = rng.random((n, j))
        sizes = rng.integers(1, 20, (n, j)).astype(float)
        budget = float(rng.integers(int(sizes.min(1).sum()), int(sizes.max(1).sum()) + 1))
        best = min((sum(costs[i, c] for i, c in enumerate(combo)), combo)
                   for combo in itertools.product(range(j), repeat=n)
                   if sum(sizes[i, c] for i, c in enumerate(combo)) <= budget)
        got = allocate_types(costs, sizes, budget)
        assert sum(sizes[i, c] for i, c in enumerate(got)) <= budget
        assert sum(costs[i, c] for i, c in enumerate(got)) == pytest.approx(best[0], rel=1e-12)
    # a budget of exactly the cheapest options is feasible (no rounding loss), and takes them
    sizes = np.array([[84.0 * 448, 144.0 * 448], [18.0 * 2048, 34.0 * 2048]])
    assert allocate_types(np.array([[2.0, 1.0], [2.0, 1.0]]), sizes, sizes[:, 0].sum()).tolist() == [0, 0]
    with pytest.raises(ValueError, match="below the smallest"):
        allocate_types(np.ones((2, 2)), np.full((2, 2), 10.0), 15)


def test_type_table_matches_ggml() -> None:
    for name, (block, size) in GGUF_BLOCKS.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (block, size)
    assert gguf_type_for(3, 256) == "Q3_K" and gguf_type_for(3, 448) == "Q4_0" and gguf_type_for(6, 448) == "Q8_0"
    assert tensor_bytes("Q4_K", 10, 512) == 10 * 2 * 144


def test_gguf_scope_config_errors() -> None:
    with pytest.raises(ConfigError, match="method='pmq'"):
        QuantizeConfig(scope="gguf", method="random", bits=3, candidates=(2, 4))
    with pytest.raises(ConfigError, match="llama.cpp types"):
        QuantizeConfig(scope="gguf", bits=2, candidates=(1, 3))


def test_export_errors(tokenizer, tmp_path: Path) -> None:
    model = export_model("qwen3_moe", len(tokenizer))
    with pytest.raises(UnsupportedExportError, match="families .*mixtral.*'phimoe'"):
        export_gguf(tiny_model("phimoe"), tokenizer, tmp_path / "x.gguf")
    with pytest.raises(UnsupportedExportError, match="dense"):
        export_gguf(tiny_model("qwen3_moe"), tokenizer, tmp_path / "x.gguf")  # layer 0 is dense
    with pytest.raises(UnsupportedExportError, match="tokenizer"):
        export_gguf(model, None, tmp_path / "x.gguf")
    with pytest.raises(UnsupportedExportError, match="llama-quantize"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", qtype="Q4_K_M")
    with pytest.raises(UnsupportedExportError, match="--type"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", qtype="Q9")
    with pytest.raises(OutputError, match="is a folder"):
        export_gguf(model, tokenizer, tmp_path)
    other = export_model("qwen3_moe", len(tokenizer))
    other.config.rms_norm_eps = 1e-3  # another config: another hash
    plan = plan_quantize(other, sample_ids(0, 2, 8), QuantizeConfig(scope="gguf", bits=8.5, candidates=(4, 8)))
    with pytest.raises(PlanError, match="another model"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", plan=plan)
    assert not (tmp_path / "x.gguf").exists()


def test_cli_export_gguf(tiny_model_dir: Path, prune_plan: Path, tmp_path: Path, capsys) -> None:
    from moeslim.cli import main

    out = tmp_path / "tiny.gguf"
    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--type", "Q8_0", "--out", str(out)]) == 0
    shown = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "8 experts" in shown and "fallback" in shown  # rows of 48 are not 32-blocks: F16, and it says so
    reader = GGUFReader(str(out))
    assert _field(reader, "llama.expert_count") == 8
    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--out", str(tiny_model_dir)]) == 2
    assert "folder" in capsys.readouterr().err
    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--plan", str(prune_plan),
                 "--out", str(tmp_path / "p.gguf")]) == 2
    assert "scope 'gguf'" in capsys.readouterr().err
    plan = tmp_path / "gguf-plan.json"
    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    assert main(["plan", "quantize", str(tiny_model_dir), "--scope", "gguf", "--bits", "10", "--candidates", "4,8",
                 *calib, "--out", str(plan)]) == 0
    capsys.readouterr()
    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--plan", str(plan), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err  # the Q8_0 file above is kept
    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--plan", str(plan), "--out", str(out),
                 "--overwrite"]) == 0
    planned = {f"blk.{i}.ffn_{p}_exps.weight": t for i, e in json.loads(plan.read_text())["layers"].items()
               for p, t in e["gguf_types"].items()}
    assert planned["blk.0.ffn_down_exps.weight"] == "F16"  # rows of 48: no 32-block type fits
    assert {n: t for n, t in read_gguf_types(out).items() if n in planned} == planned
    assert main(["export", str(tiny_model_dir), "--format", "compressed-tensors", "--type", "Q8_0",
                 "--out", str(tmp_path / "ct")]) == 2
    assert "GGUF options" in capsys.readouterr().err


def test_moeslim_quantized_model_exports_its_dequantized_experts(tokenizer, tmp_path: Path) -> None:
    import moeslim
    from moeslim.runtime.lowbit_io import lowbit_tensors

    model = export_model("mixtral", len(tokenizer))
    ids = sample_ids(0, 4, 16)
    moeslim.apply(model, plan_quantize(model, ids, QuantizeConfig(method="uniform", bits=3, group_size=16)),
                  calibration=ids)
    packed = lowbit_tensors(model)["model.layers.1.mlp.experts.down_proj"].dequantize()
    out = export_gguf(model, tokenizer, tmp_path / "q.gguf", qtype="F32")
    np.testing.assert_array_equal(_tensor(GGUFReader(str(out.path)), "blk.1.ffn_down_exps.weight"), packed.numpy())


# Tiny-config changes that give a model llama.cpp runs: every layer MoE where its graph needs that, V3-style
# group scores (benchmarks/gguf_parity.py makes the same ones for its converter comparison).
_RUNNABLE = {"qwen2_moe": {"mlp_only_layers": []}, "qwen3_moe": {"mlp_only_layers": []},
             "deepseek_v2": {"n_group": 1, "topk_group": 1, "q_lora_rank": 16}, "deepseek_v3": {"q_lora_rank": 16},
             "olmoe": {"num_key_value_heads": 4}}


def _runnable_model(family: str, vocab: int, extra: dict | None = None) -> torch.nn.Module:
    config = tiny_config(family, vocab)
    for key, value in {**_RUNNABLE.get(family, {}), **(extra or {})}.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    _reinit(model, 0)
    return model.eval()


@pytest.mark.parametrize("family", sorted(GGUF_FAMILIES))
def test_every_gguf_family_exports_its_layout(family: str, tokenizer, tmp_path: Path) -> None:
    """Names, shapes and data of the expert tensors in llama.cpp's layout (E, I, H) / (E, H, I), nothing dropped
    or duplicated, and the architecture's counts. Names and hyper-parameters equal llama.cpp's converter's for the
    same folders (benchmarks/gguf_parity.py, recorded in docs/results-gguf-parity.md)."""
    from moeslim.models import find_moe_layers
    from moeslim.models.expert_math import expert_weight_views

    model = _runnable_model(family, len(tokenizer))
    out = export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype="F32")
    reader = GGUFReader(str(out.path))
    arch = GGUF_FAMILIES[family].name
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, f"{arch}.block_count") == model.config.num_hidden_layers
    assert _field(reader, f"{arch}.expert_count") == 8 and _field(reader, f"{arch}.expert_used_count") == 2
    names = [t.name for t in reader.tensors]
    assert len(names) == len(set(names))
    state = model.state_dict()
    split = sum(k.endswith(("gate_up_proj", "gate_up_proj_bias", "kv_b_proj.weight")) for k in state)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    assert len(names) == len(state) + split - tied  # every tensor written once, the fused ones as two
    for layer in find_moe_layers(model):
        views = expert_weight_views(layer)
        fused = views.up.detach()
        fused = fused.transpose(-1, -2) if views.transposed else fused  # (E, 2I, H)
        # gpt-oss interleaves gate and up rows; the others put the gate rows first
        gate, up = (fused[:, ::2], fused[:, 1::2]) if family == "gpt_oss" else fused.chunk(2, dim=1)
        down = views.down.detach().transpose(-1, -2) if views.transposed else views.down.detach()  # (E, H, I)
        prefix = f"blk.{layer.layer_idx}"
        np.testing.assert_array_equal(_tensor(reader, f"{prefix}.ffn_gate_exps.weight"), gate.numpy())
        np.testing.assert_array_equal(_tensor(reader, f"{prefix}.ffn_up_exps.weight"), up.numpy())
        np.testing.assert_array_equal(_tensor(reader, f"{prefix}.ffn_down_exps.weight"), down.numpy())
        assert out.tensor_types[f"{prefix}.ffn_gate_inp.weight"] == "F32"


def test_routings_llama_cpp_cannot_run_are_refused(tokenizer, tmp_path: Path) -> None:
    cases = [
        ("deepseek_v2", {"q_lora_rank": 16}, "top-2 scores.*group_limited_greedy"),  # V2: a group's best expert
        ("deepseek_v3", {}, "q_lora_rank=None.*3 layers"),  # llama.cpp tells Lite models by their layer count
        ("qwen2_moe", {"mlp_only_layers": [], "norm_topk_prob": True}, "does not renormalise"),
        ("olmoe", {"norm_topk_prob": True}, "does not renormalise"),
        ("olmoe", {}, "2 KV heads for 4 query heads"),
        ("qwen3_moe", {"mlp_only_layers": [], "norm_topk_prob": False}, "renormalises"),
        ("mixtral", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "dynamic"),
    ]
    for family, changes, message in cases:
        model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)), dtype=torch.float32)
        for key, value in changes.items():  # the export reads the config: no need to build another model
            setattr(model.config, key, value)
        with pytest.raises(UnsupportedExportError, match=message):
            export_gguf(model, tokenizer, tmp_path / "x.gguf")
    model = _runnable_model("deepseek_v3", len(tokenizer))  # 2 groups of 4 experts
    select_experts(model, {layer: [0, 1, 2] for layer in (1, 2)})  # moeslim drops the groups (n_group=1) ...
    model.config.n_group = 2  # ... a config that keeps them cannot split 3 experts
    with pytest.raises(UnsupportedExportError, match="n_group=2 equal groups; this model has 3"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_hunyuan_ntk_alpha_rope_is_written_as_llama_cpp_reads_it() -> None:
    """Hunyuan-A13B's NTK-alpha scaling: llama.cpp takes it as a larger rotary base, base * alpha^(d / (d - 2)),
    and the 256k context the alpha gives; other alphas have no published context and are refused."""
    from moeslim.export.gguf_arch import MoeShape, gguf_family

    config = tiny_config("hunyuan_v1_moe")
    config.hidden_size, config.num_attention_heads = 512, 4  # head dim 128, as the published model
    config.rope_parameters = {"rope_type": "dynamic", "alpha": 1000.0, "rope_theta": 10000.0}
    arch = gguf_family(config)
    hparams = arch.hparams(config, MoeShape(8, 2, 64))
    assert hparams["add_rope_freq_base"] == pytest.approx(11158839.9251, rel=1e-9)
    assert hparams["add_context_length"] == hparams["add_rope_scaling_orig_ctx_len"] == 256 * 1024
    assert hparams["add_rope_scaling_factor"] == 1.0
    config.rope_parameters = {"rope_type": "dynamic", "alpha": 500.0, "rope_theta": 10000.0}
    with pytest.raises(UnsupportedExportError, match="alpha=500"):
        gguf_family(config)


def test_a_tensor_llama_cpp_has_no_slot_for_is_refused_before_writing(tokenizer, tmp_path: Path) -> None:
    model = export_model("qwen3_moe", len(tokenizer))
    model.model.layers[0].self_attn.register_buffer("extra_scale", torch.ones(4))  # a tensor llama.cpp lacks
    with pytest.raises(UnsupportedExportError, match="extra_scale.*no slot"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp folder


@pytest.mark.parametrize("tied", [False, True])
def test_packed_attention_and_embedding_are_written_dequantized(tied: bool, tokenizer, tmp_path: Path) -> None:
    # a joint plan's --attention-widths / --embedding-widths: the file holds what the packed model computes with
    from moeslim.appliers.nonexpert import pack_nonexpert
    from moeslim.runtime.lowbit_io import lowbit_tensors
    from moeslim.runtime.packed_rows import packed_rows

    model = export_model("qwen3_moe", len(tokenizer))
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    pack_nonexpert(model, {0: 4}, 8, 16)
    rows = packed_rows(model)
    assert sorted(rows) == (["lm_head.weight", "model.embed_tokens.weight"])
    q = lowbit_tensors(model)["model.layers.0.self_attn.q_proj.weight"].dequantize()[0]
    out = export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype="F32")
    reader = GGUFReader(str(out.path))
    names = {t.name for t in reader.tensors}
    np.testing.assert_array_equal(_tensor(reader, "token_embd.weight"),
                                  rows["model.embed_tokens.weight"].dequantize().numpy())
    assert ("output.weight" in names) == (not tied)  # llama.cpp reuses token_embd for a tied head
    if not tied:
        np.testing.assert_array_equal(_tensor(reader, "output.weight"), rows["lm_head.weight"].dequantize().numpy())
    np.testing.assert_array_equal(_tensor(reader, "blk.0.attn_q.weight"), q.numpy())
