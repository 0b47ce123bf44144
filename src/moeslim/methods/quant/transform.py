"""The GPTQ pass that realises a "quantize" plan: packed experts per layer, computed by ``apply``.

A plan only says which width every expert gets (``driver.plan_quantize``); this module turns the widths
into packed experts (``fused.LowBitTensor``), once, when the plan is applied:

- ``gptq_experts`` runs the layer-wise calibration with the ``ExpertHessians`` observer and GPTQs each
  layer's experts at their widths. Like GPTQ itself it is sequential: with ``propagate="compressed"``
  layer l+1 is calibrated on the output of the already quantized layer l, and inside a layer down_proj
  sees the intermediates of the quantized gate_up (``sequential``).
- Starved experts (fewer routed calibration tokens than ``config.starved_below``, the group size unless
  ``min_tokens`` says otherwise) never get a Hessian from those few tokens: with ``starved="all-tokens"`` (the
  default) they are GPTQ'd with Hessians from every calibration token (``GptqResults.all_tokens``), with
  ``starved="rtn"`` rounded to nearest (``GptqResults.fallback``); ``calibrate_all_experts`` gives every expert
  the all-token Hessians. ``apply`` writes the lists and each expert's routed token count into the model's
  ``moeslim.quantize`` section. That is the only place RTN replaces GPTQ.
- ``rtn_experts`` is the data-free quantizer of plans made with ``quantizer="rtn"``.
- Streaming (``apply --stream``): ``on_packed`` receives each layer's packed experts while the layer is
  still on its device (a shard writer), so the packed model is never held whole; with a ``checkpoint`` a
  killed pass resumes at the next layer (per-layer results are then JSON: fallbacks and counts).
- Under torchrun the Hessians are summed over the processes (``ExpertHessians.sync``) and each process
  GPTQs every W-th quantized expert; the packed experts are gathered, so every process holds the same
  ``QuantizedExperts`` (rank 0 writes them).

Nothing here modifies a model in memory: expert weights are swapped in only for the duration of the
calibration forward that feeds the next layer, and always restored. (A streamed model's layer, read for its
turn and freed after, gets the dequantized experts written into its own tensors instead: no second copy.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from moeslim.calibrate import LayerDecision, Observer, result_of, run_layerwise
from moeslim.calibrate.distributed import RankedCommunicator, expert_share, process_communicator
from moeslim.calibrate.hessians import ExpertHessians, ExpertHessianSummary, down_hessian, up_hessians
from moeslim.calibrate.resume import LayerCheckpoint
from moeslim.methods.quant.config import QuantizeConfig
from moeslim.methods.quant.fused import KEEP_BITS, LowBitTensor, quantize_slices
from moeslim.methods.quant.gptq import BATCH_BYTES, gptq_bytes_per_matrix
from moeslim.models import MoELayer
from moeslim.models.expert_math import expert_weight_views
from moeslim.models.lazy import is_streamed

__all__ = ["GptqResults", "PackedSink", "QuantizedExperts", "Starved", "gptq_experts", "gptq_observer",
           "quantize_layer_experts", "rtn_experts", "swapped_expert_weights"]


class QuantizedExperts(NamedTuple):
    """Packed experts of one layer: the first projection (gate_up_proj / up_proj) and down_proj."""

    up: LowBitTensor
    down: LowBitTensor


@dataclass(frozen=True)
class GptqResults:
    """Output of ``gptq_experts`` per layer: packed experts, starved experts rounded to nearest (``fallback``) or
    GPTQ'd on all-token Hessians (``all_tokens``), routed-token counts per expert, calibration tokens seen."""

    experts: dict[int, QuantizedExperts]
    fallback: dict[int, list[int]]
    counts: dict[int, list[int]]
    all_tokens: dict[int, list[int]] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)


class Starved(NamedTuple):
    """Quantized experts of one layer that did not get their routed-token Hessians."""

    rtn: list[int]  # rounded to nearest
    all_tokens: list[int]  # GPTQ'd with all-token Hessians (starved, or calibrate_all_experts)


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


HessianOf = Callable[[int], "torch.Tensor | None"]


