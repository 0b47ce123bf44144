"""``MergeConfig``: the validated settings of expert merging (HC-SMoE / MC-SMoE), checked before calibration."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from torch import nn

from moeslim.config import ConfigError, check_types
from moeslim.methods.router_fit import FIT_TOKENS

MERGE_METHODS = ("hc-smoe", "mc-smoe")
MergeMode = Literal["layerwise", "progressive"]
# Measured by benchmarks/prune_modes.py on both demo models (docs/results-pruning.md).
DEFAULT_MERGE_MODE: MergeMode = "layerwise"
MERGE_MODE_WHY = "hc-smoe progressive was +0.3 % perplexity, lower in 8 of 18 paired runs"


@dataclass(frozen=True, kw_only=True)
class MergeConfig:
    """How every MoE layer's experts are grouped into ``keep`` merged experts (HC-SMoE / MC-SMoE)."""

    keep: int = field(metadata={"help": "merged (unique) experts per MoE layer: the average over layers with "
                                        "counts=global; at least top_k with router=fit"})
    method: Literal["hc-smoe", "mc-smoe"] = field(default="hc-smoe", metadata={
        "help": "hc-smoe: average-linkage clustering of the experts' mean outputs on calibration tokens; "
                "mc-smoe: the keep most-routed experts dominate, every other joins its most similar dominant by "
                "router-logit cosine similarity"})
    mode: MergeMode = field(default=DEFAULT_MERGE_MODE, metadata={
        "help": "layerwise: every layer grouped (and its router rows fitted) on the original model's inputs | "
                "progressive: on the inputs of the model with the earlier layers already merged (apply runs its "
                f"fits the same way); default {DEFAULT_MERGE_MODE}: {MERGE_MODE_WHY}"})
    router: Literal["keep", "fit"] = field(default="keep", metadata={
        "help": "keep = the authors' way: the router keeps its E rows and every member of a group computes the "
                "group's merged expert (saved for stock transformers by writing the merged weights into every "
                "member's slot: the checkpoint keeps E experts and the original bytes; only the unique experts "
                "shrink) | fit = a smaller model: K experts and K router rows (see fit_rows)"})
    fit_rows: Literal["lse-fit", "representative"] = field(default="lse-fit", metadata={
        "help": "router=fit only: each merged expert's router row: lse-fit = least-squares fit of the group's "
                "logsumexp logit (softmax: the group's summed probability; sigmoid: its noisy-or) on calibration "
                "tokens; representative = the representative's own row (data-free apply)"})
    metric: Literal["cosine", "euclidean"] | None = field(default=None, metadata={
        "help": "hc-smoe distance between the experts' mean outputs; None = euclidean (HC-SMoE's)"})
    align: bool | None = field(default=None, metadata={
        "help": "permute each member's intermediate neurons onto the group representative's (weight matching, "
                "Hungarian) before averaging; None = on for mc-smoe, off for hc-smoe (each paper's choice)"})
    counts: Literal["uniform", "global"] | None = field(default=None, metadata={
        "help": "groups per layer: uniform = keep in every layer | global = MC-SMoE's: keep x layers groups in "
                "all, given to the most-routed experts of the whole model (normalised per layer, each layer at "
                "least one); None = global for mc-smoe with router=keep, else uniform"})
    compress_rank: int | None = field(default=None, metadata={
        "help": "MC-SMoE's compression stage: after merging, every merged expert's projections become a rank-r "
                "factorisation plus the most important rows of the residual (low-rank + structured sparse; the "
                "authors' low_rank_factor, 32 in their scripts); a rank that saves nothing keeps the matrix "
                "dense; None = no compression (or use compress_ratio). The result needs the moeslim runtime "
                "(moeslim.load), not stock transformers"})
    compress_ratio: float | None = field(default=None, metadata={
        "help": "instead of compress_rank: the share of every merged projection's parameters the compressed "
                "form keeps (factors + residual rows), in (0, 1]; the rank is the largest that fits"})
    compress_sparse: float = field(default=0.1, metadata={
        "help": "compression stage: share of the residual's rows kept (whole output rows, chosen over the "
                "layer's merged experts by the output error they remove; the authors' final_threshold 0.10)"})
    compress_whiten: bool = field(default=True, metadata={
        "help": "compression stage: rank and rows chosen for the block output error on the calibration tokens "
                "each merged expert serves (whitened SVD, data needed in apply); --no-compress-whiten = the "
                "authors' plain SVD and weight-magnitude rows (data-free; they then fine-tune, moeslim does not)"})
    ridge: float = field(default=1e-3, metadata={"help": "ridge of the lse-fit, relative to mean diag(X^T X)"})
    max_tokens: int = field(default=FIT_TOKENS, metadata={
        "help": "calibration tokens per layer used for grouping, router fits and losses (the first ones)"})
    recalibrate_router: bool = field(default=False, metadata={
        "help": "refit the merged router rows so the block output best matches the original (Adam on the "
                "router only); before/after loss in the plan summary; apply re-runs it on the plan's windows"})

    def __post_init__(self) -> None:
        check_types(self)
        if self.method not in MERGE_METHODS:
            raise ConfigError(f"method={self.method!r}: use one of {', '.join(MERGE_METHODS)}")
        if self.mode not in ("layerwise", "progressive"):
            raise ConfigError(f"mode={self.mode!r}: use 'layerwise' or 'progressive'")
        if self.keep < 1:
            raise ConfigError(f"keep={self.keep}: keep at least 1 expert per layer")
        if self.ridge < 0:
            raise ConfigError(f"ridge={self.ridge}: use a value >= 0")
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens={self.max_tokens}: use at least 1 token")
        if self.compress_rank is not None and self.compress_ratio is not None:
            raise ConfigError("give compress_rank or compress_ratio, not both (the ratio chooses the rank)")
        if self.compress_rank is not None and self.compress_rank < 0:
            raise ConfigError(f"compress_rank={self.compress_rank}: use a rank >= 0")
        if self.compress_ratio is not None and not 0 < self.compress_ratio <= 1:
            raise ConfigError(f"compress_ratio={self.compress_ratio}: use a share of the merged experts' "
                              "parameters in (0, 1], e.g. 0.5")
        if not 0 <= self.compress_sparse < 1:
            raise ConfigError(f"compress_sparse={self.compress_sparse}: use a share of rows in [0, 1), e.g. 0.1")
        if self.compress_ratio is not None and self.compress_sparse > self.compress_ratio:
            raise ConfigError(f"compress_sparse={self.compress_sparse} keeps more of each matrix than "
                              f"compress_ratio={self.compress_ratio} allows; lower compress_sparse")
        if self.counts == "global" and self.router == "fit":
            raise ConfigError("counts='global' gives layers different expert counts, which router='fit' cannot save "
                              "as a stock checkpoint (one expert count per model); use router='keep' or "
                              "counts='uniform'")
        # The method's own defaults, resolved here so that the plan's provenance records what ran.
        hc = self.method == "hc-smoe"
        if self.metric is None:
            object.__setattr__(self, "metric", "euclidean")
        if self.align is None:
            object.__setattr__(self, "align", not hc)
        if self.counts is None:
            object.__setattr__(self, "counts", "global" if not hc and self.router == "keep" else "uniform")

    @property
    def needs_data_in_apply(self) -> bool:
        """Whether apply must see the calibration windows (router fits run there, like GPTQ)."""
        return (self.router == "fit" and self.fit_rows == "lse-fit") or self.recalibrate_router or (
            self.compresses and self.compress_whiten)

    @property
    def compresses(self) -> bool:
        """Whether MC-SMoE's compression stage runs after merging."""
        return self.compress_rank is not None or self.compress_ratio is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_model(self, model: nn.Module) -> None:
        """Fail before calibration when ``keep`` does not fit some MoE layer of ``model``."""
        from moeslim.models import find_moe_layers

        for layer in find_moe_layers(model):
            experts, top_k, family = layer.num_experts, layer.top_k, layer.family.name
            if self.keep >= experts:
                raise ConfigError(f"keep={self.keep} keeps all {experts} experts of layer {layer.layer_idx} "
                                  f"({family}): nothing to merge; use keep < {experts}")
            # router=keep still routes top_k of E slots (two slots of one group just add their weights).
            if self.router == "fit" and self.keep < top_k:
                raise ConfigError(f"keep={self.keep} is below top_k={top_k} of {family}; keep at least {top_k} "
                                  "with router='fit'")
