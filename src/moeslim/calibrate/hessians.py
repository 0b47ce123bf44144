"""Per-expert input Hessians of a MoE layer's two expert projections (for GPTQ).

For expert e, GPTQ needs H = sum_t x_t x_t^T over the tokens routed to e, for each projection's input:
- gate_up (or up): the block input x, (H, H);
- down: expert e's intermediate activation gate(x W_up^T), (I, I).

Weighting (``weighting``): "none" is the plain GPTQ Hessian, as MC-MoE uses (default). The block output
is sum_i g_i(x) f_i(x), so a weight error of expert i shows in the output scaled by its routing weight
g_i: "gate2" weights each token by g^2 (the exact squared-output-error objective), "gate" by g (milder).

GPTQ quantizes a block's sublayers in order ("true sequential"): the down projection is calibrated on the
activations the *quantized* gate_up produces. ``keep_inputs=True`` keeps the layer's block inputs so that
``down_hessians`` can recompute the down Hessians once gate_up is quantized.

All-token Hessians (llm-compressor's ``calibrate_all_experts``, and the fallback for starved experts): each
expert's Hessians over *every* calibration token, routed to it or not (unweighted: the routing weight of an
unrouted token is 0). The gate_up input is then the block input for every expert, so its Hessian is one (H, H)
matrix shared by all experts (``pooled=True`` accumulates it; ``all_tokens=True`` also makes each expert's down
Hessian from its intermediates on every token). The routed outputs of the block are not changed by any of this:
the observer only reads the layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from moeslim.calibrate.observers import Communicator
from moeslim.models import MoELayer
from moeslim.models.expert_math import expert_intermediate

HessianWeighting = Literal["none", "gate", "gate2"]
WEIGHTINGS: tuple[str, ...] = ("none", "gate", "gate2")

__all__ = ["WEIGHTINGS", "ExpertHessianSummary", "ExpertHessians", "HessianWeighting", "accumulate_hessian",
           "down_hessian", "down_hessians", "up_hessians"]


def accumulate_hessian(
    H: torch.Tensor | None, x: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Return H + sum_t weights_t * x_t x_t^T; H (in, in) or None (start from zero), x (T, in).

    weights (T,) optional per-token factors. For a routed expert the block output is
    sum_i g_i(x) f_i(x), so the squared output error of a linear expert layer is weighted by g^2:
    pass ``weights = gate**2`` for that objective, ``gate`` for a milder weighting, None for the plain
    GPTQ Hessian (the MC-MoE setting). The overall scale of H does not matter to GPTQ (damping is
    relative to its diagonal), so no 2/N factor.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be (T, in), got shape {tuple(x.shape)}")
    dtype = H.dtype if H is not None else torch.float32
    xf = x.to(dtype)
    if weights is not None:
        if weights.shape != (x.shape[0],):
            raise ValueError(f"weights must have shape ({x.shape[0]},), got {tuple(weights.shape)}")
        if torch.any(weights < 0):
            raise ValueError("weights must be non-negative")
        xw = xf * weights.to(dtype)[:, None]
    else:
        xw = xf
    update = xw.T @ xf
    if H is None:
        return update
    if H.shape != update.shape:
        raise ValueError(f"H must have shape {tuple(update.shape)}, got {tuple(H.shape)}")
    return H + update


@dataclass(frozen=True)
class ExpertHessianSummary:
    """Per expert: up (H, H) and down (I, I) float32 Hessians (None if never routed), routed token counts (E,),
    and the block inputs (T, H) when kept; ``pooled_up`` (H, H): the all-token Hessian of the block input (when
    asked for), over ``tokens`` calibration tokens."""

    up: list[Tensor | None]
    down: list[Tensor | None]
    counts: Tensor
    inputs: Tensor | None = None
    batch_tokens: tuple[int, ...] = ()  # rows of ``inputs`` per observed batch (sums are made batch by batch)
    pooled_up: Tensor | None = None
    tokens: int = 0


class ExpertHessians:
    """Accumulates each expert's gate_up-input and down-input Hessians over the tokens routed to it."""

    key = "hessians"

    def __init__(self, num_experts: int, weighting: HessianWeighting = "none", keep_inputs: bool = False,
                 up: Tensor | Mapping[int, Tensor] | None = None, down: bool = True,
                 experts: set[int] | None = None, pooled: bool = False, all_tokens: bool = False,
                 per_expert: bool = True) -> None:
        """``up``: replacement first-projection slices (E, stored layout; or {expert: slice}) for the intermediates.

        ``down=False`` skips the down Hessians (I x I per expert: the largest term) when they will be
        recomputed from the kept inputs anyway (true sequential); ``experts``: observe only these experts.
        ``pooled``: also accumulate the all-token block-input Hessian (one (H, H)); ``all_tokens``: every
        expert's Hessians from all tokens (module docstring): its up Hessians are the pooled one (not copied),
        its down Hessians its intermediates on every token; the weighting must then be "none".
        ``per_expert=False``: no per-expert Hessian at all (routed counts, the pooled Hessian and the kept inputs
        only): the expert-group split makes them later from the kept inputs (``up_hessians``, ``down_hessian``).
        """
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}: use one of {', '.join(WEIGHTINGS)}")
        if all_tokens and weighting != "none":
            raise ValueError("all-token Hessians are unweighted: an unrouted token has routing weight 0")
        self._per_expert = per_expert
        self._pooled_wanted = pooled or all_tokens
        self._all_tokens = all_tokens
        self._pooled: Tensor | None = None
        self._tokens = torch.zeros(1, dtype=torch.int64)
        self._weighting = weighting
        self._keep = keep_inputs
        self._want_down = down
        self._experts = experts
        self._inputs: list[Tensor] = []
        self._up_weight = up
        self._up: list[Tensor | None] = [None] * num_experts
        self._down: list[Tensor | None] = [None] * num_experts
        self._counts = torch.zeros(num_experts, dtype=torch.int64)

    def observe(self, layer: MoELayer, x: Tensor) -> None:
        if self._keep:
            self._inputs.append(x.detach().cpu())
        weights, ids = layer.route(layer.router_logits(x))  # (T, k), (T, k)
        self._tokens += x.shape[0]
        if self._pooled_wanted:
            self._pooled = _add(self._pooled, accumulate_hessian(None, x.float()))
        if self._all_tokens:
            self._observe_all(layer, x, ids)
            return
        if not self._per_expert:
            self._counts += torch.bincount(ids.reshape(-1).cpu(), minlength=len(self._counts))[: len(self._counts)]
            return
        for e in torch.unique(ids).tolist():
            if self._experts is not None and e not in self._experts:
                continue
            hit = ids == e  # (T, k); an expert appears at most once per token
            rows = hit.any(dim=1)
            xe = x[rows].float()  # (n, H)
            g = (weights * hit).sum(dim=1)[rows].float()  # (n,) routing weight of e on its tokens
            tw = None if self._weighting == "none" else (g if self._weighting == "gate" else g * g)
            # Each batch's terms in float32, summed in float64 on the activation device: the sum of float32
            # values is exact in float64 unless their magnitudes differ by more than 2^29, so it does not depend
            # on the order in which batches (or processes, ``sync``) are added, and 1 or N processes round to
            # the same float32 Hessian at result() (in the rare other case: to within its last bit).
            self._up[e] = _add(self._up[e], accumulate_hessian(None, xe, tw))
            if self._want_down:
                up = None if self._up_weight is None else self._up_weight[e]
                inter = expert_intermediate(layer, x[rows], e, up).float()  # (n, I)
                self._down[e] = _add(self._down[e], accumulate_hessian(None, inter, tw))
            self._counts[e] += int(rows.sum())

    def _observe_all(self, layer: MoELayer, x: Tensor, ids: Tensor) -> None:
        """Every observed expert's down Hessian from its intermediates on all of x (T, H); routed counts kept."""
        counts = torch.bincount(ids.reshape(-1).cpu(), minlength=len(self._counts))[: len(self._counts)]
        self._counts += counts
        if not self._want_down or not self._per_expert:
            return
        for e in range(len(self._down)):
            if self._experts is not None and e not in self._experts:
                continue
            up = None if self._up_weight is None else self._up_weight[e]
            inter = expert_intermediate(layer, x, e, up).float()  # (T, I)
            self._down[e] = _add(self._down[e], accumulate_hessian(None, inter))

    def sync(self, comm: Communicator) -> None:
        """Sum the Hessians and routed counts over the processes of a torchrun job (``distributed.py``).

        The kept block inputs stay each process's own: ``quantize_layer_experts`` sums the down Hessians it
        recomputes from them. An expert that no process routed to keeps no Hessian (None).
        """
        comm.all_reduce_sum(self._counts)
        comm.all_reduce_sum(self._tokens)
        if self._pooled_wanted:
            shapes = [s for s in comm.all_gather(None if self._pooled is None else tuple(self._pooled.shape))
                      if s is not None]
            if shapes:
                if self._pooled is None:
                    self._pooled = torch.zeros(shapes[0], dtype=torch.float64)
                comm.all_reduce_sum(self._pooled)
        for hessians in (self._up, self._down) if self._want_down else (self._up,):
            shapes = [s for s in comm.all_gather(next((tuple(h.shape) for h in hessians if h is not None), None))
                      if s is not None]
            for e in range(len(hessians)):
                if not shapes or (int(self._counts[e]) == 0 and not (self._all_tokens and hessians is self._down)):
                    continue
                local = hessians[e]
                total = local if local is not None else torch.zeros(shapes[0], dtype=torch.float64)
                comm.all_reduce_sum(total)
                hessians[e] = total

    def result(self) -> ExpertHessianSummary:
        def cpu(h: Tensor | None) -> Tensor | None:
            return None if h is None else h.float().cpu()

        # The float64 sums are rounded once and replaced by the float32 Hessians (not held twice: for a large
        # layer they are the biggest statistic); call result() after the last observe (and sync).
        self._up, self._down = [cpu(h) for h in self._up], [cpu(h) for h in self._down]
        self._pooled = cpu(self._pooled)
        up = [self._pooled] * len(self._up) if self._all_tokens else list(self._up)  # one shared (H, H)
        inputs = torch.cat(self._inputs) if self._inputs else None
        return ExpertHessianSummary(up, list(self._down), self._counts.clone(), inputs,
                                    tuple(int(t.shape[0]) for t in self._inputs), self._pooled, int(self._tokens))


