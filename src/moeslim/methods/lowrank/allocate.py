"""Per-expert ranks under a layer's parameter budget: greedy on whitened energy per parameter.

Each projection m (out_m, in_m) at rank r costs min(r (out_m + in_m), out_m in_m) parameters (a rank that would
cost more than the matrix keeps the matrix dense, exactly). Its error falls by s_{m,r}^2 when rank r + 1 is added
(``methods.whitened_svd.WhitenedSVD.energies``, decreasing in r). Greedy: repeatedly buy the step with the largest
error drop per parameter that still fits; the step that reaches the dense break-even buys the whole rest of the
matrix. With decreasing gains per matrix this is the classic greedy for a separable concave knapsack (optimal up to
the last, partially fitting step).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from torch import Tensor

from moeslim.methods.whitened_svd import is_dense

__all__ = ["allocate_ranks", "projection_params", "shared_base_rank"]


def projection_params(rank: int, out: int, inp: int) -> int:
    """Parameters a projection of this rank stores (dense when factors would not be smaller)."""
    return out * inp if is_dense(rank, out, inp) else rank * (out + inp)


def allocate_ranks(energies: Sequence[Tensor], shapes: Sequence[tuple[int, int]], budget: int, min_rank: int
                   ) -> list[int]:
    """Ranks (one per projection) with sum of projection_params <= budget, greedy on energy per parameter.

    energies[m] (r_m,) decreasing s^2 of projection m; shapes[m] = (out, in). A rank equal to min(out, in)
    means "kept dense". Raises ValueError when even ``min_rank`` everywhere exceeds the budget.
    """
    full = [min(o, i) for o, i in shapes]
    ranks = [min(min_rank, f) for f in full]
    ranks = [f if is_dense(r, o, i) else r for r, f, (o, i) in zip(ranks, full, shapes, strict=True)]
    spent = sum(projection_params(r, o, i) for r, (o, i) in zip(ranks, shapes, strict=True))
    if spent > budget:
        raise ValueError(f"min_rank={min_rank} on every expert needs {spent} parameters, over the budget {budget}; "
                         "raise the ratio or lower min_rank")

    def step(m: int) -> tuple[float, int, int, float] | None:
        """(-gain per parameter, m, cost, gain) of projection m's next purchase, None when it is dense."""
        r, (o, i) = ranks[m], shapes[m]
        if r >= full[m]:
            return None
        if is_dense(r + 1, o, i):  # going dense buys every remaining direction
            gain, cost = float(energies[m][r:].sum()), o * i - projection_params(r, o, i)
        else:
            gain, cost = float(energies[m][r]), o + i
        return (-gain / max(cost, 1), m, cost, gain)

    heap = [s for m in range(len(shapes)) if (s := step(m)) is not None]
    heapq.heapify(heap)
    while heap:
        _, m, cost, _ = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # later steps of m cost as much or more, and the budget left only shrinks
        spent += cost
        o, i = shapes[m]
        ranks[m] = full[m] if is_dense(ranks[m] + 1, o, i) else ranks[m] + 1
        nxt = step(m)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return ranks


def shared_base_rank(experts: int, out: int, inp: int, budget: int, min_rank: int) -> int:
    """D2-MoE: the one delta rank of every expert when a shared base (out, in) is stored once.

    Largest r with out * in + experts * projection_params(r, out, inp) <= budget (min(out, in): deltas kept
    dense). Raises ValueError when the base and ``min_rank`` deltas do not fit.
    """
    spare = budget - out * inp
    full = min(out, inp)
    rank = full if spare >= experts * out * inp else max(spare, 0) // (experts * (out + inp))
    rank = full if is_dense(rank, out, inp) else rank
    if spare < 0 or rank < min(min_rank, full):
        raise ValueError(f"a shared base ({out * inp} parameters) and rank-{min_rank} deltas for {experts} experts "
                         f"do not fit the budget of {budget}; raise the ratio or lower min_rank")
    return rank
