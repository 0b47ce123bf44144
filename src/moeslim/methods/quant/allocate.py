"""Bit-width allocation for mixed-precision experts (PMQ, MC-MoE, Huang et al. 2024, ICLR 2025).

Each expert i gets one width from a candidate set ``widths`` (J values, e.g. 1, 2, 3 bits) so that the
sum of widths stays within a bit budget and the summed cost ``cost[i, j]`` is minimal. The problem is a
small multiple-choice knapsack over integer bit totals, so an exact dynamic program solves it: no solver
tolerances (a MILP solver stops at an absolute gap, which hides the tiny costs of rarely routed experts),
no rescaling of costs, and deterministic ties. It reproduces all 288 of the authors' published
Mixtral-8x7B allocations (they used Gurobi). Cost: O(E * J * E * max width) per layer, microseconds to
milliseconds for real models.

All functions are pure: arrays in, arrays out. Shapes: E experts, J candidate widths, L layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict

import numpy as np

__all__ = [
    "AUTHORS_COST_SETTINGS",
    "allocate_bits",
    "allocate_bits_global",
    "allocate_layer_widths",
    "budget_range",
    "pmq_costs",
    "random_allocation",
    "uniform_allocation",
]

# The MC-MoE authors' code (see tests/data/mcmoe_mixtral_8x7b_factors.json `notes`): frequencies and
# routing-weight sums normalised by their per-layer sums, error raised to alpha (gamma unused), x1000.
class CostSettings(TypedDict):
    """Keyword settings of ``pmq_costs`` beyond the factors (one named set: the authors' code)."""

    alpha: float
    beta: float
    normalise: Literal["none", "sum"]
    eps_exponent: Literal["gamma", "alpha"]
    scale: float


AUTHORS_COST_SETTINGS: CostSettings = {
    "alpha": 1.0,
    "beta": 1.5,
    "normalise": "sum",
    "eps_exponent": "alpha",
    "scale": 1000.0,
}

# Budgets are sums of integer widths; a float budget like E * 2.5 must not lose a bit to rounding noise.
_BUDGET_EPS = 1e-9


def _as_vector(name: str, value: Sequence[float] | np.ndarray, length: int | None = None) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return arr


def _check_widths(widths: Sequence[int] | np.ndarray) -> np.ndarray:
    w = np.asarray(widths)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"widths must be a non-empty 1-D sequence, got {widths!r}")
    if not np.all(np.equal(np.mod(w, 1), 0)) or np.any(w <= 0):
        raise ValueError(f"widths must be positive integers, got {widths!r}")
    w = w.astype(np.int64)
    if len(set(w.tolist())) != w.size:
        raise ValueError(f"widths must be distinct, got {widths!r}")
    return w


