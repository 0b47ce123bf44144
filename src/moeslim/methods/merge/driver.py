"""``plan_merge``: group every MoE layer's experts on calibration tokens; ``merge_layer`` builds the merged block.

The planner records per layer the groups, the members' merge weights (routed-token shares) and the
representative of each group. Everything else is recomputed deterministically by ``merge_layer``, in the planner
(to report the losses) and again in ``apply``: the neuron permutations (weight matching needs only the weights),
the merged weights, and with router='fit' the K router rows (fitted on the plan's calibration windows, as GPTQ
runs in apply). With router='keep' (the papers') the E router rows stay and every slot computes its group's
merged expert. MC-SMoE's global group counts come from a first pass over all layers' routing counts.
"""

from __future__ import annotations

import functools
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moeslim.calibrate import LayerDecision, Observer, RoutingStats, RoutingSummary, result_of, run_layerwise
from moeslim.calibrate.runner import BlockOverride
from moeslim.data.calibration_set import CalibrationSet, calibration_fields
from moeslim.methods.merge.combine import (
    group_logit,
    lstsq_rows,
    match_neurons,
    merge_group,
    neuron_features,
    permute_expert,
)
from moeslim.methods.merge.compress_layer import CompressedExperts, compress_merged, served_covariances
from moeslim.methods.merge.config import MergeConfig
from moeslim.methods.merge.grouping import (
    average_linkage_groups,
    dominant_groups,
    frequency_weights,
    global_group_counts,
    pairwise_distance,
    representative,
)
from moeslim.methods.router_fit import (
    RouterFit,
    TokenInputs,
    block_loss,
    compressed_route,
    fit_router,
    is_sigmoid_router,
    layer_logits,
    original_routed,
    routed_output,
    token_inputs,
)
from moeslim.models import MoELayer, find_moe_layers, masked_routing_is_identity
from moeslim.models.expert_edit import (
    ExpertMatrices,
    compressed_outputs,
    neuron_rows,
    read_experts,
    router_bias,
)
from moeslim.plans import Plan, Provenance

__all__ = ["LayerGroups", "MergedLayer", "choose_groups", "merge_layer", "merged_block", "plan_merge"]

_CHUNK = 4096


@dataclass(frozen=True)
class LayerGroups:
    """One layer's merge decision: groups (sorted members), merge weights per member, representatives.

    Groups are ordered by representative id: merged expert j of the result is group j.
    """

    groups: list[list[int]]
    weights: list[list[float]]
    representatives: list[int]

    def to_json(self) -> dict[str, Any]:
        return {"groups": self.groups, "weights": self.weights, "representatives": self.representatives}


@dataclass(frozen=True)
class MergedLayer:
    """The merged block of one layer: K merged experts and the router.

    router='fit': router rows (K, H) (+ bias, correction bias (K,)), ``slots`` None. router='keep': the E original
    router rows (refitted with recalibrate_router), ``slots`` (E,) the merged expert each original slot computes.
    With the compression stage, ``compressed`` holds the low-rank + sparse storage and ``experts`` the matrices it
    computes with.
    """

    experts: ExpertMatrices
    router_weight: Tensor
    router_bias: Tensor | None
    correction: Tensor | None
    info: dict[str, Any]
    slots: list[int] | None = None
    compressed: CompressedExperts | None = None  # the compression stage's storage; ``experts`` what it computes

    def slot_experts(self) -> ExpertMatrices:
        """The experts as the saved model stores them: K for router='fit', E (members repeat their merge) for
        router='keep'."""
        if self.slots is None:
            return self.experts
        index = torch.tensor(self.slots)
        m = self.experts
        return ExpertMatrices(up=m.up[index], down=m.down[index],
                              up_bias=None if m.up_bias is None else m.up_bias[index],
                              down_bias=None if m.down_bias is None else m.down_bias[index],
                              norm=None if m.norm is None else m.norm[index])

    def outputs(self, layer: MoELayer, x: Tensor) -> Tensor:
        """(T, H) -> (T, K or E, H) what every router row's expert outputs (merged experts computed once)."""
        out = compressed_outputs(layer, self.experts, x)  # (T, K, H)
        return out if self.slots is None else out[:, self.slots]


