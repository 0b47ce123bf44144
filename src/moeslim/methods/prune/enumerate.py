"""Expert pruning by enumeration (Lu et al. 2024, ALGORITHMS.md section 1): the pure maths.

The loss of a kept set C is ``||F'(X; C) - F(X)||_F`` where F is the routed output with every expert and F' the
output when the router may only choose experts in C (shared experts cancel in the difference). Each expert's
output does not depend on C, only the routing does, so every subset is scored from cached expert outputs.

Why a Gram matrix: per token, F'(x) - F(x) = sum_j a_j out_j(x) over the (at most 2k) experts in the two routings
(a = +w' for the new routing, -w for the original), so its squared norm is a^T G a with G = out out^T the (E, E)
Gram matrix of the token's expert outputs. G is computed once (float64, chunked over tokens); scoring a subset then
costs O(T k^2) gathers instead of O(T k H) multiply-adds, and no expert ever runs again.

Progressive mode (the paper's definition): the candidate runs on the pruned model's inputs x' while the target is
the ORIGINAL block output z = F(x) on the original inputs. With d = F(x') - z (independent of C),
||F'(x'; C) - z||^2 = a^T G a + 2 a . (out d) + ||d||^2: one cross term, from the (T, E) products out_j(x') . d.

Group-limited routing: the candidate routing is the one the pruned model runs (``models.select.pruned_routing``),
which may differ from the target's routing (groups dropped), so scorers take a separate ``candidate_route``.
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


def _quadratic(gram: Tensor, coef: Tensor, idx: Tensor, cross: Tensor | None = None) -> Tensor:
    """sum over tokens of coef^T G[idx, idx] coef (+ 2 coef . cross[idx]).

    gram (T, E, E), coef / idx (T, m), cross (T, E) expert outputs dotted with the progressive offset d
    -> scalar float64.
    """
    m, num_experts = idx.shape[1], gram.shape[1]
    rows = gram.gather(1, idx.unsqueeze(-1).expand(-1, m, num_experts))  # (T, m, E)
    sub = rows.gather(2, idx.unsqueeze(1).expand(-1, m, m))  # (T, m, m)
    total = torch.einsum("ti,tij,tj->", coef, sub, coef)
    if cross is not None:
        total = total + 2 * (coef * cross.gather(1, idx)).sum()
    return total


def offset_terms(outputs: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
    """Progressive-target terms of one chunk: (out_j . d per token (T, E) float64, sum ||d||^2 scalar float64).

    outputs (T, E, H) expert outputs on the pruned model's inputs x'; offset (T, H) d = F(x') - F(x).
    """
    d = offset.double()
    return torch.einsum("teh,th->te", outputs.double(), d), (d * d).sum()


class SubsetScorer:
    """Scores kept sets of one layer from an ``ExpertOutputSample``; holds (T, E, E) float64 Gram matrices.

    That is 2E/H times the memory of the sample's float32 outputs (T, E, H), i.e. less whenever E < H/2.
    ``device``: where scoring runs; give the router's device (routing may read router buffers, e.g. a correction
    bias). ``evaluations`` counts the subsets scored.
    """

    def __init__(self, sample: ExpertOutputSample, route_fn: RouteFn, chunk_tokens: int = 4096,
                 device: torch.device | str | None = None, candidate_route: RouteFn | None = None,
                 offset: Tensor | None = None) -> None:
        """``route_fn``: the original routing (the target's); ``candidate_route``: the routing of the pruned
        model as masked routing (default ``route_fn``); ``offset`` (T, H): progressive d = F(x') - F(x)."""
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
        if offset is not None and offset.shape != (sample.tokens, sample.outputs.shape[-1]):
            raise ValueError(f"offset must be (tokens, H) = {(sample.tokens, sample.outputs.shape[-1])}, "
                             f"got {tuple(offset.shape)}")
        self.num_experts = int(sample.logits.shape[1])
        self.device = torch.device(device) if device is not None else sample.logits.device
        self._route = route_fn
        self._candidate = candidate_route if candidate_route is not None else route_fn
        self._grams = gram_chunks(sample.outputs, chunk_tokens, self.device)
        starts = range(0, sample.tokens, chunk_tokens)
        self._logits = [sample.logits[s : s + chunk_tokens].to(self.device) for s in starts]
        self._full = [self._route(lg, None) for lg in self._logits]  # original routing per chunk
        self._cross: list[Tensor | None] = [None] * len(self._logits)
        self._offset_sq = 0.0
        if offset is not None:
            for i, s in enumerate(starts):
                cross, sq = offset_terms(sample.outputs[s : s + chunk_tokens].to(self.device),
                                         offset[s : s + chunk_tokens].to(self.device))
                self._cross[i] = cross
                self._offset_sq += float(sq)
        self.evaluations = 0

    def loss(self, kept: Sequence[int]) -> float:
        """||F'(X; kept) - F(X)||_F over the sample's tokens (squared norm accumulated in float64)."""
        allowed = allowed_mask(kept, self.num_experts).to(self.device)
        total = torch.full((), self._offset_sq, dtype=torch.float64, device=self.device)
        for gram, logits, (w, ids), cross in zip(self._grams, self._logits, self._full, self._cross, strict=True):
            w_new, ids_new = self._candidate(logits, allowed)  # (Tc, k)
            coef = torch.cat((w_new.double(), -w.double()), dim=1)  # (Tc, 2k)
            idx = torch.cat((ids_new, ids), dim=1)  # (Tc, 2k)
            total += _quadratic(gram, coef, idx, cross)
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
    candidate_route: RouteFn | None = None,
) -> Tensor:
    """(S,) float64 reconstruction loss of every kept set in ``subsets`` on ``sample``."""
    return SubsetScorer(sample, route_fn, chunk_tokens, device, candidate_route).losses(subsets)


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

    def __init__(self, subsets: Sequence[Sequence[int]], chunk_tokens: int = 4096,
                 candidate_route: RouteFn | None = None, targets: bool = False) -> None:
        """``candidate_route``: the pruned model's routing as masked routing (default: the layer's own);
        ``targets``: progressive mode, the runner hands each batch's original block outputs (``at_target``)."""
        self.subsets = [tuple(s) for s in subsets]
        self._chunk = chunk_tokens
        self._candidate = candidate_route
        self.wants_targets = targets
        self._target: Tensor | None = None  # (T, H) original block output of the next observed batch
        self._squared: Tensor | None = None  # (S,) float64
        self.tokens = 0

    def at_target(self, target: Tensor) -> None:
        """The runner's note: the ORIGINAL model's block output on the original inputs of the next batch."""
        self._target = target

    def observe(self, layer: MoELayer, x: Tensor) -> None:
        device = layer.router_weight.device
        candidate = self._candidate if self._candidate is not None else layer.route
        target, self._target = self._target, None
        if self.wants_targets and (target is None or target.shape != x.shape):
            raise ValueError("progressive scoring needs the original block output of every batch (at_target)")
        for start in range(0, x.shape[0], self._chunk):
            xc = x[start : start + self._chunk]
            outputs = layer.expert_outputs(xc)  # (Tc, E, H)
            gram = gram_chunks(outputs, xc.shape[0] or 1, device)[0]  # (Tc, E, E)
            logits = layer.router_logits(xc).float()  # (Tc, E)
            w, ids = layer.route(logits, None)
            cross, offset_sq = None, 0.0
            if target is not None:
                offset = layer.forward(xc) - target[start : start + self._chunk].to(xc.device)  # (Tc, H)
                cross, sq = offset_terms(outputs, offset)
                offset_sq = float(sq)
            sums = torch.empty(len(self.subsets), dtype=torch.float64, device=device)
            for i, kept in enumerate(self.subsets):
                w_new, ids_new = candidate(logits, allowed_mask(kept, gram.shape[1]).to(device))
                coef = torch.cat((w_new.double(), -w.double()), dim=1)  # (Tc, 2k)
                sums[i] = _quadratic(gram, coef, torch.cat((ids_new, ids), dim=1), cross) + offset_sq
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
