"""Observers: what the layer-wise runner records on a MoE block's input tokens.

An observer accumulates over batches (``observe``) and hands back an immutable summary (``result``).
Methods ask for the observers they need; none of them touches the model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moeslim.models import MoELayer


class Observer(Protocol):
    def observe(self, layer: MoELayer, x: torch.Tensor) -> None:
        """Record what is needed from the block input ``x``.  # (T, H)"""

    def result(self) -> object:
        """Summary of everything observed so far."""


@dataclass(frozen=True)
class RoutingSummary:
    """Routing statistics of one MoE layer over all calibration tokens."""

    counts: torch.Tensor  # (E,) tokens routed to each expert (top-k assignments)
    soft_counts: torch.Tensor  # (E,) summed gate probabilities over all tokens
    weight_sums: torch.Tensor  # (E,) summed routing weights over the tokens routed to each expert
    topk_weights: torch.Tensor  # (T, k) routing weights per token, sorted descending
    tokens: int

    @property
    def load(self) -> torch.Tensor:
        """Share of top-k assignments per expert.  # (E,)"""
        return self.counts / self.counts.sum().clamp_min(1)

    @property
    def mean_weight(self) -> torch.Tensor:
        """Mean routing weight over the tokens routed to each expert (0 where none).  # (E,)"""
        return self.weight_sums / self.counts.clamp_min(1)

    def entropy(self) -> float:
        """Entropy (nats) of the load distribution; log(E) means perfectly balanced."""
        p = self.load[self.load > 0]
        return float(-(p * p.log()).sum())


class RoutingStats:
    """Counts, soft counts, weight sums and per-token top-k weights."""

    def __init__(self, num_experts: int) -> None:
        self._counts = torch.zeros(num_experts, dtype=torch.float64)
        self._soft = torch.zeros(num_experts, dtype=torch.float64)
        self._weights = torch.zeros(num_experts, dtype=torch.float64)
        self._topk: list[torch.Tensor] = []

    def observe(self, layer: MoELayer, x: torch.Tensor) -> None:
        logits = layer.router_logits(x)  # (T, E)
        weights, ids = layer.route(logits)  # (T, k), (T, k)
        flat_ids = ids.reshape(-1).cpu()
        self._counts += torch.bincount(flat_ids, minlength=self._counts.numel()).double()
        self._weights.index_add_(0, flat_ids, weights.reshape(-1).double().cpu())
        self._soft += layer.gate_probs(logits).double().sum(0).cpu()
        self._topk.append(weights.float().sort(dim=-1, descending=True).values.cpu())

    def result(self) -> RoutingSummary:
        topk = torch.cat(self._topk) if self._topk else torch.zeros(0, 0)
        return RoutingSummary(
            counts=self._counts.clone(),
            soft_counts=self._soft.clone(),
            weight_sums=self._weights.clone(),
            topk_weights=topk,
            tokens=int(topk.shape[0]),
        )


@dataclass(frozen=True)
class ExpertOutputSample:
    """Every expert's output on a seeded token sample, with the router logits of those tokens."""

    x: torch.Tensor  # (T, H) block inputs
    logits: torch.Tensor  # (T, E) router logits
    outputs: torch.Tensor  # (T, E, H) unweighted output of every expert

    @property
    def tokens(self) -> int:
        return int(self.x.shape[0])


class ExpertOutputs:
    """Computes each expert's output once on a token sample (methods then score subsets from it)."""

    def __init__(self, fraction: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction} must be in (0, 1]")
        self._fraction = fraction
        self._generator = torch.Generator().manual_seed(seed)
        self._dtype = dtype
        self._x: list[torch.Tensor] = []
        self._logits: list[torch.Tensor] = []
        self._outputs: list[torch.Tensor] = []

    def observe(self, layer: MoELayer, x: torch.Tensor) -> None:
        if self._fraction < 1:
            keep = torch.rand(x.shape[0], generator=self._generator) < self._fraction
            x = x[keep.to(x.device)]
        if x.shape[0] == 0:
            return
        self._x.append(x.to(self._dtype).cpu())
        self._logits.append(layer.router_logits(x).float().cpu())
        self._outputs.append(layer.expert_outputs(x).to(self._dtype).cpu())

    def result(self) -> ExpertOutputSample:
        if not self._x:
            raise ValueError("no tokens were sampled; raise the sample fraction or the number of samples")
        return ExpertOutputSample(
            x=torch.cat(self._x), logits=torch.cat(self._logits), outputs=torch.cat(self._outputs)
        )
