"""Observers: what the layer-wise runner records on a MoE block's input tokens.

An observer accumulates over batches (``observe``) and hands back an immutable summary (``result``).
Methods ask for the observers they need; none of them touches the model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from moeslim.models import MoELayer


class Communicator(Protocol):
    """The collective operations observers need to merge their statistics across processes."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over processes, in place."""

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order (rank r holds the r-th share of the windows)."""


class Observer(Protocol):
    key: str  # the name its result has in the runner's default decision ({key: result()})

    def observe(self, layer: MoELayer, x: torch.Tensor) -> None:
        """Record what is needed from the block input ``x``.  # (T, H)"""

    def result(self) -> object:
        """Summary of everything observed so far."""


_Result = TypeVar("_Result")


def result_of(observer: Observer, kind: type[_Result]) -> _Result:
    """``observer.result()``, checked to be a ``kind`` (each observer hands back its own summary type)."""
    result = observer.result()
    if not isinstance(result, kind):
        raise TypeError(f"{type(observer).__name__} gave a {type(result).__name__}, expected a {kind.__name__}")
    return result


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

    key = "routing"

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

    def sync(self, comm: Communicator) -> None:
        """Sum the counts over processes; gather the per-token weights in window order."""
        for total in (self._counts, self._soft, self._weights):
            comm.all_reduce_sum(total)
        parts = comm.all_gather(torch.cat(self._topk) if self._topk else None)
        self._topk = [p for p in parts if p is not None]

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
    target: torch.Tensor | None = None  # (T, H) original model's block output on its own inputs (progressive)

    @property
    def tokens(self) -> int:
        return int(self.x.shape[0])


# The default calibration set (64 windows x 256 tokens) fits: defaults are not subsampled. Memory of the cap:
# max_tokens x E x H x 4 bytes per layer (Mixtral-8x7B: 2.1 GB).
DEFAULT_MAX_TOKENS = 16384


class ExpertOutputs:
    """Computes each expert's output once on a token sample (methods then score subsets from it).

    The sample is chosen by token position, up front and independently of batching or of how windows are
    split across processes: token ``j`` of window ``w`` gets a key ``u ~ U[0, 1)`` from a generator seeded by
    ``(seed, w)``; tokens with ``u < fraction`` are candidates and, with ``max_tokens``, only the
    ``max_tokens`` candidates with the smallest keys are kept (a uniform sample without replacement; a running
    top-``max_tokens`` by key, so memory never exceeds ``max_tokens + one batch`` tokens x E x H).
    The error of a loss estimated on ``m`` of ``T`` tokens: relative standard error ~ cv / sqrt(m) (cv: the
    coefficient of variation of the per-token loss), shrunk by sqrt(1 - m / T); see docs/scale.md.
    """

    key = "expert_outputs"

    def __init__(self, fraction: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32,
                 max_tokens: int | None = DEFAULT_MAX_TOKENS) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction} must be in (0, 1]")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be at least 1 (or None for no cap)")
        self._fraction = fraction
        self._seed = seed
        self._max_tokens = max_tokens
        self._dtype = dtype
        self._window = 0  # first window of the next batch (the runner says; else counted)
        self._windows: int | None = None
        self._keys: list[torch.Tensor] = []  # (t,) float64 sample keys
        self._pos: list[torch.Tensor] = []  # (t,) int64 global token positions
        self._x: list[torch.Tensor] = []
        self._logits: list[torch.Tensor] = []
        self._outputs: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []  # (t, H) per batch, only when the runner hands targets
        self._pending: torch.Tensor | None = None

    def at_target(self, target: torch.Tensor) -> None:
        """The runner's note (progressive targets): the original block output (T, H) of the next batch."""
        self._pending = target

    def at_batch(self, first_window: int, windows: int) -> None:
        """The runner's note: the next ``observe`` sees windows ``first_window .. first_window + windows - 1``."""
        self._window, self._windows = first_window, windows

    def _token_keys(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys (T,), positions (T,)) of the next ``tokens`` block tokens, deterministic per window."""
        windows = self._windows or 1
        if tokens % windows:
            raise ValueError(f"{tokens} tokens do not split into {windows} windows")
        length = tokens // windows
        keys = torch.cat([
            torch.rand(length, generator=torch.Generator().manual_seed(self._seed * 1_000_003 + w),
                       dtype=torch.float64)
            for w in range(self._window, self._window + windows)
        ])
        pos = torch.arange(self._window * length, (self._window + windows) * length, dtype=torch.int64)
        self._window += windows
        self._windows = None
        return keys, pos

    def observe(self, layer: MoELayer, x: torch.Tensor) -> None:
        keys, pos = self._token_keys(x.shape[0])
        target, self._pending = self._pending, None
        keep = keys < self._fraction
        if self._max_tokens is not None and self._keys and sum(k.numel() for k in self._keys) >= self._max_tokens:
            keep &= keys < torch.cat(self._keys).max()  # only tokens that can enter the running sample
        if not bool(keep.any()):
            return
        x = x[keep.to(x.device)]
        self._keys.append(keys[keep])
        self._pos.append(pos[keep])
        self._x.append(x.to(self._dtype).cpu())
        self._logits.append(layer.router_logits(x).float().cpu())
        self._outputs.append(layer.expert_outputs(x).to(self._dtype).cpu())
        if target is not None:
            self._targets.append(target[keep.to(target.device)].to(self._dtype).cpu())
        self._truncate()

    def _truncate(self) -> None:
        """Keep the ``max_tokens`` smallest keys, in position order (the order one process would see)."""
        total = sum(k.numel() for k in self._keys)
        if self._max_tokens is None or total <= self._max_tokens:
            return
        keys, pos = torch.cat(self._keys), torch.cat(self._pos)
        chosen = keys.topk(self._max_tokens, largest=False).indices
        chosen = chosen[pos[chosen].argsort()]
        self._keys, self._pos = [keys[chosen]], [pos[chosen]]
        self._x = [torch.cat(self._x)[chosen]]
        self._logits = [torch.cat(self._logits)[chosen]]
        self._outputs = [torch.cat(self._outputs)[chosen]]
        if self._targets:
            self._targets = [torch.cat(self._targets)[chosen]]

    def sync(self, comm: Communicator) -> None:
        """Gather every process's sample (in position order), then apply the cap to the union."""
        parts = comm.all_gather([torch.cat(v) if v else None for v in (
            self._keys, self._pos, self._x, self._logits, self._outputs, self._targets)])
        fields: list[list[torch.Tensor]] = [[], [], [], [], [], []]
        for part in parts:
            for field, value in zip(fields, part, strict=True):
                if value is not None:
                    field.append(value)
        self._keys, self._pos, self._x, self._logits, self._outputs, self._targets = fields
        if self._pos:
            order = torch.cat(self._pos).argsort()
            self._keys, self._pos, self._x, self._logits, self._outputs = (
                [torch.cat(f)[order]] for f in fields[:5])
            self._targets = [torch.cat(self._targets)[order]] if self._targets else []
        self._truncate()

    def result(self) -> ExpertOutputSample:
        if not self._x:
            raise ValueError("no tokens were sampled; raise the sample fraction or the number of samples")
        return ExpertOutputSample(
            x=torch.cat(self._x), logits=torch.cat(self._logits), outputs=torch.cat(self._outputs),
            target=torch.cat(self._targets) if self._targets else None,
        )
