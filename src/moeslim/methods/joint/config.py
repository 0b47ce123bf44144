"""``JointConfig``: validated settings of the joint planner (experts kept and widths under one byte target)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from torch import nn

from moeslim.calibrate.observers import DEFAULT_MAX_TOKENS
from moeslim.config import ConfigError, check_types
from moeslim.methods.joint.hold import HoldDtype, as_held, hold_torch_dtype
from moeslim.methods.joint.lowrank_options import with_rank_bytes
from moeslim.methods.joint.nonexpert import check_nonexpert, nonexpert_bytes
from moeslim.methods.joint.sizes import LayerBytes, model_layer_bytes
from moeslim.methods.joint.solve import ChoiceGroup, min_held_bytes
from moeslim.methods.prune import PruneConfig
from moeslim.methods.prune.config import PruneShape
from moeslim.methods.prune.enumerate import count_subsets
from moeslim.methods.quant.fused import KEEP_BITS
from moeslim.methods.skip.thresholds import SKIP_RULES, SkipRule
from moeslim.models import MoELayer, find_moe_layers
from moeslim.models.held_bytes import held_bytes

MIB = 2**20
PruneSearch = Literal["auto", "enumerate", "search"]


def _help(text: str, default: Any = None) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class JointConfig:
    """Keep/drop experts per layer and a width per kept expert, under one target, for the least estimated error.
    With ``ranks``, a layer may instead hold its kept experts low-rank (a rank share or dense per kept expert).

    Targets: ``target_mib`` or ``target_ratio`` (held bytes of the compressed model, as ``moeslim.load`` holds
    them) and/or ``target_active_mib`` (routed-expert bytes read per token at decode, expected over the
    calibration tokens' routing). Optionally every float weight held in ``hold_dtype`` (``hold.py``) and a skip
    threshold per layer from ``skip_betas`` (``curves.py``).
    """

    target_mib: float | None = _help("held MiB (2**20 bytes) of the compressed model, as moeslim.load holds it")
    target_ratio: float | None = _help("held bytes as a share of the original's, e.g. 0.25")
    target_active_mib: float | None = _help(
        "MiB of routed-expert weights read per token at decode (expected over the calibration routing)")
    widths: tuple[int, ...] = _help("widths a kept expert may get, 1..8 bits, 16 = untouched", (2, 3, 4, 8, 16))
    min_keep: int | None = _help("fewest experts a layer may keep (default top_k)")
    size_step: int = _help("kept-set sizes considered per layer: min_keep, then every size_step-th size up to all "
                           "experts (1: every size; larger for many experts, a smaller planning problem)", 1)
    prune_method: PruneSearch = _help(
        "how the kept set of each size is chosen: enumerate (every kept set, exact) | search (greedy removal "
        "path + swaps, the same loss; large expert counts) | auto (enumerate while it scores at most "
        "max_subsets sets per layer)", "auto")
    max_subsets: int = _help("auto: enumerate up to this many kept sets per layer, else search", 20_000)
    search_budget: int | None = _help("search: max loss evaluations per layer (None: no limit)", 2000)
    group_size: int = _help("quantization group size along the input dimension", 128)
    symmetric: bool = _help("symmetric groups (no zero points; widths 2..8)", False)
    quantizer: Literal["gptq", "rtn"] = _help(
        "gptq (runs in apply, on the plan's calibration windows; the planner weighs GPTQ's errors too) | rtn "
        "(round-to-nearest, no data)", "gptq")
    gptq_folds: int = _help(
        "gptq: the options' quantization errors are measured out of sample, each sample token's error from the "
        "expert GPTQ'd on the other folds' tokens (methods/joint/curves.py); 1: in sample (GPTQ judged on the tokens "
        "it fitted, optimistic for rarely routed experts)", 2)
    act_order: bool = _help(
        "gptq: act-order with static groups, in the options' errors and in apply (QuantizeConfig.act_order)", True)
    max_tokens: int | None = _help("cap on the calibration tokens whose expert outputs are measured per layer",
                                   DEFAULT_MAX_TOKENS)
    token_fraction: float = _help("share of calibration tokens measured", 1.0)
    seed: int = _help("token-sample seed", 0)
    batch_size: int = _help("calibration batch size", 8)
    error_scale: Literal["squared", "kl"] = _help(
        "squared: summed squared block-output errors as measured | kl: each layer's pruning and quantization "
        "errors weighed by a measured KL per unit of squared error (one probe per layer and kind, "
        "methods/joint/probe.py; the estimate an expected KL per token). On the demo model at 25 % of its bytes the "
        "kl plan measured +14 % perplexity against +11 % for the squared one, hence the default", "squared")
    probe_windows: int = _help("kl: calibration windows the probes run on", 8)
    hold_dtype: HoldDtype = _help(
        "float dtype the plan holds every float weight in: auto (keep the model's) | bfloat16 | float16 | float32. "
        "Bytes and errors are measured on the model as cast, and apply casts it first (the low-bit experts then "
        "compute in it too). Real checkpoints are already 16-bit: this matters for float32 models, whose "
        "embeddings and attention otherwise take twice the bytes of a small target", "auto")
    hold_dtypes: tuple[str, ...] = _help(
        "hold dtypes the planner chooses among instead of one hold_dtype, e.g. auto,bfloat16: the options are "
        "measured on each cast copy, one plan solved per dtype (those whose smallest plan exceeds the target are "
        "skipped), and the plan of least estimated error kept, a cast's estimate including the cast's own price "
        "(the KL of the cast model against the original, methods/joint/cast_price.py). The plan records the "
        "chosen dtype as hold_dtype and every candidate's estimate. Empty: hold_dtype alone", ())
    skip_betas: tuple[float, ...] = _help(
        "skip thresholds a layer may take besides 0 (no skipping), e.g. 0.3,0.6: each layer's options become kept "
        "set x threshold, and apply installs dynamic skipping (methods/skip) with the chosen ones. Skipping holds "
        "the same bytes but reads fewer per token: it serves target_active_mib. Empty: no skipping", ())
    skip_rule: SkipRule = _help(
        "skip_betas: top2 (skip the second expert when w2 < beta * w1; top-2 routing) | topk (drop the tail "
        "experts whose weight share is below beta)", "top2")
    ranks: tuple[float, ...] = _help(
        "low-rank options beside the widths: shares of an expert's weight parameters its whitened-SVD factors keep "
        "(as plan lowrank's ratio), e.g. 0.25,0.5; a layer is then either low-rank (each kept expert at one of "
        "these shares or dense) or quantized (methods/joint/lowrank_options.py). Empty: widths only", ())
    rank_damp: float = _help("low-rank options: covariance damping of the whitening (as plan lowrank's damp)", 0.01)
    attention_widths: tuple[int, ...] = _help(
        "widths each decoder layer's attention projections may be held at (all of a layer's at one width; 16 = "
        "untouched is always an option), e.g. 16,8,4: round-to-nearest packed weights, each option priced by the "
        "KL measured with only that layer's attention at that width (methods/joint/nonexpert.py). Empty: attention "
        "untouched", ())
    embedding_widths: tuple[int, ...] = _help(
        "widths the token embedding and output head may be held at together (one storage when tied; 16 = "
        "untouched is always an option), e.g. 16,8,4: packed rows that stay packed in memory (a lookup "
        "dequantizes its rows only). Empty: untouched", ())
    verify_windows: int = _help(
        "calibration windows (the last ones) held out from measuring the options: the planner's few candidate "
        "plans (the optimum per hold dtype, without attention / embedding packing, widths only, PMQ's allocation "
        "at the same bytes) are each applied (GPTQ on the other windows) and judged by their measured KL on these, "
        "and the least is kept (methods/joint/verify.py). 0: the estimated optimum, unverified", 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))
        object.__setattr__(self, "skip_betas", tuple(self.skip_betas))
        object.__setattr__(self, "ranks", tuple(self.ranks))
        object.__setattr__(self, "hold_dtypes", tuple(self.hold_dtypes))
        for name in ("attention_widths", "embedding_widths"):  # 16 (untouched) always an option, listed first
            given = tuple(getattr(self, name))
            object.__setattr__(self, name, (KEEP_BITS, *(b for b in given if b != KEEP_BITS)) if given else ())
        check_types(self)
        if self.target_mib is None and self.target_ratio is None and self.target_active_mib is None:
            raise ConfigError("give a target: target_mib (held MiB), target_ratio (share of the original's held "
                              "bytes) or target_active_mib (expert MiB read per token)")
        if self.target_mib is not None and self.target_ratio is not None:
            raise ConfigError(f"target_mib={self.target_mib} and target_ratio={self.target_ratio} both set the held "
                              "bytes: give one")
        for name in ("target_mib", "target_ratio", "target_active_mib"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}={value}: give a positive number")
        if self.target_ratio is not None and self.target_ratio >= 1:
            raise ConfigError(f"target_ratio={self.target_ratio}: give a share below 1 of the original's bytes")
        if not self.widths or len(set(self.widths)) != len(self.widths) or not all(
                1 <= b <= 8 or b == KEEP_BITS for b in self.widths):
            raise ConfigError(f"widths={list(self.widths)}: give distinct widths in 1..8, or 16 for untouched")
        if self.symmetric and 1 in self.widths:
            raise ConfigError("symmetric=True with width 1: a symmetric 1-bit grid is {-2m, 0}; use widths >= 2")
        if self.min_keep is not None and self.min_keep < 1:
            raise ConfigError(f"min_keep={self.min_keep}: keep at least 1 expert (default: top_k)")
        hold_torch_dtype(self.hold_dtype)  # a ConfigError naming the dtypes
        self._check_hold_dtypes()
        if len(set(self.skip_betas)) != len(self.skip_betas) or not all(
                math.isfinite(b) and b > 0 for b in self.skip_betas):
            raise ConfigError(f"skip_betas={list(self.skip_betas)}: give distinct positive thresholds (no skipping, "
                              "0, is always an option)")
        if self.skip_rule not in SKIP_RULES:
            raise ConfigError(f"skip_rule={self.skip_rule!r}: use one of {', '.join(SKIP_RULES)}")
        if self.skip_rule == "top2" and any(b > 1 for b in self.skip_betas):
            raise ConfigError(f"skip_betas={list(self.skip_betas)}: the top2 rule compares w2 < beta * w1 with "
                              "w2 <= w1, so a beta above 1 skips as 1 does; use thresholds in (0, 1]")
        if self.error_scale not in ("kl", "squared"):
            raise ConfigError(f"error_scale={self.error_scale!r}: use 'kl' or 'squared'")
        for name, low in (("size_step", 1), ("max_subsets", 1), ("group_size", 1), ("batch_size", 1),
                          ("probe_windows", 1), ("verify_windows", 0), ("gptq_folds", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}={getattr(self, name)}: use {low} or more")
        if self.search_budget is not None and self.search_budget < 1:
            raise ConfigError(f"search_budget={self.search_budget}: use 1 or more, or leave unset")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens={self.max_tokens}: use at least 1 token, or leave unset for no cap")
        if not 0 < self.token_fraction <= 1:
            raise ConfigError(f"token_fraction={self.token_fraction}: use a value in (0, 1]")
        self._check_ranks()
        for name in ("attention_widths", "embedding_widths"):
            given = getattr(self, name)
            if len(set(given)) != len(given) or not all(1 <= b <= 8 or b == KEEP_BITS for b in given):
                raise ConfigError(f"{name}={list(given)}: give distinct widths in 1..8 (16, untouched, is always "
                                  "an option), e.g. 8,4")

    def _check_hold_dtypes(self) -> None:
        if not self.hold_dtypes:
            return
        if self.hold_dtype != "auto":
            raise ConfigError(f"hold_dtype={self.hold_dtype!r} with hold_dtypes={list(self.hold_dtypes)}: give one "
                              "hold_dtype, or the candidates in hold_dtypes (e.g. auto,bfloat16)")
        for name in self.hold_dtypes:
            try:
                hold_torch_dtype(name)
            except ConfigError:
                raise ConfigError(f"hold_dtypes={list(self.hold_dtypes)}: {name!r} is not a hold dtype; use auto "
                                  "(keep the model's dtype), bfloat16, float16, float32") from None
        if len(set(self.hold_dtypes)) != len(self.hold_dtypes):
            raise ConfigError(f"hold_dtypes={list(self.hold_dtypes)}: give each dtype once")

    def hold_candidates(self) -> tuple[str, ...]:
        """The hold dtypes the planner tries: ``hold_dtypes``, or ``hold_dtype`` alone."""
        return self.hold_dtypes or (self.hold_dtype,)

    def held_as(self, dtype: str) -> JointConfig:
        """This config planning in one hold dtype (a candidate of ``hold_candidates``)."""
        return replace(self, hold_dtype=dtype, hold_dtypes=())  # type: ignore[arg-type]

    def _check_ranks(self) -> None:
        if len(set(self.ranks)) != len(self.ranks) or not all(math.isfinite(f) and 0 < f <= 1 for f in self.ranks):
            raise ConfigError(f"ranks={list(self.ranks)}: give distinct shares of an expert's parameters in (0, 1], "
                              "e.g. 0.25,0.5")
        if self.ranks and self.error_scale != "squared":
            raise ConfigError(f"ranks with error_scale={self.error_scale!r}: the KL probes weigh pruning and "
                              "quantization errors only; use error_scale='squared' with low-rank options")
        if self.ranks and self.skip_betas:
            raise ConfigError(f"ranks={list(self.ranks)} with skip_betas={list(self.skip_betas)}: skipping is not "
                              "measured or installed on low-rank layers; plan with one of the two")
        if not (math.isfinite(self.rank_damp) and self.rank_damp > 0):
            raise ConfigError(f"rank_damp={self.rank_damp}: use a positive damping, e.g. 0.01")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["widths"] = list(self.widths)
        data["skip_betas"] = list(self.skip_betas)
        data["ranks"] = list(self.ranks)
        data["attention_widths"] = list(self.attention_widths)
        data["embedding_widths"] = list(self.embedding_widths)
        data["hold_dtypes"] = list(self.hold_dtypes)
        return data

    def check_model(self, model: nn.Module) -> Any:
        """Fail before calibration when the targets cannot be met; return the resolved ``JointTargets`` (of the
        first hold dtype that fits, with ``hold_dtypes``)."""
        fits = held_targets(model, self)
        return next(iter(fits.values()))


@dataclass(frozen=True)
class JointTargets:
    """``base`` the original's held bytes; ``target`` the held-bytes cap (``base`` when only the active target is
    set); ``active`` the cap on expert bytes read per token (None: none); ``sizes`` per-layer byte tables;
    ``kept_sizes`` the kept-set sizes each layer may take; ``prune`` the pruning settings of the loss curves.
    With ``hold_dtype`` every byte count is of the model as held (cast), except ``original``: the model as given,
    which ``target_ratio`` is a share of."""

    base: int
    target: int
    active: float | None
    sizes: dict[int, LayerBytes]
    kept_sizes: tuple[int, ...]
    prune: PruneConfig
    shape: PruneShape
    original: int = 0  # the held bytes of the model as given (``base`` is after the cast to ``hold_dtype``)
    # weights outside the experts (``nonexpert.py``): {group name: {width: held bytes saved}}
    nonexpert: dict[str, dict[int, int]] = field(default_factory=dict)


def _prune_config(config: JointConfig, num_experts: int, min_keep: int) -> PruneConfig:
    method = config.prune_method
    if method == "auto":
        count = sum(count_subsets(num_experts, k) for k in range(min_keep, num_experts))
        method = "enumerate" if count <= config.max_subsets else "search"
    return PruneConfig(keep=min_keep, method=method, allocation="global", min_keep=min_keep, layout="compact",
                       max_subsets=config.max_subsets, budget=config.search_budget, seed=config.seed,
                       token_fraction=config.token_fraction, max_tokens=config.max_tokens)


def _check_skipping(layer: MoELayer, rule: str) -> None:
    """skip_betas on a model whose routing has nothing to skip, or with the top2 rule on top-k > 2 routing."""
    if layer.top_k < 2:
        raise ConfigError(f"skip_betas: {layer.family.name} routes top-{layer.top_k}, there is no expert to skip; "
                          "drop skip_betas")
    if rule == "top2" and layer.top_k != 2:
        raise ConfigError(f"skip_rule='top2' needs top-2 routing but {layer.family.name} routes top-{layer.top_k}; "
                          "use skip_rule='topk'")


def resolve_targets(model: nn.Module, config: JointConfig, held_model: nn.Module | None = None) -> JointTargets:
    """``held_model``: ``model`` as the plan holds it (``hold.as_held``), when the caller has it already."""
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ConfigError("the joint planner measures the held bytes of the whole model, and some of its tensors are "
                          "not loaded (meta: a streamed or partly loaded model); load it whole (drop --stream)")
    original = held_bytes(model)
    model = held_model if held_model is not None else as_held(model, config.hold_dtype)
    layers = find_moe_layers(model)
    blocked = next((layer.family for layer in layers if layer.family.skip_blocker), None)
    if config.skip_betas and blocked is not None:
        raise ConfigError(f"skip_betas: {blocked.name}: dynamic expert skipping cannot run this family: "
                          f"{blocked.skip_blocker}; leave skip_betas empty")
    experts, top_k = layers[0].num_experts, layers[0].top_k
    if any(layer.num_experts != experts for layer in layers):
        raise ConfigError("the joint planner needs every MoE layer to hold the same number of experts "
                          f"(got {sorted({layer.num_experts for layer in layers})}); plan the unpruned model")
    min_keep = config.min_keep if config.min_keep is not None else top_k
    if config.skip_betas:
        _check_skipping(layers[0], config.skip_rule)
    if not top_k <= min_keep < experts:
        raise ConfigError(f"min_keep={min_keep}: use a count in {top_k}..{experts - 1} (top_k..experts - 1)")
    prune = _prune_config(config, experts, min_keep)
    shape = prune.check_model(model)
    low = min(shape.sizes)
    kept_sizes = tuple(sorted({k for k in shape.sizes if (k - low) % config.size_step == 0} | {experts}))
    sizes = model_layer_bytes(model, config.widths, config.group_size, config.symmetric)
    if config.ranks:
        sizes = with_rank_bytes(model, sizes, config.ranks)
    base = held_bytes(model)
    check_nonexpert(model, config.attention_widths, config.embedding_widths)
    nonexpert = nonexpert_bytes(model, config.attention_widths, config.embedding_widths, config.group_size)
    groups = [ChoiceGroup(name, tuple(saved), (0.0,) * len(saved), tuple(saved.values()))
              for name, saved in nonexpert.items()]
    smallest = min_held_bytes(base, sizes, {idx: low for idx in sizes}, config.widths, config.ranks, groups)
    target = base
    if config.target_mib is not None or config.target_ratio is not None:
        target = (int(config.target_mib * MIB) if config.target_mib is not None
                  else int(config.target_ratio * original))  # type: ignore[operator]
        asked = (f"target_mib={config.target_mib}" if config.target_mib is not None
                 else f"target_ratio={config.target_ratio} ({target / MIB:.3f} MiB)")
        if target < smallest:
            raise ConfigError(
                f"{asked} is below the smallest size a joint plan reaches on this model: {smallest / MIB:.3f} MiB "
                f"({smallest / original:.1%} of the original's {original / MIB:.3f} MiB; every MoE layer keeping {low} "
                f"experts at {min(config.widths)} bits{' or the cheapest rank share' if config.ranks else ''}"
                f"{', attention and embedding at their narrowest' if groups else ''}): "
                "raise the target, or lower min_keep / add a narrower width")
        if target >= original:
            raise ConfigError(f"{asked} is not below the original's held {original / MIB:.3f} MiB: nothing to "
                              "compress")
    active = None
    if config.target_active_mib is not None:
        active = config.target_active_mib * MIB
        reads = 1 if config.skip_betas else top_k  # skipping leaves at least the first expert of a token
        least = sum(reads * min([lb.width[b] for b in config.widths] + list(lb.rank.values()))
                    for lb in sizes.values())
        if active < least:
            raise ConfigError(
                f"target_active_mib={config.target_active_mib} is below the least a token reads: {least / MIB:.4f} "
                f"MiB ({reads} routed expert(s) per MoE layer at {min(config.widths)} bits); raise the target")
    return JointTargets(base=base, target=target, active=active, sizes=sizes, kept_sizes=kept_sizes, prune=prune,
                        shape=shape, original=original, nonexpert=nonexpert)


def held_targets(model: nn.Module, config: JointConfig) -> dict[str, JointTargets]:
    """{hold dtype: its resolved targets} for each of ``config.hold_candidates()`` that fits the targets; with
    ``hold_dtypes`` a dtype that does not fit is left out, and when none fits the ConfigError says why for each."""
    fits: dict[str, JointTargets] = {}
    errors: dict[str, ConfigError] = {}
    for dtype in config.hold_candidates():
        try:
            fits[dtype] = resolve_targets(model, config.held_as(dtype))
        except ConfigError as err:
            if not config.hold_dtypes:
                raise
            errors[dtype] = err
    if not fits:
        raise ConfigError("no hold dtype fits: " + "; ".join(f"held as {d}: {e}" for d, e in errors.items()))
    return fits