def down_hessians(layer: MoELayer, x: Tensor, up: Tensor, weighting: HessianWeighting = "none",
                  chunk: int = 4096) -> list[Tensor | None]:
    """Per-expert down-input Hessians (I, I) on block inputs x (T, H), with first-projection weights ``up``
    (E, stored layout; e.g. the dequantized gate_up) instead of the layer's own."""
    observer = ExpertHessians(layer.num_experts, weighting, up=up)
    device = up.device
    for start in range(0, x.shape[0], chunk):
        observer.observe(layer, x[start : start + chunk].to(device))
    return observer.result().down


def up_hessians(layer: MoELayer, x: Tensor, experts: set[int], weighting: HessianWeighting = "none",
                batches: Sequence[int] = (), device: torch.device | None = None) -> dict[int, Tensor]:
    """The first-projection Hessians (H, H) of ``experts`` on block inputs x (T, H), as float64 sums (round with
    ``.float()`` after adding other processes' sums); an expert no row is routed to is left out.

    ``batches``: rows per calibration batch (``ExpertHessianSummary.batch_tokens``): the terms are made batch by
    batch as the observer made them during the pass, so the result equals ``ExpertHessians``' bit for bit (the
    expert-group split: only these experts' Hessians are alive).
    """
    observer = ExpertHessians(layer.num_experts, weighting, down=False, experts=experts)
    start = 0
    for rows in batches or [x.shape[0]]:
        observer.observe(layer, x[start : start + rows].to(device) if device is not None else x[start : start + rows])
        start += rows
    if start != x.shape[0]:
        raise ValueError(f"batches cover {start} of the {x.shape[0]} input rows")
    return {e: h for e in sorted(experts) if (h := observer._up[e]) is not None}


