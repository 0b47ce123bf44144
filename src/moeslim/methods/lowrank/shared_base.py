"""D2-MoE's shared base: one matrix per projection kind that all experts of a layer add their delta to.

D2-MoE (Gu et al. 2025) merges a layer's experts into a base by a Fisher-weighted average and keeps, per expert,
a truncated (whitened) SVD of its delta W_e - W_base. The paper's Fisher comes from language-model gradients;
here it is layer-local (no backprop): for the block's output error, the diagonal Gauss-Newton of expert e's
weight W_e[o, i] is sum_t g_t^2 x_{t,i}^2 over the tokens routed to e (times a factor per output row that is
the same for every expert and cancels in the average), i.e. diag of the expert's gate^2-weighted input
covariance, which moeslim already collects for the whitening. Routing frequency is part of it (a sum over the
routed tokens), as the paper multiplies its Fisher by expert frequency.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["fisher_base"]


def fisher_base(weights: Tensor, hessians: Sequence[Tensor | None]) -> Tensor:
    """weights (E, out, in), per-expert input covariances (in, in) or None (never routed) -> base (out, in).

    Column i of the base is sum_e F_e[i] W_e[:, i] / sum_e F_e[i] with F_e = diag(covariance_e); a column no
    routed token touched is the plain mean of the experts' columns.
    """
    n, _, inp = weights.shape
    if len(hessians) != n:
        raise ValueError(f"need one covariance per expert ({n}), got {len(hessians)}")
    fisher = torch.stack([torch.zeros(inp, dtype=torch.float64) if h is None else h.diagonal().double().clamp_min(0)
                          for h in hessians])  # (E, in)
    total = fisher.sum(0)  # (in,)
    share = torch.where(total > 0, fisher / total.clamp_min(1e-300), torch.full_like(fisher, 1.0 / n))  # (E, in)
    return (weights.double() * share[:, None, :]).sum(0).float()
