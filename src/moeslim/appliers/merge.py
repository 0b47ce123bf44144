"""Apply a "merge" plan (a standard checkpoint results either way).

The plan holds the groups, merge weights and representatives. Here the merged experts are computed
(``methods.merge.merge_layer``: weight-matching permutations, frequency-weighted averages). Then:

- router='keep' (the papers'): the router is untouched (refitted only with recalibrate_router) and every
  expert slot gets its group's merged weights. The model keeps E experts per layer, so the saved checkpoint has
  the original size: fused (E, ...) tensors cannot share rows, and stock transformers has no slot -> expert map.
- compression (MC-SMoE's stage 2, ``compress_rank`` / ``compress_ratio``): the merged experts' projections are
  installed in the low-rank runtime (``runtime/lowrank.py``) as factors + kept residual rows, one stored expert
  per group; with router='keep' every slot points at its group's (the checkpoint holds K experts, not E copies).
  ``moeslim.save`` then writes the low-rank form, which ``moeslim.load`` reads (stock transformers cannot).
- router='fit': with fit_rows='lse-fit' or recalibrate_router the K router rows are fitted on the plan's
  calibration windows (passed in, as for GPTQ); ``select_experts`` shrinks every layer to the representatives
  (config expert count, router rows, biases, group limits handled as for pruning) and the merged tensors are
  written over them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moeslim.appliers.calibrated_pass import calibrated_pass
from moeslim.calibrate import Observer
from moeslim.config import from_mapping
from moeslim.data.calibration_set import CalibrationSet
from moeslim.methods.merge import LayerGroups, MergeConfig, MergedLayer, merge_layer
from moeslim.methods.merge.driver import merged_block
from moeslim.methods.router_fit import TokenInputs, token_inputs
from moeslim.models import MoELayer, find_moe_layers, masked_routing_is_identity, select_experts
from moeslim.models.expert_edit import write_experts, write_router
from moeslim.models.expert_math import expert_weight_views
from moeslim.plans import Plan, PlanError
from moeslim.runtime.lowrank import LowRankProjection, install_lowrank

__all__ = ["apply_merge", "merge_config", "plan_groups"]


def merge_config(plan: Plan) -> MergeConfig:
    """The MergeConfig the plan was made with (its provenance config)."""
    known = set(MergeConfig.__dataclass_fields__)
    recorded = {k: v for k, v in plan.provenance.config.items() if k in known}
    if recorded.get("router") in ("lse-fit", "representative"):  # plans from before router='keep' existed
        recorded["fit_rows"], recorded["router"] = recorded["router"], "fit"
    try:
        return from_mapping(MergeConfig, recorded, "merge plan provenance config")
    except ValueError as err:
        raise PlanError(str(err)) from err


def plan_groups(plan: Plan, layers: dict[int, MoELayer], router: str = "fit") -> dict[int, LayerGroups]:
    """The plan's per-layer groups, validated against the model (every MoE layer, a partition; router='fit':
    the same K in every layer, at least top_k)."""
    missing = sorted(set(layers) - set(plan.layers))
    unknown = sorted(set(plan.layers) - set(layers))
    if missing or unknown:
        raise PlanError(f"merge plan layers do not fit this model: MoE layers {sorted(layers)}, "
                        f"plan layers {sorted(plan.layers)}")
    out: dict[int, LayerGroups] = {}
    for idx, entry in plan.layers.items():
        try:
            decision = LayerGroups([[int(e) for e in g] for g in entry["groups"]],
                                   [[float(w) for w in ws] for ws in entry["weights"]],
                                   [int(r) for r in entry["representatives"]])
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"merge plan layer {idx}: need groups, weights, representatives ({err})") from err
        n = layers[idx].num_experts
        flat = sorted(e for g in decision.groups for e in g)
        if flat != list(range(n)):
            raise PlanError(f"merge plan layer {idx}: groups {decision.groups} are not a partition of {n} experts")
        if [len(w) for w in decision.weights] != [len(g) for g in decision.groups] or any(
                r not in g for r, g in zip(decision.representatives, decision.groups, strict=True)):
            raise PlanError(f"merge plan layer {idx}: weights / representatives do not match the groups")
        if decision.representatives != sorted(decision.representatives):
            raise PlanError(f"merge plan layer {idx}: groups must be ordered by representative")
        if router == "fit" and len(decision.groups) < layers[idx].top_k:
            raise PlanError(f"merge plan layer {idx}: {len(decision.groups)} groups is below top_k "
                            f"{layers[idx].top_k}")
        out[idx] = decision
    if router == "fit" and len({len(d.groups) for d in out.values()}) != 1:
        raise PlanError("merge plan: every MoE layer must keep the same number of experts")
    return out


def apply_merge(model: nn.Module, plan: Plan, calibration: CalibrationSet | torch.Tensor | None = None,
                device: torch.device | str | None = None, progress: bool = False) -> dict[str, Any]:
    """Merge the experts in place; return the ``merge`` entry of the moeslim config section."""
    if plan.kind != "merge":
        raise PlanError(f"apply_merge got a {plan.kind!r} plan")
    config = merge_config(plan)
    layers = {layer.layer_idx: layer for layer in find_moe_layers(model)}
    decisions = plan_groups(plan, layers, config.router)
    reps = {idx: d.representatives for idx, d in decisions.items()}
    keep_groups = masked_routing_is_identity(model, reps)
    before = max(layer.num_experts for layer in layers.values())
    if config.needs_data_in_apply:
        def on_layer(layer: MoELayer, observers: Sequence[Observer]) -> MergedLayer:
            x, _, _ = token_inputs(observers)
            return merge_layer(layer, decisions[layer.layer_idx], x, config, keep_groups)

        merged: dict[int, MergedLayer] = calibrated_pass(
            model, plan, calibration, "fits the merged router rows",
            lambda layer: [TokenInputs(layer.num_experts, config.max_tokens)], on_layer, device, progress,
            label="merge", override=merged_block if config.mode == "progressive" else None)
    else:
        merged = {idx: merge_layer(layers[idx], d, None, config, keep_groups) for idx, d in decisions.items()}
    if config.router == "fit":
        select_experts(model, reps)
    stored: dict[str, dict[str, Any]] = {}
    for idx, layer in layers.items():  # views stay valid after select_experts
        m = merged[idx]
        write_experts(layer, m.slot_experts())
        write_router(layer, m.router_weight, m.router_bias, m.correction)
        if m.compressed is not None:
            stored[str(idx)] = _install_compressed(layer, m)
    unique = sum(len(d.groups) for d in decisions.values())
    compressed = {"lowrank": {"layers": stored, "method": f"{config.method} compression",
                              "compress_rank": config.compress_rank, "compress_ratio": config.compress_ratio,
                              "compress_sparse": config.compress_sparse}} if stored else {}
    return {**compressed, "merge": {
        "method": plan.provenance.method,
        "experts_before": before,
        "experts_after": max(layer.num_experts for layer in layers.values()),
        "unique_experts": {str(idx): len(d.groups) for idx, d in sorted(decisions.items())},
        "unique_expert_ratio": unique / (before * len(decisions)),
        "router": config.router,
        "recalibrate_router": config.recalibrate_router,
        "groups": {str(idx): d.groups for idx, d in sorted(decisions.items())},
        "compress": bool(stored),
    }}


def _install_compressed(layer: MoELayer, merged: MergedLayer) -> dict[str, Any]:
    """Replace the layer's expert weights by the compressed merged experts (low-rank runtime, one stored expert
    per group, every router slot pointing at its group's); return the layer's entry of the lowrank section."""
    c = merged.compressed
    if c is None:
        raise ValueError("this merged layer was not compressed")
    views = expert_weight_views(layer)
    dtype, where = views.up.dtype, views.up.device
    for name, factors, sparse in ((views.up_name, c.up, c.up_sparse), (views.down_name, c.down, c.down_sparse)):
        install_lowrank(layer.experts, name, LowRankProjection.from_projections(
            factors, dtype, where, sparse=sparse, slots=merged.slots))
    entry: dict[str, Any] = {
        "up_ranks": [min(views.up.shape[1:]) if len(f) == 1 else int(f[0].shape[1]) for f in c.up],
        "down_ranks": [min(views.down.shape[1:]) if len(f) == 1 else int(f[0].shape[1]) for f in c.down],
        "up_sparse_rows": c.info["up_sparse_rows"], "down_sparse_rows": c.info["down_sparse_rows"]}
    if merged.slots is not None:
        entry["slots"] = list(merged.slots)
    return entry