@torch.no_grad()
def _mean_outputs(layer: MoELayer, x: Tensor) -> Tensor:
    """(T, H) -> (E, H) every expert's mean output over the tokens (HC-SMoE's expert feature)."""
    device = layer.router_weight.device
    total = torch.zeros(layer.num_experts, x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], _CHUNK):
        chunk = x[start:start + _CHUNK].to(device=device, dtype=layer.router_weight.dtype)
        total += layer.expert_outputs(chunk).double().sum(0).cpu()
    return total / max(x.shape[0], 1)


def choose_groups(layer: MoELayer, x: Tensor, counts: Tensor, config: MergeConfig, keep: int | None = None
                  ) -> LayerGroups:
    """Group the layer's experts into ``keep`` (default ``config.keep``) groups on tokens x (T, H) with routed
    counts (E,)."""
    k = config.keep if keep is None else keep
    if config.method == "hc-smoe":
        groups = average_linkage_groups(pairwise_distance(_mean_outputs(layer, x), str(config.metric)), k)
    else:
        logits = layer_logits(layer, x)  # (T, E)
        unit = logits.double() / logits.double().norm(dim=0, keepdim=True).clamp_min(1e-12)
        groups = dominant_groups(unit.T @ unit, counts, k)
    weights = [frequency_weights(g, counts) for g in groups]
    reps = [representative(g, w) for g, w in zip(groups, weights, strict=True)]
    order = sorted(range(len(groups)), key=lambda i: reps[i])
    return LayerGroups([groups[i] for i in order], [weights[i] for i in order], [reps[i] for i in order])


@torch.no_grad()
def _merged_experts(layer: MoELayer, decision: LayerGroups, align: bool) -> ExpertMatrices:
    mats = read_experts(layer)
    rows = neuron_rows(layer) if align else None
    merged = []
    for group, weights, rep in zip(decision.groups, decision.weights, decision.representatives, strict=True):
        members = []
        ref = neuron_features(mats, rep, rows) if rows is not None else None
        for e in group:
            if rows is None or ref is None:
                members.append(_one(mats, e))
                continue
            perm = torch.arange(mats.intermediate) if e == rep else match_neurons(ref, neuron_features(mats, e, rows))
            members.append(permute_expert(mats, e, rows, perm))
        merged.append(merge_group(members, weights))
    return ExpertMatrices(
        up=torch.cat([m.up for m in merged]), down=torch.cat([m.down for m in merged]),
        up_bias=None if mats.up_bias is None else torch.cat(_biases([m.up_bias for m in merged])),
        down_bias=None if mats.down_bias is None else torch.cat(_biases([m.down_bias for m in merged])),
        norm=None if mats.norm is None else torch.cat(_biases([m.norm for m in merged])),
    )


def _biases(parts: list[Tensor | None]) -> list[Tensor]:
    """The merged groups' biases (or per-expert norm rows) of a layer that has them (each group's merge keeps
    them)."""
    present = [p for p in parts if p is not None]
    if len(present) != len(parts):
        raise ValueError("a merged group lost its bias")
    return present


def _one(mats: ExpertMatrices, e: int) -> ExpertMatrices:
    return ExpertMatrices(up=mats.up[e][None], down=mats.down[e][None],
                          up_bias=None if mats.up_bias is None else mats.up_bias[e][None],
                          down_bias=None if mats.down_bias is None else mats.down_bias[e][None],
                          norm=None if mats.norm is None else mats.norm[e][None])


