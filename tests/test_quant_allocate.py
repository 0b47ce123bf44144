"""PMQ bit allocation: exact DP vs brute force (with ties, tiny costs), budgets, baselines, published allocations."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from moeslim.methods.quant.allocate import (
    AUTHORS_COST_SETTINGS,
    allocate_bits,
    allocate_bits_global,
    allocate_layer_widths,
    budget_range,
    pmq_costs,
    random_allocation,
    uniform_allocation,
)

FACTORS = Path(__file__).parent / "data" / "mcmoe_mixtral_8x7b_factors.json"
WIDTHS = (1, 2, 3)


def _brute_force(costs: np.ndarray, widths, budget: float, require_top_two: bool):
    best, best_choice = np.inf, None
    top, mid = sorted(widths)[-1], sorted(widths)[-2]
    for choice in itertools.product(range(len(widths)), repeat=costs.shape[0]):
        bits = [widths[j] for j in choice]
        if sum(bits) > budget or (require_top_two and (top not in bits or mid not in bits)):
            continue
        total = sum(costs[i, j] for i, j in enumerate(choice))
        if total < best:
            best, best_choice = total, np.array(bits)
    return best, best_choice


def _objective(costs: np.ndarray, widths, alloc: np.ndarray) -> float:
    index = {w: j for j, w in enumerate(widths)}
    return float(sum(costs[i, index[int(b)]] for i, b in enumerate(alloc)))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("require_top_two", [False, True])
def test_dp_matches_brute_force(seed: int, require_top_two: bool) -> None:
    rng = np.random.default_rng(seed)
    n_experts = 4 + seed % 2
    costs = rng.random((n_experts, 3)) * 10
    lo, hi = budget_range(n_experts, WIDTHS, require_top_two)
    for budget in range(lo, hi + 1):
        best, choice = _brute_force(costs, WIDTHS, budget, require_top_two)
        alloc = allocate_bits(costs, WIDTHS, budget, require_top_two=require_top_two)
        assert alloc.sum() <= budget
        assert _objective(costs, WIDTHS, alloc) == pytest.approx(best, rel=1e-12, abs=1e-12)
        np.testing.assert_array_equal(alloc, choice)


def _right_to_left(costs: np.ndarray, widths, bits) -> float:
    """c_0 + (c_1 + (... + c_{E-1})): the summation order of the allocator's DP, so float sums compare exactly."""
    index = {w: j for j, w in enumerate(widths)}
    total = 0.0
    for i in reversed(range(len(bits))):
        total = costs[i, index[int(bits[i])]] + total
    return total


def _enumerate(costs: np.ndarray, widths, budget: float, require_top_two: bool):
    """Every allocation: (min cost, then most bits, then the lexicographically widest) by brute force."""
    top, mid = sorted(widths)[-1], sorted(widths)[-2]
    best_key, best_bits = None, None
    for bits in itertools.product(sorted(widths, reverse=True), repeat=costs.shape[0]):  # widest first
        if sum(bits) > budget or (require_top_two and (top not in bits or mid not in bits)):
            continue
        key = (_right_to_left(costs, widths, bits), -sum(bits))
        if best_key is None or key < best_key:  # strict: the first (widest) of equal keys stays
            best_key, best_bits = key, np.array(bits)
    return best_key, best_bits


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("require_top_two", [False, True])
def test_exact_optimum_equals_enumeration_with_ties(seed: int, require_top_two: bool) -> None:
    # Small integer costs: many exact ties, so the tie rule (more bits, then wider earlier experts) is tested.
    rng = np.random.default_rng(200 + seed)
    widths = (1, 2, 3) if seed % 2 == 0 else (2, 4, 8)
    n_experts = 3 + seed % 3
    costs = rng.integers(0, 3, size=(n_experts, 3)).astype(np.float64)
    costs[rng.integers(n_experts)] = 0.0  # a never-routed expert: cost 0 at every width
    lo, hi = budget_range(n_experts, widths, require_top_two)
    for budget in range(lo, hi + 2):
        (best, neg_bits), choice = _enumerate(costs, widths, budget, require_top_two)
        alloc = allocate_bits(costs, widths, budget, require_top_two=require_top_two)
        assert _right_to_left(costs, widths, alloc) == best
        assert int(alloc.sum()) == -neg_bits
        np.testing.assert_array_equal(alloc, choice)
        np.testing.assert_array_equal(allocate_bits(costs, widths, budget, require_top_two=require_top_two), alloc)


