"""Apply a prune plan made with ``recalibrate_router``: refit the kept router rows, then prune.

The fit (``methods.router_fit.fit_pruned_layer``) needs the original experts' outputs as its target, so it runs on
the plan's calibration windows BEFORE ``apply_prune`` slices the model; the refitted rows are written after.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moeslim.appliers.calibrated_pass import calibrated_pass
from moeslim.appliers.prune import apply_prune
from moeslim.calibrate import Observer
from moeslim.data.calibration_set import CalibrationSet
from moeslim.methods.router_fit import (
    RouterFit,
    TokenInputs,
    check_uniform,
    fit_pruned_layer,
    prune_keeps_groups,
    token_inputs,
)
from moeslim.models import MoELayer, find_moe_layers
from moeslim.models.expert_edit import write_router
from moeslim.plans import Plan, PlanError

__all__ = ["apply_prune_refit", "refits_router"]


def refits_router(plan: Plan) -> bool:
    return bool(plan.provenance.config.get("recalibrate_router", False))


def apply_prune_refit(model: nn.Module, plan: Plan, calibration: CalibrationSet | torch.Tensor | None = None,
                      device: torch.device | str | None = None, progress: bool = False) -> dict[str, Any]:
    """``apply_prune``, with the router rows refitted when the plan asks for it."""
    if not refits_router(plan):
        return apply_prune(model, plan)
    try:
        check_uniform(plan)
    except ValueError as err:
        raise PlanError(str(err)) from err
    keep_groups = prune_keeps_groups(model, plan)

    def on_layer(layer: MoELayer, observers: Sequence[Observer]) -> RouterFit | None:
        kept = plan.layers.get(layer.layer_idx)
        if kept is None:
            return None
        x = token_inputs(observers)[0]
        return fit_pruned_layer(layer, kept, x, keep_groups)

    fits: dict[int, RouterFit | None] = calibrated_pass(
        model, plan, calibration, "refits the kept experts' router rows",
        lambda layer: [TokenInputs(layer.num_experts)], on_layer, device, progress, label="router refit")
    section = apply_prune(model, plan)
    layers = {layer.layer_idx: layer for layer in find_moe_layers(model)}
    for idx, fit in fits.items():
        if fit is not None:
            write_router(layers[idx], fit.weight, fit.bias)
    section["prune"]["recalibrate_router"] = True
    section["prune"]["router_fit"] = {str(k): f.summary() for k, f in sorted(fits.items()) if f is not None}
    return section
