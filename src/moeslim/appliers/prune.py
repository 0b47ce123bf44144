"""Apply a "prune" plan: keep the planned experts of every MoE layer (a standard checkpoint results)."""

from __future__ import annotations

from typing import Any

from torch import nn

from moeslim.models import find_moe_layers, select_experts
from moeslim.plans import Plan, PlanError


def apply_prune(model: nn.Module, plan: Plan) -> dict[str, Any]:
    """Slice experts and router rows in place; return the ``prune`` entry of the moeslim config section.

    Shared experts and dense layers are untouched. A plan computed on another config is refused by
    ``select_experts`` when it does not fit (unknown layers, ids out of range, fewer than top-k kept).
    """
    if plan.kind != "prune":
        raise PlanError(f"apply_prune got a {plan.kind!r} plan")
    kept = {int(idx): [int(e) for e in ids] for idx, ids in plan.layers.items()}
    before = {layer.layer_idx: layer.num_experts for layer in find_moe_layers(model)}
    try:
        select_experts(model, kept)
    except ValueError as err:
        raise PlanError(f"prune plan does not fit this model: {err}") from err
    return {
        "prune": {
            "method": plan.provenance.method,
            "experts_before": max(before.values()),
            "experts_after": len(next(iter(kept.values()))),
            "kept": {str(idx): ids for idx, ids in sorted(kept.items())},
        }
    }
