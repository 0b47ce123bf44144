"""``plan_quantize``: per-expert bit-widths (PMQ, uniform, random) and the GPTQ pass that realises them.

Flow (one stage of a recipe: ``plan_quantize`` then ``apply``):

1. Allocation. PMQ runs the layer-wise calibration once with the ``ExpertOutputs`` sample, computes each
   layer's factors (frequency, routing weight, RTN error per candidate width; ``factors.py``) and solves
   the MILP (``allocate.py``), per layer or globally. Uniform and random need no data.
2. GPTQ (``quantizer="gptq"``). ``gptq_experts`` runs the layer-wise calibration again with the
   ``ExpertHessians`` observer and quantizes each layer's experts at their widths. Like GPTQ itself it is
   sequential: with ``propagate="compressed"`` layer l+1 is calibrated on the output of the already
   quantized layer l. Experts with fewer than ``min_tokens`` routed calibration tokens have no usable
   Hessian and fall back to round-to-nearest; the plan summary lists them.
3. Hand-over to ``apply``. Plans stay small JSON (no tensors). The packed GPTQ results are kept in memory
   on the model they were computed for (``model.moeslim_gptq_results[token]``, the token is written in the
   plan summary as ``gptq_results``), since they are only valid for those exact weights. ``apply_quantize``
   takes them from there; a plan without results there (e.g. loaded from JSON in another process) is
   applied with round-to-nearest at the plan's widths, and the applied section says so.

Bits 16 keep an expert as it is. The router always stays in full precision.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from moeslim.calibrate import ExpertOutputs, ExpertOutputSample, LayerDecision, Observer, run_layerwise
from moeslim.calibrate.hessians import ExpertHessians, ExpertHessianSummary, down_hessians
from moeslim.calibration_data import CalibrationSet, calibration_fields
from moeslim.methods.quant.allocate import (
    AUTHORS_COST_SETTINGS,
    allocate_bits,
    allocate_bits_global,
    pmq_costs,
    random_allocation,
)
from moeslim.methods.quant.config import QUANT_METHODS, QuantizeConfig
from moeslim.methods.quant.factors import LayerFactors, layer_factors
from moeslim.methods.quant.gptq import rtn_quantize
from moeslim.methods.quant.pack import bits_accounting
from moeslim.models import MoELayer, find_moe_layers
from moeslim.models.expert_math import expert_forward, expert_weight_views
from moeslim.plans import Plan, Provenance
from moeslim.methods.quant.fused import KEEP_BITS, LowBitTensor, quantize_fused

__all__ = [
    "QUANT_METHODS",
    "RESULTS_ATTR",
    "GptqResults",
    "QuantizeConfig",
    "QuantizedExperts",
    "gptq_experts",
    "plan_bits",
    "plan_quantize",
    "pmq_factors",
]

RESULTS_ATTR = "moeslim_gptq_results"  # model attribute: {token: GptqResults}


class QuantizedExperts(NamedTuple):
    """Packed experts of one layer: the first projection (gate_up_proj / up_proj) and down_proj."""

    up: LowBitTensor
    down: LowBitTensor


@dataclass(frozen=True)
class GptqResults:
    """Output of ``gptq_experts``: packed experts per layer, RTN fallbacks and routed-token counts."""

    experts: dict[int, QuantizedExperts]
    fallback: dict[int, list[int]]
    counts: dict[int, list[int]]


# -- allocation ----------------------------------------------------------------------------------------------

def _rtn_slice(w: torch.Tensor, bits: int, group_size: int, transposed: bool) -> torch.Tensor:
    """One expert slice (stored layout) -> its round-to-nearest dequantized copy, same layout."""
    mat = w.detach().float()
    mat = mat.T if transposed else mat  # (out, in): groups run along the input dimension
    deq = rtn_quantize(mat, bits, group_size, scale_dtype=torch.float16).weight
    return (deq.T if transposed else deq).to(w.dtype)


def factors_for_layer(layer: MoELayer, sample: ExpertOutputSample, config: QuantizeConfig) -> LayerFactors:
    """PMQ factors of one layer on its token sample (RTN errors at every candidate width)."""
    weights, ids = layer.route(sample.logits)
    views = expert_weight_views(layer)
    x = sample.x.to(views.up.device, views.up.dtype)

    def quantized_output(e: int, bits: int, rows: torch.Tensor) -> torch.Tensor:
        up = _rtn_slice(views.up[e], bits, config.group_size, views.transposed)
        down = _rtn_slice(views.down[e], bits, config.group_size, views.transposed)
        return expert_forward(layer, x[rows.to(x.device)], e, up=up, down=down).float().cpu()

    return layer_factors(sample.outputs.float(), weights.cpu(), ids.cpu(), quantized_output, config.candidates)


def _costs(f: LayerFactors, config: QuantizeConfig) -> np.ndarray:
    err = f.err.numpy()
    if config.cost == "authors":
        # The authors' code works on raw counts and weight sums normalised per layer.
        sums = (f.weight * f.counts.double()).numpy()
        return pmq_costs(f.counts.double().numpy(), sums, err, **AUTHORS_COST_SETTINGS)  # type: ignore[arg-type]
    return pmq_costs(f.freq.numpy(), f.weight.numpy(), err, config.alpha, config.beta, config.gamma)


# Rarely routed experts have costs ~1e-9 of the layer's largest: below the solver's tolerances they tie
# across widths and the budget goes unused. A tie-breaker of this relative size prefers wider widths.
_TIE_BREAK = 1e-6


def _tie_break(costs: np.ndarray, widths: Sequence[int]) -> np.ndarray:
    """(E, J) costs + _TIE_BREAK * max cost * (max width - width) / max width: fill the budget on ties."""
    w = np.asarray(widths, dtype=np.float64)
    span = float(np.max(costs)) if costs.size and np.max(costs) > 0 else 1.0
    return costs + _TIE_BREAK * span * (w.max() - w)[None, :] / w.max()


def _allocate_pmq(factors: dict[int, LayerFactors], sizes: dict[int, int], config: QuantizeConfig
                  ) -> dict[int, list[int]]:
    require = config.cost == "authors"
    order = sorted(factors)
    costs = {idx: _tie_break(_costs(factors[idx], config), config.candidates) for idx in order}
    if config.scope == "global":
        total = sum(sizes[idx] for idx in order) * config.bits
        widths = allocate_bits_global([costs[i] for i in order], config.candidates, total, require_top_two=require)
        return {idx: [int(b) for b in w] for idx, w in zip(order, widths, strict=True)}
    return {
        idx: [int(b) for b in allocate_bits(costs[idx], config.candidates, sizes[idx] * config.bits,
                                            require_top_two=require)]
        for idx in order
    }


def _allocate_random(sizes: dict[int, int], config: QuantizeConfig) -> dict[int, list[int]]:
    if config.scope == "global":
        # One draw over all experts of the model, cut back into layers.
        order = sorted(sizes)
        flat = random_allocation(sum(sizes.values()), config.candidates, sum(sizes.values()) * config.bits,
                                 config.seed)
        out, start = {}, 0
        for idx in order:
            out[idx] = [int(b) for b in flat[start:start + sizes[idx]]]
            start += sizes[idx]
        return out
    return {idx: [int(b) for b in random_allocation(n, config.candidates, n * config.bits, config.seed + idx)]
            for idx, n in sizes.items()}


def pmq_factors(model: nn.Module, input_ids: torch.Tensor, config: QuantizeConfig,
                device: torch.device | str | None = None, progress: bool = False) -> dict[int, LayerFactors]:
    """{decoder layer index: LayerFactors} on the calibration ids (N, L), original-model inputs per layer.

    Depends on ``candidates``, ``group_size``, ``token_fraction``, ``seed`` and ``batch_size`` only, so
    one result serves several budgets or cost settings (pass it to ``plan_quantize(factors=...)``).
    """
    return run_layerwise(
        model, input_ids,
        make_observers=lambda _layer: [ExpertOutputs(fraction=config.token_fraction, seed=config.seed)],
        on_layer=lambda layer, obs: LayerDecision(result=factors_for_layer(layer, obs[0].result(), config)),
        propagate="original", batch_size=config.batch_size, device=device, progress=progress,
    )


def plan_bits(model: nn.Module, input_ids: torch.Tensor | None, config: QuantizeConfig,
              device: torch.device | str | None = None, progress: bool = False,
              factors: dict[int, LayerFactors] | None = None,
              ) -> tuple[dict[int, list[int]], dict[int, LayerFactors]]:
    """Widths per MoE layer ({decoder layer index: (E,) widths}) and, for PMQ, the factors used."""
    sizes = {layer.layer_idx: layer.num_experts for layer in find_moe_layers(model)}
    if config.method == "uniform":
        return {idx: [int(config.bits)] * n for idx, n in sizes.items()}, {}
    if config.method == "random":
        return _allocate_random(sizes, config), {}
    if factors is None:
        if input_ids is None:
            raise ValueError("method='pmq' needs calibration data")
        factors = pmq_factors(model, input_ids, config, device, progress)
    if sorted(factors) != sorted(sizes) or any(f.widths != config.candidates for f in factors.values()):
        raise ValueError(f"precomputed factors do not fit: layers {sorted(factors)} vs {sorted(sizes)}, "
                         f"candidates must be {list(config.candidates)}")
    return _allocate_pmq(factors, sizes, config), factors


# -- GPTQ pass -----------------------------------------------------------------------------------------------

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
    """Pack one layer's experts at ``bits``; returns them and the experts quantized by RTN fallback."""
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


