"""Pruning driver, config validation, saliency baselines, search, apply and plan JSON."""

from __future__ import annotations

import copy
import itertools
import random
from collections.abc import Sequence

import pytest
import torch
from tiny_models import sample_ids, tiny_model

from moeslim.appliers.prune import apply_prune
from moeslim.calibrate import ExpertOutputSample, RoutingSummary
from moeslim.config import ConfigError
from moeslim.methods.prune import PruneConfig, plan_prune
from moeslim.methods.prune.enumerate import allowed_mask
from moeslim.methods.prune.saliency import (
    frequency_scores,
    random_subset,
    reap_scores,
    soft_count_scores,
    top_experts,
)
from moeslim.methods.prune.search import search_subset
from moeslim.models import find_moe_layers, masked_routing_is_identity
from moeslim.plans import Plan

IDS = sample_ids(seed=2, batch=4, seq=16)


# -- config validation -------------------------------------------------------------------------------------
def test_keep_below_top_k_is_refused_before_calibration() -> None:
    with pytest.raises(ConfigError, match="keep=1 is below top_k=2 of mixtral; keep at least 2 experts"):
        plan_prune(tiny_model("mixtral"), IDS, PruneConfig(method="enumerate", keep=1))


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "magic"}, "not a pruning method"),
    ({"mode": "sideways"}, "layerwise"),
    ({"keep": 0}, "keep at least 1"),
    ({"token_fraction": 0.0}, "token_fraction"),
    ({"budget": 0}, "budget"),
])
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**{"keep": 6, **kwargs})


def test_config_rejects_nothing_to_prune_and_too_many_subsets() -> None:
    model = tiny_model("mixtral")
    with pytest.raises(ConfigError, match="nothing to prune"):
        PruneConfig(keep=8).check_model(model)
    with pytest.raises(ConfigError, match="method='search'"):
        PruneConfig(keep=4, max_subsets=10).check_model(model)
    PruneConfig(method="search", keep=4, max_subsets=10).check_model(model)  # search has no such limit


# -- saliency baselines on a hand-made case ----------------------------------------------------------------
def test_frequency_and_soft_count_pick_highest_with_low_id_ties() -> None:
    summary = RoutingSummary(counts=torch.tensor([5.0, 9.0, 5.0, 1.0]), soft_counts=torch.tensor([1.0, 0.5, 2.0, 2.0]),
                             weight_sums=torch.zeros(4), topk_weights=torch.zeros(0, 2), tokens=10)
    assert top_experts(frequency_scores(summary), 2) == (0, 1)  # 9, then 5 vs 5 -> lower id 0
    assert top_experts(soft_count_scores(summary), 3) == (0, 2, 3)