def _check_costs(costs: np.ndarray, n_widths: int) -> np.ndarray:
    c = np.asarray(costs, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != n_widths or c.shape[0] == 0:
        raise ValueError(f"costs must have shape (E, {n_widths}) with E >= 1, got {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("costs must be finite")
    return c


def pmq_costs(
    freq: Sequence[float] | np.ndarray,
    weight: Sequence[float] | np.ndarray,
    err: np.ndarray,
    alpha: float = 1.0,
    beta: float = 1.5,
    gamma: float = 2.0,
    *,
    normalise: Literal["none", "sum"] = "none",
    eps_exponent: Literal["gamma", "alpha"] = "gamma",
    scale: float = 1.0,
) -> np.ndarray:
    """PMQ cost of each (expert, width): ``scale * phi_i^alpha * w_i^beta * eps_ij^e``.

    Args:
        freq: (E,) activation frequency phi_i (share of routed tokens, or raw counts with
            ``normalise="sum"``).
        weight: (E,) routing weight w_i (mean gate probability over routed tokens, or summed
            probabilities with ``normalise="sum"``).
        err: (E, J) quantization error eps_ij of the block output with only expert i at width j.
        alpha, beta, gamma: exponents. Paper: gamma = 2, alpha and beta in {1, 1.5, 2}.
        normalise: "sum" divides freq and weight by their per-layer sums (the authors' code).
        eps_exponent: "gamma" (paper) or "alpha" (the authors' code raises eps to alpha; gamma unused).
        scale: constant factor (authors: 1000); it does not change the argmin.

    Returns:
        (E, J) float64 costs. ``pmq_costs(..., **AUTHORS_COST_SETTINGS)`` is the authors' cost.
    """
    e = np.asarray(err, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"err must have shape (E, J), got {e.shape}")
    if not np.all(np.isfinite(e)) or np.any(e < 0):
        raise ValueError("err must be finite and non-negative")
    phi = _as_vector("freq", freq, e.shape[0])
    w = _as_vector("weight", weight, e.shape[0])
    if normalise == "sum":
        if phi.sum() <= 0 or w.sum() <= 0:
            raise ValueError("normalise='sum' needs freq and weight with a positive sum")
        phi, w = phi / phi.sum(), w / w.sum()
    elif normalise != "none":
        raise ValueError(f"normalise must be 'none' or 'sum', got {normalise!r}")
    if eps_exponent not in ("gamma", "alpha"):
        raise ValueError(f"eps_exponent must be 'gamma' or 'alpha', got {eps_exponent!r}")
    g = gamma if eps_exponent == "gamma" else alpha
    return scale * (phi**alpha * w**beta)[:, None] * e**g


def budget_range(
    n_experts: int, widths: Sequence[int] | np.ndarray, require_top_two: bool = False
) -> tuple[int, int]:
    """(minimum, maximum) total bits achievable by ``n_experts`` experts (one width each)."""
    w = np.sort(_check_widths(widths))
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    lo, hi = n_experts * int(w[0]), n_experts * int(w[-1])
    if require_top_two:
        _check_top_two(n_experts, w)
        lo = (n_experts - 2) * int(w[0]) + int(w[-1]) + int(w[-2])
    return lo, hi


def _check_top_two(n_experts: int, sorted_widths: np.ndarray) -> None:
    if sorted_widths.size < 2 or n_experts < 2:
        raise ValueError(
            "require_top_two needs at least 2 candidate widths and 2 experts, "
            f"got widths={sorted_widths.tolist()} and {n_experts} experts"
        )


# Flags of the authors' rule: bit 0 = an expert at the top width, bit 1 = an expert at the second-top width.
_TOP, _SECOND = 1, 2


def _width_flags(widths: np.ndarray, require_top_two: bool) -> tuple[np.ndarray, int, int]:
    """(J,) flag bits per width, number of flag states K, and the flags every allocation must cover."""
    if not require_top_two:
        return np.zeros(widths.size, dtype=np.int64), 1, 0
    order = np.argsort(widths)
    flags = np.zeros(widths.size, dtype=np.int64)
    flags[order[-1]], flags[order[-2]] = _TOP, _SECOND
    return flags, 4, _TOP | _SECOND


def _suffix_table(costs: np.ndarray, widths: np.ndarray, flags: np.ndarray, n_flags: int) -> np.ndarray:
    """Exact DP over integer bit totals (a multiple-choice knapsack).

    Returns F (E + 1, S + 1, K) float64 with S = E * max(widths): F[k, s, need] is the smallest cost of
    experts k..E-1 that use exactly s bits and cover the flags ``need`` (the authors' rule; K = 1 without
    it), inf when impossible. Costs are summed from the last expert to the first, c_k + (c_{k+1} + (...)),
    in float64 without any rescaling; float addition is monotone, so F[0] is exactly the minimum of that
    sum over all allocations (no solver tolerance).
    """
    n_experts = costs.shape[0]
    top = n_experts * int(widths.max())
    table = np.full((n_experts + 1, top + 1, n_flags), np.inf)
    table[n_experts, 0, 0] = 0.0
    for k in range(n_experts - 1, -1, -1):
        nxt, cur = table[k + 1], table[k]
        for j, w in enumerate(widths.tolist()):
            for need in range(n_flags):
                rest = need & ~int(flags[j])  # what experts k+1.. must still cover
                # new total s = s' + w
                np.minimum(cur[w:, need], costs[k, j] + nxt[: top + 1 - w, rest], out=cur[w:, need])
    return table


def _layer_curve(costs: np.ndarray, widths: np.ndarray, require_top_two: bool) -> np.ndarray:
    """(S + 1,) exact minimum cost of one layer for every total of bits s (inf where unreachable)."""
    flags, n_flags, need = _width_flags(widths, require_top_two)
    return _suffix_table(costs, widths, flags, n_flags)[0, :, need]


def _reconstruct(costs: np.ndarray, widths: np.ndarray, require_top_two: bool, total: int) -> np.ndarray:
    """(E,) the allocation of exactly ``total`` bits whose cost is the table's minimum.

    Ties (equal float costs) go to the widest width of the lowest-index expert first, so the result is
    deterministic and does not depend on a solver's path.
    """
    flags, n_flags, need = _width_flags(widths, require_top_two)
    table = _suffix_table(costs, widths, flags, n_flags)
    if not np.isfinite(table[0, total, need]):
        raise ValueError(f"no allocation uses exactly {total} bits")
    out = np.empty(costs.shape[0], dtype=np.int64)
    widest_first = np.argsort(-widths, kind="stable").tolist()
    for k in range(costs.shape[0]):
        target = table[k, total, need]
        for j in widest_first:
            w, rest = int(widths[j]), need & ~int(flags[j])
            if w <= total and costs[k, j] + table[k + 1, total - w, rest] == target:
                out[k], total, need = w, total - w, rest
                break
        else:  # impossible: target was computed from exactly these candidates
            raise RuntimeError(f"allocation DP could not be traced back at expert {k}")
    return out


def _best_total(curve: np.ndarray, budget_total: float) -> int:
    """Total bits <= budget with the smallest cost; on a tie the larger total (use the budget)."""
    cap = min(int(np.floor(budget_total + _BUDGET_EPS)), curve.size - 1)
    values = curve[: cap + 1]
    best = values.min()
    if not np.isfinite(best):
        raise ValueError(f"no allocation fits {budget_total} bits")
    return int(np.flatnonzero(values == best)[-1])


def _check_budget(lo: int, hi: int, budget_total: float, what: str) -> None:
    if not np.isfinite(budget_total):
        raise ValueError(f"budget_total must be finite, got {budget_total}")
    if budget_total + _BUDGET_EPS < lo:
        raise ValueError(
            f"infeasible budget {budget_total} bits for {what}: achievable totals range from "
            f"{lo} (minimum) to {hi} (maximum) bits"
        )


def allocate_bits(
    costs: np.ndarray,
    widths: Sequence[int] | np.ndarray,
    budget_total: float,
    *,
    require_top_two: bool = False,
) -> np.ndarray:
    """Exact per-layer PMQ allocation: minimise sum cost[i, j] x_ij s.t. sum widths_j x_ij <= budget.

    Solved by an exact dynamic program over integer bit totals (``_suffix_table``). Among allocations of
    equal cost the one using more bits wins (the budget is used), then wider widths for lower-index
    experts: deterministic, with no tolerance and no tie-break perturbation of the costs.

    Args:
        costs: (E, J) cost of expert i at candidate width ``widths[j]`` (e.g. from ``pmq_costs``).
        widths: (J,) distinct positive integer bit widths, e.g. (1, 2, 3).
        budget_total: total bits for the layer (E * average bits); integer widths use floor(budget).
        require_top_two: the authors' rule, at least one expert at the highest width and one at the
            second-highest (the middle one for three candidates).

    Returns:
        (E,) int64 width per expert. Raises ValueError when no allocation fits the budget.
    """
    w = _check_widths(widths)
    c = _check_costs(costs, w.size)
    lo, hi = budget_range(c.shape[0], w, require_top_two)
    _check_budget(lo, hi, budget_total, f"{c.shape[0]} experts and widths {w.tolist()}")
    total = _best_total(_layer_curve(c, w, require_top_two), budget_total)
    return _reconstruct(c, w, require_top_two, total)


def allocate_bits_global(
    costs: Sequence[np.ndarray],
    widths: Sequence[int] | np.ndarray,
    budget_total: float,
    *,
    require_top_two: bool = False,
) -> list[np.ndarray]:
    """One exact allocation across layers: a single bit budget for the whole model.

    Args:
        costs: L arrays of shape (E_l, J); costs must be comparable across layers for this to make
            sense (per-layer normalised costs are, up to the per-layer scale of eps).
        widths: (J,) candidate widths shared by all layers.
        budget_total: total bits summed over all experts of all layers.
        require_top_two: the authors' rule, applied to each layer separately.

    Returns:
        L arrays (E_l,) int64 of widths. Experts are assumed to have equal parameter counts.
    """
    w = _check_widths(widths)
    if len(costs) == 0:
        raise ValueError("costs must hold at least one layer")
    blocks = [_check_costs(c, w.size) for c in costs]
    ranges = [budget_range(b.shape[0], w, require_top_two) for b in blocks]
    lo, hi = sum(r[0] for r in ranges), sum(r[1] for r in ranges)
    _check_budget(lo, hi, budget_total, f"{len(blocks)} layers and widths {w.tolist()}")
    curves = [_layer_curve(b, w, require_top_two) for b in blocks]
    totals = _combine_layers(curves, budget_total)
    return [_reconstruct(b, w, require_top_two, s) for b, s in zip(blocks, totals, strict=True)]


def _combine_layers(curves: Sequence[np.ndarray], budget_total: float) -> list[int]:
    """Per-layer bit totals of the cheapest model within ``budget_total``, given each layer's exact cost curve
    (curve[s]: minimum cost of the layer at exactly s bits, inf where unreachable).

    A second DP over layers: best[l][t] = min cost of layers l..L-1 using exactly t bits, summed from the last
    layer to the first like the experts inside a layer (exact, float64, no rescaling).
    """
    size = sum(c.size - 1 for c in curves) + 1
    best = [np.full(size, np.inf) for _ in range(len(curves) + 1)]
    best[-1][0] = 0.0
    for layer in range(len(curves) - 1, -1, -1):
        nxt, cur = best[layer + 1], best[layer]
        for s in np.flatnonzero(np.isfinite(curves[layer])).tolist():
            np.minimum(cur[s:], curves[layer][s] + nxt[: size - s], out=cur[s:])
    total = _best_total(best[0], budget_total)
    out = []
    for layer, curve in enumerate(curves):
        # The largest layer total that reaches the optimum: ties prefer earlier layers' bits, deterministically.
        nxt = best[layer + 1]
        s = max(s for s in np.flatnonzero(np.isfinite(curve)).tolist()
                if s <= total and curve[s] + nxt[total - s] == best[layer][total])
        out.append(s)
        total -= s
    return out


def allocate_layer_widths(
    costs: Sequence[np.ndarray],
    widths: Sequence[int] | np.ndarray,
    budget_total: float,
) -> list[np.ndarray]:
    """PMQ at engine granularity: one width for every expert of a layer, under one model-wide bit budget.

    The same program as ``allocate_bits_global`` with the variables of a layer's experts tied (x_ij = x_j for
    every expert i of layer l): layer l at width w costs sum_i cost[i, w] and takes E_l * w bits. Each layer's
    cost curve then has one point per width, and the exact layer DP (``_combine_layers``) picks them.

    Args:
        costs: L arrays of shape (E_l, J), comparable across layers (as for ``allocate_bits_global``).
        widths: (J,) candidate widths shared by all layers.
        budget_total: total bits summed over all experts of all layers.

    Returns:
        L arrays (E_l,) int64, each constant (the layer's width). Experts are assumed to have equal parameter
        counts. Raises ValueError when even the narrowest width everywhere exceeds the budget.
    """
    w = _check_widths(widths)
    if len(costs) == 0:
        raise ValueError("costs must hold at least one layer")
    blocks = [_check_costs(c, w.size) for c in costs]
    lo = sum(b.shape[0] * int(w.min()) for b in blocks)
    hi = sum(b.shape[0] * int(w.max()) for b in blocks)
    _check_budget(lo, hi, budget_total, f"{len(blocks)} layers of one width each and widths {w.tolist()}")
    curves = []
    for b in blocks:
        curve = np.full(b.shape[0] * int(w.max()) + 1, np.inf)
        # A layer's cost at width j: its experts' costs summed in the order the expert DP sums them.
        for j, width in enumerate(w.tolist()):
            curve[b.shape[0] * width] = _right_to_left_sum(b[:, j])
        curves.append(curve)
    totals = _combine_layers(curves, budget_total)
    return [np.full(b.shape[0], s // b.shape[0], dtype=np.int64) for b, s in zip(blocks, totals, strict=True)]


def _right_to_left_sum(values: np.ndarray) -> float:
    """v_0 + (v_1 + (... + v_{n-1})): float sums in the allocator's order, so ties are exact."""
    total = 0.0
    for v in values[::-1].tolist():
        total = v + total
    return total


def uniform_allocation(n_experts: int, widths: Sequence[int] | np.ndarray, budget_total: float) -> np.ndarray:
    """(E,) every expert at the largest candidate width whose uniform total fits the budget."""
    w = np.sort(_check_widths(widths))
    lo, hi = budget_range(n_experts, w)
    _check_budget(lo, hi, budget_total, f"{n_experts} experts and widths {w.tolist()}")
    fits = w[n_experts * w <= budget_total + _BUDGET_EPS]
    return np.full(n_experts, int(fits[-1]), dtype=np.int64)


def random_allocation(
    n_experts: int, widths: Sequence[int] | np.ndarray, budget_total: float, seed: int
) -> np.ndarray:
    """(E,) random widths whose total is the largest achievable total <= budget (exactly the budget
    when it is achievable), drawn uniformly among all assignments with that total.

    Sequential sampling with exact counts: expert k takes width w with probability proportional to the
    number of completions of experts k+1..E-1 that reach the target total.
    """
    w = _check_widths(widths)
    lo, hi = budget_range(n_experts, w)
    _check_budget(lo, hi, budget_total, f"{n_experts} experts and widths {w.tolist()}")
    cap = int(min(np.floor(budget_total + _BUDGET_EPS), hi))
    ways = _completion_counts(n_experts, w, cap)
    target = max(s for s in range(cap + 1) if ways[0][s] > 0)
    rng = np.random.default_rng(seed)
    out = np.empty(n_experts, dtype=np.int64)
    remaining = target
    for k in range(n_experts):
        options = [int(b) for b in w if b <= remaining and ways[k + 1][remaining - b] > 0]
        counts = [ways[k + 1][remaining - b] for b in options]
        total = sum(counts)
        # Python ints keep the counts exact; a uniform integer draw keeps the sampling exact too.
        r = int(rng.integers(total)) if total < 2**63 else _big_randint(rng, total)
        pick = 0
        while r >= counts[pick]:
            r -= counts[pick]
            pick += 1
        out[k] = options[pick]
        remaining -= options[pick]
    return out


def _completion_counts(n_experts: int, widths: np.ndarray, cap: int) -> list[list[int]]:
    """ways[k][s] = number of width assignments of experts k..E-1 summing to s (s <= cap)."""
    ways = [[0] * (cap + 1) for _ in range(n_experts + 1)]
    ways[n_experts][0] = 1
    for k in range(n_experts - 1, -1, -1):
        nxt, cur = ways[k + 1], ways[k]
        for s in range(cap + 1):
            cur[s] = sum(nxt[s - int(b)] for b in widths if b <= s)
    return ways


def _big_randint(rng: np.random.Generator, total: int) -> int:
    n_bytes = (total.bit_length() + 7) // 8 + 8
    return int.from_bytes(rng.bytes(n_bytes), "little") % total