@pytest.mark.parametrize("seed", range(6))
def test_exact_optimum_with_costs_across_many_magnitudes(seed: int) -> None:
    # Costs from 1e-15 to 1e3 in one layer (rarely vs often routed experts): no solver tolerance hides the tiny
    # ones, and the budget is used whenever the extra bits do not cost anything.
    rng = np.random.default_rng(300 + seed)
    n_experts = 6
    scale = 10.0 ** rng.uniform(-15, 3, size=(n_experts, 1))
    costs = np.sort(rng.random((n_experts, 3)), axis=1)[:, ::-1] * scale
    for budget in range(n_experts, 3 * n_experts + 1):
        (best, neg_bits), _ = _enumerate(costs, WIDTHS, budget, False)
        alloc = allocate_bits(costs, WIDTHS, budget)
        assert _right_to_left(costs, WIDTHS, alloc) == best
        assert int(alloc.sum()) == -neg_bits == budget


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("require_top_two", [False, True])
def test_global_dp_equals_enumeration(seed: int, require_top_two: bool) -> None:
    rng = np.random.default_rng(400 + seed)
    layers = [rng.integers(0, 4, size=(3, 3)).astype(np.float64) * s for s in (1.0, 10.0)]
    stacked = np.concatenate(layers)
    lo = 2 * budget_range(3, WIDTHS, require_top_two)[0]
    for budget in range(lo, 19):
        best_key, best_bits = None, None
        for bits in itertools.product(sorted(WIDTHS, reverse=True), repeat=6):
            parts = (bits[:3], bits[3:])
            if sum(bits) > budget or (require_top_two and not all(3 in p and 2 in p for p in parts)):
                continue
            key = (_objective(stacked, WIDTHS, np.array(bits)), -sum(bits))
            if best_key is None or key < best_key:
                best_key, best_bits = key, bits
        result = np.concatenate(allocate_bits_global(layers, WIDTHS, budget, require_top_two=require_top_two))
        assert _objective(stacked, WIDTHS, result) == best_key[0]  # integer costs: exact
        assert int(result.sum()) == -best_key[1]
        if require_top_two:
            assert all(3 in r and 2 in r for r in (result[:3], result[3:]))
        assert best_bits is not None


@pytest.mark.parametrize("seed", range(6))
def test_layer_granularity_equals_enumeration_of_tied_widths(seed: int) -> None:
    """One width per layer (the engine-scoped program): the optimum over all per-layer width tuples, layers of
    different expert counts, random real costs, every budget from the smallest to the largest total."""
    rng = np.random.default_rng(700 + seed)
    widths = (2, 3, 4)
    sizes = (3, 5, 4)
    layers = [rng.random((n, 3)) * 10.0 ** rng.integers(-3, 3) for n in sizes]
    lo, hi = sum(n * 2 for n in sizes), sum(n * 4 for n in sizes)
    for budget in np.arange(lo, hi + 1, 0.5):
        best = None
        for choice in itertools.product(range(3), repeat=len(sizes)):
            bits = sum(n * widths[j] for n, j in zip(sizes, choice, strict=True))
            if bits > budget:
                continue
            cost = sum(float(layer[:, j].sum()) for layer, j in zip(layers, choice, strict=True))
            if best is None or (cost, -bits) < best[:2]:
                best = (cost, -bits, [widths[j] for j in choice])
        result = allocate_layer_widths(layers, widths, float(budget))
        assert best is not None
        assert [len(set(r.tolist())) for r in result] == [1, 1, 1]  # tied: one width per layer
        assert [int(r[0]) for r in result] == best[2]
        assert sum(int(r.sum()) for r in result) == -best[1] <= budget


def test_layer_granularity_costs_at_least_the_per_expert_optimum() -> None:
    """Tying variables can only raise the optimum of the same program: the engine scope's cost in one line."""
    rng = np.random.default_rng(9)
    layers = [rng.random((6, 3)) for _ in range(3)]
    for budget in range(36, 73, 3):
        free = allocate_bits_global(layers, (2, 3, 4), budget)
        tied = allocate_layer_widths(layers, (2, 3, 4), budget)
        cost = [sum(_objective(c, (2, 3, 4), a) for c, a in zip(layers, alloc, strict=True)) for alloc in (free, tied)]
        assert cost[0] <= cost[1] + 1e-12
    with pytest.raises(ValueError, match="infeasible budget 35 bits for 3 layers of one width each"):
        allocate_layer_widths(layers, (2, 3, 4), 35)