def _softmax_top2(logits: torch.Tensor, allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    w, ids = torch.softmax(logits, -1).topk(2, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def test_reap_is_mean_weighted_output_norm_over_routed_tokens() -> None:
    # token 0 routes to experts 0 (w 0.75) and 1 (w 0.25); token 1 routes to 1 (0.75) and 2 (0.25).
    a = torch.log(torch.tensor(3.0))
    logits = torch.tensor([[a, 0.0, -20.0], [-20.0, a, 0.0]])
    outputs = torch.zeros(2, 3, 2)
    outputs[0, 0] = torch.tensor([3.0, 4.0])  # norm 5
    outputs[0, 1] = torch.tensor([0.0, 2.0])  # norm 2
    outputs[1, 1] = torch.tensor([0.0, 4.0])  # norm 4
    outputs[1, 2] = torch.tensor([6.0, 8.0])  # norm 10
    sample = ExpertOutputSample(x=torch.zeros(2, 2), logits=logits, outputs=outputs)
    scores = reap_scores(sample, _softmax_top2)
    expected = torch.tensor([0.75 * 5, (0.25 * 2 + 0.75 * 4) / 2, 0.25 * 10], dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-6)
    assert top_experts(scores, 2) == (0, 2)  # 3.75 and 2.5 beat 1.75


def test_random_subset_is_seeded() -> None:
    assert random_subset(8, 4, seed=3) == random_subset(8, 4, seed=3)
    assert len(set(random_subset(8, 4, seed=3))) == 4
    assert len({random_subset(8, 4, seed=s) for s in range(10)}) > 1


# -- search: brute-force checks on random objectives -------------------------------------------------------
def _brute_greedy(loss, num_experts: int, keep: int) -> tuple[int, ...]:
    kept = tuple(range(num_experts))
    while len(kept) > keep:
        kept = min((tuple(e for e in kept if e != d) for d in kept), key=lambda c: (loss(c), c))
    return kept


@pytest.mark.parametrize("seed", range(5))
def test_search_greedy_and_local_optimum_by_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    num_experts, keep = 7, 3
    unary = [rng.random() for _ in range(num_experts)]
    pair = {(i, j): rng.random() for i in range(num_experts) for j in range(i + 1, num_experts)}

    def loss(kept: Sequence[int]) -> float:
        dropped = [e for e in range(num_experts) if e not in kept]
        return sum(unary[e] for e in dropped) + sum(pair[(i, j)] for i, j in itertools.combinations(dropped, 2))

    greedy = search_subset(loss, num_experts, keep, local_search=False)
    assert greedy.kept == _brute_greedy(loss, num_experts, keep)
    found = search_subset(loss, num_experts, keep)
    assert found.loss <= greedy.loss
    for out in found.kept:  # no single swap improves: a local optimum
        for into in set(range(num_experts)) - set(found.kept):
            assert loss(tuple(sorted({*found.kept} - {out} | {into}))) >= found.loss - 1e-12
    best = min(itertools.combinations(range(num_experts), keep), key=loss)
    wide = search_subset(loss, num_experts, keep, beam=35)  # a beam as wide as all states: exhaustive
    assert wide.loss == pytest.approx(loss(best))
    limited = search_subset(loss, num_experts, keep, budget=5)
    assert limited.evaluations <= 5 and limited.budget_exhausted and len(limited.kept) == keep


# -- driver, apply, plan JSON ------------------------------------------------------------------------------
def _masked_logits(model, kept: dict[int, list[int]], ids: torch.Tensor) -> torch.Tensor:
    """Logits of the ORIGINAL model with every MoE block replaced by its masked forward."""
    handles = []
    for layer in find_moe_layers(model):
        allowed = allowed_mask(kept[layer.layer_idx], layer.num_experts)

        def hook(_m, args, output, layer=layer, allowed=allowed):
            x = args[0]
            new = layer.forward(x.reshape(-1, x.shape[-1]), allowed).reshape(x.shape)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handles.append(layer.block.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_plan_apply_equals_masked_original(family: str, tmp_path) -> None:
    model = tiny_model(family)
    plan = plan_prune(model, IDS, PruneConfig(method="enumerate", keep=6), model_name=f"tiny-{family}")
    assert plan.kind == "prune" and all(len(v) == 6 and v == sorted(v) for v in plan.layers.values())
    # Group-limited DeepSeek-V3 (2 groups of 4): only the balanced sets (3 + 3) the pruned model can run.
    expected = 16 if family == "deepseek_v3" else 28
    assert plan.summary["groups"] == ("keep" if family == "deepseek_v3" else None)
    for entry in plan.summary["layers"].values():
        assert entry["subsets_scored"] == expected and entry["loss"] <= entry["best_alternative"] <= entry["worst"]
    assert plan.provenance.data == "input_ids" and plan.provenance.data_hash
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.layers == plan.layers and loaded.summary == plan.summary and loaded.provenance == plan.provenance

    reference = _masked_logits(model, plan.layers, IDS)
    pruned = copy.deepcopy(model)
    section = apply_prune(pruned, loaded)["prune"]
    assert section["experts_after"] == 6 and section["kept"] == {str(k): v for k, v in sorted(plan.layers.items())}
    assert all(layer.num_experts == 6 for layer in find_moe_layers(pruned))
    assert masked_routing_is_identity(model, plan.layers)  # balanced groups: the pruned model is masked routing
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["search", "frequency", "soft-count", "reap", "random"])
def test_every_method_plans(method: str) -> None:
    model = tiny_model("qwen3_moe")
    # One mode for all: losses of different modes are measured on different inputs (some defaults are progressive).
    plan = plan_prune(model, IDS, PruneConfig(method=method, keep=4, score=True, mode="layerwise"))
    assert sorted(plan.layers) == [1, 2]
    enum = plan_prune(model, IDS, PruneConfig(method="enumerate", keep=4, mode="layerwise"))
    for idx, entry in plan.summary["layers"].items():
        assert entry["loss"] >= enum.summary["layers"][idx]["loss"] - 1e-9  # enumerate is the optimum
