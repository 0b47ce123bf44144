"""Kept-set search for layers where enumeration is too expensive (ALGORITHMS.md section 1, large E).

Same objective as enumeration (``SubsetScorer.loss``). Beam search over removals (beam=1: greedy removal, drop the
expert whose removal increases the loss least, repeat until ``keep`` remain), then local search: swap a kept and a
dropped expert while the best swap lowers the loss. Deterministic: ties go to lower expert ids, and losses are
memoised so a set is never scored twice. ``budget`` caps the number of loss evaluations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

LossFn = Callable[[Sequence[int]], float]


@dataclass(frozen=True)
class SearchResult:
    kept: tuple[int, ...]
    loss: float
    evaluations: int  # distinct kept sets scored
    swaps: int  # improving swaps taken by the local search
    budget_exhausted: bool


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

    def __call__(self, kept: tuple[int, ...]) -> float | None:
        """The loss of ``kept`` (sorted tuple), or None once the budget is spent."""
        if kept in self._cache:
            return self._cache[kept]
        if self.exhausted:
            return None
        value = self._fn(kept)
        self._cache[kept] = value
        return value


def _beam_removal(memo: _Memo, num_experts: int, keep: int, beam: int) -> tuple[tuple[int, ...], float | None]:
    """Remove one expert at a time from every state of the beam, keeping the ``beam`` best states.

    Once the budget is spent the best state so far is cut to ``keep`` by dropping its highest ids (loss None).
    """
    states: list[tuple[float, tuple[int, ...]]] = [(0.0, tuple(range(num_experts)))]
    while len(states[0][1]) > keep:
        candidates: dict[tuple[int, ...], float] = {}
        children = sorted({tuple(e for e in kept if e != drop) for _, kept in states for drop in kept})
        for child in children:
            value = memo(child)
            if value is not None:
                candidates[child] = value
        if not candidates:
            return states[0][1][:keep], None
        states = sorted((v, c) for c, v in candidates.items())[:beam]
    return states[0][1], states[0][0]


def _local_search(memo: _Memo, num_experts: int, kept: tuple[int, ...], loss: float, max_rounds: int
                  ) -> tuple[tuple[int, ...], float, int]:
    """Best-improvement swaps kept <-> dropped while the loss strictly decreases."""
    swaps = 0
    for _ in range(max_rounds):
        dropped = [e for e in range(num_experts) if e not in kept]
        best: tuple[float, tuple[int, ...]] | None = None
        for out in kept:
            for into in dropped:
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
) -> SearchResult:
    """Approximately minimise ``loss_fn(kept)`` over kept sets of size ``keep`` (sorted tuples of expert ids)."""
    if not 0 < keep <= num_experts:
        raise ValueError(f"keep={keep} must be in [1, {num_experts}]")
    if beam < 1:
        raise ValueError(f"beam={beam} must be >= 1")
    if budget is not None and budget < 1:
        raise ValueError(f"budget={budget} must be >= 1 (or None for no limit)")
    memo = _Memo(loss_fn, budget)
    kept, found = _beam_removal(memo, num_experts, keep, beam)
    # A set cut short by the budget is still scored once (outside the budget) so the result has a loss.
    loss = found if found is not None else loss_fn(kept)
    swaps = 0
    if local_search and keep < num_experts and not memo.exhausted:
        kept, loss, swaps = _local_search(memo, num_experts, kept, loss, max_swap_rounds)
    return SearchResult(kept=kept, loss=loss, evaluations=memo.evaluations, swaps=swaps,
                        budget_exhausted=memo.exhausted)
