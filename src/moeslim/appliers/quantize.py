"""Apply a "quantize" plan: quantize the experts at the plan's widths and hand the packed tensors to the runtime.

The plan holds widths only. Here the experts are quantized, once:

- ``quantizer="gptq"`` (the default): the GPTQ pass (``methods.quant.transform.gptq_experts``) runs on the
  calibration windows the plan was made on. They must be passed in (``moeslim.apply(model, plan,
  calibration=...)``; ``moeslim apply`` redraws them from the plan's ``summary["calibration"]``), and their
  hashes must match the plan's. Without them apply raises: it never falls back to round-to-nearest.
  Starved experts (fewer routed calibration tokens than the group size, or ``min_tokens``) get all-token
  Hessians or are rounded to nearest (``starved``); the returned section states the rule and lists them under
  ``all_token_fallback`` / ``rtn_fallback`` with every expert's routed token count (explicit, not silent).
- ``quantizer="rtn"``: round-to-nearest at the plan's widths, no data.
- ``quantize_attention``: attention projections are rounded to nearest (moeslim has no GPTQ pass for them);
  the section says so (``attention_quantizer``).

Each packed ``LowBitTensor`` goes to the runtime through one call, ``runtime.lowbit_io.install_lowbit``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from moeslim.config import from_mapping
from moeslim.data.calibration_set import CalibrationSet, check_same_calibration
from moeslim.methods.quant.config import QuantizeConfig, refuse_lowrank
from moeslim.methods.quant.driver import bits_summary
from moeslim.methods.quant.fused import KEEP_BITS, LowBitTensor, quantize_fused
from moeslim.methods.quant.transform import GptqResults, QuantizedExperts, gptq_experts, rtn_experts
from moeslim.models import MoELayer, find_moe_layers
from moeslim.models.expert_math import expert_weight_views
from moeslim.models.nonexpert import attention_linears_by_layer
from moeslim.plans import Plan, PlanError
from moeslim.runtime.lowbit_io import install_lowbit

__all__ = ["QuantizeSettings", "apply_quantize", "attention_linears", "gptq_input_ids", "needs_calibration",
           "quantize_attention_weight", "quantize_section", "quantize_settings"]


def _plan_bits(model_layers: dict[int, MoELayer], plan: Plan) -> dict[int, list[int]]:
    bits: dict[int, list[int]] = {}
    for idx, entry in plan.layers.items():
        if idx not in model_layers:
            raise PlanError(f"plan layer {idx} is not a MoE layer of this model (MoE layers: {sorted(model_layers)})")
        widths = [int(b) for b in entry["bits"]] if isinstance(entry, dict) and "bits" in entry else None
        if widths is None or len(widths) != model_layers[idx].num_experts:
            n = model_layers[idx].num_experts
            raise PlanError(f"plan layer {idx}: need {{'bits': [{n} widths]}}, got {entry!r}")
        bits[idx] = widths
    return bits


def _quantizer(plan: Plan) -> str:
    """The plan's quantizer; a plan that does not say is a GPTQ plan (the QuantizeConfig default)."""
    return str(plan.summary.get("quantizer", plan.provenance.config.get("quantizer", QuantizeConfig.quantizer)))


def needs_calibration(plan: Plan) -> bool:
    """True for a quantize plan whose experts apply must GPTQ (quantizer "gptq", some width below 16)."""
    if plan.kind != "quantize" or _quantizer(plan) != "gptq":
        return False
    return any(int(b) != KEEP_BITS for entry in plan.layers.values() if isinstance(entry, dict)
               for b in entry.get("bits", []))


def _gptq_config(plan: Plan, group_size: int) -> QuantizeConfig:
    """The GPTQ settings the plan was made with (its provenance config), at the plan's group size."""
    known = set(QuantizeConfig.__dataclass_fields__)
    recorded = {k: v for k, v in plan.provenance.config.items() if k in known}
    # Plans made before the starved-expert rule recorded min_tokens only and rounded starved experts to nearest.
    recorded.setdefault("starved", "rtn")
    recorded.setdefault("act_order", False)  # plans that do not record it were made with GPTQ's plain order
    if recorded.get("min_tokens") == 0:  # those plans read 0 as 1 (no expert GPTQ'd from zero tokens)
        recorded["min_tokens"] = 1
    try:
        return from_mapping(QuantizeConfig, {**recorded, "group_size": group_size}, "plan provenance config")
    except ValueError as err:
        raise PlanError(str(err)) from err


def _missing_calibration(plan: Plan) -> PlanError:
    spec = plan.summary.get("calibration") or {}
    if "data" in spec:
        how = (f"moeslim.build_calibration_set(CalibrationConfig(data={tuple(spec['data'])!r}, "
               f"samples={spec.get('samples')}, seq_len={spec.get('seq_len')}, seed={spec.get('seed')}), tokenizer)")
    else:
        how = "the (N, L) input ids the plan was made on"
    return PlanError(
        "this quantize plan uses GPTQ, which runs when the plan is applied and needs the plan's calibration "
        f"windows: call apply(model, plan, calibration=...) with {how} (`moeslim apply` redraws them itself); "
        "or recompute the plan with quantizer='rtn' for data-free round-to-nearest")


def attention_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every nn.Linear inside a decoder layer's attention (name with 'attn')."""
    return [(f"{i}.{name}", module) for i, found in attention_linears_by_layer(model).items()
            for name, module in found]


