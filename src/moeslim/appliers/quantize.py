"""Apply a "quantize" plan: packed low-bit experts on each experts module, fake-quantized floats in memory.

Each quantized module gets ``moeslim_lowbit = {parameter name: LowBitTensor}`` (the packed codes, group
scales and zeros, which ``runtime.lowbit_io.save_quantized`` writes), and its float parameters are replaced
by the dequantized values: the model computes with the quantized weights through the stock forward, at the
memory of the float model ("dequantize once at load"; no low-bit kernels).

GPTQ results come from the model itself (``plan_quantize`` attaches them under the plan's
``gptq_results`` token). Without them (a plan loaded from JSON, or ``quantizer="rtn"``) the experts are
quantized here with round-to-nearest at the plan's widths, and the returned section says
``"quantizer": "rtn"``, so a run never reports GPTQ it did not do.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from moeslim.methods.quant.driver import (
    RESULTS_ATTR,
    GptqResults,
    QuantizeConfig,
    QuantizedExperts,
    bits_summary,
    quantize_layer_experts,
)
from moeslim.models import MoELayer, decoder_layers, find_moe_layers
from moeslim.models.expert_math import expert_weight_views
from moeslim.plans import Plan, PlanError
from moeslim.methods.quant.fused import KEEP_BITS, quantize_fused
from moeslim.runtime.lowbit_io import install_lowbit

__all__ = ["apply_quantize", "attention_linears"]

log = logging.getLogger(__name__)


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


def _take_results(model: nn.Module, plan: Plan, bits: dict[int, list[int]]) -> GptqResults | None:
    """Pop the GPTQ results ``plan_quantize`` attached for this plan, if they match its widths."""
    token = plan.summary.get("gptq_results")
    store = getattr(model, RESULTS_ATTR, None) or {}
    results: GptqResults | None = store.pop(token, None) if token else None
    if results is None:
        return None
    for idx, widths in bits.items():
        packed = results.experts.get(idx)
        if packed is None or packed.up.bits != widths or packed.down.bits != widths:
            log.warning("GPTQ results attached to the model do not match the plan's widths; using RTN")
            return None
    return results


def attention_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every nn.Linear inside a decoder layer's attention (name with 'attn')."""
    found = []
    for i, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and "attn" in name.split(".")[0]:
                found.append((f"{i}.{name}", module))
    return found


def apply_quantize(model: nn.Module, plan: Plan) -> dict[str, Any]:
    """Quantize the experts (and optionally attention) in place; return the ``quantize`` config section."""
    layers = {layer.layer_idx: layer for layer in find_moe_layers(model)}
    bits = _plan_bits(layers, plan)
    group_size = int(plan.summary.get("group_size", plan.provenance.config.get("group_size", 128)))
    rtn_config = QuantizeConfig(method="uniform", bits=8, group_size=group_size, quantizer="rtn")
    results = _take_results(model, plan, bits)
    for idx, widths in bits.items():
        layer = layers[idx]
        packed: QuantizedExperts = (results.experts[idx] if results is not None
                                    else quantize_layer_experts(layer, widths, None, rtn_config)[0])
        views = expert_weight_views(layer)
        install_lowbit(layer.experts, views.up_name, packed.up)
        install_lowbit(layer.experts, views.down_name, packed.down)
    attention_bits = plan.summary.get("quantize_attention")
    if attention_bits is not None:
        # Round-to-nearest: attention projections have no GPTQ pass in moeslim yet.
        for _, linear in attention_linears(model):
            w = linear.weight.detach()
            install_lowbit(linear, "weight", quantize_fused(w[None], [int(attention_bits)], group_size, None, "rtn"))
    quantized = any(b != KEEP_BITS for widths in bits.values() for b in widths)
    quantizer = "gptq" if results is not None else ("rtn" if quantized else "none")
    if quantizer == "rtn" and plan.summary.get("quantizer", "gptq") == "gptq":
        log.warning("plan %s carries no GPTQ results for this model: experts quantized with round-to-nearest",
                    plan.provenance.method)
    totals = bits_summary(model, bits, group_size)
    return {"quantize": {
        "group_size": group_size,
        "bits": {str(idx): widths for idx, widths in sorted(bits.items())},
        "avg_bits": totals["avg_bits"],
        "avg_bits_with_overhead": totals["avg_bits_with_overhead"],
        "quantizer": quantizer,
        "quantize_attention": attention_bits,
        "rtn_fallback": dict(plan.summary.get("rtn_fallback", {})) if results is not None else {},
    }}
