"""Checks of the embedded demo MoE model (``moeslim/assets/demo-moe``).

The reference numbers come from ``eval.json``, written by ``scripts/demo_model_card.py``.
Only a small fixed slice of the validation split is re-evaluated so the test stays fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from demo_assets import corpus_windows, load_offline

from moeslim.models.loading import demo_model_path


def _assets_dir() -> Path:
    return demo_model_path().parent


ASSETS = _assets_dir()
MODEL_DIR = ASSETS / "demo-moe"
DOMAINS = ("code", "prose")
MIN_EXPERT_LOAD = 0.03
MIN_DOMAIN_EXPERT_LOAD = 0.01
PPL_REL_TOL = 0.02

@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return json.loads((MODEL_DIR / "eval.json").read_text())


@pytest.fixture(scope="module")
def model_and_tokenizer() -> tuple[Any, Any]:
    return load_offline(MODEL_DIR)


@pytest.fixture(scope="module")
def slice_eval(model_and_tokenizer: tuple[Any, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Perplexity and top-k expert assignment counts per domain on the reference slice."""
    model, tok = model_and_tokenizer
    cfg = model.config
    out: dict[str, Any] = {}
    with torch.no_grad():
        for domain in DOMAINS:
            x = corpus_windows(tok, domain, "validation", reference["test_slice_windows"], reference["context"])
            res = model(input_ids=x, output_router_logits=True)
            logits = res.logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            counts = torch.stack([
                torch.bincount(r.topk(cfg.num_experts_per_tok, dim=-1).indices.flatten(),
                               minlength=cfg.num_local_experts)
                for r in res.router_logits
            ])
            out[domain] = {"ppl": math.exp(nll.item()), "counts": counts, "finite": bool(logits.isfinite().all())}
    return out


def test_config_and_size(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tok = model_and_tokenizer
    cfg = model.config
    assert cfg.model_type == "mixtral"
    assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (8, 2)
    assert len(tok) == cfg.vocab_size
    weights = MODEL_DIR / "model.safetensors"
    with weights.open("rb") as handle:  # safetensors: 8-byte header length, JSON header, raw tensor bytes
        header_len = int.from_bytes(handle.read(8), "little")
    stored = {p.data_ptr(): p for p in model.parameters()}.values()  # tied weights are stored once
    assert weights.stat().st_size == 8 + header_len + sum(p.numel() * 2 for p in stored)  # bf16, nothing else
    header = json.loads((MODEL_DIR / "config.json").read_text())
    assert header.get("dtype", header.get("torch_dtype")) == "bfloat16"


def test_logits_finite(slice_eval: dict[str, Any]) -> None:
    assert all(slice_eval[d]["finite"] for d in DOMAINS)


@pytest.mark.parametrize("domain", DOMAINS)
def test_perplexity_matches_reference(slice_eval: dict[str, Any], reference: dict[str, Any], domain: str) -> None:
    ref = reference["domains"][domain]
    ppl = slice_eval[domain]["ppl"]
    assert ppl == pytest.approx(ref["slice_ppl"], rel=PPL_REL_TOL)
    # A trained model must beat the unigram baseline of the same tokenizer by far.
    assert ppl < ref["unigram_ppl"] / 3
    assert ref["ppl"] < ref["unigram_ppl"] / 3


def test_every_expert_used_on_validation(reference: dict[str, Any]) -> None:
    """Pooled over both domains every expert of every layer gets >= 3 % of the assignments.

    Per domain the floor is lower on purpose: experts specialise by domain (tested below).
    """
    for layer, load in enumerate(reference["expert_load_pooled"]):
        assert min(load) >= MIN_EXPERT_LOAD, (layer, load)
    for domain in DOMAINS:
        for layer, load in enumerate(reference["domains"][domain]["expert_load"]):
            assert min(load) >= MIN_DOMAIN_EXPERT_LOAD, (domain, layer, load)


def test_recomputed_expert_load(slice_eval: dict[str, Any]) -> None:
    """On the small slice (both domains pooled) no expert may be (nearly) dead either."""
    counts = sum(slice_eval[d]["counts"] for d in DOMAINS).double()
    share = counts / counts.sum(dim=1, keepdim=True)
    assert share.min().item() >= MIN_EXPERT_LOAD, share


def test_domains_use_experts_differently(slice_eval: dict[str, Any]) -> None:
    code, prose = (slice_eval[d]["counts"].double() for d in DOMAINS)
    code, prose = code / code.sum(1, keepdim=True), prose / prose.sum(1, keepdim=True)
    tv_distance = 0.5 * (code - prose).abs().sum(dim=1)
    assert tv_distance.max().item() > 0.1, tv_distance
