"""Low-rank options of the joint planner: a kept expert held as whitened-SVD factors, as ``plan lowrank`` builds them.

A rank option is a share f of an expert's weight parameters (as ``plan lowrank --ratio``): each projection W
(out, in) keeps rank r = floor(f * out * in / (out + in)), so its factors A (out, r), B (r, in) hold at most f of
its parameters; f = 1 keeps the projection dense (the original). The factors are SVD-LLM's (``methods/whitened_svd``,
method 'svd-llm' of ``plan lowrank``), whitened with each expert's gate^2-weighted input covariances, which apply
recomputes on the plan's calibration windows (``appliers/joint.py``).

Error, as ``curves.quant_distances`` measures widths: per sample token the squared distance between the expert's
output and its output with both projections at rank r (the down projection's covariance from the original
intermediates, as apply's observer builds it), then weighed by the pruned routing's gates (``rank_options``):

    R_ker = sum_t g^k_e(t)^2 ||f_e(x_t) - f^r_e(x_t)||^2

The covariances here use the sample tokens routed to e by the original router; apply's use every calibration
token the pruned model routes to e (the same estimate GPTQ's widths are priced with).

Bytes, as ``moeslim.load`` holds a low-rank expert (``runtime/lowrank.LowRankProjection``): per projection
r (out + in) elements in the experts' dtype, or out * in when dense; a low-rank layer holds no packed maps.
Shapes: T sample tokens, E experts, H hidden, R rank options, k kept experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from moeslim.calibrate import ExpertOutputSample
from moeslim.config import ConfigError
from moeslim.methods.joint.sizes import LayerBytes
from moeslim.methods.joint.solve import SizeOption
from moeslim.methods.prune.enumerate import RouteFn, allowed_mask
from moeslim.methods.quant.factors import expert_gate
from moeslim.methods.whitened_svd import WhitenedSVD, is_dense, whitened_svd, whitening
from moeslim.models import MoELayer, find_moe_layers
from moeslim.models.expert_math import expert_forward, expert_intermediate, expert_weight_views

__all__ = ["expert_ranks", "projection_rank", "rank_distances", "rank_options", "with_rank_bytes"]


def projection_rank(share: float, out: int, inp: int) -> int:
    """The rank whose factors hold at most ``share`` of an (out, in) matrix's parameters; min(out, in) (dense) at 1."""
    if share >= 1:
        return min(out, inp)
    return int(share * out * inp / (out + inp))


def _shapes(layer: MoELayer) -> tuple[tuple[int, int], tuple[int, int]]:
    """((out, in) of the first projection, (out, in) of down_proj) of one expert."""
    views = expert_weight_views(layer)

    def out_in(w: Tensor) -> tuple[int, int]:
        return (int(w.shape[2]), int(w.shape[1])) if views.transposed else (int(w.shape[1]), int(w.shape[2]))

    return out_in(views.up), out_in(views.down)


def expert_ranks(layer: MoELayer, share: float) -> tuple[int, int]:
    """(up rank, down rank) of one expert of ``layer`` at parameter share ``share``."""
    up, down = _shapes(layer)
    return projection_rank(share, *up), projection_rank(share, *down)


def _projection_bytes(rank: int, out: int, inp: int, element: int) -> int:
    return (out * inp if is_dense(rank, out, inp) else rank * (out + inp)) * element


def with_rank_bytes(model: nn.Module, sizes: dict[int, LayerBytes], shares: Sequence[float]
                    ) -> dict[int, LayerBytes]:
    """``sizes`` with each layer's per-expert bytes and (up, down) ranks at every share (raises ConfigError on a
    share that leaves some projection no rank)."""
    out = dict(sizes)
    for layer in find_moe_layers(model):
        element = expert_weight_views(layer).up.element_size()
        up, down = _shapes(layer)
        held: dict[float, int] = {}
        ranks: dict[float, tuple[int, int]] = {}
        for share in shares:
            r_up, r_down = projection_rank(share, *up), projection_rank(share, *down)
            if min(r_up, r_down) < 1:
                least = max((o + i) / (o * i) for o, i in (up, down))
                raise ConfigError(f"ranks={list(shares)}: share {share} leaves layer {layer.layer_idx}'s expert "
                                  f"projections {up} / {down} no rank; use shares of at least {least:.4f}")
            ranks[share] = (r_up, r_down)
            held[share] = _projection_bytes(r_up, *up, element) + _projection_bytes(r_down, *down, element)
        out[layer.layer_idx] = dataclasses.replace(sizes[layer.layer_idx], rank=held, rank_ranks=ranks)
    return out


