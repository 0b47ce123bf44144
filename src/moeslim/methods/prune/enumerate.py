"""Expert pruning by enumeration (Lu et al. 2024, ALGORITHMS.md section 1): the pure maths.

The loss of a kept set C is ``||F'(X; C) - F(X)||_F`` where F is the routed output with every expert and F' the
output when the router may only choose experts in C (shared experts cancel in the difference). Each expert's
output does not depend on C, only the routing does, so every subset is scored from cached expert outputs.

Why a Gram matrix: per token, F'(x) - F(x) = sum_j a_j out_j(x) over the (at most 2k) experts in the two routings
(a = +w' for the new routing, -w for the original), so its squared norm is a^T G a with G = out out^T the (E, E)
Gram matrix of the token's expert outputs. G is computed once (float64, chunked over tokens); scoring a subset then
costs O(T k^2) gathers instead of O(T k H) multiply-adds, and no expert ever runs again.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moeslim.calibrate import ExpertOutputSample
from moeslim.calibrate.observers import Communicator
from moeslim.models import MoELayer

# (logits (T, E), allowed (E,) bool | None) -> (weights (T, k), ids (T, k)), exactly as the family routes.
RouteFn = Callable[[Tensor, "Tensor | None"], tuple[Tensor, Tensor]]


def enumerate_subsets(num_experts: int, keep: int) -> list[tuple[int, ...]]:
    """Every kept set of ``keep`` experts out of ``num_experts``, in lexicographic order."""
    if not 0 < keep <= num_experts:
        raise ValueError(f"keep={keep} must be in [1, {num_experts}]")
    return list(itertools.combinations(range(num_experts), keep))


def count_subsets(num_experts: int, keep: int) -> int:
    return math.comb(num_experts, keep)


def allowed_mask(kept: Iterable[int], num_experts: int) -> Tensor:
    """(E,) bool mask of the kept experts."""
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[list(kept)] = True
    return mask


def gram_chunks(outputs: Tensor, chunk_tokens: int, device: torch.device | None = None) -> list[Tensor]:
    """Per-token Gram matrices of the expert outputs, float64, one tensor per token chunk (on ``device``).

    outputs (T, E, H) -> [(Tc, E, E)]. float32 products are exact in float64, so only the sums round.
    """
    chunks = []
    for start in range(0, outputs.shape[0], chunk_tokens):
        out = outputs[start : start + chunk_tokens].to(device).double()  # (Tc, E, H)
        chunks.append(torch.bmm(out, out.transpose(1, 2)))  # (Tc, E, E)
    return chunks


def _quadratic(gram: Tensor, coef: Tensor, idx: Tensor) -> Tensor:
    """sum over tokens of coef^T G[idx, idx] coef.  gram (T, E, E), coef / idx (T, m) -> scalar float64."""
    m, num_experts = idx.shape[1], gram.shape[1]
    rows = gram.gather(1, idx.unsqueeze(-1).expand(-1, m, num_experts))  # (T, m, E)
    sub = rows.gather(2, idx.unsqueeze(1).expand(-1, m, m))  # (T, m, m)
    return torch.einsum("ti,tij,tj->", coef, sub, coef)


class SubsetScorer:
    """Scores kept sets of one layer from an ``ExpertOutputSample``; holds (T, E, E) float64 Gram matrices.

    That is 2E/H times the memory of the sample's float32 outputs (T, E, H), i.e. less whenever E < H/2.
    ``device``: where scoring runs; give the router's device (routing may read router buffers, e.g. a correction
    bias). ``evaluations`` counts the subsets scored.
    """

    def __init__(self, sample: ExpertOutputSample, route_fn: RouteFn, chunk_tokens: int = 4096,
                 device: torch.device | str | None = None) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
        self.num_experts = int(sample.logits.shape[1])
        self.device = torch.device(device) if device is not None else sample.logits.device
        self._route = route_fn
        self._grams = gram_chunks(sample.outputs, chunk_tokens, self.device)
        self._logits = [sample.logits[s : s + chunk_tokens].to(self.device)
                        for s in range(0, sample.tokens, chunk_tokens)]
        self._full = [self._route(lg, None) for lg in self._logits]  # original routing per chunk
        self.evaluations = 0

    def loss(self, kept: Sequence[int]) -> float:
        """||F'(X; kept) - F(X)||_F over the sample's tokens (squared norm accumulated in float64)."""
        allowed = allowed_mask(kept, self.num_experts).to(self.device)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for gram, logits, (w, ids) in zip(self._grams, self._logits, self._full, strict=True):
            w_new, ids_new = self._route(logits, allowed)  # (Tc, k)
            coef = torch.cat((w_new.double(), -w.double()), dim=1)  # (Tc, 2k)
            idx = torch.cat((ids_new, ids), dim=1)  # (Tc, 2k)
            total += _quadratic(gram, coef, idx)
        self.evaluations += 1
        # Rounding can leave a tiny negative value where the routing did not change at all.
        return math.sqrt(max(float(total), 0.0))

    def losses(self, subsets: Iterable[Sequence[int]]) -> Tensor:
        """(S,) float64 loss of every subset."""
        return torch.tensor([self.loss(s) for s in subsets], dtype=torch.float64)


def score_all(
    sample: ExpertOutputSample,
    route_fn: RouteFn,
    subsets: Sequence[Sequence[int]],
    chunk_tokens: int = 4096,
    device: torch.device | str | None = None,
) -> Tensor:
    """(S,) float64 reconstruction loss of every kept set in ``subsets`` on ``sample``."""
    return SubsetScorer(sample, route_fn, chunk_tokens, device).losses(subsets)


@dataclass(frozen=True)
class EnumerationResult:
    """The best kept set of one layer and the spread of the losses over all kept sets."""

    kept: tuple[int, ...]
    loss: float
    best_alternative: float | None  # loss of the second-best set (None when there is only one set)
    worst: float
    subsets_scored: int


def best_subset(subsets: Sequence[Sequence[int]], losses: Tensor) -> EnumerationResult:
    """The lowest-loss subset (ties: the lexicographically first, i.e. lower expert ids)."""
    order = sorted(range(len(subsets)), key=lambda i: (float(losses[i]), tuple(subsets[i])))
    best = order[0]
    return EnumerationResult(
        kept=tuple(sorted(subsets[best])),
        loss=float(losses[best]),
        best_alternative=float(losses[order[1]]) if len(order) > 1 else None,
        worst=float(losses[order[-1]]),
        subsets_scored=len(subsets),
    )


def enumerate_best(
    sample: ExpertOutputSample,
    route_fn: RouteFn,
    keep: int,
    chunk_tokens: int = 4096,
    device: torch.device | str | None = None,
) -> EnumerationResult:
    """Score all C(E, keep) kept sets and return the best one."""
    subsets = enumerate_subsets(int(sample.logits.shape[1]), keep)
    return best_subset(subsets, score_all(sample, route_fn, subsets, chunk_tokens, device))


class SubsetLossAccumulator:
    """An observer that scores every kept set batch by batch: exact enumeration in bounded memory.

    The squared loss is a sum over tokens, so each batch's expert outputs (T, E, H) are turned into its
    per-subset squared losses and dropped; only the (S,) float64 sums live across batches, never a
    (tokens, E, H) cache. Same objective and same kept sets as ``SubsetScorer`` on all tokens (the sums
    only round differently, ~1e-15 relative).
    """

    key = "subset_losses"

    def __init__(self, subsets: Sequence[Sequence[int]], chunk_tokens: int = 4096) -> None:
        self.subsets = [tuple(s) for s in subsets]
        self._chunk = chunk_tokens
        self._squared: Tensor | None = None  # (S,) float64
        self.tokens = 0

    def observe(self, layer: MoELayer, x: Tensor) -> None:
        device = layer.router_weight.device
        for start in range(0, x.shape[0], self._chunk):
            xc = x[start : start + self._chunk]
            gram = gram_chunks(layer.expert_outputs(xc), xc.shape[0] or 1, device)[0]  # (Tc, E, E)
            logits = layer.router_logits(xc).float()  # (Tc, E)
            w, ids = layer.route(logits, None)
            sums = torch.empty(len(self.subsets), dtype=torch.float64, device=device)
            for i, kept in enumerate(self.subsets):
                w_new, ids_new = layer.route(logits, allowed_mask(kept, gram.shape[1]).to(device))
                coef = torch.cat((w_new.double(), -w.double()), dim=1)  # (Tc, 2k)
                sums[i] = _quadratic(gram, coef, torch.cat((ids_new, ids), dim=1))
            self._squared = sums.cpu() if self._squared is None else self._squared + sums.cpu()
            self.tokens += int(xc.shape[0])

    def sync(self, comm: Communicator) -> None:
        """Sum the per-subset squared losses and token counts over processes."""
        squared = self._squared if self._squared is not None else torch.zeros(len(self.subsets), dtype=torch.float64)
        comm.all_reduce_sum(squared)
        self._squared = squared
        self.tokens = sum(comm.all_gather(self.tokens))

    def losses(self) -> Tensor:
        """(S,) float64 loss sqrt(sum of squared errors) of every subset, in ``subsets`` order."""
        if self._squared is None:
            raise ValueError("no tokens were observed")
        return self._squared.clamp_min(0).sqrt()

    def result(self) -> Tensor:
        return self.losses()
