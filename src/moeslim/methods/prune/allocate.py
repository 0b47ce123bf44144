"""Non-uniform per-layer expert counts: an exact dynamic programme over the layers' loss curves.

Each layer l has a loss curve c_l(k) = the squared reconstruction error of its best kept set of size k (from
enumeration, or the search's removal path). The allocation minimises sum_l c_l(k_l) subject to sum_l k_l = total.
Squared errors are summed because the layers' output errors add into the residual stream: if they are
uncorrelated, the squared norm of the sum is the sum of the squared norms. The DP over (layer, experts used so
far) is exact: O(L x total x sizes) additions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def allocate_counts(curves: Mapping[int, Mapping[int, float]], total: int) -> dict[int, int]:
    """{layer: kept count} minimising sum of ``curves[layer][count]`` with the counts summing to ``total``.

    Ties go to the allocation found first scanning layers in order and counts ascending (deterministic).
    Raises ValueError when no allocation reaches ``total``.
    """
    layers = sorted(curves)
    if not layers:
        raise ValueError("no layers to allocate")
    # best[t] = (cost, counts so far) over the layers seen, using t experts in total
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for layer in layers:
        step: dict[int, tuple[float, tuple[int, ...]]] = {}
        for used, (cost, counts) in best.items():
            for size, value in sorted(curves[layer].items()):
                t = used + size
                if t > total or not math.isfinite(value):
                    continue
                candidate = (cost + value, (*counts, size))
                if t not in step or candidate[0] < step[t][0]:
                    step[t] = candidate
        best = step
    if total not in best:
        lows = sum(min(c) for c in curves.values())
        highs = sum(max(c) for c in curves.values())
        raise ValueError(f"total={total} is not reachable with the layers' sizes (reachable: {lows}..{highs})")
    return dict(zip(layers, best[total][1], strict=True))
