"""``plan_quantize``: per-expert bit-widths (PMQ, uniform, random) as a pure JSON plan.

Flow (one stage of a recipe: ``plan_quantize`` then ``apply``):

1. Allocation (here). PMQ runs the layer-wise calibration once with the ``ExpertOutputs`` sample, computes
   each layer's factors (frequency, raw routing weight, RTN error per candidate width; ``factors.py``) and
   solves the allocation exactly (``allocate.py``), per layer or globally. Uniform and random need no data.
   The model is only read: a plan is widths plus provenance, never tensors.
2. The plan records the calibration it was made on (``summary["calibration"]``: sources, samples,
   seq_len, seed, batch size, the data hash and a hash of the token windows), because with
   ``quantizer="gptq"`` the experts are GPTQ'd by ``apply`` on those same windows (``transform.py``):
   ``moeslim.apply(model, plan, calibration=...)`` runs the GPTQ pass once, checks the hashes, and refuses
   without calibration. ``quantizer="rtn"`` plans are applied by round-to-nearest, without data.

Bits 16 keep an expert as it is. The router always stays in full precision.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from moeslim.calibrate import ExpertOutputs, ExpertOutputSample, LayerDecision, result_of, run_layerwise
from moeslim.calibrate.resume import LayerCheckpoint
from moeslim.data.calibration_set import CalibrationSet, calibration_fields, calibration_spec
from moeslim.methods.quant.allocate import (
    AUTHORS_COST_SETTINGS,
    allocate_bits,
    allocate_bits_global,
    allocate_layer_widths,
    pmq_costs,
    random_allocation,
)
from moeslim.methods.quant.config import QUANT_METHODS, QuantizeConfig
from moeslim.methods.quant.factors import LayerFactors, layer_factors
from moeslim.methods.quant.fused import KEEP_BITS
from moeslim.methods.quant.gptq import rtn_quantize
from moeslim.methods.quant.pack import bits_accounting
from moeslim.models import MoELayer, find_moe_layers
from moeslim.models.expert_math import expert_forward, expert_weight_views
from moeslim.plans import Plan, Provenance

__all__ = [
    "QUANT_METHODS",
    "QuantizeConfig",
    "bits_summary",
    "plan_bits",
    "plan_quantize",
    "pmq_factors",
]


# -- allocation ----------------------------------------------------------------------------------------------

def rtn_slice(w: torch.Tensor, bits: int, group_size: int, transposed: bool, symmetric: bool = False
               ) -> torch.Tensor:
    """One expert slice (stored layout) -> its round-to-nearest dequantized copy, same layout."""
    mat = w.detach().float()
    mat = mat.T if transposed else mat  # (out, in): groups run along the input dimension
    deq = rtn_quantize(mat, bits, group_size, scale_dtype=torch.float16, symmetric=symmetric).weight
    return (deq.T if transposed else deq).to(w.dtype)


def factors_for_layer(layer: MoELayer, sample: ExpertOutputSample, config: QuantizeConfig) -> LayerFactors:
    """PMQ factors of one layer on its token sample (RTN errors at every candidate width)."""
    weights, ids = layer.route(sample.logits)  # (T, k) as the block applies them: the error factor
    probs = layer.gate_probs(sample.logits)  # (T, E) raw softmax / sigmoid scores: the routing-weight factor
    views = expert_weight_views(layer)
    x = sample.x.to(views.up.device, views.up.dtype)

    def quantized_output(e: int, bits: int, rows: torch.Tensor) -> torch.Tensor:
        # The error factor is measured on the grid apply will use (symmetric or not).
        up = rtn_slice(views.up[e], bits, config.group_size, views.transposed, config.symmetric)
        down = rtn_slice(views.down[e], bits, config.group_size, views.transposed, config.symmetric)
        return expert_forward(layer, x[rows.to(x.device)], e, up=up, down=down).float().cpu()

    return layer_factors(sample.outputs.float(), weights.cpu(), ids.cpu(), probs.cpu(), quantized_output,
                         config.candidates)


def _costs(f: LayerFactors, config: QuantizeConfig) -> np.ndarray:
    err = f.err.numpy()
    if config.cost == "authors":
        # The authors' code works on raw counts and raw-probability sums, normalised per layer.
        return pmq_costs(f.counts.double().numpy(), f.weight_sum.numpy(), err,
                         **AUTHORS_COST_SETTINGS)
    return pmq_costs(f.freq.numpy(), f.weight.numpy(), err, config.alpha, config.beta, config.gamma)


def _allocate_pmq(factors: dict[int, LayerFactors], sizes: dict[int, int], config: QuantizeConfig
                  ) -> dict[int, list[int]]:
    require = config.cost == "authors"
    order = sorted(factors)
    # Exact allocation: rarely routed experts with costs ~1e-9 of the layer's largest still count, and exact
    # ties (experts never routed cost 0 at every width) go to the wider widths, so the budget is used.
    costs = {idx: _costs(factors[idx], config) for idx in order}
    if config.granularity == "layer":  # one width per layer (config: scope global)
        total = sum(sizes[idx] for idx in order) * config.bits
        tied = allocate_layer_widths([costs[i] for i in order], config.candidates, total)
        return {idx: [int(b) for b in w] for idx, w in zip(order, tied, strict=True)}
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
                device: torch.device | str | None = None, progress: bool = False,
                checkpoint: LayerCheckpoint | None = None) -> dict[int, LayerFactors]:
    """{decoder layer index: LayerFactors} on the calibration ids (N, L), original-model inputs per layer.

    Depends on ``candidates``, ``group_size``, ``token_fraction``, ``seed`` and ``batch_size`` only, so
    one result serves several budgets or cost settings (pass it to ``plan_quantize(factors=...)``).
    ``checkpoint``: resume a killed factor pass at the next layer (``calibrate/resume.py``).
    """
    return run_layerwise(
        model, input_ids,
        make_observers=lambda _layer: [ExpertOutputs(fraction=config.token_fraction, seed=config.seed,
                                                     max_tokens=config.max_tokens)],
        on_layer=lambda layer, obs: LayerDecision(
            result=factors_for_layer(layer, result_of(obs[0], ExpertOutputSample), config)),
        propagate="original", batch_size=config.batch_size, device=device, progress=progress, checkpoint=checkpoint,
    )


def plan_bits(model: nn.Module, input_ids: torch.Tensor | None, config: QuantizeConfig,
              device: torch.device | str | None = None, progress: bool = False,
              factors: dict[int, LayerFactors] | None = None, checkpoint: LayerCheckpoint | None = None,
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
        factors = pmq_factors(model, input_ids, config, device, progress, checkpoint)
    if sorted(factors) != sorted(sizes) or any(f.widths != config.candidates for f in factors.values()):
        raise ValueError(f"precomputed factors do not fit: layers {sorted(factors)} vs {sorted(sizes)}, "
                         f"candidates must be {list(config.candidates)}")
    return _allocate_pmq(factors, sizes, config), factors


# -- the plan ------------------------------------------------------------------------------------------------

def bits_summary(model: nn.Module, bits: dict[int, list[int]], group_size: int, symmetric: bool = False
                 ) -> dict[str, Any]:
    """Average bits per expert weight over the MoE layers in ``bits`` (all of them, but for a joint plan's low-rank
    layers), without and with group scales (and zero points, unless ``symmetric``: those store none)."""
    code = overhead = params = 0
    per_layer: dict[str, dict[str, float]] = {}
    for layer in find_moe_layers(model):
        if layer.layer_idx not in bits:
            continue
        widths = bits[layer.layer_idx]
        views = expert_weight_views(layer)
        acc_total = [0, 0, 0]
        for w in (views.up, views.down):
            n_in = w.shape[1] if views.transposed else w.shape[2]
            acc = bits_accounting(widths, int(w[0].numel()), group_size, zero_bits=0 if symmetric else None,
                                  in_features=int(n_in))
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


def _needs_calibration(config: QuantizeConfig, bits: dict[int, list[int]]) -> bool:
    return config.quantizer == "gptq" and any(b != KEEP_BITS for w in bits.values() for b in w)


def plan_quantize(
    model: nn.Module,
    calibration: CalibrationSet | torch.Tensor | None,
    config: QuantizeConfig,
    model_name: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    factors: dict[int, LayerFactors] | None = None,
    checkpoint: LayerCheckpoint | None = None,
) -> Plan:
    """Choose per-expert widths; return a "quantize" plan. The model is not modified and no GPTQ runs here.

    ``calibration``: the windows PMQ's factors are computed on and, with ``quantizer="gptq"``, the windows
    ``apply`` will GPTQ on (the plan records how to redraw them and their hashes; pass the same set to
    ``moeslim.apply(model, plan, calibration=...)``). May be None only for uniform/random widths with
    ``quantizer="rtn"``. ``factors``: PMQ factors from ``pmq_factors`` on the same model and data.
    ``checkpoint``: resume a killed PMQ factor pass at the next layer (``calibrate/resume.py``).
    """
    config.check_model(model)
    if config.scope == "gguf":  # one llama.cpp type per expert tensor, for moeslim export --format gguf
        from moeslim.methods.quant.gguf_types import plan_gguf_types

        return plan_gguf_types(model, calibration, config, model_name, device, progress)
    input_ids, data_name, data_hash = calibration_fields(calibration) if calibration is not None else (None, None, None)
    start = time.perf_counter()
    bits, factors = plan_bits(model, input_ids, config, device, progress, factors, checkpoint)
    if calibration is None and _needs_calibration(config, bits):
        raise ValueError("quantizer='gptq' needs calibration data: apply runs GPTQ on the windows the plan records; "
                         "pass calibration=CalibrationSet or (N, L) input ids, or use quantizer='rtn'")
    summary: dict[str, Any] = {
        "method": config.method,
        "target_bits": config.bits,
        "group_size": config.group_size,
        "quantizer": config.quantizer,
        "symmetric": config.symmetric,
        "min_tokens": config.starved_below,
        # Known before any GPTQ: the rule; the experts it applies to and every routed count are in the applied
        # checkpoint's moeslim.quantize section (PMQ: the counts are also in each layer's factors below).
        "starved_rule": config.starved_rule() if config.quantizer == "gptq" else None,
        "calibrate_all_experts": config.calibrate_all_experts,
        "quantize_attention": config.quantize_attention,
        **bits_summary(model, bits, config.group_size, config.symmetric),
    }
    for idx, f in factors.items():
        entry = summary["layers"][str(idx)]
        entry["objective"] = _objective(f, bits[idx], config)
        entry["factors"] = f.to_dict()
    summary["seconds"] = time.perf_counter() - start
    if calibration is not None and input_ids is not None:
        summary["calibration_windows"] = int(input_ids.shape[0])
        summary["calibration"] = calibration_spec(calibration)
    provenance = Provenance.of(model, model_name, config.method, config.to_dict(), data_name, data_hash)
    layers = {idx: {"bits": widths} for idx, widths in sorted(bits.items())}
    return Plan(kind="quantize", layers=layers, provenance=provenance, summary=summary)
