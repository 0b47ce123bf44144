"""Bit-width allocation for mixed-precision experts (PMQ, MC-MoE, Huang et al. 2024, ICLR 2025).

Each expert i gets one width from a candidate set ``widths`` (J values, e.g. 1, 2, 3 bits) so that the
sum of widths stays within a bit budget and the summed cost ``cost[i, j]`` is minimal. The problem is a
small multiple-choice knapsack; we solve it exactly as a MILP with ``scipy.optimize.milp`` (HiGHS),
which reproduces the authors' published Mixtral-8x7B allocations (they used Gurobi).

All functions are pure: arrays in, arrays out. Shapes: E experts, J candidate widths, L layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

__all__ = [
    "AUTHORS_COST_SETTINGS",
    "allocate_bits",
    "allocate_bits_global",
    "budget_range",
    "pmq_costs",
    "random_allocation",
    "uniform_allocation",
]

# The MC-MoE authors' code (see tests/data/mcmoe_mixtral_8x7b_factors.json `notes`): frequencies and
# routing-weight sums normalised by their per-layer sums, error raised to alpha (gamma unused), x1000.
AUTHORS_COST_SETTINGS: dict[str, object] = {
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


def _layer_constraints(
    n_experts: int, widths: np.ndarray, offset: int, n_vars: int, require_top_two: bool
) -> list[LinearConstraint]:
    """One width per expert, plus the authors' rule (>= 1 expert at the top and second-top width)."""
    n_w = widths.size
    one_each = np.zeros((n_experts, n_vars))
    for i in range(n_experts):
        one_each[i, offset + i * n_w : offset + (i + 1) * n_w] = 1.0
    cons = [LinearConstraint(one_each, 1.0, 1.0)]
    if require_top_two:
        order = np.argsort(widths)
        for j in (order[-1], order[-2]):
            row = np.zeros((1, n_vars))
            row[0, offset + j : offset + n_experts * n_w : n_w] = 1.0
            cons.append(LinearConstraint(row, 1.0, np.inf))
    return cons


def _solve(
    cost_blocks: list[np.ndarray], widths: np.ndarray, budget_total: float, require_top_two: bool
) -> list[np.ndarray]:
    n_w = widths.size
    sizes = [c.shape[0] for c in cost_blocks]
    n_vars = sum(sizes) * n_w
    c = np.concatenate([b.reshape(-1) for b in cost_blocks])
    # HiGHS stops at an absolute gap of 1e-6: rescale so that gap is negligible for any cost scale.
    span = np.max(np.abs(c))
    c = c / span if span > 0 else c
    cons: list[LinearConstraint] = []
    offset = 0
    for n in sizes:
        cons += _layer_constraints(n, widths, offset, n_vars, require_top_two)
        offset += n * n_w
    bits_row = np.tile(widths.astype(np.float64), sum(sizes))[None, :]
    cons.append(LinearConstraint(bits_row, -np.inf, np.floor(budget_total + _BUDGET_EPS)))
    res = milp(
        c,
        constraints=cons,
        integrality=np.ones(n_vars),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"MILP failed: status {res.status}, {res.message}")
    choice = np.round(res.x).reshape(-1, n_w).argmax(axis=1)
    out, start = [], 0
    for n in sizes:
        out.append(widths[choice[start : start + n]].copy())
        start += n
    return out


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
    return _solve([c], w, budget_total, require_top_two)[0]


def allocate_bits_global(
    costs: Sequence[np.ndarray],
    widths: Sequence[int] | np.ndarray,
    budget_total: float,
    *,
    require_top_two: bool = False,
) -> list[np.ndarray]:
    """One MILP across layers: a single bit budget for the whole model.

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
    return _solve(blocks, w, budget_total, require_top_two)


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