def _router_rows(layer: MoELayer, decision: LayerGroups, x: Tensor | None, config: MergeConfig
                 ) -> tuple[Tensor, Tensor | None]:
    """Merged router rows (K, H) and bias (K,): lse-fit on x, or the representatives' rows (router='fit')."""
    weight = layer.router_weight.detach().float().cpu()
    rbias = router_bias(layer)
    rbias = None if rbias is None else rbias.detach().float().cpu()
    reps = torch.tensor(decision.representatives)
    rows, bias = weight[reps].clone(), None if rbias is None else rbias[reps].clone()
    if config.fit_rows == "representative":
        return rows, bias
    if x is None:
        raise ValueError("router='lse-fit' needs the calibration tokens")
    logits = layer_logits(layer, x)  # (T, E)
    sigmoid = is_sigmoid_router(layer)
    multi = [j for j, g in enumerate(decision.groups) if len(g) > 1]  # one-expert groups keep their row exactly
    if multi:
        y = torch.stack([group_logit(logits, decision.groups[j], sigmoid) for j in multi], dim=1)  # (T, |multi|)
        fit_w, fit_b = lstsq_rows(x, y, rbias is not None, config.ridge)
        rows[multi] = fit_w
        if bias is not None and fit_b is not None:
            bias[multi] = fit_b
    return rows, bias


def _correction(layer: MoELayer, decision: LayerGroups) -> Tensor | None:
    corr = layer.correction_bias()
    if corr is None:
        return None
    c = corr.detach().float().cpu()
    return torch.stack([functools.reduce(operator.add, (w * c[e] for e, w in zip(g, ws, strict=True)))
                        for g, ws in zip(decision.groups, decision.weights, strict=True)])


def merge_layer(layer: MoELayer, decision: LayerGroups, x: Tensor | None, config: MergeConfig,
                keep_groups: bool | None = None) -> MergedLayer:
    """The merged block of ``layer`` for ``decision`` (the model is not modified).

    x (T, H): calibration tokens (needed for router='lse-fit', the losses and the router refit).
    ``keep_groups``: whether group limits survive (default: decided from this layer's representatives).
    """
    start = time.perf_counter()
    experts = _merged_experts(layer, decision, bool(config.align))
    slots: list[int] | None = None
    if config.router == "keep":  # every slot keeps its router row and computes its group's merged expert
        slots = [0] * layer.num_experts
        for j, group in enumerate(decision.groups):
            for e in group:
                slots[e] = j
        weight = layer.router_weight.detach().float().cpu().clone()
        rbias = router_bias(layer)
        bias = None if rbias is None else rbias.detach().float().cpu().clone()
        corr = layer.correction_bias()
        correction = None if corr is None else corr.detach().float().cpu().reshape(-1).clone()
        keep_groups = True  # all E experts stay, so do the routing groups
    else:
        weight, bias = _router_rows(layer, decision, x, config)
        correction = _correction(layer, decision)
        if keep_groups is None:
            keep_groups = masked_routing_is_identity(layer.config, {layer.layer_idx: decision.representatives})
    info: dict[str, Any] = {"keep_groups": bool(keep_groups)}
    compressed = None
    if config.compresses:  # MC-SMoE's stage 2: low-rank + structured sparse merged experts
        covariances = None
        if config.compress_whiten:
            if x is None:
                raise ValueError("the compression stage needs the calibration tokens (compress_whiten)")
            covariances = served_covariances(layer, experts, x, compressed_route(layer, correction, keep_groups),
                                             weight, bias, slots)
        compressed = compress_merged(experts, covariances, config)
        experts = compressed.dense
        info["compress"] = compressed.info
    if x is not None:
        route = compressed_route(layer, correction, keep_groups)
        outputs = MergedLayer(experts, weight, bias, correction, info, slots).outputs(layer, x)  # (T, K or E, H)
        target = original_routed(layer, x)
        info["loss"] = block_loss(x, outputs, target, route, weight, bias)
        info["tokens"] = int(x.shape[0])
        if config.recalibrate_router:
            fit: RouterFit = fit_router(x, outputs, target, route, weight, bias)
            weight, bias = fit.weight, fit.bias
            info["router_fit"] = fit.summary()
            info["loss"] = fit.loss_after
    info["seconds"] = time.perf_counter() - start
    return MergedLayer(experts, weight, bias, correction, info, slots, compressed)


