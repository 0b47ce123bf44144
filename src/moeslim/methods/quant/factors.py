"""PMQ per-expert factors of one MoE layer (MC-MoE, Huang et al. 2024): frequency, routing weight, error.

Pure tensor functions. Shapes: T sampled tokens, k experts per token, E experts, H hidden, J candidate
widths.

- phi_i = n_i / N: expert i's share of the top-k assignments (sums to 1 over experts).
- routing weight: the router's raw gate probability of expert i (the softmax over all experts, before any
  top-k renormalisation; sigmoid scores for DeepSeek-V3 / GLM-4-MoE), summed over the tokens routed to i.
  This is the ``routing_weight_sum`` of the MC-MoE authors' released factors, which their cost normalises
  by its per-layer sum (``cost="authors"``); the paper's w_i is its mean over those tokens
  (``LayerFactors.weight``, 0 for an expert never routed). Renormalised top-k weights would lose the
  router's confidence: with top-2 renormalisation two experts at 0.30 / 0.10 and at 0.60 / 0.20 look alike.
- eps_ij = ||F(X) - F(X; expert i at j bits)||_F with only expert i quantized. F is the routed part of the
  block output, sum_k w_k f_{id_k}(x); shared experts are identical on both sides and cancel. Only the
  tokens routed to i change, so eps_ij = ||g_i(x) * (f_i(x) - f~_i(x))||_F with g_i the routing weight of
  i on each token (0 where i is not routed). As in the authors' code the quantized expert f~_i uses
  round-to-nearest, not GPTQ (cheap, and only the ranking matters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LayerFactors", "expert_gate", "layer_factors", "routed_frequency", "routing_weight_sum",
           "swap_error"]


@dataclass(frozen=True)
class LayerFactors:
    """PMQ factors of one layer: freq (E,), weight_sum (E,) summed raw gate probabilities over routed tokens,
    err (E, J) for ``widths`` (J,), counts (E,) routed tokens."""

    freq: Tensor
    weight_sum: Tensor
    err: Tensor
    widths: tuple[int, ...]
    counts: Tensor

    @property
    def weight(self) -> Tensor:
        """(E,) mean raw gate probability over the tokens routed to each expert (0 where none): the paper's w_i."""
        return self.weight_sum / self.counts.double().clamp_min(1)

    def to_dict(self) -> dict[str, list]:
        """JSON-friendly lists (for the plan summary)."""
        return {
            "freq": [float(v) for v in self.freq],
            "weight_sum": [float(v) for v in self.weight_sum],
            "weight": [float(v) for v in self.weight],
            "err": [[float(v) for v in row] for row in self.err],
            "widths": list(self.widths),
            "counts": [int(v) for v in self.counts],
        }


def routed_frequency(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """ids (T, k) -> (phi (E,) float64 share of assignments, counts (E,) int64)."""
    counts = torch.bincount(ids.reshape(-1).long(), minlength=num_experts)
    total = max(int(counts.sum()), 1)
    return counts.double() / total, counts


def routing_weight_sum(probs: Tensor, ids: Tensor) -> Tensor:
    """probs (T, E) raw gate probabilities, ids (T, k) -> (E,) float64 sum of probs[t, i] over tokens t routed to i."""
    num_experts = probs.shape[1]
    picked = probs.double().gather(1, ids.long())  # (T, k): each routed expert's raw probability
    return torch.zeros(num_experts, dtype=torch.float64).index_add_(0, ids.reshape(-1).long(), picked.reshape(-1))


def expert_gate(weights: Tensor, ids: Tensor, e: int) -> Tensor:
    """weights, ids (T, k) -> (T,) routing weight of expert e on each token (0 where not routed)."""
    return (weights * (ids == e).to(weights.dtype)).sum(dim=1)


def swap_error(original: Tensor, replaced: Tensor, gate: Tensor) -> float:
    """||F(X) - F(X; expert swapped)||_F from expert e's outputs only.

    original, replaced: (T, H) unweighted outputs of expert e with original / quantized weights;
    gate: (T,) its routing weight per token (0 where e is not routed). Equal to swapping e's column
    of the cached (T, E, H) outputs and recombining, without redoing the other experts.
    """
    diff = (original.double() - replaced.double()) * gate.double()[:, None]
    return float(torch.linalg.vector_norm(diff))


def layer_factors(
    outputs: Tensor,
    weights: Tensor,
    ids: Tensor,
    probs: Tensor,
    quantized_output: Callable[[int, int, Tensor], Tensor],
    widths: Sequence[int],
) -> LayerFactors:
    """PMQ factors of one layer on a token sample.

    Args:
        outputs: (T, E, H) unweighted outputs of every expert (the ExpertOutputs sample).
        weights, ids: (T, k) routing of the sample tokens, as the block applies it (the error uses these).
        probs: (T, E) raw gate probabilities before top-k (the routing-weight factor uses these).
        quantized_output: (e, bits, rows) -> (R, H) expert e's output on the R sample tokens selected by
            the bool mask ``rows`` (T,), with its weights quantized to ``bits`` (only called for experts
            routed at least once, never for 16 bits, which means unchanged).
        widths: (J,) candidate widths.

    Returns:
        LayerFactors with err (E, J) float64; experts never routed have err 0 (they do not change F).
    """
    num_experts = outputs.shape[1]
    phi, counts = routed_frequency(ids, num_experts)
    weight_sum = routing_weight_sum(probs, ids)
    err = torch.zeros(num_experts, len(widths), dtype=torch.float64)
    for e in range(num_experts):
        if int(counts[e]) == 0:
            continue
        gate = expert_gate(weights, ids, e)
        rows = (ids == e).any(dim=1)  # only routed tokens change F: skip the other tokens' matmuls
        for j, bits in enumerate(widths):
            if bits == 16:
                continue
            err[e, j] = swap_error(outputs[rows, e], quantized_output(e, int(bits), rows), gate[rows])
    return LayerFactors(phi, weight_sum, err, tuple(int(b) for b in widths), counts)
