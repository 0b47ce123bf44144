"""``plan_prune``: run the layer-wise calibration with the observers a pruning method needs, decide per layer."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

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
from moeslim.methods.prune.config import ROUTING_METHODS, PruneConfig
from moeslim.methods.prune.enumerate import (
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
)
from moeslim.methods.prune.search import search_subset
from moeslim.models import MoELayer, find_moe_layers
from moeslim.plans import Plan, Provenance


def _observers(config: PruneConfig, layer: MoELayer) -> list[Observer]:
    observers: list[Observer] = []
    if config.method in ROUTING_METHODS:
        observers.append(RoutingStats(layer.num_experts))
    if config.method == "enumerate" and not config.score and config.token_fraction == 1:
        # Exact enumeration in bounded memory: every kept set's loss is accumulated batch by batch
        # (a token_fraction < 1 asks for the seeded token sample instead, as before).
        observers.append(SubsetLossAccumulator(enumerate_subsets(layer.num_experts, config.keep), config.chunk_tokens))
    elif config.needs_sample:
        observers.append(ExpertOutputs(fraction=config.token_fraction, seed=config.seed,
                                       max_tokens=config.max_tokens))
    return observers


def _find(observers: Sequence[Observer], kind: type) -> Any:
    return next(o for o in observers if isinstance(o, kind)).result()


def decide_layer(layer: MoELayer, observers: Sequence[Observer], config: PruneConfig) -> dict[str, Any]:
    """The kept set of one layer and its summary entry (kept ids, losses, subsets scored, seconds)."""
    start = time.perf_counter()
    streamed = next((o for o in observers if isinstance(o, SubsetLossAccumulator)), None)
    sample: ExpertOutputSample | None = (
        _find(observers, ExpertOutputs) if config.needs_sample and streamed is None else None)
    device = layer.router_weight.device  # routing may read router buffers (e.g. a correction bias)
    scorer = SubsetScorer(sample, layer.route, config.chunk_tokens, device) if sample is not None else None
    entry: dict[str, Any] = {}
    if streamed is not None:
        found = best_subset(streamed.subsets, streamed.losses())
        kept = found.kept
        entry.update(loss=found.loss, best_alternative=found.best_alternative, worst=found.worst,
                     subsets_scored=found.subsets_scored, tokens=streamed.tokens)
    elif config.method == "enumerate":
        assert scorer is not None
        subsets = enumerate_subsets(layer.num_experts, config.keep)
        found = best_subset(subsets, scorer.losses(subsets))
        kept: tuple[int, ...] = found.kept
        entry.update(loss=found.loss, best_alternative=found.best_alternative, worst=found.worst,
                     subsets_scored=found.subsets_scored)
    elif config.method == "search":
        assert scorer is not None
        result = search_subset(scorer.loss, layer.num_experts, config.keep, beam=config.beam,
                               local_search=config.local_search, budget=config.budget)
        kept = result.kept
        entry.update(loss=result.loss, subsets_scored=result.evaluations, swaps=result.swaps,
                     budget_exhausted=result.budget_exhausted)
    elif config.method == "reap":
        assert sample is not None
        kept = top_experts(reap_scores(sample, layer.route, device), config.keep)
    elif config.method == "random":
        kept = random_subset(layer.num_experts, config.keep, config.seed + layer.layer_idx)
    else:
        routing: RoutingSummary = _find(observers, RoutingStats)
        scores = frequency_scores(routing) if config.method == "frequency" else soft_count_scores(routing)
        kept = top_experts(scores, config.keep)
    if "loss" not in entry and scorer is not None:
        entry["loss"] = scorer.loss(kept)
    if sample is not None:
        entry["tokens"] = sample.tokens
    entry["seconds"] = time.perf_counter() - start
    return {"kept": list(kept), **entry}


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
    """Choose ``config.keep`` experts per MoE layer on ``calibration`` and return a "prune" plan.

    The model is not modified. ``calibration`` is a ``CalibrationSet`` or raw input ids (N, L).
    """
    config.check_model(model)
    input_ids, data_name, data_hash = calibration_fields(calibration)
    start = time.perf_counter()
    if config.method == "random" and not config.score:
        # Random choice needs no data: skip the calibration pass.
        results = {layer.layer_idx: decide_layer(layer, [], config) for layer in find_moe_layers(model)}
    else:
        results = run_layerwise(
            model, input_ids,
            make_observers=lambda layer: _observers(config, layer),
            on_layer=lambda layer, obs: _decision(layer, obs, config),
            propagate="compressed" if config.mode == "progressive" else "original",
            batch_size=batch_size, device=device, progress=progress, checkpoint=checkpoint,
        )
    summary = {
        "method": config.method,
        "num_experts": find_moe_layers(model)[0].num_experts,
        "keep": config.keep,
        "mode": config.mode,
        "layers": {str(idx): {k: v for k, v in r.items() if k != "kept"} for idx, r in sorted(results.items())},
        "seconds": time.perf_counter() - start,
        "calibration_windows": int(input_ids.shape[0]),
        "calibration_seq_len": int(input_ids.shape[1]),
    }
    provenance = Provenance.of(model, model_name, config.method, config.to_dict(), data_name, data_hash)
    layers = {idx: sorted(r["kept"]) for idx, r in results.items()}
    return Plan(kind="prune", layers=layers, provenance=provenance, summary=summary)


def _decision(layer: MoELayer, observers: Sequence[Observer], config: PruneConfig) -> LayerDecision:
    result = decide_layer(layer, observers, config)
    if config.mode != "progressive":
        return LayerDecision(result=result)
    allowed = allowed_mask(result["kept"], layer.num_experts)
    # Later layers see this layer as the pruned model computes it (masked routing on the same input).
    return LayerDecision(result=result, override=lambda x: layer.forward(x, allowed.to(x.device)))
