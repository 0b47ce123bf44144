"""Merging a group of experts into one: neuron alignment, frequency-weighted averaging, the merged router row.

Pure tensor functions on ``ExpertMatrices`` (out, in orientation, see ``models/expert_edit.py``).
"""

from __future__ import annotations

import functools
import operator

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from moeslim.models.expert_edit import ExpertMatrices

__all__ = ["group_logit", "lstsq_rows", "match_neurons", "merge_group", "neuron_features", "permute_expert"]


def neuron_features(mats: ExpertMatrices, e: int, rows: Tensor) -> Tensor:
    """(I, D) one vector per intermediate neuron of expert e: its first-projection rows (gate and up) and its
    down_proj column, concatenated. rows (I, m) from ``neuron_rows``."""
    up = mats.up[e][rows].reshape(rows.shape[0], -1)  # (I, m * H)
    down = mats.down[e].T  # (I, H)
    return torch.cat((up, down), dim=1)


def match_neurons(reference: Tensor, other: Tensor) -> Tensor:
    """Weight matching (MC-SMoE): perm (I,) long maximising sum_j <reference[j], other[perm[j]]>.

    reference, other (I, D). Solved exactly by the Hungarian algorithm (scipy's linear_sum_assignment).
    """
    score = (reference.double() @ other.double().T).numpy()  # (I, I)
    rows, cols = linear_sum_assignment(score, maximize=True)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.as_tensor(perm, dtype=torch.long)


def permute_expert(mats: ExpertMatrices, e: int, rows: Tensor, perm: Tensor) -> ExpertMatrices:
    """Expert e with its intermediate neurons reordered: new neuron j = old neuron perm[j] (same function).

    Returns a one-expert ExpertMatrices (leading dim 1). rows (I, m), perm (I,).
    """
    index = torch.arange(mats.up.shape[1])
    index[rows.reshape(-1)] = rows[perm].reshape(-1)  # the rows of neuron j become those of neuron perm[j]
    up = mats.up[e][index]
    down = mats.down[e][:, perm]
    up_bias = None if mats.up_bias is None else mats.up_bias[e][index][None]
    down_bias = None if mats.down_bias is None else mats.down_bias[e][None]
    norm = None if mats.norm is None else mats.norm[e][None]  # per-expert norm rows act after down_proj: unmoved
    return ExpertMatrices(up=up[None], down=down[None], up_bias=up_bias, down_bias=down_bias, norm=norm)


def merge_group(members: list[ExpertMatrices], weights: list[float]) -> ExpertMatrices:
    """Frequency-weighted average of (aligned) one-expert matrices: sum_i w_i W_i with sum_i w_i = 1 (per-expert
    norm rows, Ergo, averaged the same way)."""
    if len(members) != len(weights) or not members:
        raise ValueError("need one weight per member and at least one member")
    w = torch.tensor(weights, dtype=torch.float32)
    if torch.any(w < 0) or abs(float(w.sum()) - 1) > 1e-6:
        raise ValueError(f"merge weights must be >= 0 and sum to 1, got {weights}")

    def total(parts: list[Tensor]) -> Tensor:  # w_1 P_1 + w_2 P_2 + ..., in member order
        return functools.reduce(operator.add, (wi * p for wi, p in zip(w, parts, strict=True)))

    def avg(parts: list[Tensor | None]) -> Tensor | None:
        present = [p for p in parts if p is not None]
        if not present:
            return None
        if len(present) != len(parts):
            raise ValueError("some members have this bias and others do not")
        return total(present)

    return ExpertMatrices(up=total([m.up for m in members]), down=total([m.down for m in members]),
                          up_bias=avg([m.up_bias for m in members]), down_bias=avg([m.down_bias for m in members]),
                          norm=avg([m.norm for m in members]))


def group_logit(logits: Tensor, group: list[int], sigmoid: bool) -> Tensor:
    """(T, E) router logits -> (T,) the logit a merged expert should have so that it takes the group's routing.

    softmax routers: logsumexp over the group, so softmax over the merged logits gives every merged expert
    exactly the summed probability of its group. Sigmoid routers (independent scores): the log-odds of the
    group's noisy-or 1 - prod(1 - s_i), the sigmoid analogue of a sum that stays in (0, 1).
    Both equal the member's own logit for a one-expert group.
    """
    g = logits[:, group].double()
    if not sigmoid:
        return torch.logsumexp(g, dim=1)
    log_none = -torch.nn.functional.softplus(g).sum(dim=1)  # log prod(1 - s_i)
    return torch.log((-torch.expm1(log_none)).clamp_min(1e-300)) - log_none


def lstsq_rows(x: Tensor, y: Tensor, bias: bool, ridge: float) -> tuple[Tensor, Tensor | None]:
    """Least squares linear map x (T, H) -> y (T, K): weight (K, H) and, with ``bias``, intercept (K,).

    Ridge ``ridge * mean(diag(X^T X))`` keeps the solve well posed with few tokens; float64 normal equations.
    """
    xd = x.double()
    if bias:
        xd = torch.cat((xd, torch.ones(xd.shape[0], 1, dtype=xd.dtype)), dim=1)
    gram = xd.T @ xd
    lam = ridge * float(gram.diagonal().mean()) if gram.numel() else 0.0
    gram = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    sol = torch.linalg.solve(gram, xd.T @ y.double())  # (H [+1], K)
    if bias:
        return sol[:-1].T.float(), sol[-1].float()
    return sol.T.float(), None
