"""Kept-set search for layers where enumeration is too expensive (ALGORITHMS.md section 1, large E).

Same objective as enumeration (``SubsetScorer.loss``). Beam search over removals (beam=1: greedy removal, drop the
expert whose removal increases the loss least, repeat until ``keep`` remain), then local search: swap a kept and a
dropped expert while the best swap lowers the loss. Deterministic: ties go to lower expert ids, and losses are
memoised so a set is never scored twice. ``budget`` caps the number of loss evaluations; when it runs out during
the removal, the best state so far is cut to ``keep`` by dropping the experts whose removal cost least (the loss
of the state without that expert, as far as it was scored), never by index.

``groups`` / ``per_group`` constrain the search to balanced kept sets (group-limited routing, see
``models.select.GroupLimits``): an expert may only be removed while its group holds more than ``per_group``
experts, and swaps stay inside a group, so the result keeps exactly ``per_group`` experts in every group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

LossFn = Callable[[Sequence[int]], float]


@dataclass(frozen=True)
class SearchResult:
    kept: tuple[int, ...]
    loss: float
    evaluations: int  # distinct kept sets scored
    swaps: int  # improving swaps taken by the local search
    budget_exhausted: bool
    # size -> (best kept set of that size on the removal path, its loss), sizes keep .. E-1 (allocation=global)
    path: dict[int, tuple[tuple[int, ...], float]] = field(default_factory=dict)


class _Memo:
    """Memoised loss with an evaluation budget."""

    def __init__(self, loss_fn: LossFn, budget: int | None) -> None:
        self._fn = loss_fn
        self._cache: dict[tuple[int, ...], float] = {}
        self.budget = budget

    @property
    def evaluations(self) -> int:
        return len(self._cache)

    @property
    def exhausted(self) -> bool:
        return self.budget is not None and self.evaluations >= self.budget

    def known(self, kept: tuple[int, ...]) -> float | None:
        return self._cache.get(kept)

    def __call__(self, kept: tuple[int, ...]) -> float | None:
        """The loss of ``kept`` (sorted tuple), or None once the budget is spent."""
        if kept in self._cache:
            return self._cache[kept]
        if self.exhausted:
            return None
        value = self._fn(kept)
        self._cache[kept] = value
        return value

    def force(self, kept: tuple[int, ...]) -> float:
        """The loss of ``kept`` even past the budget (a result must have a loss)."""
        value = self._cache.get(kept)
        return value if value is not None else self._fn(kept)


class _Groups:
    """The balance constraint: which experts may leave a state, which swaps keep the balance."""

    def __init__(self, groups: Sequence[int] | None, per_group: int | None) -> None:
        self.groups, self.per_group = groups, per_group

    def removable(self, state: tuple[int, ...], expert: int) -> bool:
        if self.groups is None or self.per_group is None:
            return True
        g = self.groups[expert]
        return sum(1 for e in state if self.groups[e] == g) > self.per_group

    def swappable(self, out: int, into: int) -> bool:
        return self.groups is None or self.groups[out] == self.groups[into]


def _cut_by_loss(memo: _Memo, state: tuple[int, ...], keep: int, rule: _Groups, num_experts: int
                 ) -> tuple[int, ...]:
    """Cut ``state`` to ``keep`` experts without new evaluations: drop first the experts whose removal cost least.

    Cost of removing e: the scored loss of ``state`` without e, else of all experts without e, else +inf
    (never scored: kept). Ties: lower id dropped first.
    """
    full = tuple(range(num_experts))

    def cost(e: int) -> float:
        for parent in (state, full):
            value = memo.known(tuple(x for x in parent if x != e))
            if value is not None:
                return value
        return math.inf

    current = list(state)
    for e in sorted(state, key=lambda x: (cost(x), x)):
        if len(current) == keep:
            break
        if rule.removable(tuple(current), e):
            current.remove(e)
    return tuple(current)


def _beam_removal(memo: _Memo, num_experts: int, keep: int, beam: int, rule: _Groups
                  ) -> tuple[tuple[int, ...], float | None, dict[int, tuple[tuple[int, ...], float]]]:
    """Remove one expert at a time from every state of the beam, keeping the ``beam`` best states.

    Returns (kept, loss or None when the budget cut the removal short, {size: (best state, loss)} on the way).
    """
    states: list[tuple[float, tuple[int, ...]]] = [(0.0, tuple(range(num_experts)))]
    path: dict[int, tuple[tuple[int, ...], float]] = {}
    while len(states[0][1]) > keep:
        candidates: dict[tuple[int, ...], float] = {}
        children = sorted({tuple(e for e in kept if e != drop) for _, kept in states for drop in kept
                           if rule.removable(kept, drop)})
        for child in children:
            value = memo(child)
            if value is not None:
                candidates[child] = value
        if not candidates:
            return _cut_by_loss(memo, states[0][1], keep, rule, num_experts), None, path
        states = sorted((v, c) for c, v in candidates.items())[:beam]
        path[len(states[0][1])] = (states[0][1], states[0][0])
    return states[0][1], states[0][0], path


def _local_search(memo: _Memo, num_experts: int, kept: tuple[int, ...], loss: float, max_rounds: int,
                  rule: _Groups) -> tuple[tuple[int, ...], float, int]:
    """Best-improvement swaps kept <-> dropped while the loss strictly decreases."""
    swaps = 0
    for _ in range(max_rounds):
        dropped = [e for e in range(num_experts) if e not in kept]
        best: tuple[float, tuple[int, ...]] | None = None
        for out in kept:
            for into in dropped:
                if not rule.swappable(out, into):
                    continue
                cand = tuple(sorted((*[e for e in kept if e != out], into)))
                value = memo(cand)
                if value is None:
                    break
                if value < loss and (best is None or (value, cand) < best):
                    best = (value, cand)
        if best is None:
            break
        loss, kept = best
        swaps += 1
    return kept, loss, swaps


def search_subset(
    loss_fn: LossFn,
    num_experts: int,
    keep: int,
    beam: int = 1,
    local_search: bool = True,
    budget: int | None = None,
    max_swap_rounds: int = 100,
    groups: Sequence[int] | None = None,
    per_group: int | None = None,
    path: bool = False,
) -> SearchResult:
    """Approximately minimise ``loss_fn(kept)`` over kept sets of size ``keep`` (sorted tuples of expert ids).

    ``groups`` (E,) group of each expert and ``per_group``: search only sets with ``per_group`` experts in every
    group (``keep`` must equal per_group x groups). ``path``: also report the best state of every size on the
    removal path (states cut by the budget are scored once, outside the budget).
    """
    if not 0 < keep <= num_experts:
        raise ValueError(f"keep={keep} must be in [1, {num_experts}]")
    if beam < 1:
        raise ValueError(f"beam={beam} must be >= 1")
    if budget is not None and budget < 1:
        raise ValueError(f"budget={budget} must be >= 1 (or None for no limit)")
    if (groups is None) != (per_group is None):
        raise ValueError("give both groups and per_group, or neither")
    if groups is not None and per_group is not None and (
            len(groups) != num_experts or per_group * len(set(groups)) != keep):
        raise ValueError(f"groups must list the group of each of the {num_experts} experts and keep={keep} must "
                         "equal per_group x number of groups")
    rule = _Groups(groups, per_group)
    memo = _Memo(loss_fn, budget)
    kept, found, sizes = _beam_removal(memo, num_experts, keep, beam, rule)
    loss = found if found is not None else memo.force(kept)
    if path:  # fill the sizes the budget cut off, from the last state reached, by removal cost
        last = min(sizes) if sizes else num_experts
        state = sizes[last][0] if sizes else tuple(range(num_experts))
        for size in range(last - 1, keep - 1, -1):
            state = _cut_by_loss(memo, state, size, rule, num_experts)
            sizes[size] = (state, memo.force(state))
    swaps = 0
    if local_search and keep < num_experts and not memo.exhausted:
        kept, loss, swaps = _local_search(memo, num_experts, kept, loss, max_swap_rounds, rule)
    if path:
        sizes[keep] = (kept, loss)
    return SearchResult(kept=kept, loss=loss, evaluations=memo.evaluations, swaps=swaps,
                        budget_exhausted=memo.exhausted, path=dict(sorted(sizes.items())) if path else {})
