"""``plan_lowrank``: per-expert ranks of whitened SVD factors per MoE layer; ``lowrank_layer`` builds them.

method 'svd-llm': each expert's own whitened SVD, ranks allocated greedily across the layer's experts.
method 'd2moe': a Fisher-weighted shared base per projection kind (``shared_base.fisher_base``) and each expert's
whitened SVD of its delta, one delta rank for every expert (``allocate.shared_base_rank``).
method 'mobe': each expert A_e B_e with B_e a mixture of a few bases shared by the layer's experts
(``mobe.fit_mobe``), one rank per projection kind (``mobe.mobe_rank``).

The plan holds the ranks. The factors are recomputed deterministically by ``lowrank_layer`` from the layer's
per-expert input covariances on the plan's calibration windows, in the planner (to report the losses) and in
``apply`` (as GPTQ runs in apply): nothing but integers goes into the JSON.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moeslim.calibrate import LayerDecision, Observer, result_of, run_layerwise
from moeslim.calibrate.hessians import ExpertHessians, ExpertHessianSummary
from moeslim.data.calibration_set import CalibrationSet, calibration_fields
from moeslim.methods.lowrank.allocate import allocate_ranks, projection_params, shared_base_rank
from moeslim.methods.lowrank.config import LowRankConfig
from moeslim.methods.lowrank.mobe import fit_mobe, mobe_params, mobe_rank
from moeslim.methods.lowrank.shared_base import fisher_base
from moeslim.methods.router_fit import (
    TokenInputs,
    block_loss,
    compressed_route,
    fit_router,
    original_routed,
    token_inputs,
)
from moeslim.methods.whitened_svd import WhitenedSVD, is_dense, whitened_svd, whitening
from moeslim.models import MoELayer
from moeslim.models.expert_edit import ExpertMatrices, compressed_outputs, read_experts, router_bias
from moeslim.plans import Plan, Provenance

__all__ = ["LowRankLayer", "Projection", "layer_svds", "lowrank_layer", "lowrank_observers", "plan_lowrank"]

# One stored projection of one expert: the dense matrix (out, in), or factors A (out, r), B (r, in).
Projection = tuple[Tensor] | tuple[Tensor, Tensor]


@dataclass(frozen=True)
class LowRankLayer:
    """One layer's low-rank experts: per expert the stored up / down projections ((out, in) orientation; deltas
    from ``up_base`` / ``down_base`` (out, in) when those are set, D2-MoE), the router rows (E, H) (+ bias) when
    refitted, and the summary entry."""

    up: list[Projection]
    down: list[Projection]
    router_weight: Tensor | None
    router_bias: Tensor | None
    info: dict[str, Any]
    up_base: Tensor | None = None
    down_base: Tensor | None = None
    up_bases: tuple[Tensor, Tensor] | None = None  # MoBE: shared bases (m, r, in) and mixing weights (E, m)
    down_bases: tuple[Tensor, Tensor] | None = None


def lowrank_observers(layer: MoELayer, config: LowRankConfig) -> list[Observer]:
    return [ExpertHessians(layer.num_experts, config.weighting),
            TokenInputs(layer.num_experts, config.max_tokens)]


def layer_svds(mats: ExpertMatrices, hessians: ExpertHessianSummary, damp: float
               ) -> tuple[list[WhitenedSVD], list[WhitenedSVD]]:
    """Whitened SVDs of every expert's up (U, H) and down (H, I) projection."""
    ups, downs = [], []
    for e in range(mats.num_experts):
        ups.append(whitened_svd(mats.up[e], whitening(hessians.up[e], mats.up.shape[2], damp)))
        downs.append(whitened_svd(mats.down[e], whitening(hessians.down[e], mats.down.shape[2], damp)))
    return ups, downs


def _unrouted(hessians: ExpertHessianSummary) -> list[int]:
    return [e for e, c in enumerate(hessians.counts.tolist()) if c == 0]