@pytest.mark.parametrize("seed", range(4))
def test_budget_binds_exactly_when_more_bits_always_help(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n_experts = 8
    # Costs strictly decreasing in width: every spare bit lowers the objective, so the budget binds.
    costs = np.sort(rng.random((n_experts, 3)), axis=1)[:, ::-1] + np.arange(3)[::-1] * 1e-3
    for avg in (1.25, 1.5, 2.0, 2.5, 2.75):
        budget = n_experts * avg
        alloc = allocate_bits(costs, WIDTHS, budget)
        assert alloc.sum() == int(np.floor(budget))
    # A fractional budget never rounds up.
    assert allocate_bits(costs, WIDTHS, 8 * 2.49).sum() == 19


def test_infeasible_budget_message_names_the_range() -> None:
    costs = np.ones((8, 3))
    with pytest.raises(ValueError, match=r"from 8 \(minimum\) to 24 \(maximum\)"):
        allocate_bits(costs, WIDTHS, 7)
    with pytest.raises(ValueError, match=r"from 11 \(minimum\)"):
        allocate_bits(costs, WIDTHS, 10, require_top_two=True)
    with pytest.raises(ValueError, match="shape"):
        allocate_bits(np.ones((8, 2)), WIDTHS, 16)
    with pytest.raises(ValueError, match="positive integers"):
        allocate_bits(costs, (1, 2.5, 3), 16)


def test_pmq_costs_variants() -> None:
    freq = np.array([0.5, 0.3, 0.2])
    weight = np.array([0.4, 0.35, 0.3])
    err = np.array([[3.0, 2.0, 1.0], [6.0, 4.0, 2.0], [9.0, 5.0, 1.0]])
    paper = pmq_costs(freq, weight, err, alpha=1.5, beta=2.0, gamma=2.0)
    np.testing.assert_allclose(paper, (freq**1.5 * weight**2.0)[:, None] * err**2)
    authors = pmq_costs(freq * 1000, weight * 7, err, **AUTHORS_COST_SETTINGS)
    fn, wn = freq / freq.sum(), weight / weight.sum()
    np.testing.assert_allclose(authors, 1000 * (fn * wn**1.5)[:, None] * err)
    with pytest.raises(ValueError, match="non-negative"):
        pmq_costs(-freq, weight, err)


def test_published_mcmoe_allocations_reproduced() -> None:
    data = json.loads(FACTORS.read_text())
    matched, total = 0, 0
    for budget, layers in data["published_allocations"].items():
        for layer, published in layers.items():
            f = data["layers"][layer]
            n_experts = len(f["frequency_count"])
            err = np.array([[f["quant_error"][str(e)][str(b)] for b in WIDTHS] for e in range(n_experts)])
            costs = pmq_costs(f["frequency_count"], f["routing_weight_sum"], err, **AUTHORS_COST_SETTINGS)
            alloc = allocate_bits(costs, WIDTHS, int(budget), require_top_two=True)
            expected = np.array([published[str(e)] for e in range(n_experts)])
            matched += int(np.array_equal(alloc, expected))
            total += 1
    print(f"{matched}/{total} published allocations reproduced")
    assert total == 288
    assert matched == total


def test_global_allocation_is_one_problem_over_layers() -> None:
    rng = np.random.default_rng(7)
    layers = [rng.random((3, 3)) * s for s in (1.0, 10.0)]
    budget = 12
    result = allocate_bits_global(layers, WIDTHS, budget)
    assert sum(int(r.sum()) for r in result) <= budget
    stacked = np.concatenate(layers)
    best, choice = _brute_force(stacked, WIDTHS, budget, require_top_two=False)
    np.testing.assert_array_equal(np.concatenate(result), choice)
    # The layer with larger costs gets more bits than an even split would give it.
    assert result[1].sum() >= result[0].sum()
    with pytest.raises(ValueError, match="minimum"):
        allocate_bits_global(layers, WIDTHS, 5)


def test_global_top_two_rule_holds_per_layer() -> None:
    rng = np.random.default_rng(8)
    layers = [rng.random((4, 3)), rng.random((4, 3)) * 100]
    result = allocate_bits_global(layers, WIDTHS, 14, require_top_two=True)
    for r in result:
        assert 3 in r and 2 in r


def test_uniform_and_random_baselines() -> None:
    np.testing.assert_array_equal(uniform_allocation(8, WIDTHS, 20), np.full(8, 2))
    np.testing.assert_array_equal(uniform_allocation(8, WIDTHS, 24), np.full(8, 3))
    for seed in range(5):
        for budget in (8, 13, 20, 24, 30):
            alloc = random_allocation(8, WIDTHS, budget, seed)
            assert alloc.sum() == min(budget, 24)
            assert set(alloc.tolist()) <= set(WIDTHS)
    assert not np.array_equal(random_allocation(8, WIDTHS, 16, 0), random_allocation(8, WIDTHS, 16, 1))
    np.testing.assert_array_equal(random_allocation(8, WIDTHS, 16, 3), random_allocation(8, WIDTHS, 16, 3))
    # With widths {2, 4} an odd budget is unreachable: the largest reachable total below it is used.
    assert random_allocation(5, (2, 4), 15, 0).sum() == 14
