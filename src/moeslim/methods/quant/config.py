"""``QuantizeConfig``: validated settings of per-expert bit-width allocation and GPTQ."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from torch import nn

from moeslim.calibrate.hessians import HessianWeighting
from moeslim.calibrate.observers import DEFAULT_MAX_TOKENS
from moeslim.config import ConfigError, check_types
from moeslim.methods.quant.allocate import budget_range
from moeslim.methods.quant.fused import KEEP_BITS
from moeslim.models import find_moe_layers

QuantMethod = Literal["pmq", "uniform", "random"]
Cost = Literal["paper", "authors"]
Scope = Literal["layer", "global", "gguf"]
Granularity = Literal["expert", "layer"]
Quantizer = Literal["gptq", "rtn"]
Propagate = Literal["original", "compressed"]
Starved = Literal["all-tokens", "rtn"]
QUANT_METHODS: tuple[str, ...] = get_args(QuantMethod)
_DEFAULT_DAMP = 0.01


def _valid_width(b: object) -> bool:
    return isinstance(b, int) and not isinstance(b, bool) and (1 <= b <= 8 or b == KEEP_BITS)


@dataclass(frozen=True)
class QuantizeConfig:
    """Choose a bit-width per expert (PMQ mixed precision or uniform) and how to realise it.

    Each field's meaning is its ``metadata["help"]`` (also the ``moeslim plan quantize`` help).
    """

    method: QuantMethod = field(default="pmq", metadata={
        "help": "pmq (MC-MoE allocation) | uniform (every expert at bits) | random (random widths at the same "
                "budget: the control for PMQ)"})
    bits: float = field(default=2.5, metadata={
        "required_flag": True,
        "help": "average code bits per expert weight (pmq/random: per layer, or over the model with scope "
                "global); uniform needs an integer in 1..8, or 16 to keep the experts"})
    candidates: tuple[int, ...] = field(default=(1, 2, 3), metadata={
        "help": "widths an expert may get (pmq/random), e.g. 1,2,3; each 1..8, or 16 for keep"})
    alpha: float = field(default=1.0, metadata={"help": "exponent of phi in the cost phi^alpha * w^beta * eps^gamma"})
    beta: float = field(default=1.5, metadata={"help": "exponent of w in the cost (paper: alpha, beta in {1, 1.5, 2})"})
    gamma: float = field(default=2.0, metadata={"help": "exponent of eps in the cost (paper: 2)"})
    cost: Cost = field(default="paper", metadata={
        "help": "paper | authors (the authors' code: alpha=1, beta=1.5 on sum-normalised factors, eps^alpha, at "
                "least one expert at the two top widths; alpha, beta, gamma ignored)"})
    group_size: int = field(default=128, metadata={"help": "GPTQ group size (paper: 128)"})
    damp: float = field(default=_DEFAULT_DAMP, metadata={"help": "GPTQ damping fraction (paper: 0.01)"})
    act_order: bool = field(default=True, metadata={
        "help": "GPTQ act-order with static groups (llm-compressor's actorder 'static', its default: groups stay "
                "contiguous, so no g_idx is stored and vLLM's kernels read it as is; paper: no). On the demo "
                "models it cuts the KL of uniform 2-bit by 22 % and of 4-bit on demo-fine by 30 %"})
    symmetric: bool = field(default=False, metadata={
        "help": "symmetric groups: one scale per group, no zero points (codes c - 2^(b-1)); the grid vLLM's and "
                "transformers' MoE kernels read, exported as compressed-tensors W4A16 / W8A16 in exactly b bits; "
                "off: asymmetric min-max groups with zero points, as in the paper (exported one bit wider)"})
    weighted_hessian: bool = field(default=False, metadata={
        "help": "weight each token's Hessian term by its squared routing weight (the expert's share of the block "
                "output error); off: the plain GPTQ Hessian, as in the paper"})
    sequential: bool = field(default=True, metadata={
        "help": "GPTQ's true-sequential order inside the experts: down_proj is calibrated on the intermediates "
                "of the already quantized gate_up (keeps the layer's block inputs in CPU memory)"})
    quantizer: Quantizer = field(default="gptq", metadata={
        "help": "gptq (runs in apply, once, on the calibration windows the plan records) | rtn "
                "(round-to-nearest, no data)"})
    scope: Scope = field(default="layer", metadata={
        "help": "layer (the paper: a budget per layer) | global (one budget for the whole model) | gguf (one "
                "llama.cpp type per expert tensor, layer x gate/up/down, under a model-wide size budget: bits "
                "with scales; candidates 2,3,4,5,6,8,16 = Q2_K..Q6_K, Q8_0, F16; for moeslim export --format "
                "gguf)"})
    granularity: Granularity = field(default="expert", metadata={
        "help": "what one PMQ width covers: expert (the paper: every expert its own width; served by moeslim's "
                "own runtime) | layer (every expert of a MoE layer one width, chosen under the model-wide "
                "budget of scope global: the mixed widths vLLM serves from compressed-tensors, whose fused-MoE "
                "kernel takes one scheme per layer). No per-projection choice: vLLM refuses different schemes for "
                "gate, up and down of one MoE layer"})
    seed: int = field(default=0, metadata={
        "help": "random allocation (seed + layer index) and the factor token sample"})
    min_tokens: int | None = field(default=None, metadata={
        "help": "an expert with fewer routed calibration tokens is starved: GPTQ never uses a Hessian from fewer "
                "tokens; unset: the group size (a Hessian from fewer tokens than a group has rank below the group)"})
    starved: Starved = field(default="all-tokens", metadata={
        "help": "what a starved expert gets: all-tokens (GPTQ with Hessians from every calibration token, routed to "
                "it or not; keeps the block inputs) | rtn (round-to-nearest); the applied moeslim.quantize section "
                "lists them (all_token_fallback / rtn_fallback) with every expert's routed token count"})
    hessian_experts: int | None = field(default=None, metadata={
        "help": "expert-group split: GPTQ Hessians of at most this many experts alive at once, made group by group "
                "from the kept block inputs (the same Hessians, bit for bit); unset: every expert's at once, unless "
                "hessian_memory sets the group (memory model: docs/scale.md)"})
    hessian_memory: float | None = field(default=None, metadata={
        "help": "GiB the per-expert gate_up Hessians (H x H float64 sums each) may take: sets the expert-group split "
                "per layer (at least one expert); unset: no limit"})
    calibrate_all_experts: bool = field(default=False, metadata={
        "help": "every expert's GPTQ Hessians from all calibration tokens (llm-compressor's calibrate_all_experts); "
                "the block's outputs stay routed as the model routes them"})
    token_fraction: float = field(default=1.0, metadata={
        "help": "share of calibration tokens whose expert outputs the PMQ factors use"})
    max_tokens: int | None = field(default=DEFAULT_MAX_TOKENS, metadata={
        "help": "cap on those tokens per layer (seeded subsample by token position), which bounds the factor "
                "pass's memory at max-tokens x E x H floats (error model: docs/scale.md)"})
    quantize_attention: int | None = field(default=None, metadata={
        "help": "bits for the attention projections (round-to-nearest); unset keeps them"})
    propagate: Propagate = field(default="compressed", metadata={
        "help": "what the GPTQ pass feeds layer l+1: the quantized (compressed, as GPTQ) or original output"})
    batch_size: int = field(default=8, metadata={"help": "calibration batch size"})

    def __post_init__(self) -> None:
        # YAML/JSON give lists: normalise to a tuple so the config stays hashable and frozen.
        object.__setattr__(self, "candidates", tuple(self.candidates))
        check_types(self)  # also the enumerations (Literal fields)
        if not isinstance(self.bits, (int, float)) or not math.isfinite(self.bits) or self.bits <= 0:
            raise ConfigError(f"bits={self.bits!r}: give a positive average bit-width, e.g. 2.5")
        if self.method == "uniform" and not (float(self.bits).is_integer() and _valid_width(int(self.bits))):
            raise ConfigError(f"bits={self.bits}: uniform needs an integer width in 1..8, or 16 to keep experts")
        if not self.candidates or not all(_valid_width(b) for b in self.candidates):
            raise ConfigError(f"candidates={self.candidates}: give distinct integer widths in 1..8 (or 16)")
        if len(set(self.candidates)) != len(self.candidates):
            raise ConfigError(f"candidates={self.candidates}: widths must be distinct")
        # scope gguf: bits count the types' scales too (Q8_0 = 8.5); plan_gguf_types checks the byte budget
        if self.method != "uniform" and self.scope != "gguf" and not min(self.candidates) <= self.bits <= max(
                self.candidates):
            raise ConfigError(
                f"bits={self.bits}: the average must lie between the smallest and largest candidate "
                f"{min(self.candidates)}..{max(self.candidates)}")
        if self.cost == "authors" and self.method == "pmq" and len(self.candidates) < 2:
            raise ConfigError("cost='authors' needs at least 2 candidates (one expert at each of the top two)")
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}={value!r}: use a finite non-negative exponent")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"group_size={self.group_size!r}: use a positive integer (paper: 128)")
        if not 0 < self.damp < 1:
            raise ConfigError(f"damp={self.damp}: use a damping fraction in (0, 1) (paper: 0.01)")
        if self.min_tokens is not None and self.min_tokens < 1:
            raise ConfigError(f"min_tokens={self.min_tokens}: use 1 or more, or leave unset for the group size")
        if self.hessian_experts is not None and self.hessian_experts < 1:
            raise ConfigError(f"hessian_experts={self.hessian_experts}: use 1 or more experts a group, or leave unset")
        if self.hessian_memory is not None and not (math.isfinite(self.hessian_memory) and self.hessian_memory > 0):
            raise ConfigError(f"hessian_memory={self.hessian_memory}: give a positive number of GiB, or leave unset")
        if self.hessian_experts is not None and self.hessian_memory is not None:
            raise ConfigError("hessian_experts and hessian_memory both set the expert-group split: give one")
        if self.calibrate_all_experts and self.weighted_hessian:
            raise ConfigError("calibrate_all_experts=True with weighted_hessian=True: a token not routed to an expert "
                              "has routing weight 0, so the weighted Hessian would be the routed one; choose one")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens={self.max_tokens}: use at least 1 token, or leave unset for no cap")
        if not 0 < self.token_fraction <= 1:
            raise ConfigError(f"token_fraction={self.token_fraction}: use a value in (0, 1]")
        if self.quantize_attention is not None and not _valid_width(self.quantize_attention):
            raise ConfigError(f"quantize_attention={self.quantize_attention!r}: use an integer in 1..8, or None")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: use at least 1")
        if self.granularity == "layer":
            _check_layer_granularity(self)
        if self.scope == "gguf":
            _check_gguf_scope(self)
        if self.symmetric:
            _check_symmetric(self)

    def hessian_group(self, num_experts: int, hidden: int) -> int | None:
        """Experts per group of the expert-group split for a layer of ``num_experts`` experts whose gate_up input
        has ``hidden`` features, or None (no split: every expert's Hessians from the calibration pass)."""
        if self.hessian_memory is not None:
            per_expert = hidden * hidden * 8  # one float64 (H, H) sum
            group = max(1, int(self.hessian_memory * 2**30 // per_expert))
        else:
            group = self.hessian_experts if self.hessian_experts is not None else num_experts
        return None if group >= num_experts else group

    @property
    def splits_hessians(self) -> bool:
        """Whether the expert-group split may apply (the pass then keeps the block inputs)."""
        return self.hessian_experts is not None or self.hessian_memory is not None

    @property
    def starved_below(self) -> int:
        """Routed calibration tokens below which an expert is starved: ``min_tokens``, or the group size."""
        return self.min_tokens if self.min_tokens is not None else self.group_size

    def starved_rule(self) -> str:
        """The starved-expert rule in words (plan summary, applied section)."""
        if self.calibrate_all_experts:
            return "every expert's Hessians from all calibration tokens (calibrate_all_experts)"
        fallback = ("GPTQ with all-token Hessians (round-to-nearest if the layer saw fewer tokens)"
                    if self.starved == "all-tokens" else "round-to-nearest")
        return f"experts with fewer than {self.starved_below} routed calibration tokens: {fallback}"

    @property
    def hessian_weighting(self) -> HessianWeighting:
        return "gate2" if self.weighted_hessian else "none"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["candidates"] = list(self.candidates)
        return data

    def check_model(self, model: nn.Module) -> None:
        """Fail before calibration when the model's experts cannot be quantized (low-rank factors) or the budget
        cannot be met by some layer (or the model)."""
        refuse_lowrank(model)
        if self.method == "uniform" or self.scope == "gguf":
            return  # gguf: the budget is in bytes of real llama.cpp types; plan_gguf_types checks it
        layers = find_moe_layers(model)
        require = self.method == "pmq" and self.cost == "authors"
        ranges = [budget_range(layer.num_experts, self.candidates, require) for layer in layers]
        totals = [layer.num_experts * self.bits for layer in layers]
        if self.scope == "global":
            ranges, totals = [(sum(r[0] for r in ranges), sum(r[1] for r in ranges))], [sum(totals)]
        for (lo, _hi), total in zip(ranges, totals, strict=True):
            if total + 1e-9 < lo:
                rule = " with the authors' top-two rule" if require else ""
                raise ConfigError(f"bits={self.bits}: below the smallest achievable budget ({lo} bits in total "
                                  f"for candidates {list(self.candidates)}{rule})")



def refuse_lowrank(model: nn.Module, layers: Collection[int] | None = None) -> None:
    """Raise ConfigError when some MoE layer to be quantized (``layers``; None: every one) holds low-rank experts
    (a low-rank plan was applied). A joint plan quantizes only the layers it left without low-rank experts.

    GPTQ quantizes one (out, in) matrix per expert with its input Hessian; a low-rank expert is two factors
    A (out, r) and B (r, in), with no dense weight left (the fused parameters are meta placeholders), and moeslim
    has no packed storage or runtime for quantized factors, so quantizing it is refused here, before any
    calibration, rather than failing mid-pass. (Read from the placeholders and the model's ``moeslim`` section:
    methods do not import the runtime.)
    """
    from moeslim.models.expert_math import expert_weight_views

    section = getattr(getattr(model, "config", None), "moeslim", None) or {}
    if "lowrank" not in section:
        return
    held = [layer.layer_idx for layer in find_moe_layers(model)
            if (layers is None or layer.layer_idx in layers)
            and any(t.is_meta for t in (expert_weight_views(layer).up, expert_weight_views(layer).down))]
    if held:
        raise ConfigError(
            f"quantizing low-rank experts is not supported (decoder layers {held} hold low-rank factors A (out, r) "
            "and B (r, in), not the dense expert weights GPTQ quantizes, and there is no packed format for quantized "
            "factors): quantize the model without the low-rank stage, or keep the low-rank model in 16 bits")


def _check_layer_granularity(config: QuantizeConfig) -> None:
    """granularity='layer': PMQ's allocation, one budget for the model (a layer budget would fix every width)."""
    if config.method != "pmq":
        raise ConfigError(f"granularity='layer' ties PMQ's allocation per layer: use method='pmq', not "
                          f"{config.method!r} (a uniform plan already has one width per layer)")
    if config.scope != "global":
        raise ConfigError(f"granularity='layer' with scope={config.scope!r}: one width per layer leaves a per-layer "
                          "budget nothing to choose, so the budget is the model's: use scope='global' "
                          "(--scope global)")
    if config.cost == "authors":
        raise ConfigError("granularity='layer' with cost='authors': the authors' rule puts experts of one layer at "
                          "the two top widths, which one width per layer cannot; use cost='paper'")


def _check_symmetric(config: QuantizeConfig) -> None:
    """symmetric=True: no 1-bit width (a symmetric 1-bit grid is {-2m, 0}), no llama.cpp types."""
    if config.scope == "gguf":
        raise ConfigError("symmetric=True: scope='gguf' plans llama.cpp types, whose grids llama.cpp chooses; "
                          "drop --symmetric")
    widths = [int(config.bits)] if config.method == "uniform" else list(config.candidates)
    if 1 in widths:
        raise ConfigError(f"symmetric=True with 1-bit widths ({widths}): a symmetric 1-bit grid is {{-2m, 0}}; use "
                          "widths of 2 bits or more (e.g. --candidates 2,3,4)")


def _check_gguf_scope(config: QuantizeConfig) -> None:
    """scope='gguf': PMQ only, candidates that name llama.cpp types (methods/quant/gguf_types.py)."""
    from moeslim.methods.quant.gguf_types import GGUF_WIDTHS

    if config.method != "pmq":
        raise ConfigError(f"scope='gguf' allocates with PMQ's factors: use method='pmq', not {config.method!r}")
    bad = [b for b in config.candidates if b not in GGUF_WIDTHS]
    if bad:
        names = ", ".join(f"{w}={t}" for w, t in GGUF_WIDTHS.items())
        raise ConfigError(f"candidates {bad}: scope='gguf' widths name llama.cpp types ({names})")