def choose_ranks(mats: ExpertMatrices, svds: tuple[list[WhitenedSVD], list[WhitenedSVD]], unrouted: list[int],
                 config: LowRankConfig) -> tuple[list[int], list[int]]:
    """(up ranks (E,), down ranks (E,)): each projection kind keeps ``ratio`` of its parameters in the layer.

    The budget is split by kind because the two energies are in different units (the first projection's error is
    measured before the activation, down_proj's in the block output); within a kind, experts compete for rank.
    """
    ranks = []
    for kind, weights in zip(svds, (mats.up, mats.down), strict=True):
        n, out, inp = weights.shape
        budget = int(config.ratio * n * out * inp)
        if config.method == "d2moe" and config.delta_ranks == "uniform":  # the paper's: one rank for every delta
            ranks.append([shared_base_rank(n, out, inp, budget, config.min_rank)] * n)
            continue
        if config.method == "d2moe":  # the base is paid once; the deltas share what is left
            shared_base_rank(n, out, inp, budget, config.min_rank)  # refuses a budget the base does not fit
            budget -= out * inp
        # An expert no calibration token reached adds nothing to the calibration loss: its directions gain zero.
        energies = [torch.zeros_like(s.s) if e in unrouted else s.energies for e, s in enumerate(kind)]
        ranks.append(allocate_ranks(energies, [(out, inp)] * n, budget, config.min_rank))
    return ranks[0], ranks[1]


def _stored(svd: WhitenedSVD, weight: Tensor, rank: int) -> Projection:
    out, inp = weight.shape
    if is_dense(rank, out, inp):
        return (weight.clone(),)
    return svd.factors(rank)


def _factors(a: Tensor, b: Tensor) -> Projection:
    return (a, b)


def _dense(p: Projection) -> Tensor:
    return p[0] if len(p) == 1 else p[0] @ p[1]


def lowrank_layer(layer: MoELayer, hessians: ExpertHessianSummary, x: Tensor | None, config: LowRankConfig,
                  ranks: tuple[list[int], list[int]] | None = None) -> LowRankLayer:
    """The low-rank experts of ``layer`` (the model is not modified).

    ``ranks``: (up, down) per expert; None chooses them under ``config.ratio``. x (T, H): tokens for the losses
    and the router refit.
    """
    start = time.perf_counter()
    original = read_experts(layer)
    up_base = down_base = None
    up_bases = down_bases = None
    mats = original
    n = mats.num_experts
    unrouted = _unrouted(hessians)
    info: dict[str, Any] = {}
    if config.method == "mobe":
        m = config.bases_for(n)
        up_r, down_r = ranks if ranks is not None else mobe_ranks(mats, m, config)
        if len(set(up_r)) != 1 or len(set(down_r)) != 1 or len(up_r) != n or len(down_r) != n:
            raise ValueError(f"mobe needs one rank for all {n} experts per projection kind, got {up_r} / {down_r}")
        fits = [fit_mobe(w, h, r[0], m, config.damp) for w, h, r in ((mats.up, hessians.up, up_r),
                                                                      (mats.down, hessians.down, down_r))]
        up, down = ([_factors(f.a[e], f.basis(e)) for e in range(n)] for f in fits)
        up_bases, down_bases = ((f.bases, f.mix) for f in fits)
        params = sum(mobe_params(n, m, r[0], *w.shape[1:]) for w, r in ((mats.up, up_r), (mats.down, down_r)))
        info["bases"] = m
        info["fit_error"] = {kind: {"shared_basis": f.error_start, "mobe": f.error}
                             for kind, f in zip(("up", "down"), fits, strict=True)}
    else:
        if config.method == "d2moe":
            up_base, down_base = fisher_base(original.up, hessians.up), fisher_base(original.down, hessians.down)
            mats = ExpertMatrices(up=original.up - up_base, down=original.down - down_base,  # the deltas
                                  up_bias=original.up_bias, down_bias=original.down_bias, norm=original.norm)
        svds = layer_svds(mats, hessians, config.damp)
        up_r, down_r = ranks if ranks is not None else choose_ranks(mats, svds, unrouted, config)
        if len(up_r) != n or len(down_r) != n:
            raise ValueError(f"need {n} up and down ranks, got {len(up_r)} and {len(down_r)}")
        up = [_stored(svds[0][e], mats.up[e], up_r[e]) for e in range(n)]
        down = [_stored(svds[1][e], mats.down[e], down_r[e]) for e in range(n)]
        params = sum(projection_params(up_r[e], *mats.up.shape[1:]) +
                     projection_params(down_r[e], *mats.down.shape[1:]) for e in range(n))
        params += sum(b.numel() for b in (up_base, down_base) if b is not None)
    dense_params = n * (mats.up.shape[1] * mats.up.shape[2] + mats.down.shape[1] * mats.down.shape[2])
    info = {"up_ranks": list(up_r), "down_ranks": list(down_r), "param_ratio": params / dense_params,
            "unrouted": unrouted, **info}
    weight = bias = None
    if x is not None:
        def full(p: Projection, base: Tensor | None) -> Tensor:
            return _dense(p) if base is None else _dense(p) + base

        approx = ExpertMatrices(up=torch.stack([full(p, up_base) for p in up]),
                                down=torch.stack([full(p, down_base) for p in down]),
                                up_bias=mats.up_bias, down_bias=mats.down_bias, norm=mats.norm)
        route = compressed_route(layer, layer.correction_bias(), keep_groups=True)
        outputs = compressed_outputs(layer, approx, x)  # (T, E, H)
        target = original_routed(layer, x)
        w0 = layer.router_weight.detach().float().cpu()
        b0 = router_bias(layer)
        b0 = None if b0 is None else b0.detach().float().cpu()
        info["loss"] = block_loss(x, outputs, target, route, w0, b0)
        info["tokens"] = int(x.shape[0])
        if config.recalibrate_router:
            fit = fit_router(x, outputs, target, route, w0, b0)
            weight, bias = fit.weight, fit.bias
            info["router_fit"] = fit.summary()
            info["loss"] = fit.loss_after
    info["seconds"] = time.perf_counter() - start
    return LowRankLayer(up, down, weight, bias, info, up_base, down_base, up_bases, down_bases)