def merged_block(layer: MoELayer, merged: MergedLayer) -> BlockOverride:
    """(T, H) -> (T, H): the merged block of ``layer`` as the merged model computes it (shared experts included)."""
    route = compressed_route(layer, merged.correction, bool(merged.info["keep_groups"]))
    weight = merged.router_weight.float()
    bias = None if merged.router_bias is None else merged.router_bias.float()

    @torch.no_grad()
    def forward(x: Tensor) -> Tensor:
        logits = x.float() @ weight.T.to(x.device)  # (T, K)
        w, ids = route(logits if bias is None else logits + bias.to(x.device))
        out = routed_output(merged.outputs(layer, x), w.float().cpu(), ids.cpu())  # (T, H)
        out = out.to(device=x.device, dtype=x.dtype)
        shared = layer.shared_output(x)
        return out if shared is None else out + shared

    return forward


def _global_counts(model: nn.Module, input_ids: Tensor, config: MergeConfig, batch_size: int,
                   device: torch.device | str | None, progress: bool) -> dict[int, int]:
    """MC-SMoE's per-layer group counts from every layer's routed counts on the original model (one extra
    calibration pass: the allocation needs all layers before the first is grouped)."""
    def on_layer(layer: MoELayer, observers: Sequence[Observer]) -> LayerDecision:
        return LayerDecision(result=result_of(observers[0], RoutingSummary).counts)

    counts: dict[int, Tensor] = run_layerwise(
        model, input_ids, make_observers=lambda layer: [RoutingStats(layer.num_experts)], on_layer=on_layer,
        propagate="original", batch_size=batch_size, device=device, progress=progress, label="routing counts")
    return global_group_counts(counts, config.keep)


def plan_merge(
    model: nn.Module,
    calibration: CalibrationSet | torch.Tensor,
    config: MergeConfig,
    model_name: str | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Plan:
    """Group every MoE layer's experts into ``config.keep`` merged experts; return a "merge" plan.

    The model is not modified. ``calibration`` is a ``CalibrationSet`` or raw input ids (N, L).
    """
    config.check_model(model)
    input_ids, data_name, data_hash = calibration_fields(calibration)
    start = time.perf_counter()

    progressive = config.mode == "progressive"
    per_layer = _global_counts(model, input_ids, config, batch_size, device, progress) \
        if config.counts == "global" else {}

    def on_layer(layer: MoELayer, observers: Sequence[Observer]) -> LayerDecision:
        x, counts, tokens = token_inputs(observers)
        decision = choose_groups(layer, x, counts, config, per_layer.get(layer.layer_idx))
        merged = merge_layer(layer, decision, x, config)
        result = {**decision.to_json(), **merged.info, "calibration_tokens": tokens}
        # Progressive: later layers see this one as the merged model computes it.
        return LayerDecision(result=result, override=merged_block(layer, merged) if progressive else None)

    results: dict[int, dict[str, Any]] = run_layerwise(
        model, input_ids,
        make_observers=lambda layer: [TokenInputs(layer.num_experts, config.max_tokens)],
        on_layer=on_layer, propagate="compressed" if progressive else "original", batch_size=batch_size,
        device=device, progress=progress,
    )
    layers = {idx: {k: r[k] for k in ("groups", "weights", "representatives")} for idx, r in results.items()}
    summary = {
        "method": config.method,
        "num_experts": find_moe_layers(model)[0].num_experts,
        "keep": config.keep,
        "mode": config.mode,
        "router": config.router,
        "counts": config.counts,
        "groups_per_layer": {str(idx): len(r["groups"]) for idx, r in sorted(results.items())},
        "align": config.align,
        "compress": config.compresses,
        "recalibrate_router": config.recalibrate_router,
        "apply_needs_calibration": config.needs_data_in_apply,
        "layers": {str(idx): {k: v for k, v in r.items() if k not in layers[idx]}
                   for idx, r in sorted(results.items())},
        "seconds": time.perf_counter() - start,
        "calibration_windows": int(input_ids.shape[0]),
        "calibration_seq_len": int(input_ids.shape[1]),
    }
    provenance = Provenance.of(model, model_name, config.method, config.to_dict(), data_name, data_hash)
    return Plan(kind="merge", layers=layers, provenance=provenance, summary=summary)
