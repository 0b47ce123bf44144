"""Progressive pruning as the paper defines it: layer l's candidates run on the inputs of the model whose earlier
layers are pruned, and are scored against the ORIGINAL model's block output on the original inputs."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from test_prune_groups import IDS, block_io
from tiny_models import tiny_model

from moeslim.methods.prune import PruneConfig, plan_prune
from moeslim.models import find_moe_layers
from moeslim.models.select import select_experts


@torch.no_grad()
def progressive_errors(model: torch.nn.Module, kept: dict[int, list[int]], original: dict) -> dict[int, float]:
    """||F_pruned,l(X'_l) - F_l(X_l)||_F per MoE layer of the model pruned to ``kept`` (a real pruned model)."""
    pruned = copy.deepcopy(model)
    select_experts(pruned, kept)
    io = block_io(pruned)
    return {idx: float((out.double() - original[idx][1].double()).norm()) for idx, (_x, out) in io.items()}


@pytest.mark.parametrize("family, keep", [("mixtral", 4), ("qwen3_moe", 5), ("deepseek_v3", 4)])
@pytest.mark.parametrize("sample", [False, True])
def test_progressive_target_is_the_original_output_on_every_layer(family: str, keep: int, sample: bool) -> None:
    model = tiny_model(family)
    # sample=True scores from the token sample (SubsetScorer), False streams every kept set (accumulator).
    plan = plan_prune(model, IDS, PruneConfig(keep=keep, mode="progressive", score=sample))
    original = block_io(model)
    layers = sorted(plan.layers)
    assert len(layers) >= 2
    # The reported loss of every layer is the real pruned model's error against the original output.
    measured = progressive_errors(model, plan.layers, original)
    for idx in layers:
        assert plan.summary["layers"][str(idx)]["loss"] == pytest.approx(measured[idx], rel=1e-5), idx
    # Brute force, layer by layer: with the earlier layers as planned, every kept set of layer l (later layers
    # kept as planned: they do not change layer l's error) -> the plan's choice is the argmin.
    groups = plan.summary["groups"]
    for idx in layers:
        errors = {}
        for kept in itertools.combinations(range(8), keep):
            if groups == "keep" and sum(e < 4 for e in kept) != keep // 2:
                continue
            errors[kept] = progressive_errors(model, {**plan.layers, idx: list(kept)}, original)[idx]
        best = min(errors, key=lambda k: (errors[k], k))
        assert plan.layers[idx] == list(best), idx


def test_progressive_differs_from_scoring_against_pruned_inputs() -> None:
    """The old target F(X') (the original block on the pruned inputs) is not what progressive scores."""
    model = tiny_model("mixtral")
    plan = plan_prune(model, IDS, PruneConfig(keep=4, mode="progressive"))
    first, second = sorted(plan.layers)
    pruned = copy.deepcopy(model)
    select_experts(pruned, plan.layers)
    moe_pruned = {m.layer_idx: m for m in find_moe_layers(pruned)}
    moe_orig = {m.layer_idx: m for m in find_moe_layers(model)}
    x_pruned = block_io(pruned)[second][0]  # X' of the second layer
    old_target = moe_orig[second].forward(x_pruned)  # F(X')
    with torch.no_grad():
        out = moe_pruned[second].forward(x_pruned)
    old_loss = float((out.double() - old_target.double()).norm())
    assert plan.summary["layers"][str(second)]["loss"] != pytest.approx(old_loss, rel=1e-3)
    assert plan.layers[first] == plan_prune(model, IDS, PruneConfig(keep=4)).layers[first]
