"""Grouping experts for merging: HC-SMoE (hierarchical clustering) and MC-SMoE (dominant experts), pure maths."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["average_linkage_groups", "dominant_groups", "frequency_weights", "global_group_counts", "pairwise_distance",
           "representative"]


def pairwise_distance(features: Tensor, metric: str) -> Tensor:
    """features (E, D) -> (E, E) float64 distances: 1 - cosine similarity, or Euclidean."""
    f = features.double()
    if metric == "cosine":
        unit = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (1 - unit @ unit.T).clamp_min(0).fill_diagonal_(0)
    if metric == "euclidean":
        return torch.cdist(f, f)
    raise ValueError(f"unknown metric {metric!r}")


def average_linkage_groups(distance: Tensor, keep: int) -> list[list[int]]:
    """Agglomerative clustering with average linkage until ``keep`` clusters remain (HC-SMoE).

    distance (E, E) symmetric. The two closest clusters are merged at each step (ties: lowest ids); cluster
    distances follow Lance-Williams for average linkage, d(a+b, c) = (n_a d(a, c) + n_b d(b, c)) / (n_a + n_b),
    which equals the mean of all pairwise distances between the members. Returns sorted member lists.
    """
    n = distance.shape[0]
    if not 1 <= keep <= n:
        raise ValueError(f"keep={keep} must be in [1, {n}]")
    d = distance.double().clone()
    d.fill_diagonal_(float("inf"))
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    alive = torch.ones(n, dtype=torch.bool)
    while len(members) > keep:
        masked = d.masked_fill(~(alive[:, None] & alive[None, :]), float("inf"))
        flat = int(torch.argmin(masked))  # first minimum in row-major order: lowest ids on ties
        a, b = sorted((flat // n, flat % n))
        na, nb = len(members[a]), len(members[b])
        d[a, :] = (na * d[a, :] + nb * d[b, :]) / (na + nb)
        d[:, a] = d[a, :]
        d[a, a] = float("inf")
        members[a] = sorted(members[a] + members.pop(b))
        alive[b] = False
    return sorted(members.values(), key=lambda g: g[0])


def dominant_groups(similarity: Tensor, counts: Tensor, keep: int) -> list[list[int]]:
    """MC-SMoE grouping: the ``keep`` most-routed experts dominate; every other expert joins the dominant expert
    it is most similar to. similarity (E, E), counts (E,) -> sorted member lists (ties: lowest ids)."""
    n = similarity.shape[0]
    if not 1 <= keep <= n:
        raise ValueError(f"keep={keep} must be in [1, {n}]")
    order = sorted(range(n), key=lambda e: (-float(counts[e]), e))
    dominant = sorted(order[:keep])
    groups = {d: [d] for d in dominant}
    for e in range(n):
        if e in groups:
            continue
        sims = similarity[e, dominant].double()
        groups[dominant[int(torch.argmax(sims))]].append(e)
    return [sorted(groups[d]) for d in dominant]


def frequency_weights(group: list[int], counts: Tensor) -> list[float]:
    """Merge weights of a group's members: their share of the group's routed tokens (uniform if none routed)."""
    c = torch.tensor([float(counts[e]) for e in group], dtype=torch.float64)
    total = float(c.sum())
    return [1.0 / len(group)] * len(group) if total <= 0 else (c / total).tolist()


def representative(group: list[int], weights: list[float]) -> int:
    """The member with the largest merge weight (ties: lowest id): neurons are aligned onto it."""
    return min(zip(group, weights, strict=True), key=lambda item: (-item[1], item[0]))[0]


def global_group_counts(counts: dict[int, Tensor], keep: int) -> dict[int, int]:
    """MC-SMoE's global group counts: {layer: routed counts (E,)} -> {layer: groups}, ``keep`` per layer on average.

    Every layer's counts are normalised to routing frequencies; the ``keep * layers`` most frequent experts of the
    whole model become dominant (ties: lower layer, then lower expert id), so layers whose routing is spread over
    many experts keep more groups. Each layer's most-routed expert is always dominant (at least one group).
    """
    if not counts:
        return {}
    layers = sorted(counts)
    experts = {int(counts[i].numel()) for i in layers}
    if len(experts) != 1 or not 1 <= keep <= next(iter(experts)):
        raise ValueError(f"keep={keep} must be in [1, experts] and every layer must have the same expert count")
    entries: list[tuple[float, int, int]] = []
    for i in layers:
        c = counts[i].double()
        freq = c / c.sum().clamp_min(1e-300)
        top = int(torch.argmax(freq))  # lowest id among ties
        entries += [(float("inf") if e == top else float(freq[e]), i, e) for e in range(freq.numel())]
    chosen = sorted(entries, key=lambda t: (-t[0], t[1], t[2]))[:keep * len(layers)]
    out = dict.fromkeys(layers, 0)
    for _, i, _ in chosen:
        out[i] += 1
    return out
