"""``plan_prune``: run the layer-wise calibration with the observers a pruning method needs, decide per layer.

Every loss is the error of the model the plan produces: candidates are scored with the routing the pruned model
runs (``models.select.pruned_routing``: group limits kept for balanced kept sets, or dropped, then scored without
them), and progressive mode scores against the ORIGINAL model's block output on its own inputs. With
``allocation="global"`` each layer reports its loss curve and an exact DP (``allocate.py``) picks the counts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moeslim.calibrate import (
    ExpertOutputs,
    ExpertOutputSample,
    LayerDecision,
    Observer,
    RoutingStats,
    RoutingSummary,
    run_layerwise,
)
from moeslim.calibrate.resume import LayerCheckpoint
from moeslim.data.calibration_set import CalibrationSet, calibration_fields
from moeslim.methods.prune.allocate import allocate_counts
from moeslim.methods.prune.config import ROUTING_METHODS, PruneConfig, PruneShape
from moeslim.methods.prune.enumerate import (
    RouteFn,
    SubsetLossAccumulator,
    SubsetScorer,
    allowed_mask,
    best_subset,
    enumerate_subsets,
)
from moeslim.methods.prune.saliency import (
    frequency_scores,
    random_subset,
    reap_scores,
    soft_count_scores,
    top_experts,
    top_per_group,
)
from moeslim.methods.prune.search import search_subset
from moeslim.models import MoELayer, find_moe_layers
from moeslim.models.select import GroupLimits, group_limits, pruned_routing, resolve_group_policy
from moeslim.plans import Plan, Provenance


class PruneContext:
    """What every layer's decision needs besides its observations (resolved once, before calibration)."""

    def __init__(self, config: PruneConfig, shape: PruneShape, limits: GroupLimits | None) -> None:
        self.config, self.shape = config, shape
        self.limits = limits if shape.groups == "keep" else None  # the balance constraint, when groups stay

    def sizes(self, layer: MoELayer) -> list[int]:
        """Kept sizes to score in this layer (global: the whole curve below E; uniform: keep)."""
        return [k for k in self.shape.sizes if k < layer.num_experts]

    def subsets(self, layer: MoELayer) -> list[tuple[int, ...]]:
        """Every kept set the pruned model can represent, of every size to score."""
        found = [s for k in self.sizes(layer) for s in enumerate_subsets(layer.num_experts, k)]
        if self.limits is not None:
            found = [s for s in found if self.limits.representable(s, layer.num_experts)]
        return found

    def route(self, layer: MoELayer) -> RouteFn:
        return pruned_routing(layer, self.shape.groups)

    @property
    def progressive(self) -> bool:
        return self.config.effective_mode == "progressive"


def _observers(ctx: PruneContext, layer: MoELayer) -> list[Observer]:
    config = ctx.config
    observers: list[Observer] = []
    if config.method in ROUTING_METHODS:
        observers.append(RoutingStats(layer.num_experts))
    if config.method == "enumerate" and not config.score and config.token_fraction == 1:
        # Exact enumeration in bounded memory: every kept set's loss is accumulated batch by batch
        # (a token_fraction < 1 asks for the seeded token sample instead, as before).
        observers.append(SubsetLossAccumulator(ctx.subsets(layer), config.chunk_tokens, ctx.route(layer),
                                               targets=ctx.progressive))
    elif config.needs_sample:
        observers.append(ExpertOutputs(fraction=config.token_fraction, seed=config.seed,
                                       max_tokens=config.max_tokens))
    return observers


def _find(observers: Sequence[Observer], kind: type) -> Any:
    return next(o for o in observers if isinstance(o, kind)).result()


def _offset(layer: MoELayer, sample: ExpertOutputSample) -> Tensor | None:
    """Progressive offset d = F(x') - F(x) (T, H) of the sampled tokens; None without targets."""
    if sample.target is None:
        return None
    weight = layer.router_weight
    return layer.forward(sample.x.to(weight.device, weight.dtype)).float().cpu() - sample.target.float()


def _curve_entry(kept_by_size: dict[int, tuple[tuple[int, ...], float]]) -> dict[str, Any]:
    return {str(k): {"kept": list(kept), "loss": loss} for k, (kept, loss) in sorted(kept_by_size.items())}


