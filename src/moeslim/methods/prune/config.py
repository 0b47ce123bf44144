"""``PruneConfig``: the validated settings of expert pruning, checked before any calibration runs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from moeslim.calibrate.observers import DEFAULT_MAX_TOKENS
from moeslim.config import ConfigError, check_types

PRUNE_METHODS = ("enumerate", "search", "frequency", "soft-count", "reap", "random")
LOSS_METHODS = ("enumerate", "search")  # minimise the reconstruction loss
SAMPLE_METHODS = ("enumerate", "search", "reap")  # need every expert's output on the token sample
ROUTING_METHODS = ("frequency", "soft-count")  # need routing statistics only
PRUNE_MODES = ("layerwise", "progressive")


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """How to choose the ``keep`` experts every MoE layer keeps.

    method: enumerate (all C(E, keep) sets, exact), search (beam removal + swaps, same objective, large E),
        frequency | soft-count | reap | random (one-pass baselines).
    mode: layerwise (inputs from the original model) or progressive (inputs from the model with earlier layers
        already pruned; the target stays the original layer's output on those inputs).
    max_subsets: enumerate refuses layers with more kept sets than this (use search).
    beam / local_search / budget: search settings (budget = max loss evaluations per layer, None = no limit).
    seed: random-subset seed (per layer: seed + layer index) and token-sample seed.
    token_fraction: share of calibration tokens whose expert outputs are kept (memory: T x E x H floats).
    max_tokens: cap on the tokens whose expert outputs are kept per layer (a seeded uniform subsample chosen by
        token position, so memory stays max_tokens x E x H floats; None = no cap; error: docs/scale.md).
        ``enumerate`` needs no sample: it accumulates every kept set's loss batch by batch (exact, O(C(E, keep))).
    chunk_tokens: tokens per chunk when scoring (bounds temporary memory).
    score: also compute the reconstruction loss of the kept set for the baseline methods (costs the sample).
    """

    keep: int  # required: how many experts each MoE layer keeps (no default that could prune by surprise)
    method: str = "enumerate"
    mode: str = "layerwise"
    max_subsets: int = 20_000
    beam: int = 1
    local_search: bool = True
    budget: int | None = None
    seed: int = 0
    token_fraction: float = 1.0
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    chunk_tokens: int = 4096
    score: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        if self.method not in PRUNE_METHODS:
            raise ConfigError(f"method={self.method!r} is not a pruning method; use one of {', '.join(PRUNE_METHODS)}")
        if self.mode not in PRUNE_MODES:
            raise ConfigError(f"mode={self.mode!r}: use 'layerwise' or 'progressive'")
        if self.keep < 1:
            raise ConfigError(f"keep={self.keep}: keep at least 1 expert per layer")
        if self.max_subsets < 1:
            raise ConfigError(f"max_subsets={self.max_subsets}: use at least 1")
        if self.beam < 1:
            raise ConfigError(f"beam={self.beam}: use at least 1 (1 = greedy removal)")
        if self.budget is not None and self.budget < 1:
            raise ConfigError(f"budget={self.budget}: use at least 1 loss evaluation, or leave unset")
        if not 0 < self.token_fraction <= 1:
            raise ConfigError(f"token_fraction={self.token_fraction}: use a value in (0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens={self.max_tokens}: use at least 1 token, or leave unset for no cap")
        if self.chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens={self.chunk_tokens}: use at least 1")

    @property
    def needs_sample(self) -> bool:
        return self.method in SAMPLE_METHODS or self.score

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_model(self, model: nn.Module) -> None:
        """Fail before calibration when ``keep`` does not fit some MoE layer of ``model``."""
        from moeslim.models import find_moe_layers

        for layer in find_moe_layers(model):
            experts, top_k, family = layer.num_experts, layer.top_k, layer.family.name
            if self.keep >= experts:
                raise ConfigError(
                    f"keep={self.keep} keeps all {experts} experts of layer {layer.layer_idx} ({family}): "
                    f"nothing to prune; use keep < {experts}"
                )
            if self.keep < top_k:
                raise ConfigError(
                    f"keep={self.keep} is below top_k={top_k} of {family}; keep at least {top_k} experts"
                )
            subsets = math.comb(experts, self.keep)
            if self.method == "enumerate" and subsets > self.max_subsets:
                raise ConfigError(
                    f"enumerate would score C({experts}, {self.keep}) = {subsets} kept sets per layer "
                    f"(max_subsets={self.max_subsets}); use method='search' (same objective, greedy + local "
                    "search) or raise max_subsets"
                )
