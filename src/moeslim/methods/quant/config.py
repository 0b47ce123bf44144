"""``QuantizeConfig``: validated settings of per-expert bit-width allocation and GPTQ."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from moeslim.calibrate.observers import DEFAULT_MAX_TOKENS
from moeslim.config import ConfigError, check_types
from moeslim.methods.quant.allocate import budget_range
from moeslim.methods.quant.fused import KEEP_BITS
from moeslim.models import find_moe_layers

QUANT_METHODS = ("pmq", "uniform", "random")
COSTS = ("paper", "authors")
SCOPES = ("layer", "global")
QUANTIZERS = ("gptq", "rtn")
PROPAGATE = ("original", "compressed")
_DEFAULT_DAMP = 0.01


def _valid_width(b: object) -> bool:
    return isinstance(b, int) and not isinstance(b, bool) and (1 <= b <= 8 or b == KEEP_BITS)


@dataclass(frozen=True)
class QuantizeConfig:
    """How to choose and realise per-expert bit-widths.

    method: pmq (MC-MoE allocation), uniform (every expert at ``bits``), random (random widths at the
        same budget: the control for PMQ).
    bits: average code bits per expert weight (pmq/random: per layer, or over the model with
        scope="global"); uniform needs an integer in 1..8, or 16 to keep the experts.
    candidates: widths an expert may get (pmq/random); 1..8, or 16 for "keep".
    alpha, beta, gamma: exponents of the cost phi^alpha * w^beta * eps^gamma (paper: gamma = 2, alpha and
        beta in {1, 1.5, 2}); ``cost="authors"`` uses the authors' code instead (alpha=1, beta=1.5 on
        sum-normalised factors, eps^alpha, at least one expert at the two top widths) and ignores them.
    group_size, damp, act_order: GPTQ settings (paper: 128, 0.01, no act-order; asymmetric min-max).
    weighted_hessian: weight each token's Hessian term by its squared routing weight (the expert's share
        of the block output error); default False, the plain GPTQ Hessian as in the paper.
    sequential: GPTQ's "true sequential" order inside the experts: down_proj is calibrated on the
        intermediates of the already quantized gate_up (keeps the layer's block inputs in CPU memory).
    quantizer: gptq (runs in ``apply``, once, on the calibration windows the plan records) or rtn
        (round-to-nearest, no data).
    scope: allocate per layer (paper) or one budget for the whole model.
    seed: random allocation (seed + layer index) and the factor token sample.
    min_tokens: experts with fewer routed calibration tokens are rounded to nearest instead of GPTQ'd (the
        applied ``moeslim.quantize`` section lists them under ``rtn_fallback``).
    token_fraction: share of calibration tokens whose expert outputs the PMQ factors use.
    max_tokens: cap on those tokens per layer (seeded subsample by token position; None = no cap), which
        bounds the factor pass's memory at max_tokens x E x H floats (error model: docs/scale.md).
    quantize_attention: bits for the attention projections (round-to-nearest), None keeps them.
    propagate: what the GPTQ pass feeds layer l+1: the quantized ("compressed", as GPTQ) or original output.
    batch_size: calibration batch size.
    """

    method: str = "pmq"
    bits: float = 2.5
    candidates: tuple[int, ...] = (1, 2, 3)
    alpha: float = 1.0
    beta: float = 1.5
    gamma: float = 2.0
    cost: str = "paper"
    group_size: int = 128
    damp: float = _DEFAULT_DAMP
    act_order: bool = False
    weighted_hessian: bool = False
    sequential: bool = True
    quantizer: str = "gptq"
    scope: str = "layer"
    seed: int = 0
    min_tokens: int = 1
    token_fraction: float = 1.0
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    quantize_attention: int | None = None
    propagate: str = "compressed"
    batch_size: int = 8

    def __post_init__(self) -> None:
        # YAML/JSON give lists: normalise to a tuple so the config stays hashable and frozen.
        object.__setattr__(self, "candidates", tuple(self.candidates))
        check_types(self)
        _check_choice("method", self.method, QUANT_METHODS)
        _check_choice("cost", self.cost, COSTS)
        _check_choice("scope", self.scope, SCOPES)
        _check_choice("quantizer", self.quantizer, QUANTIZERS)
        _check_choice("propagate", self.propagate, PROPAGATE)
        if not isinstance(self.bits, (int, float)) or not math.isfinite(self.bits) or self.bits <= 0:
            raise ConfigError(f"bits={self.bits!r}: give a positive average bit-width, e.g. 2.5")
        if self.method == "uniform" and not (float(self.bits).is_integer() and _valid_width(int(self.bits))):
            raise ConfigError(f"bits={self.bits}: uniform needs an integer width in 1..8, or 16 to keep experts")
        if not self.candidates or not all(_valid_width(b) for b in self.candidates):
            raise ConfigError(f"candidates={self.candidates}: give distinct integer widths in 1..8 (or 16)")
        if len(set(self.candidates)) != len(self.candidates):
            raise ConfigError(f"candidates={self.candidates}: widths must be distinct")
        if self.method != "uniform" and not min(self.candidates) <= self.bits <= max(self.candidates):
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
        if self.min_tokens < 0:
            raise ConfigError(f"min_tokens={self.min_tokens}: use 0 or more")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens={self.max_tokens}: use at least 1 token, or leave unset for no cap")
        if not 0 < self.token_fraction <= 1:
            raise ConfigError(f"token_fraction={self.token_fraction}: use a value in (0, 1]")
        if self.quantize_attention is not None and not _valid_width(self.quantize_attention):
            raise ConfigError(f"quantize_attention={self.quantize_attention!r}: use an integer in 1..8, or None")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: use at least 1")

    @property
    def hessian_weighting(self) -> str:
        return "gate2" if self.weighted_hessian else "none"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["candidates"] = list(self.candidates)
        return data

    def check_model(self, model: nn.Module) -> None:
        """Fail before calibration when the budget cannot be met by some layer (or the model)."""
        if self.method == "uniform":
            return
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


def _check_choice(name: str, value: object, options: Sequence[str]) -> None:
    if value not in options:
        raise ConfigError(f"{name}={value!r}: use one of {', '.join(options)}")
