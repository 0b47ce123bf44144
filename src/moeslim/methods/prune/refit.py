"""Prune plans with a router refit: ``plan_prune``, then the fit's before/after loss per layer in the summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from moeslim.methods.prune.driver import plan_prune
from moeslim.methods.router_fit import TokenInputs, check_uniform, fit_pruned_layer, prune_keeps_groups, token_inputs
from moeslim.models import MoELayer
from moeslim.plans import Plan

__all__ = ["plan_prune_with_router_fit"]


def plan_prune_with_router_fit(model: nn.Module, calibration: Any, config: Any, model_name: str | None = None,
                               device: torch.device | str | None = None, **kwargs: Any) -> Plan:
    """``plan_prune``, and with ``config.recalibrate_router`` the router fit's before/after loss per layer in
    ``summary["router_fit"]`` (the fit itself is re-run by apply on the same windows)."""
    from moeslim.calibrate import LayerDecision, run_layerwise
    from moeslim.data.calibration_set import calibration_fields

    plan = plan_prune(model, calibration, config, model_name, device=device, **kwargs)
    if not getattr(config, "recalibrate_router", False):
        return plan
    check_uniform(plan)
    input_ids, _, _ = calibration_fields(calibration)
    keep_groups = prune_keeps_groups(model, plan)

    def on_layer(layer: MoELayer, observers: Sequence[Any]) -> LayerDecision:
        x = token_inputs(observers)[0]
        return LayerDecision(result=fit_pruned_layer(layer, plan.layers[layer.layer_idx], x, keep_groups).summary())

    fits = run_layerwise(model, input_ids, make_observers=lambda layer: [TokenInputs(layer.num_experts)],
                         on_layer=on_layer, propagate="original", device=device,
                         progress=bool(kwargs.get("progress", False)), label="router refit")
    return replace(plan, summary={**plan.summary, "router_fit": {str(k): v for k, v in sorted(fits.items())}})
