"""One-pass saliency criteria for expert pruning (ALGORITHMS.md sections 5 and 6).

Each criterion gives a score per expert (higher = more important); the kept set is the ``keep`` highest scores,
ties broken by the lower expert id, returned sorted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moeslim.calibrate import ExpertOutputSample, RoutingSummary
from moeslim.methods.prune.enumerate import RouteFn


def top_experts(scores: Tensor, keep: int) -> tuple[int, ...]:
    """The ``keep`` experts with the highest score (ties: lower id first), sorted.  scores (E,)"""
    if not 0 < keep <= scores.numel():
        raise ValueError(f"keep={keep} must be in [1, {scores.numel()}]")
    # A stable ascending sort of -score keeps equal scores in id order.
    order = torch.sort(-scores.double(), stable=True).indices
    return tuple(sorted(int(e) for e in order[:keep]))


def top_per_group(scores: Tensor, per_group: int, n_group: int) -> tuple[int, ...]:
    """The ``per_group`` highest-scoring experts of each of ``n_group`` contiguous groups (group-limited routing
    whose groups are kept), sorted.  scores (E,)"""
    size = scores.numel() // n_group
    kept: list[int] = []
    for g in range(n_group):
        kept += [g * size + e for e in top_experts(scores[g * size : (g + 1) * size], per_group)]
    return tuple(sorted(kept))


def frequency_scores(routing: RoutingSummary) -> Tensor:
    """(E,) number of tokens that routed to each expert (top-k assignments)."""
    return routing.counts.double()


def soft_count_scores(routing: RoutingSummary) -> Tensor:
    """(E,) summed gate probabilities (before top-k) over all tokens."""
    return routing.soft_counts.double()


def reap_scores(sample: ExpertOutputSample, route_fn: RouteFn, device: torch.device | str | None = None) -> Tensor:
    """(E,) REAP saliency: mean over tokens routed to j of g_j(x) * ||f_j(x)||_2 (0 for experts never routed to).

    g_j is the routing weight as routed (renormalised top-k where the family renormalises, times any scaling).
    ``device``: where routing runs (the router's device).
    """
    weights, ids = route_fn(sample.logits.to(device), None)  # (T, k)
    weights, ids = weights.cpu(), ids.cpu()
    norms = sample.outputs.double().norm(dim=-1)  # (T, E)
    picked = norms.gather(1, ids) * weights.double()  # (T, k)
    num_experts = sample.outputs.shape[1]
    total = torch.zeros(num_experts, dtype=torch.float64).index_add_(0, ids.reshape(-1), picked.reshape(-1))
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts).double()
    return total / counts.clamp_min(1)


def random_subset(num_experts: int, keep: int, seed: int, n_group: int = 1) -> tuple[int, ...]:
    """A seeded uniformly random kept set (``n_group`` > 1: keep // n_group experts from each contiguous group)."""
    if not 0 < keep <= num_experts:
        raise ValueError(f"keep={keep} must be in [1, {num_experts}]")
    generator = torch.Generator().manual_seed(seed)
    if n_group > 1:
        return top_per_group(torch.rand(num_experts, generator=generator, dtype=torch.float64), keep // n_group,
                             n_group)
    return tuple(sorted(int(e) for e in torch.randperm(num_experts, generator=generator)[:keep]))
