"""Apply a "prune" plan: keep the planned experts of every MoE layer.

Equal counts give a standard checkpoint. Unequal counts (allocation="global") use the plan's layout: "padded"
(a standard checkpoint padded with experts the router never selects: stock transformers loads it) or "compact"
(each layer holds only its experts; ``runtime/nonuniform.py`` saves it and ``moeslim.load`` loads it).
"""

from __future__ import annotations

from typing import Any, cast

from torch import nn

from moeslim.models import find_moe_layers
from moeslim.models.select import GroupPolicy, Layout, select_experts
from moeslim.plans import Plan, PlanError


def apply_prune(model: nn.Module, plan: Plan) -> dict[str, Any]:
    """Slice experts and router rows in place; return the ``prune`` entry of the moeslim config section.

    Shared experts and dense layers are untouched. A plan computed on another config is refused by
    ``select_experts`` when it does not fit (unknown layers, ids out of range, fewer than top-k kept). The plan's
    group decision (``summary["groups"]``: keep / drop, what its losses were scored with) is applied as is.
    """
    if plan.kind != "prune":
        raise PlanError(f"apply_prune got a {plan.kind!r} plan")
    kept = {int(idx): [int(e) for e in ids] for idx, ids in plan.layers.items()}
    before = {layer.layer_idx: layer.num_experts for layer in find_moe_layers(model)}
    counts = {idx: len(ids) for idx, ids in kept.items()}
    uniform = len(set(counts.values())) == 1
    layout = None if uniform else plan.summary.get("layout", "compact")
    if layout not in (None, "padded", "compact"):
        raise PlanError(f"prune plan summary: layout={layout!r} is not 'padded' or 'compact'")
    groups = plan.summary.get("groups") or "auto"
    if groups not in ("auto", "keep", "drop"):
        raise PlanError(f"prune plan summary: groups={groups!r} is not 'keep', 'drop' or null")
    try:
        # Both were checked against their Literal choices just above.
        select_experts(model, kept, groups=cast(GroupPolicy, groups), layout=cast("Layout | None", layout))
    except ValueError as err:
        raise PlanError(f"prune plan does not fit this model: {err}") from err
    entry: dict[str, Any] = {
        "method": plan.provenance.method,
        "experts_before": max(before.values()),
        "experts_after": max(counts.values()),
        "kept": {str(idx): ids for idx, ids in sorted(kept.items())},
    }
    if not uniform:
        entry.update(layout=layout, experts_per_layer={str(idx): n for idx, n in sorted(counts.items())})
    return {"prune": entry}
