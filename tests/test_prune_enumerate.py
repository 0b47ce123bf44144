"""Enumeration scores kept sets exactly as re-running the masked MoE block would, on several families."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from tiny_models import sample_ids, tiny_model

from moeslim.calibrate import ExpertOutputs, LayerDecision, run_layerwise
from moeslim.methods.prune.enumerate import (
    SubsetScorer,
    allowed_mask,
    best_subset,
    enumerate_subsets,
    score_all,
)
from moeslim.methods.prune.search import search_subset

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def _reference_losses(layer, x: torch.Tensor, subsets) -> torch.Tensor:
    """The authors' way: re-run the whole masked MoE block for every subset (shared experts included)."""
    full = layer.forward(x).double()
    return torch.tensor([
        float((layer.forward(x, allowed_mask(s, layer.num_experts)).double() - full).norm()) for s in subsets
    ], dtype=torch.float64)


@functools.cache
def _per_layer(family: str, keep: int):
    model = tiny_model(family)
    ids = sample_ids(seed=1, batch=4, seq=16)
    out = {}

    def on_layer(layer, observers):
        sample = observers[0].result()
        subsets = enumerate_subsets(layer.num_experts, keep)
        ours = score_all(sample, layer.route, subsets, chunk_tokens=7)  # odd chunk: exercises chunking
        ref = _reference_losses(layer, sample.x, subsets)
        return LayerDecision(result=(subsets, ours, ref, sample, layer))

    results = run_layerwise(model, ids, lambda layer: [ExpertOutputs()], on_layer, progress=False, device="cpu")
    for idx, (subsets, ours, ref, sample, layer) in results.items():
        out[idx] = (subsets, ours, ref, sample, layer)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_enumerate_matches_rerun_reference(family: str) -> None:
    for subsets, ours, ref, _, _ in _per_layer(family, keep=4).values():
        assert len(subsets) == math.comb(8, 4)
        assert ref.max() > 0
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * float(ref.max()))
        assert best_subset(subsets, ours).kept == best_subset(subsets, ref).kept


@pytest.mark.parametrize("family", ("mixtral", "deepseek_v3"))
def test_search_equals_enumerate_on_small_e(family: str) -> None:
    for subsets, ours, _, sample, layer in _per_layer(family, keep=4).values():
        best = best_subset(subsets, ours)
        scorer = SubsetScorer(sample, layer.route)
        found = search_subset(scorer.loss, layer.num_experts, 4)
        assert found.kept == best.kept
        assert found.loss == pytest.approx(best.loss, rel=1e-7)
        assert found.evaluations < len(subsets)  # cheaper than enumeration (38 of 70 loss evaluations here)


def test_best_subset_reports_alternative_and_worst() -> None:
    subsets = [(0, 1), (0, 2), (1, 2)]
    result = best_subset(subsets, torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64))
    assert result.kept == (0, 2)  # tie broken towards lower ids
    assert result.best_alternative == 1.0 and result.worst == 3.0 and result.subsets_scored == 3


def test_enumerate_subsets_counts() -> None:
    assert len(enumerate_subsets(8, 6)) == 28 and len(enumerate_subsets(8, 4)) == 70
    with pytest.raises(ValueError):
        enumerate_subsets(4, 5)
