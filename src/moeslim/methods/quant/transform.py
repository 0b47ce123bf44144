"""The GPTQ pass that realises a "quantize" plan: packed experts per layer, computed by ``apply``.

A plan only says which width every expert gets (``driver.plan_quantize``); this module turns the widths
into packed experts (``fused.LowBitTensor``), once, when the plan is applied:

- ``gptq_experts`` runs the layer-wise calibration with the ``ExpertHessians`` observer and GPTQs each
  layer's experts at their widths. Like GPTQ itself it is sequential: with ``propagate="compressed"``
  layer l+1 is calibrated on the output of the already quantized layer l, and inside a layer down_proj
  sees the intermediates of the quantized gate_up (``sequential``).
- Experts with fewer than ``min_tokens`` routed calibration tokens have no usable Hessian: they are
  quantized by round-to-nearest, and ``GptqResults.fallback`` lists them (``apply`` writes the list into
  the model's ``moeslim.quantize`` section). That is the only place RTN replaces GPTQ.
- ``rtn_experts`` is the data-free quantizer of plans made with ``quantizer="rtn"``.

Nothing here modifies the model: expert weights are swapped in only for the duration of the calibration
forward that feeds the next layer, and always restored.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from moeslim.calibrate import LayerDecision, Observer, run_layerwise
from moeslim.calibrate.hessians import ExpertHessians, ExpertHessianSummary, down_hessians
from moeslim.methods.quant.config import QuantizeConfig
from moeslim.methods.quant.fused import KEEP_BITS, LowBitTensor, quantize_fused
from moeslim.models import MoELayer
from moeslim.models.expert_math import expert_weight_views

__all__ = ["GptqResults", "QuantizedExperts", "gptq_experts", "quantize_layer_experts", "rtn_experts",
           "swapped_expert_weights"]


class QuantizedExperts(NamedTuple):
    """Packed experts of one layer: the first projection (gate_up_proj / up_proj) and down_proj."""

    up: LowBitTensor
    down: LowBitTensor


@dataclass(frozen=True)
class GptqResults:
    """Output of ``gptq_experts``: packed experts per layer, RTN fallbacks (too few tokens), routed-token counts."""

    experts: dict[int, QuantizedExperts]
    fallback: dict[int, list[int]]
    counts: dict[int, list[int]]


@contextmanager
def swapped_expert_weights(layer: MoELayer, up: torch.Tensor, down: torch.Tensor) -> Iterator[None]:
    """Temporarily run ``layer`` with other fused expert tensors (same shapes); always restores."""
    views = expert_weight_views(layer)
    params = (getattr(layer.experts, views.up_name), getattr(layer.experts, views.down_name))
    saved = (params[0].data, params[1].data)
    params[0].data, params[1].data = up.to(saved[0]), down.to(saved[1])
    try:
        yield
    finally:
        params[0].data, params[1].data = saved


def quantize_layer_experts(layer: MoELayer, bits: Sequence[int], hessians: ExpertHessianSummary | None,
                           config: QuantizeConfig) -> tuple[QuantizedExperts, list[int]]:
    """Pack one layer's experts at ``bits`` (E,): GPTQ with ``hessians``, round-to-nearest without.

    Returns the packed experts and the quantized experts that had fewer than ``config.min_tokens`` routed
    tokens and were therefore rounded to nearest (all quantized experts when ``hessians`` is None).
    """
    views = expert_weight_views(layer)
    n = layer.num_experts
    if hessians is None:
        usable = [False] * n
    else:
        usable = [int(hessians.counts[e]) >= max(config.min_tokens, 1) for e in range(n)]
    fallback = [e for e in range(n) if not usable[e] and bits[e] != KEEP_BITS]
    method = "gptq" if hessians is not None else "rtn"

    def pack(weight: torch.Tensor, hs: list[torch.Tensor | None] | None) -> LowBitTensor:
        per_expert = None if hs is None else [hs[e] if usable[e] else None for e in range(n)]
        return quantize_fused(weight.detach(), list(bits), config.group_size, per_expert, method,  # type: ignore[arg-type]
                              transposed=views.transposed, act_order=config.act_order,
                              percdamp=config.damp)

    up = pack(views.up, None if hessians is None else hessians.up)
    down_h = None if hessians is None else hessians.down
    if hessians is not None and hessians.inputs is not None:
        # True sequential: down_proj sees what the quantized gate_up produces.
        deq = up.dequantize().to(views.up.device)
        down_h = down_hessians(layer, hessians.inputs, deq, config.hessian_weighting)  # type: ignore[arg-type]
    return QuantizedExperts(up, pack(views.down, down_h)), fallback


def rtn_experts(layer: MoELayer, bits: Sequence[int], group_size: int) -> QuantizedExperts:
    """Round-to-nearest packed experts of one layer at ``bits`` (E,): no calibration data."""
    config = QuantizeConfig(method="uniform", bits=8, group_size=group_size, quantizer="rtn")
    return quantize_layer_experts(layer, bits, None, config)[0]


def gptq_experts(model: nn.Module, bits: Mapping[int, Sequence[int]], input_ids: torch.Tensor,
                 config: QuantizeConfig, device: torch.device | str | None = None, progress: bool = False
                 ) -> GptqResults:
    """GPTQ every MoE layer's experts at ``bits`` ({decoder layer index: (E,) widths}), layer by layer, on
    the calibration ids (N, L). The model is not modified."""
    widths = {int(idx): [int(b) for b in w] for idx, w in bits.items()}
    fallback: dict[int, list[int]] = {}
    counts: dict[int, list[int]] = {}

    def on_layer(layer: MoELayer, observers: Sequence[Observer]) -> LayerDecision:
        if layer.layer_idx not in widths:  # a layer the plan leaves alone
            return LayerDecision(result=None)
        summary: ExpertHessianSummary = observers[0].result()  # type: ignore[assignment]
        packed, fallback[layer.layer_idx] = quantize_layer_experts(layer, widths[layer.layer_idx], summary, config)
        counts[layer.layer_idx] = [int(c) for c in summary.counts]
        up, down = packed.up.dequantize(), packed.down.dequantize()

        def override(x: torch.Tensor) -> torch.Tensor:
            with swapped_expert_weights(layer, up, down):
                return layer.forward(x)

        return LayerDecision(result=packed, override=override)

    experts: dict[int, QuantizedExperts] = run_layerwise(
        model, input_ids,
        make_observers=lambda layer: [ExpertHessians(layer.num_experts, config.hessian_weighting,  # type: ignore[arg-type]
                                                     keep_inputs=config.sequential)],
        on_layer=on_layer, propagate=config.propagate,  # type: ignore[arg-type]
        batch_size=config.batch_size, device=device, progress=progress,
    )
    experts = {idx: packed for idx, packed in experts.items() if packed is not None}
    return GptqResults(experts=experts, fallback=fallback, counts=counts)