def gptq_experts(model: nn.Module, plan: Plan | dict[int, Sequence[int]], calibration: CalibrationSet | torch.Tensor,
                 config: QuantizeConfig, device: torch.device | str | None = None, progress: bool = False
                 ) -> GptqResults:
    """GPTQ every MoE layer's experts at the plan's widths, layer by layer; the model is not modified.

    ``plan``: a quantize Plan or {decoder layer index: (E,) widths}.
    """
    bits = _bits_of(plan)
    input_ids, _, _ = calibration_fields(calibration)
    fallback: dict[int, list[int]] = {}
    counts: dict[int, list[int]] = {}

    def on_layer(layer: MoELayer, observers: Sequence[Observer]) -> LayerDecision:
        summary: ExpertHessianSummary = observers[0].result()  # type: ignore[assignment]
        packed, fallback[layer.layer_idx] = quantize_layer_experts(layer, bits[layer.layer_idx], summary, config)
        counts[layer.layer_idx] = [int(c) for c in summary.counts]
        up, down = packed.up.dequantize(), packed.down.dequantize()

        def override(x: torch.Tensor) -> torch.Tensor:
            with swapped_expert_weights(layer, up, down):
                return layer.forward(x)

        return LayerDecision(result=packed, override=override)

    experts = run_layerwise(
        model, input_ids,
        make_observers=lambda layer: [ExpertHessians(layer.num_experts, config.hessian_weighting,  # type: ignore[arg-type]
                                                     keep_inputs=config.sequential)],
        on_layer=on_layer, propagate=config.propagate,  # type: ignore[arg-type]
        batch_size=config.batch_size, device=device, progress=progress,
    )
    return GptqResults(experts=experts, fallback=fallback, counts=counts)