class QuantizeSettings(NamedTuple):
    """What applying a quantize plan to a model needs from the plan, validated against the model."""

    bits: dict[int, list[int]]  # {decoder layer index: (E,) widths}
    group_size: int
    quantizer: str  # "gptq", "rtn", or "none" (every expert kept at 16 bits)
    config: QuantizeConfig  # the GPTQ settings the plan was made with
    attention_bits: int | None


def quantize_settings(model: nn.Module, plan: Plan) -> QuantizeSettings:
    """The widths, group size, quantizer and GPTQ settings of ``plan`` (raises PlanError if it does not fit, and
    ConfigError on a model with low-rank experts)."""
    refuse_lowrank(model, set(plan.layers))  # before any calibration: a quantize plan applied after a low-rank one
    layers = {layer.layer_idx: layer for layer in find_moe_layers(model)}
    bits = _plan_bits(layers, plan)
    group_size = int(plan.summary.get("group_size", plan.provenance.config.get("group_size", 128)))
    quantized = any(b != KEEP_BITS for widths in bits.values() for b in widths)
    quantizer = _quantizer(plan) if quantized else "none"
    if quantizer not in ("gptq", "rtn", "none"):
        raise PlanError(f"plan quantizer {quantizer!r} is not 'gptq' or 'rtn'")
    attention = plan.summary.get("quantize_attention")
    return QuantizeSettings(bits, group_size, quantizer, _gptq_config(plan, group_size),
                            None if attention is None else int(attention))


def gptq_input_ids(plan: Plan, calibration: CalibrationSet | torch.Tensor | None) -> torch.Tensor:
    """The plan's calibration windows (N, L), checked against its hashes; raises naming what to pass."""
    if calibration is None:
        raise _missing_calibration(plan)
    return check_same_calibration(calibration, plan.summary.get("calibration"), plan.provenance.data_hash)


def quantize_attention_weight(linear: nn.Linear, bits: int, group_size: int) -> LowBitTensor:
    """Round-to-nearest packed weight of one attention projection."""
    return quantize_fused(linear.weight.detach()[None], [int(bits)], group_size, None, "rtn")


def quantize_section(model: nn.Module, settings: QuantizeSettings, results: GptqResults | None) -> dict[str, Any]:
    """The ``quantize`` config section; ``model``'s expert tensors may be real or on meta (only shapes count).

    ``results``: the GPTQ pass's (None for round-to-nearest plans): starved experts and routed token counts.
    """
    gptq = settings.quantizer == "gptq"
    fallback = results.fallback if results is not None else {}
    all_tokens = results.all_tokens if results is not None else {}
    symmetric = settings.config.symmetric and settings.quantizer != "none"
    totals = bits_summary(model, settings.bits, settings.group_size, symmetric)
    attention_bits = settings.attention_bits
    return {"quantize": {
        "group_size": settings.group_size,
        "bits": {str(idx): widths for idx, widths in sorted(settings.bits.items())},
        "avg_bits": totals["avg_bits"],
        "avg_bits_with_overhead": totals["avg_bits_with_overhead"],
        "quantizer": settings.quantizer,
        "symmetric": symmetric,
        "quantize_attention": attention_bits,
        "attention_quantizer": "rtn" if attention_bits is not None else None,
        # Starved experts (fewer routed tokens than min_tokens): the rule, who got which fallback, every count.
        "min_tokens": settings.config.starved_below if gptq else None,
        "starved_rule": settings.config.starved_rule() if gptq else None,
        "calibrate_all_experts": settings.config.calibrate_all_experts if gptq else None,
        "rtn_fallback": {str(k): v for k, v in sorted(fallback.items()) if v},
        "all_token_fallback": {str(k): v for k, v in sorted(all_tokens.items()) if v},
        "tokens": {str(k): v for k, v in sorted(results.counts.items())} if results is not None else {},
    }}


def apply_quantize(model: nn.Module, plan: Plan, calibration: CalibrationSet | torch.Tensor | None = None,
                   device: torch.device | str | None = None, progress: bool = False) -> dict[str, Any]:
    """Quantize the experts (and optionally attention) in place; return the ``quantize`` config section.

    ``calibration``: the windows the plan was made on; required when ``needs_calibration(plan)``.
    (``workflows/streamed_apply.py`` does the same one layer at a time, from and to shards.)
    """
    layers = {layer.layer_idx: layer for layer in find_moe_layers(model)}
    settings = quantize_settings(model, plan)
    bits, group_size = settings.bits, settings.group_size
    results: GptqResults | None = None
    if settings.quantizer == "gptq":
        input_ids = gptq_input_ids(plan, calibration)
        results = gptq_experts(model, bits, input_ids, settings.config, device, progress)
        packed: dict[int, QuantizedExperts] = results.experts
    else:
        packed = {idx: rtn_experts(layers[idx], widths, group_size, settings.config.symmetric)
                  for idx, widths in bits.items()}
    section = quantize_section(model, settings, results)  # from the float tensors, before the runtime takes them
    for idx in bits:
        views = expert_weight_views(layers[idx])
        install_lowbit(layers[idx].experts, views.up_name, packed[idx].up)
        install_lowbit(layers[idx].experts, views.down_name, packed[idx].down)
    if settings.attention_bits is not None:
        for _, linear in attention_linears(model):
            install_lowbit(linear, "weight", quantize_attention_weight(linear, settings.attention_bits, group_size))
    return section