def decide_layer(layer: MoELayer, observers: Sequence[Observer], config: PruneConfig,
                 ctx: PruneContext | None = None) -> dict[str, Any]:
    """The kept set of one layer and its summary entry (kept ids, losses, subsets scored, seconds).

    allocation="global": also ``curve`` {size: {kept, loss}} (the best kept set of every size scored).
    """
    ctx = ctx if ctx is not None else _layer_context(config, layer)
    start = time.perf_counter()
    streamed = next((o for o in observers if isinstance(o, SubsetLossAccumulator)), None)
    sample: ExpertOutputSample | None = (
        _find(observers, ExpertOutputs) if config.needs_sample and streamed is None else None)
    if ctx.progressive and sample is not None and sample.target is None:
        raise ValueError("progressive scoring needs the original model's block outputs (run with targets)")
    device = layer.router_weight.device  # routing may read router buffers (e.g. a correction bias)
    route = ctx.route(layer)
    scorer = (SubsetScorer(sample, layer.route, config.chunk_tokens, device, candidate_route=route,
                           offset=_offset(layer, sample)) if sample is not None else None)
    n_group = ctx.limits.n_group if ctx.limits is not None else 1
    entry: dict[str, Any] = {}
    curve: dict[int, tuple[tuple[int, ...], float]] = {}
    if config.method == "enumerate":
        subsets = streamed.subsets if streamed is not None else ctx.subsets(layer)
        if streamed is not None:
            losses = streamed.losses()
        elif scorer is not None:
            losses = scorer.losses(subsets)
        else:  # needs_sample is true for enumerate unless a streamed scorer replaces the sample
            raise ValueError("enumerate needs the expert-output sample or the streamed scorer")
        for size in ctx.sizes(layer):
            index = [i for i, s in enumerate(subsets) if len(s) == size]
            found = best_subset([subsets[i] for i in index], losses[index])
            curve[size] = (found.kept, found.loss)
            if size == config.keep:
                entry.update(loss=found.loss, best_alternative=found.best_alternative, worst=found.worst)
        entry["subsets_scored"] = len(subsets)
        if streamed is not None:
            entry["tokens"] = streamed.tokens
        kept = curve[config.keep][0] if config.keep in curve else curve[max(curve)][0]
    elif config.method == "search":
        assert scorer is not None
        kept, curve = _search(scorer, layer, ctx, entry)
    elif config.method == "reap":
        assert sample is not None
        scores = reap_scores(sample, layer.route, device)
        kept = top_per_group(scores, config.keep // n_group, n_group) if n_group > 1 else top_experts(
            scores, config.keep)
    elif config.method == "random":
        kept = random_subset(layer.num_experts, config.keep, config.seed + layer.layer_idx, n_group)
    else:
        routing: RoutingSummary = _find(observers, RoutingStats)
        scores = frequency_scores(routing) if config.method == "frequency" else soft_count_scores(routing)
        kept = top_per_group(scores, config.keep // n_group, n_group) if n_group > 1 else top_experts(
            scores, config.keep)
    if "loss" not in entry and scorer is not None:
        entry["loss"] = scorer.loss(kept)
    if sample is not None:
        entry["tokens"] = sample.tokens
    if config.allocation == "global":
        curve[layer.num_experts] = (tuple(range(layer.num_experts)), 0.0)
        entry["curve"] = _curve_entry(curve)
    entry["seconds"] = time.perf_counter() - start
    return {"kept": list(kept), **entry}