def down_hessian(layer: MoELayer, x: Tensor, expert: int, up: Tensor, weighting: HessianWeighting = "none",
                 batches: Sequence[int] = (), all_tokens: bool = False) -> Tensor | None:
    """Expert ``expert``'s down-input Hessian (I, I) on block inputs x (T, H) with its first-projection slice
    ``up`` (stored layout), holding one Hessian: the float64 sums (round with ``.float()`` after adding
    other processes' sums; ``down_hessians`` gives the rounded ones of every expert).

    ``batches``: rows per calibration batch (``ExpertHessianSummary.batch_tokens``): the float32 terms are
    made batch by batch, so any split of the batches over processes adds up to the same sums. ``all_tokens``:
    over every row of x, routed to the expert or not (unweighted).
    """
    observer = ExpertHessians(layer.num_experts, "none" if all_tokens else weighting, up={expert: up},
                              experts={expert}, all_tokens=all_tokens)
    start = 0
    for rows in batches or [x.shape[0]]:
        observer.observe(layer, x[start : start + rows].to(up.device))
        start += rows
    if start != x.shape[0]:
        raise ValueError(f"batches cover {start} of the {x.shape[0]} input rows")
    return observer._down[expert]


def _add(total: Tensor | None, update: Tensor) -> Tensor:
    """``total + update`` in float64 (``update``: one batch's float32 terms)."""
    return update.double() if total is None else total.add_(update)