def _stored(mat: Tensor, transposed: bool, like: Tensor) -> Tensor:
    """(out, in) -> the stored layout and dtype of ``like``."""
    return (mat.T if transposed else mat).to(like.dtype)


def _approx(weight: Tensor, svd: WhitenedSVD, rank: int) -> Tensor:
    """(out, in) the best rank-``rank`` replacement of ``weight`` under ``svd``'s whitening (dense when full)."""
    out, inp = weight.shape
    if is_dense(rank, out, inp):
        return weight
    a, b = svd.factors(rank)
    return (a @ b).to(weight.dtype)


@torch.no_grad()
def rank_distances(layer: MoELayer, sample: ExpertOutputSample, shares: Sequence[float], damp: float) -> Tensor:
    """(T, E, R) float64 squared distance between each expert's output and its output at each rank share."""
    views = expert_weight_views(layer)
    x = sample.x.to(views.up.device, views.up.dtype)
    tokens, num_experts, _ = sample.outputs.shape
    weights, ids = layer.route(sample.logits.to(layer.router_weight.device))
    weights, ids = weights.to(x.device), ids.to(x.device)
    dist = torch.zeros(tokens, num_experts, len(shares), dtype=torch.float64)
    for e in range(num_experts):
        hit = ids == e
        rows = hit.any(dim=1)
        g2 = (weights * hit).sum(dim=1)[rows].double().pow(2)[:, None]  # (n, 1) gate^2 of e's tokens
        xe = x[rows].double()
        cov_up = (xe * g2).T @ xe if xe.shape[0] else None
        he = expert_intermediate(layer, x[rows], e).double()
        cov_down = (he * g2).T @ he if he.shape[0] else None
        w_up = (views.up[e].T if views.transposed else views.up[e]).float()  # (out, in)
        w_down = (views.down[e].T if views.transposed else views.down[e]).float()
        # one whitened SVD per projection serves every share (the rank only truncates it)
        svd_up = whitened_svd(w_up, whitening(cov_up, w_up.shape[1], damp))
        svd_down = whitened_svd(w_down, whitening(cov_down, w_down.shape[1], damp))
        for j, share in enumerate(shares):
            r_up, r_down = expert_ranks(layer, share)
            up = _stored(_approx(w_up, svd_up, r_up), views.transposed, views.up)
            down = _stored(_approx(w_down, svd_down, r_down), views.transposed, views.down)
            out = expert_forward(layer, x, e, up=up, down=down).double().cpu()
            dist[:, e, j] = (sample.outputs[:, e].double() - out).pow(2).sum(dim=-1)
    return dist


def rank_options(options: Sequence[SizeOption], layer: MoELayer, sample: ExpertOutputSample, route: RouteFn,
                 shares: Sequence[float], damp: float) -> list[SizeOption]:
    """``options`` with each kept expert's squared error at every rank share (``rank_err`` (k, R)), weighed by
    the gates of that kept set's routing of the sample's logits (T, E)."""
    dist = rank_distances(layer, sample, shares, damp)
    logits = sample.logits.to(layer.router_weight.device)
    out = []
    for opt in options:
        allowed = allowed_mask(opt.kept, int(logits.shape[1])).to(logits.device)
        weights, ids = route(logits, allowed)
        weights, ids = weights.double().cpu(), ids.cpu()
        errs = np.zeros((len(opt.kept), len(shares)))
        for i, e in enumerate(opt.kept):
            gate = expert_gate(weights, ids, e)  # (T,)
            errs[i] = (gate.pow(2)[:, None] * dist[:, e]).sum(dim=0).numpy()
        out.append(dataclasses.replace(opt, rank_err=errs))
    return out
