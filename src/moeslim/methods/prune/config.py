"""``PruneConfig``: the validated settings of expert pruning, checked before any calibration runs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from torch import nn

from moeslim.calibrate.observers import DEFAULT_MAX_TOKENS
from moeslim.config import ConfigError, check_types

PruneMethod = Literal["enumerate", "search", "frequency", "soft-count", "reap", "random"]
PruneMode = Literal["layerwise", "progressive"]
PRUNE_METHODS: tuple[str, ...] = get_args(PruneMethod)
LOSS_METHODS = ("enumerate", "search")  # minimise the reconstruction loss
SAMPLE_METHODS = ("enumerate", "search", "reap")  # need every expert's output on the token sample
ROUTING_METHODS = ("frequency", "soft-count")  # need routing statistics only
PRUNE_MODES: tuple[str, ...] = get_args(PruneMode)

# Each method's mode when none is given, and why: the measurement of benchmarks/prune_modes.py (held-out perplexity
# on both demo models, 3 calibration seeds, both window spacings; docs/results-pruning.md). soft-count and random
# were not measured and keep layerwise (random ignores the data unless score=True).
# Progressive replaces layerwise (the cheaper pass) only when it lowers perplexity on average and in most pairs.
DEFAULT_MODES: dict[str, PruneMode] = {
    "enumerate": "layerwise", "search": "progressive", "frequency": "layerwise", "soft-count": "layerwise",
    "reap": "progressive", "random": "layerwise",
}
MODE_WHY: dict[str, str] = {
    "enumerate": "progressive +0.0 % perplexity, lower in 5 of 12 paired runs",
    "search": "progressive -0.3 % on the 64-expert model, lower in 6 of 6",
    "frequency": "progressive -0.3 %, lower in only 9 of 18",
    "reap": "progressive -1.0 %, lower in 10 of 18; llm-compressor's REAP runs this way",
}


# Default loss evaluations per layer for method="search": covers the whole greedy removal path of a 64-expert layer
# at 25 % and 50 % removal (904 / 1552 evaluations) with the rest for swaps; layers with more experts are cut by
# removal loss. One evaluation costs O(tokens x (2 top_k)^2): 0.47 s for 8192 tokens, 64 experts, top-8 on one
# loaded CPU core, so bound the time with max_tokens as well (docs/results-reap.md has the measurement).
DEFAULT_SEARCH_BUDGET = 2000


def _help(text: str, default: Any = None) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """How to choose the experts every MoE layer keeps (each field's ``metadata["help"]`` says what it does).

    ``enumerate`` needs no sample: it accumulates every kept set's loss batch by batch (exact, O(C(E, keep))).
    ``allocation="global"`` gives layers different counts: each layer's loss curve (best kept set of every size,
    from enumeration or the search's removal path) goes into an exact dynamic programme that minimises the summed
    squared reconstruction error of all layers for the total ``total_keep`` (default keep x MoE layers).
    """

    keep: int = field(metadata={"help": "experts each MoE layer keeps (allocation=global: the mean per layer, "
                                        "total = keep x MoE layers unless total_keep is set)"})
    method: PruneMethod = _help("enumerate (all kept sets, exact) | search (beam removal + swaps, same objective, "
                                "large E) | frequency | soft-count | reap | random (one-pass baselines)", "enumerate")
    mode: PruneMode | None = _help(
        "layerwise (inputs from the original model) | progressive (inputs from the model with earlier layers "
        "pruned; target: the ORIGINAL model's block output on its own inputs) | unset: the method's measured best, "
        + "; ".join(f"{m} {d}" + (f" ({MODE_WHY[m]})" if m in MODE_WHY else "") for m, d in DEFAULT_MODES.items())
        + "; allocation=global is always layerwise")
    allocation: Literal["uniform", "global"] = _help(
        "uniform (every layer keeps `keep`) | global (per-layer counts from the layers' loss curves, exact DP "
        "for the least total squared loss at the same total)", "uniform")
    total_keep: int | None = _help("allocation=global: experts kept over all MoE layers (default keep x MoE "
                                   "layers)")
    min_keep: int | None = _help("allocation=global: fewest experts a layer may keep (default top_k)")
    layout: Literal["auto", "padded", "compact"] = _help(
        "how unequal per-layer counts are stored: padded (stock transformers loads it; needs a router that can "
        "exclude experts: a logit or correction bias) | compact (moeslim.load) | auto (padded where possible)",
        "auto")
    groups: Literal["auto", "keep", "drop"] = _help(
        "group-limited routing (n_group > 1): keep (search only kept sets with equal counts per group, so the "
        "pruned model keeps its groups) | drop (the pruned model routes without group limits; that is what is "
        "scored) | auto (keep when the kept count allows it)", "auto")
    max_subsets: int = _help("enumerate refuses layers with more kept sets than this (use search)", 20_000)
    beam: int = _help("search: states kept per removal step (1 = greedy removal)", 1)
    local_search: bool = _help("search: improve the removal result by swaps kept <-> dropped", True)
    budget: int | None = _help("search: max loss evaluations per layer (None = no limit); a cut removal drops "
                               "the experts whose removal cost least", DEFAULT_SEARCH_BUDGET)
    seed: int = _help("random-subset seed (per layer: seed + layer index) and token-sample seed", 0)
    token_fraction: float = _help("share of calibration tokens whose expert outputs are kept", 1.0)
    max_tokens: int | None = _help("cap on the tokens whose expert outputs are kept per layer (seeded uniform "
                                   "subsample; None = no cap; error: docs/scale.md)", DEFAULT_MAX_TOKENS)
    chunk_tokens: int = _help("tokens per chunk when scoring (bounds temporary memory)", 4096)
    score: bool = _help("also compute the reconstruction loss of the kept set for the baseline methods", False)
    recalibrate_router: bool = _help("refit the kept experts' router rows so the pruned block's output best matches "
                                     "the original (methods/router_fit.py); apply re-runs the fit on the plan's "
                                     "calibration windows (uniform allocation only)", False)

    def __post_init__(self) -> None:
        if self.method not in PRUNE_METHODS:
            raise ConfigError(f"method={self.method!r} is not a pruning method; use one of {', '.join(PRUNE_METHODS)}")
        if self.mode is not None and self.mode not in PRUNE_MODES:
            raise ConfigError(f"mode={self.mode!r}: use 'layerwise' or 'progressive' (or leave it unset)")
        check_types(self)
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
        self._check_allocation()

    def _check_allocation(self) -> None:
        if self.allocation == "uniform":
            for name in ("total_keep", "min_keep"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name}={getattr(self, name)} is only used with allocation='global'; "
                                      f"set allocation='global' or leave {name} unset")
            return
        if self.method not in LOSS_METHODS:
            raise ConfigError(f"allocation='global' needs each layer's loss curve: use method='enumerate' or "
                              f"'search' (got method={self.method!r})")
        if self.mode == "progressive":
            raise ConfigError("allocation='global' decides every layer's count after all layers are scored, so "
                              "progressive mode (which needs each layer's kept set before the next) cannot "
                              "run; use mode='layerwise'")
        if self.min_keep is not None and self.min_keep < 1:
            raise ConfigError(f"min_keep={self.min_keep}: use at least 1 (default: top_k)")
        if self.total_keep is not None and self.total_keep < 1:
            raise ConfigError(f"total_keep={self.total_keep}: use at least 1")

    @property
    def needs_sample(self) -> bool:
        return self.method in SAMPLE_METHODS or self.score

    @property
    def effective_mode(self) -> PruneMode:
        """``mode``, or when unset the method's default (layerwise for allocation='global', which needs it)."""
        if self.mode is not None:
            return self.mode
        return "layerwise" if self.allocation == "global" else DEFAULT_MODES[self.method]

    def to_dict(self) -> dict[str, Any]:
        """The settings with the mode resolved, so a plan records the mode it was made with."""
        return {**asdict(self), "mode": self.effective_mode}

    def check_model(self, model: nn.Module) -> PruneShape:
        """Fail before calibration when the settings do not fit ``model``; return what they resolve to."""
        from moeslim.models import find_moe_layers

        layers = find_moe_layers(model)
        for layer in layers:
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
            if self.method == "search" and self.budget is not None and self.budget < experts:
                raise ConfigError(
                    f"budget={self.budget} cannot score the {experts} single removals of layer {layer.layer_idx} "
                    f"(a budget cut drops experts by those losses); use budget >= {experts} or leave it unset"
                )
            subsets = math.comb(experts, self.keep)
            if self.method == "enumerate" and subsets > self.max_subsets:
                raise ConfigError(
                    f"enumerate would score C({experts}, {self.keep}) = {subsets} kept sets per layer "
                    f"(max_subsets={self.max_subsets}); use method='search' (same objective, greedy + local "
                    "search) or raise max_subsets"
                )
        return self._shape(model, layers)

    def _shape(self, model: nn.Module, layers: list[Any]) -> PruneShape:
        from moeslim.models.select import group_limits, padding_refusal, resolve_group_policy

        experts, top_k = layers[0].num_experts, layers[0].top_k
        limits = group_limits(model)
        if self.allocation == "uniform":
            sizes: tuple[int, ...] = (self.keep,)
            total = None
        else:
            low = self.min_keep if self.min_keep is not None else top_k
            if low < top_k:
                raise ConfigError(f"min_keep={low} is below top_k={top_k}; use min_keep >= {top_k}")
            sizes = tuple(k for k in range(low, experts + 1) if limits is None or self.groups == "drop"
                          or limits.size_ok(k) or k == experts)
            total = self.total_keep if self.total_keep is not None else self.keep * len(layers)
            most = len(layers) * experts
            if not len(layers) * low <= total < most:
                raise ConfigError(f"total_keep={total} must be in [{len(layers) * low}, {most - 1}] for "
                                  f"{len(layers)} MoE layers of {experts} experts with min_keep={low}")
        try:
            policy = resolve_group_policy(limits, [s for s in sizes if s < experts] or [self.keep], self.groups)
        except ValueError as err:
            raise ConfigError(f"keep={self.keep}: {err}") from err
        if policy == "keep" and self.allocation == "global":
            sizes = tuple(k for k in sizes if limits is not None and (limits.size_ok(k) or k == experts))
        if self.allocation == "global" and self.method == "enumerate":
            count = sum(math.comb(experts, k) for k in sizes if k < experts)
            if count > self.max_subsets:
                raise ConfigError(f"allocation='global' with enumerate scores every kept set of sizes "
                                  f"{min(sizes)}..{experts - 1}: {count} per layer (max_subsets="
                                  f"{self.max_subsets}); use method='search', raise min_keep or max_subsets")
        layout: str | None = None
        if self.allocation == "global":
            refused = next((why for layer in layers if (why := padding_refusal(layer)) is not None), None)
            if self.layout == "padded" and refused is not None:
                raise ConfigError(f"layout='padded': {refused}")
            layout = "compact" if self.layout == "compact" or refused is not None else "padded"
        return PruneShape(sizes=sizes, total=total, groups=policy, layout=layout)


@dataclass(frozen=True)
class PruneShape:
    """What a ``PruneConfig`` resolves to on one model (``check_model``).

    sizes: kept counts a layer may get (uniform: (keep,)); total: allocation=global total (else None);
    groups: "keep" / "drop" for group-limited routing (None: ungrouped); layout: how unequal counts are stored
    (None: uniform).
    """

    sizes: tuple[int, ...]
    total: int | None
    groups: Literal["keep", "drop"] | None
    layout: str | None