def mobe_ranks(mats: ExpertMatrices, bases: int, config: LowRankConfig) -> tuple[list[int], list[int]]:
    """MoBE: one rank per projection kind, the largest whose factors, bases and mixing weights keep ``ratio`` of
    that kind's parameters."""
    out = []
    for weights in (mats.up, mats.down):
        n, rows, cols = weights.shape
        out.append([mobe_rank(n, bases, rows, cols, int(config.ratio * n * rows * cols), config.min_rank)] * n)
    return out[0], out[1]


def plan_lowrank(
    model: nn.Module,
    calibration: CalibrationSet | torch.Tensor,
    config: LowRankConfig,
    model_name: str | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Plan:
    """Choose per-expert ranks of every MoE layer under ``config.ratio``; return a "lowrank" plan.

    The model is not modified. ``calibration`` is a ``CalibrationSet`` or raw input ids (N, L).
    """
    config.check_model(model)
    input_ids, data_name, data_hash = calibration_fields(calibration)
    start = time.perf_counter()

    def on_layer(layer: MoELayer, observers: Sequence[Observer]) -> LayerDecision:
        hessians = result_of(observers[0], ExpertHessianSummary)
        x, _, _ = token_inputs(observers)
        return LayerDecision(result=lowrank_layer(layer, hessians, x, config).info)

    results: dict[int, dict[str, Any]] = run_layerwise(
        model, input_ids, make_observers=lambda layer: lowrank_observers(layer, config), on_layer=on_layer,
        propagate="original", batch_size=batch_size, device=device, progress=progress,
    )
    layers = {idx: {"up_ranks": r["up_ranks"], "down_ranks": r["down_ranks"]} for idx, r in results.items()}
    ratios = [r["param_ratio"] for r in results.values()]
    summary = {
        "method": config.method,
        "ratio": config.ratio,
        "param_ratio": sum(ratios) / len(ratios),
        "recalibrate_router": config.recalibrate_router,
        "apply_needs_calibration": True,
        "layers": {str(idx): {k: v for k, v in r.items() if k not in ("up_ranks", "down_ranks")}
                   for idx, r in sorted(results.items())},
        "seconds": time.perf_counter() - start,
        "calibration_windows": int(input_ids.shape[0]),
        "calibration_seq_len": int(input_ids.shape[1]),
    }
    provenance = Provenance.of(model, model_name, config.method, config.to_dict(), data_name, data_hash)
    return Plan(kind="lowrank", layers=layers, provenance=provenance, summary=summary)
