"""Search budget: a sensible default, and a budget cut that drops experts by their removal loss, never by index."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from moeslim.methods.prune import PruneConfig
from moeslim.methods.prune.config import DEFAULT_SEARCH_BUDGET
from moeslim.methods.prune.search import search_subset


def additive(weights: Sequence[float]):
    """loss(kept) = sum of the weights of the dropped experts (the optimum keeps the heaviest)."""
    def loss(kept: Sequence[int]) -> float:
        return sum(w for e, w in enumerate(weights) if e not in kept)
    return loss


def test_budget_cut_drops_the_cheapest_experts_not_the_highest_ids() -> None:
    weights = [float(e + 1) for e in range(12)]  # high ids matter most: an index cut would drop them
    result = search_subset(additive(weights), 12, 5, local_search=False, budget=12)
    assert result.budget_exhausted
    assert result.kept == tuple(range(7, 12))  # the five heaviest, found from the single-removal losses
    assert result.loss == pytest.approx(sum(weights[:7]))


def test_budget_below_one_removal_level_is_refused() -> None:
    """A cut is informed by every single-removal loss, so the budget must cover at least those E evaluations."""
    from tiny_models import tiny_model

    from moeslim.config import ConfigError

    with pytest.raises(ConfigError, match="budget=5 cannot score the 8 single removals"):
        PruneConfig(keep=4, method="search", budget=5).check_model(tiny_model("mixtral"))
    PruneConfig(keep=4, method="search", budget=8).check_model(tiny_model("mixtral"))


@pytest.mark.parametrize("keep", [48, 32])
def test_default_budget_covers_the_removal_path_of_a_64_expert_layer(keep: int) -> None:
    assert PruneConfig(keep=4).budget == DEFAULT_SEARCH_BUDGET
    weights = [((e * 37) % 64) / 64 + 1 for e in range(64)]
    calls: list[int] = []

    def counted(kept: Sequence[int]) -> float:
        calls.append(1)
        return additive(weights)(kept)

    result = search_subset(counted, 64, keep, local_search=False, budget=DEFAULT_SEARCH_BUDGET)
    assert not result.budget_exhausted  # the greedy path finished within the default budget
    assert result.evaluations == sum(range(keep + 1, 65)) == len(calls)
    assert result.kept == tuple(sorted(sorted(range(64), key=lambda e: -weights[e])[:keep]))
    with_swaps = search_subset(additive(weights), 64, keep, budget=DEFAULT_SEARCH_BUDGET)
    assert with_swaps.evaluations <= DEFAULT_SEARCH_BUDGET and with_swaps.kept == result.kept


def test_group_constrained_search_stays_balanced() -> None:
    weights = [1.0, 9.0, 8.0, 2.0, 7.0, 6.0, 5.0, 4.0]  # groups {0..3}, {4..7}
    groups = [e // 4 for e in range(8)]
    result = search_subset(additive(weights), 8, 4, groups=groups, per_group=2)
    assert result.kept == (1, 2, 4, 5)  # the best two of each group, though 6 (5.0) beats 3 (2.0)...
    with pytest.raises(ValueError, match="per_group x number of groups"):
        search_subset(additive(weights), 8, 5, groups=groups, per_group=2)