def _bits_of(plan: Plan | dict[int, Sequence[int]]) -> dict[int, list[int]]:
    if isinstance(plan, Plan):
        return {idx: [int(b) for b in entry["bits"]] for idx, entry in plan.layers.items()}
    return {int(idx): [int(b) for b in widths] for idx, widths in plan.items()}


# -- the plan ------------------------------------------------------------------------------------------------

def bits_summary(model: nn.Module, bits: dict[int, list[int]], group_size: int) -> dict[str, Any]:
    """Average bits per expert weight over all MoE layers, without and with group scales/zeros."""
    code = overhead = params = 0
    per_layer: dict[str, dict[str, float]] = {}
    for layer in find_moe_layers(model):
        widths = bits[layer.layer_idx]
        views = expert_weight_views(layer)
        acc_total = [0, 0, 0]
        for w in (views.up, views.down):
            n_in = w.shape[1] if views.transposed else w.shape[2]
            acc = bits_accounting(widths, int(w[0].numel()), group_size, in_features=int(n_in))
            acc_total = [acc_total[0] + acc.code_bits, acc_total[1] + acc.overhead_bits, acc_total[2] + acc.n_params]
        code, overhead, params = code + acc_total[0], overhead + acc_total[1], params + acc_total[2]
        per_layer[str(layer.layer_idx)] = {
            "avg_bits": acc_total[0] / acc_total[2],
            "avg_bits_with_overhead": (acc_total[0] + acc_total[1]) / acc_total[2],
        }
    return {
        "avg_bits": code / params,
        "avg_bits_with_overhead": (code + overhead) / params,
        "expert_params": params,
        "layers": per_layer,
    }


