"""Apply a "lowrank" plan: every MoE layer's experts become whitened-SVD factors of the planned ranks (method
'svd-llm': of each expert; 'd2moe': of each expert's delta from the layer's shared base).

The plan holds ranks only. The factors are computed here from the per-expert input covariances on the plan's
calibration windows (which must be passed in, as for GPTQ), then handed to the runtime
(``runtime.lowrank.install_lowrank``); with ``recalibrate_router`` the router rows are refitted in the same pass.
``moeslim.save`` writes the result in the low-rank format (``runtime/lowrank.py``), which ``moeslim.load`` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moeslim.appliers.calibrated_pass import calibrated_pass
from moeslim.calibrate import Observer, result_of
from moeslim.calibrate.hessians import ExpertHessianSummary
from moeslim.config import from_mapping
from moeslim.data.calibration_set import CalibrationSet
from moeslim.methods.lowrank import LowRankConfig, LowRankLayer, lowrank_layer, lowrank_observers
from moeslim.methods.router_fit import token_inputs
from moeslim.models import MoELayer, find_moe_layers
from moeslim.models.expert_edit import write_router
from moeslim.models.expert_math import expert_weight_views
from moeslim.plans import Plan, PlanError
from moeslim.runtime.lowrank import LowRankProjection, install_lowrank, lowrank_storage

__all__ = ["apply_lowrank", "lowrank_config"]


def lowrank_config(plan: Plan) -> LowRankConfig:
    known = set(LowRankConfig.__dataclass_fields__)
    recorded = {k: v for k, v in plan.provenance.config.items() if k in known}
    try:
        return from_mapping(LowRankConfig, recorded, "lowrank plan provenance config")
    except ValueError as err:
        raise PlanError(str(err)) from err


def _plan_ranks(plan: Plan, layers: dict[int, MoELayer], mobe: bool = False
                ) -> dict[int, tuple[list[int], list[int]]]:
    out = {}
    for idx, entry in plan.layers.items():
        if idx not in layers:
            raise PlanError(f"lowrank plan layer {idx} is not a MoE layer of this model (MoE layers: {sorted(layers)})")
        n = layers[idx].num_experts
        try:
            up, down = [int(r) for r in entry["up_ranks"]], [int(r) for r in entry["down_ranks"]]
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"lowrank plan layer {idx}: need up_ranks and down_ranks ({err})") from err
        if len(up) != n or len(down) != n or min(up + down) < 0:
            raise PlanError(f"lowrank plan layer {idx}: need {n} non-negative up and down ranks")
        views = expert_weight_views(layers[idx])
        for name, ranks, weight in (("up_ranks", up, views.up), ("down_ranks", down, views.down)):
            # an (out, in) matrix has at most min(out, in) singular directions; a shared basis spans at most in
            (out_dim, in_dim) = (weight.shape[2], weight.shape[1]) if views.transposed else weight.shape[1:]
            full = int(in_dim) if mobe else min(int(out_dim), int(in_dim))
            over = [(e, r) for e, r in enumerate(ranks) if r > full]
            if over:
                e, r = over[0]
                raise PlanError(f"lowrank plan layers.{idx}.{name}[{e}] = {r} is above the full rank {full} of "
                                f"this model's {views.up_name if name == 'up_ranks' else views.down_name} "
                                f"({tuple(weight.shape[1:])}); use at most {full}")
        out[idx] = (up, down)
    return out


def apply_lowrank(model: nn.Module, plan: Plan, calibration: CalibrationSet | torch.Tensor | None = None,
                  device: torch.device | str | None = None, progress: bool = False) -> dict[str, Any]:
    """Replace the experts by their low-rank factors in place; return the ``lowrank`` config section."""
    if plan.kind != "lowrank":
        raise PlanError(f"apply_lowrank got a {plan.kind!r} plan")
    section = getattr(model.config, "moeslim", None) or {}
    if "quantize" in section or "lowrank" in section:
        raise PlanError("the model's experts are already quantized / low-rank: apply lowrank to float experts")
    config = lowrank_config(plan)
    layers = {layer.layer_idx: layer for layer in find_moe_layers(model)}
    ranks = _plan_ranks(plan, layers, config.method == "mobe")

    def on_layer(layer: MoELayer, observers: Sequence[Observer]) -> LowRankLayer | None:
        if layer.layer_idx not in ranks:
            return None
        hessians = result_of(observers[0], ExpertHessianSummary)
        x = token_inputs(observers)[0] if config.recalibrate_router else None
        return lowrank_layer(layer, hessians, x, config, ranks[layer.layer_idx])

    built: dict[int, LowRankLayer | None] = calibrated_pass(
        model, plan, calibration, "computes whitened SVD factors from calibration covariances",
        lambda layer: lowrank_observers(layer, config), on_layer, device, progress, label="low-rank SVD")
    shared = config.method == "d2moe"
    params_before = params_after = 0
    for idx, result in built.items():
        if result is None:
            continue
        layer = layers[idx]
        views = expert_weight_views(layer)
        dtype, where = views.up.dtype, views.up.device
        params_before += views.up.numel() + views.down.numel()
        if result.router_weight is not None:
            write_router(layer, result.router_weight, result.router_bias)
        for name, projections, base, bases in ((views.up_name, result.up, result.up_base, result.up_bases),
                                               (views.down_name, result.down, result.down_base, result.down_bases)):
            install_lowrank(layer.experts, name, LowRankProjection.from_projections(projections, dtype, where, base,
                                                                                    bases=bases))
        params_after += sum(p.params() for p in lowrank_storage(layer.experts).values())
    return {"lowrank": {
        "layers": {str(idx): {"up_ranks": up, "down_ranks": down, **({"shared_base": True} if shared else {}),
                              **({"bases": config.bases_for(len(up))} if config.method == "mobe" else {})}
                   for idx, (up, down) in sorted(ranks.items())},
        "method": config.method,
        "ratio": config.ratio,
        "param_ratio": params_after / max(params_before, 1),
        "recalibrate_router": config.recalibrate_router,
    }}
