"""``LowRankConfig``: the validated settings of activation-aware low-rank experts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from torch import nn

from moeslim.config import ConfigError, check_types
from moeslim.methods.router_fit import FIT_TOKENS


@dataclass(frozen=True, kw_only=True)
class LowRankConfig:
    """Low-rank experts under a parameter budget: per-expert whitened SVD (SVD-LLM), D2-MoE's shared base + deltas,
    or MoBE's shared bases."""

    method: Literal["svd-llm", "d2moe", "mobe"] = field(default="svd-llm", metadata={
        "help": "svd-llm: every expert's own whitened truncated SVD, ranks allocated greedily across the layer's "
                "experts | d2moe: a Fisher-weighted average of the layer's experts as a shared base (Fisher = the "
                "routed tokens' gate^2 x input^2 per input column, layer-local, no backprop) plus every expert's "
                "whitened SVD of its delta, one delta rank for all experts (D2-MoE's) | mobe: every expert A_e B_e "
                "with B_e a learned mixture of a few bases shared by the layer's experts (MoBE's, linear mixture), "
                "fitted on the same whitened error; one rank per projection kind"})
    bases: int | None = field(default=None, metadata={
        "help": "mobe only: shared bases per layer and projection kind, 1..E; None = E // 4 (at least 1)"})
    delta_ranks: Literal["uniform", "greedy"] = field(default="uniform", metadata={
        "help": "d2moe only: uniform = one delta rank for every expert (the paper's) | greedy = ranks allocated "
                "across the layer's experts by whitened error removed per parameter, as svd-llm does"})
    ratio: float = field(metadata={
        "help": "share of the expert weight parameters each MoE layer keeps (factors + matrices left dense), "
                "in (0, 1]; 1 keeps every expert dense (the original)"})
    min_rank: int = field(default=1, metadata={"help": "smallest rank any expert projection gets"})
    weighting: Literal["none", "gate", "gate2"] = field(default="gate2", metadata={
        "help": "token weights of the input covariances: gate2 = routing weight squared (the block's output "
                "error), gate, or none (plain activation covariance)"})
    damp: float = field(default=0.01, metadata={
        "help": "covariance damping, relative to the mean of its diagonal (keeps the whitening invertible)"})
    max_tokens: int = field(default=FIT_TOKENS, metadata={
        "help": "calibration tokens per layer used for the reported losses and the router refit"})
    recalibrate_router: bool = field(default=False, metadata={
        "help": "refit the router rows so the low-rank block's output best matches the original (Adam on the "
                "router only); before/after loss in the plan summary; apply re-runs it on the plan's windows"})

    def __post_init__(self) -> None:
        check_types(self)
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"ratio={self.ratio}: use a share of expert parameters in (0, 1], e.g. 0.5")
        if self.min_rank < 0:
            raise ConfigError(f"min_rank={self.min_rank}: use 0 or more")
        if self.weighting not in ("none", "gate", "gate2"):
            raise ConfigError(f"weighting={self.weighting!r}: use 'none', 'gate' or 'gate2'")
        if self.damp <= 0:
            raise ConfigError(f"damp={self.damp}: use a positive damping, e.g. 0.01")
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens={self.max_tokens}: use at least 1 token")
        if self.method not in ("svd-llm", "d2moe", "mobe"):
            raise ConfigError(f"method={self.method!r}: use 'svd-llm', 'd2moe' or 'mobe'")
        if self.bases is not None and self.method != "mobe":
            raise ConfigError("bases applies to method='mobe'")
        if self.bases is not None and self.bases < 1:
            raise ConfigError(f"bases={self.bases}: use at least 1 shared basis")
        if self.delta_ranks == "greedy" and self.method != "d2moe":
            raise ConfigError("delta_ranks applies to method='d2moe' (svd-llm always allocates greedily)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def bases_for(self, experts: int) -> int:
        """MoBE's number of shared bases in a layer of ``experts`` experts."""
        return max(1, experts // 4) if self.bases is None else self.bases

    def check_model(self, model: nn.Module) -> None:
        """Fail before calibration on models whose experts are already compressed (quantized / low-rank)."""
        section = getattr(model.config, "moeslim", None) or {}
        for kind in ("quantize", "lowrank"):
            if kind in section:
                raise ConfigError(f"the model's experts are already {kind}d: apply lowrank before {kind}, "
                                  "on float experts")
        if self.method == "mobe" and self.bases is not None:
            from moeslim.models import find_moe_layers

            for layer in find_moe_layers(model):
                if self.bases > layer.num_experts:
                    raise ConfigError(f"bases={self.bases} exceeds the {layer.num_experts} experts of layer "
                                      f"{layer.layer_idx}; use at most {layer.num_experts}")
        if self.method == "d2moe":
            from moeslim.models import find_moe_layers

            for layer in find_moe_layers(model):
                if self.ratio * layer.num_experts < 1:
                    raise ConfigError(f"ratio={self.ratio}: d2moe's shared base alone costs one expert of "
                                      f"{layer.num_experts} (layer {layer.layer_idx}); use ratio >= "
                                      f"{1 / layer.num_experts:.3f} or method='svd-llm'")