def _objective(f: LayerFactors, widths: Sequence[int], config: QuantizeConfig) -> float:
    """The allocation's cost sum_i cost[i, j(i)] for the chosen widths."""
    costs = _costs(f, config)
    col = {b: j for j, b in enumerate(f.widths)}
    return float(sum(costs[i, col[b]] for i, b in enumerate(widths)))


def plan_quantize(
    model: nn.Module,
    calibration: CalibrationSet | torch.Tensor,
    config: QuantizeConfig,
    model_name: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    factors: dict[int, LayerFactors] | None = None,
) -> Plan:
    """Choose per-expert widths and, with quantizer="gptq", GPTQ the experts; return a "quantize" plan.

    The model's weights are not modified; the GPTQ results are attached to the model for ``apply``
    (see the module docstring). ``factors``: PMQ factors from ``pmq_factors`` on the same model and data.
    """
    config.check_model(model)
    input_ids, data_name, data_hash = calibration_fields(calibration)
    start = time.perf_counter()
    bits, factors = plan_bits(model, input_ids, config, device, progress, factors)
    summary: dict[str, Any] = {
        "method": config.method,
        "target_bits": config.bits,
        "group_size": config.group_size,
        "quantizer": config.quantizer,
        "quantize_attention": config.quantize_attention,
        **bits_summary(model, bits, config.group_size),
    }
    for idx, f in factors.items():
        entry = summary["layers"][str(idx)]
        entry["objective"] = _objective(f, bits[idx], config)
        entry["factors"] = f.to_dict()
    provenance = Provenance.of(model, model_name, config.method, config.to_dict(), data_name, data_hash)
    layers = {idx: {"bits": widths} for idx, widths in sorted(bits.items())}
    plan = Plan(kind="quantize", layers=layers, provenance=provenance, summary=summary)
    if config.quantizer == "gptq" and any(b != KEEP_BITS for w in bits.values() for b in w):
        results = gptq_experts(model, plan, input_ids, config, device, progress)
        # Deterministic token: the same model, data and config give the same plan JSON.
        token = hashlib.sha256(json.dumps([plan.to_dict()["layers"], data_hash, config.to_dict()],
                                          sort_keys=True).encode()).hexdigest()[:16]
        _store_results(model, token, results)
        summary = {**summary, "gptq_results": token,
                   "rtn_fallback": {str(k): v for k, v in sorted(results.fallback.items()) if v},
                   "min_tokens": config.min_tokens}
        for idx, c in results.counts.items():
            summary["layers"][str(idx)]["routed_tokens"] = c
    summary["seconds"] = time.perf_counter() - start
    summary["calibration_windows"] = int(input_ids.shape[0])
    return replace(plan, summary=summary)


def _store_results(model: nn.Module, token: str, results: GptqResults) -> None:
    store = dict(getattr(model, RESULTS_ATTR, None) or {})
    store[token] = results
    # A plain attribute (not a buffer): never saved, never moved, gone with the model.
    object.__setattr__(model, RESULTS_ATTR, store)


def attach_gptq_results(model: nn.Module, plan: Plan, calibration: CalibrationSet | torch.Tensor,
                        device: torch.device | str | None = None, progress: bool = False) -> bool:
    """Re-run the GPTQ pass of a saved "quantize" plan (e.g. ``moeslim apply`` in a new process), so that
    ``apply`` stores GPTQ rather than round-to-nearest experts. Returns False if the plan used no GPTQ.

    Pass the calibration the plan was made on (``plan.summary["calibration"]`` says how to draw it):
    the same windows give the same GPTQ results.
    """
    token = plan.summary.get("gptq_results")
    if plan.kind != "quantize" or not token:
        return False
    config = QuantizeConfig(**plan.provenance.config)
    input_ids, _, data_hash = calibration_fields(calibration)
    if plan.provenance.data_hash and data_hash != plan.provenance.data_hash:
        raise ValueError(f"calibration data hash {data_hash} differs from the plan's {plan.provenance.data_hash}; "
                         "GPTQ must see the windows the plan was made on")
    _store_results(model, token, gptq_experts(model, plan, input_ids, config, device, progress))
    return True
