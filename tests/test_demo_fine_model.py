"""Checks of the fine-grained demo MoE model (``moeslim/assets/demo-fine``: Qwen3-MoE, 64 experts, top-8).

It is loaded offline from the package folder, is a Qwen3-MoE with the stated expert count, beats the unigram model
of its tokenizer on held-out text by a wide margin, and no expert is dead on the calibration split.

Reference numbers come from ``eval.json``, written by ``scripts/demo_model_card.py``; only small fixed slices
of the validation and calibration splits are re-evaluated so the tests stay fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from demo_assets import corpus_windows, load_offline

from moeslim._package import assets_dir
from moeslim.models import find_moe_layers

ASSETS = assets_dir()
MODEL_DIR = ASSETS / "demo-fine"
DOMAINS = ("code", "prose")
EXPERTS, TOP_K, LAYERS = 64, 8, 4
MAX_CHECKPOINT_BYTES = 40_000_000
PPL_REL_TOL = 0.02
UNIGRAM_MARGIN = 3.0  # model perplexity must be at least this many times below the unigram perplexity
CALIBRATION_WINDOWS = 4  # per domain: 2 x 4 x 256 tokens x top-8 = 256 assignments per expert if uniform
# An expert below this share of the uniform load 1/E counts as (nearly) dead.
MIN_SHARE_OF_UNIFORM = 0.1


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return json.loads((MODEL_DIR / "eval.json").read_text())


@pytest.fixture(scope="module")
def model_and_tokenizer() -> tuple[Any, Any]:
    return load_offline(MODEL_DIR)


@torch.no_grad()
def _run(model: Any, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Perplexity of ``x`` and the top-k assignment counts per layer, (layers, E)."""
    res = model(input_ids=x, output_router_logits=True)
    logits = res.logits[:, :-1].float()
    assert logits.isfinite().all()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
    top_k, n_exp = model.config.num_experts_per_tok, model.config.num_experts
    counts = torch.stack([torch.bincount(r.topk(top_k, dim=-1).indices.flatten(), minlength=n_exp)
                          for r in res.router_logits])
    return math.exp(nll.item()), counts


@pytest.fixture(scope="module")
def slice_ppl(model_and_tokenizer: tuple[Any, Any], reference: dict[str, Any]) -> dict[str, float]:
    model, tok = model_and_tokenizer
    return {d: _run(model, corpus_windows(tok, d, "validation", reference["test_slice_windows"],
                                    reference["context"]))[0] for d in DOMAINS}


def test_is_fine_grained_qwen3_moe(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tok = model_and_tokenizer
    cfg = model.config
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers) == (EXPERTS, TOP_K, LAYERS)
    assert cfg.norm_topk_prob and cfg.tie_word_embeddings
    # moeslim sees every layer as a 64-expert top-8 MoE layer (all decoder layers are sparse).
    layers = find_moe_layers(model)
    assert [(m.num_experts, m.top_k) for m in layers] == [(EXPERTS, TOP_K)] * LAYERS
    # Same tokenizer as the Mixtral demo model, so both share corpus and evaluation code.
    mixtral_tok = transformers.AutoTokenizer.from_pretrained(str(ASSETS / "demo-moe"), local_files_only=True)
    assert tok.get_vocab() == mixtral_tok.get_vocab() and len(tok) == cfg.vocab_size


def test_checkpoint_is_small_bf16(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, _ = model_and_tokenizer
    weights = MODEL_DIR / "model.safetensors"
    with weights.open("rb") as handle:  # safetensors: 8-byte header length, JSON header, raw tensor bytes
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    stored = {p.data_ptr(): p for p in model.parameters()}.values()  # tied weights are stored once
    assert weights.stat().st_size == 8 + header_len + sum(p.numel() * 2 for p in stored)
    assert weights.stat().st_size <= MAX_CHECKPOINT_BYTES


@pytest.mark.parametrize("domain", DOMAINS)
def test_beats_unigram_on_held_out_text(slice_ppl: dict[str, float], reference: dict[str, Any], domain: str) -> None:
    ref = reference["domains"][domain]
    assert slice_ppl[domain] == pytest.approx(ref["slice_ppl"], rel=PPL_REL_TOL)
    # A trained LM beats the unigram model of the same tokenizer (same targets) by a wide margin.
    assert slice_ppl[domain] < ref["unigram_ppl"] / UNIGRAM_MARGIN
    assert ref["ppl"] < ref["unigram_ppl"] / UNIGRAM_MARGIN


def test_no_dead_expert_on_calibration_split(model_and_tokenizer: tuple[Any, Any],
                                             reference: dict[str, Any]) -> None:
    """Recomputed on a calibration slice (both domains) and recorded for the whole split in eval.json."""
    model, tok = model_and_tokenizer
    x = torch.cat([corpus_windows(tok, d, "calibration", CALIBRATION_WINDOWS, reference["context"]) for d in DOMAINS])
    _, counts = _run(model, x)
    share = counts.double() / counts.sum(dim=1, keepdim=True)
    assert (counts > 0).all(), counts
    assert share.min().item() >= MIN_SHARE_OF_UNIFORM / EXPERTS, share.min(dim=1)
    assert reference["dead_experts"] == {"validation": [0] * LAYERS, "calibration": [0] * LAYERS}
    full = torch.tensor(reference["expert_load_calibration"])
    assert full.min().item() >= MIN_SHARE_OF_UNIFORM / EXPERTS


def test_demo_runs_both_embedded_models(tmp_path: Any) -> None:
    """`moeslim demo` (model=demo) runs the Mixtral model, then this one into OUT/fine with removal-share variants."""
    from moeslim.config import CalibrationConfig, ConfigError
    from moeslim.models import resolve_model_path
    from moeslim.workflows.demo import DemoConfig, demo_models, demo_variants, fine_variants

    both = demo_models(DemoConfig(out=str(tmp_path)))
    assert [(m.label, m.out) for m in both] == [("demo", tmp_path), ("demo-fine", tmp_path / "fine")]
    assert Path(resolve_model_path(both[1].model)) == MODEL_DIR
    assert [m.label for m in demo_models(DemoConfig(model="demo-fine"))] == ["demo-fine"]
    assert [m.label for m in demo_models(DemoConfig(model="demo-moe"))] == ["demo"]
    variants = fine_variants(DemoConfig(), CalibrationConfig(), EXPERTS)
    keeps = {v.stages[0].config.keep for v in variants if v.stages[0].kind == "prune"}
    assert keeps == {48, 32}  # 25 % and 50 % of 64 experts removed
    # one skipping row (top-8 routing: the top-k rule) and one quantized row, as the 8-expert table has
    assert [(v.name, [s.kind for s in v.stages]) for v in variants[-2:]] == [("skip", ["skip"]),
                                                                          ("uniform-3", ["quantize"])]
    assert variants[-2].stages[0].config.rule == "topk"
    assert variants[-1].stages[0].config.quantizer == "gptq"
    with pytest.raises(ConfigError):
        demo_variants(DemoConfig(), CalibrationConfig(), EXPERTS)  # keep 6 / 4 of 8 cannot fit 64 experts