def _pack_experts(weight: torch.Tensor, bits: Sequence[int], group_size: int, hessian_of: HessianOf | None,
                  method: Literal["gptq", "rtn"], comm: RankedCommunicator | None, **options: Any) -> LowBitTensor:
    """``quantize_fused`` with each expert's Hessian made only when it is needed, the experts GPTQ'd in batches.

    ``hessian_of(e)``: expert e's (in, in) Hessian or None (round-to-nearest); it is called for every
    quantized expert in order on every process (it may run collectives). The Hessians wait until a batch is full
    (as many experts as ``gptq.BATCH_BYTES`` of GPTQ working memory allows), so at most one batch of them is
    alive; each width's pending experts are GPTQ'd together (``quantize_slices``), every result that of its expert
    alone, so the whole is ``quantize_fused``'s, byte for byte. Under torchrun (``comm``) process r quantizes
    every W-th quantized expert and the packed experts are gathered; kept (16-bit) experts are copied locally:
    every process holds the weights.
    """
    n = int(weight.shape[0])
    transposed = bool(options.get("transposed", False))
    out = LowBitTensor(shape=(n, int(weight.shape[1]), int(weight.shape[2])), bits=[int(b) for b in bits],
                       group_size=group_size, transposed=transposed,
                       dtype=weight.dtype, codes=[None] * n, scales=[None] * n, zeros=[None] * n,
                       dense=[weight[e].detach().clone() if b == KEEP_BITS else None for e, b in enumerate(bits)],
                       symmetric=bool(options.get("symmetric", False)))
    quantized = [e for e, b in enumerate(bits) if b != KEEP_BITS]
    size, rank = (comm.size, comm.rank) if comm is not None else (1, 0)
    mine = {quantized[i] for i in expert_share(len(quantized), rank, size)}
    n_out, n_in = out.out_in
    per_batch = max(1, BATCH_BYTES // gptq_bytes_per_matrix(n_out, n_in))
    pending: dict[int, list[tuple[int, torch.Tensor | None]]] = {}  # width -> (expert, Hessian) waiting

    def flush() -> None:
        for b, waiting in pending.items():
            experts = [e for e, _ in waiting]
            hessians = None if hessian_of is None else [h for _, h in waiting]
            packed = quantize_slices([weight[e] for e in experts], b, group_size, hessians, method, **options)
            for e, (codes, scales, zeros) in zip(experts, packed, strict=True):
                out.codes[e], out.scales[e], out.zeros[e] = codes, scales, zeros
        pending.clear()

    for e in quantized:
        hessian = hessian_of(e) if hessian_of is not None else None
        if e in mine:
            pending.setdefault(int(bits[e]), []).append((e, hessian))
            if sum(len(w) for w in pending.values()) >= per_batch:
                flush()
        del hessian
    flush()
    if comm is not None and comm.size > 1:
        shared = comm.all_gather({e: (out.codes[e], out.scales[e], out.zeros[e]) for e in sorted(mine)})
        for entries in shared:
            for e, (codes, scales, zeros) in entries.items():
                out.codes[e], out.scales[e], out.zeros[e] = codes, scales, zeros
    return out


def _hessian_sources(counts: Sequence[int], tokens: int, bits: Sequence[int], config: QuantizeConfig,
                     have_hessians: bool) -> list[str]:
    """Per expert: "routed" (its routed-token Hessians), "all" (all-token Hessians) or "rtn" (no Hessian).

    An expert is starved below ``config.starved_below`` routed tokens; it never gets a Hessian from fewer tokens:
    all-token Hessians (``starved="all-tokens"``, when the layer saw enough tokens) or round-to-nearest.
    """
    threshold = config.starved_below
    out = []
    for e, n in enumerate(counts):
        if not have_hessians or bits[e] == KEEP_BITS:
            out.append("rtn")
        elif config.calibrate_all_experts or (int(n) < threshold and config.starved == "all-tokens"):
            out.append("all" if tokens >= threshold else "rtn")
        else:
            out.append("routed" if int(n) >= threshold else "rtn")
    return out


def quantize_layer_experts(layer: MoELayer, bits: Sequence[int], hessians: ExpertHessianSummary | None,
                           config: QuantizeConfig, comm: RankedCommunicator | None = None
                           ) -> tuple[QuantizedExperts, Starved]:
    """Pack one layer's experts at ``bits`` (E,): GPTQ with ``hessians``, round-to-nearest without.

    Returns the packed experts and the quantized experts that did not get their routed-token Hessians
    (``_hessian_sources``): rounded to nearest (all quantized experts when ``hessians`` is None) or GPTQ'd with
    all-token Hessians (``hessians.pooled_up`` for gate_up; down from every kept block input).
    ``comm``: the processes of a torchrun job (``hessians`` already summed over them; the block inputs
    ``hessians.inputs`` are this process's own): the GPTQ work is split over them and gathered.
    """
    views = expert_weight_views(layer)
    n = layer.num_experts
    counts = [0] * n if hessians is None else [int(c) for c in hessians.counts]
    tokens = 0 if hessians is None else hessians.tokens
    source = _hessian_sources(counts, tokens, bits, config, hessians is not None)
    if hessians is not None and "all" in source and hessians.pooled_up is None:
        raise RuntimeError("all-token Hessians were needed but not observed (ExpertHessians(pooled=True))")
    quantized = [e for e in range(n) if bits[e] != KEEP_BITS]
    starved = Starved([e for e in quantized if source[e] == "rtn"], [e for e in quantized if source[e] == "all"])
    options: dict[str, Any] = {"transposed": views.transposed, "act_order": config.act_order,
                               "percdamp": config.damp, "symmetric": config.symmetric}
    if hessians is None:
        up = _pack_experts(views.up, bits, config.group_size, None, "rtn", comm, **options)
        return QuantizedExperts(up, _pack_experts(views.down, bits, config.group_size, None, "rtn", comm,
                                                  **options)), starved
    summary = hessians
    inputs = summary.inputs
    group = config.hessian_group(n, int(views.up.shape[2 if not views.transposed else 1]))
    if group is not None and inputs is None and (comm is None or comm.size == 1):
        raise ValueError("the expert-group split makes the Hessians from the kept block inputs: observe with "
                         "ExpertHessians(keep_inputs=True, per_expert=False)")
    routed = [e for e in quantized if source[e] == "routed"]
    made: dict[int, torch.Tensor | None] = {}  # the current group's Hessians (expert-group split)

    def up_of(e: int) -> torch.Tensor | None:
        if source[e] != "routed" or group is None:
            return {"routed": summary.up[e], "all": summary.pooled_up, "rtn": None}[source[e]]
        if e not in made:  # the next group of routed experts (asked for in order, on every process alike)
            made.clear()
            members = routed[routed.index(e): routed.index(e) + group]
            sums = {} if inputs is None else up_hessians(layer, inputs, set(members), config.hessian_weighting,
                                                         summary.batch_tokens, views.up.device)
            for m in members:
                total = _summed(sums.get(m), comm) if comm is not None and comm.size > 1 else sums.get(m)
                made[m] = None if total is None else total.float().cpu()  # rounded once, after every process's
            del sums
        return made.pop(e)

    up = _pack_experts(views.up, bits, config.group_size, up_of, "gptq", comm, **options)
    sequential = inputs is not None  # the observer kept the block inputs (true sequential, or all-token fallback)
    if comm is not None and comm.size > 1:  # a process that got no batch holds none: ask the others
        flag = torch.tensor([int(sequential)], dtype=torch.int64)
        comm.all_reduce_sum(flag)
        sequential = int(flag) > 0

    def down_of(e: int) -> torch.Tensor | None:
        if source[e] == "rtn":
            return None
        observed = group is None and (source[e] == "routed" or config.calibrate_all_experts)
        if not sequential or (not config.sequential and observed):
            return summary.down[e]  # made by the observer (routed, or all-token with calibrate_all_experts)
        # From the kept block inputs: true sequential (down sees what the quantized gate_up produces), a starved
        # expert's all-token down Hessian, or the expert-group split. One expert's Hessian at a time; under
        # torchrun each process sums over its own block inputs, none if it had no batch, then over the processes.
        first = up.dequantize_expert(e) if config.sequential else views.up[e].detach()
        h = None if inputs is None else down_hessian(layer, inputs, e, first.to(views.up.device),
                                                     config.hessian_weighting, summary.batch_tokens,
                                                     all_tokens=source[e] == "all")
        total = _summed(h, comm) if comm is not None and comm.size > 1 else h
        return None if total is None else total.float().cpu()  # rounded once, after every process's sums

    return QuantizedExperts(up, _pack_experts(views.down, bits, config.group_size, down_of, "gptq", comm,
                                              **options)), starved


def _summed(hessian: torch.Tensor | None, comm: RankedCommunicator) -> torch.Tensor | None:
    """One expert's Hessian summed over the processes (None where no process routed a token to it)."""
    shapes = [s for s in comm.all_gather(None if hessian is None else tuple(hessian.shape)) if s is not None]
    if not shapes:
        return None
    total = hessian if hessian is not None else torch.zeros(shapes[0], dtype=torch.float64)
    comm.all_reduce_sum(total)
    return total


def rtn_experts(layer: MoELayer, bits: Sequence[int], group_size: int, symmetric: bool = False) -> QuantizedExperts:
    """Round-to-nearest packed experts of one layer at ``bits`` (E,): no calibration data."""
    config = QuantizeConfig(method="uniform", bits=8, group_size=group_size, quantizer="rtn", symmetric=symmetric)
    return quantize_layer_experts(layer, bits, None, config)[0]


def _overwrite_experts(layer: MoELayer, packed: QuantizedExperts) -> None:
    """Write the dequantized experts into the layer's own tensors, one expert at a time (a streamed layer,
    freed after its turn; the same values ``swapped_expert_weights`` would run with)."""
    views = expert_weight_views(layer)
    with torch.no_grad():
        for e in range(layer.num_experts):
            views.up[e].copy_(packed.up.dequantize_expert(e))
            views.down[e].copy_(packed.down.dequantize_expert(e))


PackedSink = Callable[[MoELayer, QuantizedExperts], None]


def gptq_observer(layer: MoELayer, config: QuantizeConfig) -> ExpertHessians:
    """The calibration pass's observer for one layer's GPTQ.

    Starved experts on all-token Hessians need the pooled block-input Hessian and the block inputs (for their down
    Hessians; calibrate_all_experts makes every expert's in the observer). The expert-group split keeps the inputs
    and no per-expert Hessian (``quantize_layer_experts`` makes them group by group).
    """
    views = expert_weight_views(layer)
    split = config.hessian_group(layer.num_experts, int(views.up.shape[1 if views.transposed else 2])) is not None
    fallback = config.starved == "all-tokens" and not config.calibrate_all_experts
    return ExpertHessians(layer.num_experts, "none" if config.calibrate_all_experts else config.hessian_weighting,
                          keep_inputs=config.sequential or fallback or split, down=not config.sequential,
                          pooled=fallback, all_tokens=config.calibrate_all_experts, per_expert=not split)


def gptq_experts(model: nn.Module, bits: Mapping[int, Sequence[int]], input_ids: torch.Tensor,
                 config: QuantizeConfig, device: torch.device | str | None = None, progress: bool = False,
                 *, on_packed: PackedSink | None = None, checkpoint: LayerCheckpoint | None = None
                 ) -> GptqResults:
    """GPTQ every MoE layer's experts at ``bits`` ({decoder layer index: (E,) widths}), layer by layer, on
    the calibration ids (N, L). The model is not modified.

    ``on_packed(layer, packed)``: called while the layer is on its device; the packed experts are then
    handed over, not kept (``GptqResults.experts`` is empty). ``checkpoint``: resume a killed pass at the
    next layer (needs ``on_packed``, which must have kept what it was given: the results hold no tensors).
    """
    if checkpoint is not None and on_packed is None:
        raise ValueError("a resumable GPTQ pass hands each layer's packed experts to on_packed (a writer)")
    widths = {int(idx): [int(b) for b in w] for idx, w in bits.items()}
    kept: dict[int, QuantizedExperts] = {}
    streamed = is_streamed(model)
    dev = torch.device(device) if device is not None else None

    def on_layer(layer: MoELayer, observers: Sequence[Observer]) -> LayerDecision:
        if layer.layer_idx not in widths:  # a layer the plan leaves alone
            return LayerDecision(result=None)
        summary = result_of(observers[0], ExpertHessianSummary)
        comm = process_communicator(dev if dev is not None else summary.counts.device)
        packed, starved = quantize_layer_experts(layer, widths[layer.layer_idx], summary, config, comm)
        if on_packed is not None:
            on_packed(layer, packed)
        else:
            kept[layer.layer_idx] = packed
        override: Callable[[torch.Tensor], torch.Tensor]
        if streamed:  # the layer is read for this pass only and freed after: overwrite it, no second copy
            _overwrite_experts(layer, packed)
            override = layer.forward
        else:
            up, down = packed.up.dequantize(), packed.down.dequantize()

            def swapped(x: torch.Tensor) -> torch.Tensor:
                with swapped_expert_weights(layer, up, down):
                    return layer.forward(x)

            override = swapped

        result = {"fallback": starved.rtn, "all_tokens": starved.all_tokens, "counts": [int(c) for c in summary.counts],
                  "tokens": summary.tokens}
        return LayerDecision(result=result, override=override)

    results: dict[int, Any] = run_layerwise(
        model, input_ids,
        # True sequential recomputes the down Hessians from the kept inputs: the observer skips them.
        # (a layer the plan leaves alone is not observed: a joint plan's low-rank layers hold no dense weights)
        make_observers=lambda layer: [gptq_observer(layer, config)] if layer.layer_idx in widths else [],
        on_layer=on_layer, propagate=config.propagate,
        batch_size=config.batch_size, device=device, progress=progress, checkpoint=checkpoint, label="GPTQ",
    )
    done = {idx: r for idx, r in results.items() if r is not None}
    return GptqResults(experts=kept, fallback={idx: list(r["fallback"]) for idx, r in done.items()},
                       counts={idx: list(r["counts"]) for idx, r in done.items()},
                       all_tokens={idx: list(r.get("all_tokens", [])) for idx, r in done.items()},
                       tokens={idx: int(r.get("tokens", 0)) for idx, r in done.items()})