def _search(scorer: SubsetScorer, layer: MoELayer, ctx: PruneContext, entry: dict[str, Any]
            ) -> tuple[tuple[int, ...], dict[int, tuple[tuple[int, ...], float]]]:
    """Search the kept set (and, for allocation=global, the curve); fills ``entry``."""
    config, limits = ctx.config, ctx.limits
    num_experts = layer.num_experts
    groups = [e // (num_experts // limits.n_group) for e in range(num_experts)] if limits is not None else None
    curve: dict[int, tuple[tuple[int, ...], float]] = {}
    evaluations, exhausted, swaps = 0, False, 0
    if config.allocation == "global" and limits is None:
        # One removal path gives the best state of every size; local search only at the smallest size.
        result = search_subset(scorer.loss, num_experts, min(ctx.sizes(layer)), beam=config.beam,
                               local_search=config.local_search, budget=config.budget, path=True)
        curve = {k: v for k, v in result.path.items() if k in ctx.sizes(layer)}
        evaluations, exhausted, swaps = result.evaluations, result.budget_exhausted, result.swaps
    else:
        # Balanced sizes need their own constrained search (removal states in between are not balanced).
        for size in ctx.sizes(layer) if config.allocation == "global" else [config.keep]:
            per_group = size // limits.n_group if limits is not None else None
            result = search_subset(scorer.loss, num_experts, size, beam=config.beam,
                                   local_search=config.local_search, budget=config.budget,
                                   groups=groups, per_group=per_group)
            curve[size] = (result.kept, result.loss)
            evaluations += result.evaluations
            exhausted |= result.budget_exhausted
            swaps += result.swaps
    entry.update(subsets_scored=evaluations, swaps=swaps, budget_exhausted=exhausted)
    if config.keep in curve:
        entry["loss"] = curve[config.keep][1]
        return curve[config.keep][0], curve
    return curve[max(curve)][0], curve


def _layer_context(config: PruneConfig, layer: MoELayer) -> PruneContext:
    """The context of a uniform plan resolved from one layer (``decide_layer`` called on its own)."""
    if config.allocation != "uniform":
        raise ValueError("allocation='global' decides over all layers: call plan_prune")
    limits = group_limits(layer.config)
    shape = PruneShape(sizes=(config.keep,), total=None, layout=None,
                       groups=resolve_group_policy(limits, [config.keep], config.groups))
    return PruneContext(config, shape, limits)


def plan_prune(
    model: nn.Module,
    calibration: CalibrationSet | torch.Tensor,
    config: PruneConfig,
    model_name: str | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = False,
    checkpoint: LayerCheckpoint | None = None,
) -> Plan:
    """Choose the experts every MoE layer keeps on ``calibration`` and return a "prune" plan.

    The model is not modified. ``calibration`` is a ``CalibrationSet`` or raw input ids (N, L).
    """
    shape = config.check_model(model)
    ctx = PruneContext(config, shape, group_limits(model))
    input_ids, data_name, data_hash = calibration_fields(calibration)
    start = time.perf_counter()
    if config.method == "random" and not config.score:
        # Random choice needs no data: skip the calibration pass.
        results = {layer.layer_idx: decide_layer(layer, [], config, ctx) for layer in find_moe_layers(model)}
    else:
        results = run_layerwise(
            model, input_ids,
            make_observers=lambda layer: _observers(ctx, layer),
            on_layer=lambda layer, obs: _decision(layer, obs, ctx),
            propagate="compressed" if ctx.progressive else "original",
            batch_size=batch_size, device=device, progress=progress, checkpoint=checkpoint,
            targets=ctx.progressive,
        )
    summary: dict[str, Any] = {
        "method": config.method,
        "num_experts": find_moe_layers(model)[0].num_experts,
        "keep": config.keep,
        "mode": config.effective_mode,
        "allocation": config.allocation,
        "groups": shape.groups,
    }
    if config.allocation == "global":
        _allocate(results, shape)
        summary.update(total_keep=shape.total, layout=shape.layout,
                       experts_per_layer={str(i): len(r["kept"]) for i, r in sorted(results.items())})
    summary.update(
        layers={str(idx): {k: v for k, v in r.items() if k != "kept"} for idx, r in sorted(results.items())},
        seconds=time.perf_counter() - start,
        calibration_windows=int(input_ids.shape[0]),
        calibration_seq_len=int(input_ids.shape[1]),
    )
    provenance = Provenance.of(model, model_name, config.method, config.to_dict(), data_name, data_hash)
    layers = {idx: sorted(r["kept"]) for idx, r in results.items()}
    return Plan(kind="prune", layers=layers, provenance=provenance, summary=summary)


def _allocate(results: dict[int, dict[str, Any]], shape: PruneShape) -> None:
    """Per-layer counts by the exact DP on the squared loss curves; sets each layer's kept set and loss."""
    assert shape.total is not None
    curves = {idx: {int(k): float(v["loss"]) ** 2 for k, v in r["curve"].items()} for idx, r in results.items()}
    counts = allocate_counts(curves, shape.total)
    for idx, r in results.items():
        chosen = r["curve"][str(counts[idx])]
        r["kept"], r["loss"] = chosen["kept"], chosen["loss"]
        r.pop("best_alternative", None)
        r.pop("worst", None)


def _decision(layer: MoELayer, observers: Sequence[Observer], ctx: PruneContext) -> LayerDecision:
    result = decide_layer(layer, observers, ctx.config, ctx)
    if not ctx.progressive:
        return LayerDecision(result=result)
    allowed = allowed_mask(result["kept"], layer.num_experts)
    route = ctx.route(layer)

    def pruned(x: Tensor) -> Tensor:
        """The block as the pruned model computes it (its routing, on the same input)."""
        weights, ids = route(layer.router_logits(x), allowed.to(x.device))
        out = layer.experts(x, ids, weights)
        shared = layer.shared_output(x)
        return out if shared is None else out + shared

    # Later layers see this layer as the pruned model computes it.
    return LayerDecision(result=result, override=pruned)
