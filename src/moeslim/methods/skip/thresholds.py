"""Dynamic expert skipping (Lu et al. 2024, ALGORITHMS.md section 2): skip rules and their calibration.

All rules read the routed top-k weights of a token sorted descending, w_1 >= ... >= w_k. Both rules compare ratios,
so they give the same decision before or after top-k renormalisation or a routed scaling factor.

- "top2" (the paper's rule, top-2 routing only): skip the second expert when w_2 < beta * w_1.
  Calibration: beta = quantile_q of r = w_2 / w_1 over calibration tokens (q = 0.5: the paper's median), so a
  share q of the tokens skip their second expert.
- "topk" (the paper's appendix generalisation): keep the smallest prefix of i >= 1 experts whose remaining weight
  is below a share beta of the token's total top-k weight, i.e. the smallest i with sum_{j > i} w_j < beta * sum_j w_j
  (i = k when none). A token skips at least one expert exactly when its last expert's share w_k / sum_j w_j is
  below beta, so beta = quantile_q of that share makes a share q of the tokens skip at least one expert. For k = 2
  this is the top2 rule with beta_top2 = beta / (1 - beta).

Kept weights are rescaled to the token's original top-k total (renormalising families: the remaining expert of a
top-2 skip gets weight 1, as in the paper).
"""

from __future__ import annotations

import math
import struct
from typing import Literal, get_args

import torch
from torch import Tensor

SkipRule = Literal["top2", "topk"]
SKIP_RULES: tuple[str, ...] = get_args(SkipRule)


def sorted_desc(weights: Tensor) -> Tensor:
    """(T, k) routed weights -> (T, k) sorted descending per token."""
    return weights.sort(dim=-1, descending=True).values


def skip_statistic(sorted_weights: Tensor, rule: str) -> Tensor:
    """(T, k) weights sorted descending -> (T,) per-token statistic; a token skips (some) expert iff stat < beta."""
    w = sorted_weights.double()
    if rule == "top2":
        if w.shape[1] != 2:
            raise ValueError(f"rule 'top2' needs top-2 routing, got top-{w.shape[1]}; use rule='topk'")
        return w[:, 1] / w[:, 0].clamp_min(torch.finfo(torch.float64).tiny)
    if rule == "topk":
        return w[:, -1] / w.sum(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    raise ValueError(f"unknown skip rule {rule!r}; use one of {SKIP_RULES}")


def calibrate_beta(sorted_weights: Tensor, rule: str, quantile: float = 0.5) -> float:
    """beta such that a share ``quantile`` of the tokens skip: the ``quantile`` of the per-token statistic."""
    if not 0 <= quantile <= 1:
        raise ValueError(f"quantile={quantile} must be in [0, 1]")
    stat = skip_statistic(sorted_weights, rule)
    return float(torch.quantile(stat, quantile)) if stat.numel() else 0.0


def keep_mask(weights: Tensor, beta: float, rule: str) -> Tensor:
    """(T, k) routed weights (any column order) -> (T, k) bool: which (token, expert) pairs run.

    The best expert always runs; beta <= 0 skips nothing.
    """
    k = weights.shape[-1]
    if beta <= 0 or k < 2:
        return torch.ones_like(weights, dtype=torch.bool)
    w = weights.float()
    if rule == "top2":
        if k != 2:
            raise ValueError(f"rule 'top2' needs top-2 routing, got top-{k}; use rule='topk'")
        # The sorted form (second >= beta * first) without a sort: the first maximum (argmax's tie rule is a
        # stable descending sort's) always runs, the other expert iff its weight >= beta * the maximum. A few
        # elementwise ops: this runs once per MoE layer and decode step.
        best = w.argmax(dim=-1, keepdim=True)  # (T, 1)
        return (w >= beta * w.gather(-1, best)).scatter_(-1, best, True)
    if rule != "topk":
        raise ValueError(f"unknown skip rule {rule!r}; use one of {SKIP_RULES}")
    order = w.argsort(dim=-1, descending=True, stable=True)
    ws = w.gather(-1, order)  # (T, k) descending
    # tail[:, i] = sum of the weights after position i (a reversed cumsum: exactly 0 for the last position)
    tail = ws.flip(-1).cumsum(-1).flip(-1) - ws  # (T, k)
    done = tail < beta * ws.sum(-1, keepdim=True)  # prefix up to i suffices
    done[:, -1] = True
    first = done.int().argmax(dim=-1, keepdim=True)  # (T, 1) smallest sufficient prefix end
    keep_sorted = torch.arange(k, device=w.device).unsqueeze(0) <= first
    return torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)


_F32_MAX = float(torch.finfo(torch.float32).max)


def _f32(value: float) -> float:
    """``value`` rounded to the nearest float32 (ties to even), as a Python float."""
    rounded: float = struct.unpack("f", struct.pack("f", value))[0]
    return rounded


def keep_rows_top2(weights: list[list[float]], beta: float) -> list[list[bool]] | None:
    """``keep_mask(w, beta, "top2")`` on a few rows already read on the host (decode): (T, 2) float32 weights as
    Python floats -> (T, 2) bools, the same decisions (None: a NaN, which the tensor rule orders otherwise).

    The tensor rule compares w >= beta * w_best in float32 (the scalar rounded to float32, the product rounded
    once); the product of two float32 values is exact in a Python float, so rounding it once more gives the
    same threshold. The first maximum always runs (argmax's tie rule).
    """
    b32 = _f32(beta)
    out = []
    for row in weights:
        if len(row) != 2 or any(math.isnan(v) for v in row):
            return None
        best = 0 if row[0] >= row[1] else 1
        if abs(b32 * row[best]) > _F32_MAX:  # beyond float32's finite range: leave it to the tensor rule
            return None
        threshold = _f32(b32 * row[best])
        out.append([j == best or v >= threshold for j, v in enumerate(row)])
    return out


def rescale_kept(weights: Tensor, keep: Tensor) -> Tensor:
    """(T, k) weights, (T, k) keep mask -> (T, k) weights, kept ones scaled to the token's original total, 0 else."""
    kept = weights * keep
    # Tokens that skip nothing keep their exact weights (no rescale rounding).
    return torch.where(keep.all(-1, keepdim=True), weights, kept * (weights.sum(-1, keepdim=True)
                                                                    / kept.sum(-1, keepdim=True)))


def skip_rates(sorted_weights: Tensor, beta: float, rule: str) -> dict[str, float]:
    """Share of tokens that skip at least one expert, and share of (token, expert) calls skipped."""
    if sorted_weights.numel() == 0:
        return {"token_skip_rate": 0.0, "call_skip_rate": 0.0}
    keep = keep_mask(sorted_weights, beta, rule)
    return {
        "token_skip_rate": float((~keep).any(-1).double().mean()),
        "call_skip_rate": float((~keep).double().mean()),
    }
