"""One layer's options for the joint planner, measured on its calibration token sample.

For each kept-set size k the pruning method gives the best kept set S_k and its loss
||F'(X; S_k) - F(X)||_F (``methods/prune``: enumeration, or the search's removal path). For every kept
expert e in S_k and candidate width b the quantization error is measured under the pruned routing g^k:

    Q_keb = ||g^k_e(X) * (f_e(X) - f~_eb(X))||_F^2 = sum_t g^k_e(t)^2 d_eb(t),  d_eb(t) = ||f_e(x_t) - f~_eb(x_t)||^2

with f~_eb the expert at b bits, quantized by the quantizer apply runs (GPTQ with Hessians of the sample tokens
routed to it, or round-to-nearest; the grid apply uses). GPTQ's errors are several times below round-to-nearest's
at 2-3 bits, so measuring them with round-to-nearest (PMQ's proxy) would price quantization too high against
pruning. GPTQ's errors are measured out of sample (cross-fitting, ``folds`` > 1): the sample tokens are split into
interleaved folds and each fold's distances come from the expert GPTQ'd on the other folds' tokens. Measured on
the tokens it was fitted to, GPTQ's error is optimistic by an amount that grows as the expert's routed tokens
approach its input width (a least-squares fit's in-sample residual), so rarely routed experts would look cheap to
narrow; apply's GPTQ is then judged on tokens it never saw. The per-token distances d (T, E, J) are computed once
for all experts and widths,
so every kept set's errors are sums over its routing, not new expert runs. An expert's share of tokens under
g^k gives the bytes read per token at decode.

Skip options (``JointConfig.skip_betas``): the same kept set with the skipping rule at threshold beta applied
to g^k (skipped pairs dropped, kept weights rescaled, as the runtime does). Skipping holds the same bytes but
reads fewer per token; its error is the squared change of the routed output, S_kb = sum_t ||sum_j (g~_j - g_j)
f_j(x_t)||^2 on the sample's expert outputs, added to the pruning loss, and Q is weighed by the skipped gates.

Shapes: T sample tokens, E experts, H hidden, J widths, k top-k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from moeslim.calibrate import ExpertOutputSample
from moeslim.methods.joint.solve import SizeOption
from moeslim.methods.prune.enumerate import RouteFn, allowed_mask
from moeslim.methods.quant.driver import rtn_slice
from moeslim.methods.quant.factors import expert_gate
from moeslim.methods.quant.fused import KEEP_BITS
from moeslim.methods.quant.gptq import BATCH_BYTES, gptq_bytes_per_matrix, gptq_quantize_many
from moeslim.methods.skip.thresholds import keep_mask, rescale_kept
from moeslim.models import MoELayer
from moeslim.models.expert_math import expert_forward, expert_intermediate, expert_weight_views

__all__ = ["quant_distances", "quantized_experts", "quantized_slices", "size_options", "skip_error"]


def _gptq_slices(slices: Sequence[Tensor], hessians: Sequence[Tensor], bits: int, group_size: int,
                 transposed: bool, symmetric: bool, act_order: bool) -> list[Tensor]:
    """Expert slices (stored layout) -> their GPTQ-dequantized copies given their input Hessians (in, in),
    GPTQ'd as batches of equal shapes (``gptq_quantize_many``: each result that of its slice on its own)."""
    mats = [w.detach().float().T if transposed else w.detach().float() for w in slices]  # (out, in) each
    results = gptq_quantize_many(mats, hessians, bits, group_size, scale_dtype=torch.float16, symmetric=symmetric,
                                 act_order=act_order)
    return [(r.weight.T if transposed else r.weight).to(w.dtype) for r, w in zip(results, slices, strict=True)]


def quantized_experts(layer: MoELayer, x: Tensor, rows: Sequence[Tensor], experts: Sequence[int], bits: int,
                      group_size: int, symmetric: bool, quantizer: str, act_order: bool = False
                      ) -> list[tuple[Tensor, Tensor]]:
    """``quantized_slices`` of each expert in ``experts`` (its sample tokens ``rows[i]``), the GPTQ of every
    first projection run as one batch, then every second one."""
    views = expert_weight_views(layer)
    if quantizer == "rtn":
        return [(rtn_slice(views.up[e], bits, group_size, views.transposed, symmetric),
                 rtn_slice(views.down[e], bits, group_size, views.transposed, symmetric)) for e in experts]
    inputs = [x[r].float() for r in rows]  # (T_e, H) each
    ups = _gptq_slices([views.up[e] for e in experts], [xe.T @ xe for xe in inputs], bits, group_size,
                       views.transposed, symmetric, act_order)
    mids = [expert_intermediate(layer, x[r], e, up=up).float() for r, e, up in zip(rows, experts, ups, strict=True)]
    downs = _gptq_slices([views.down[e] for e in experts], [h.T @ h for h in mids], bits, group_size,
                         views.transposed, symmetric, act_order)
    return list(zip(ups, downs, strict=True))


def quantized_slices(layer: MoELayer, x: Tensor, rows: Tensor, e: int, bits: int, group_size: int,
                      symmetric: bool, quantizer: str, act_order: bool = False) -> tuple[Tensor, Tensor]:
    """Expert e's (up, down) at ``bits``: round-to-nearest, or GPTQ with Hessians of the sample tokens ``rows``
    (T,) bool that route to e, the second projection on the intermediates of the quantized first (as apply);
    ``act_order``: GPTQ's static-group column order (``QuantizeConfig.act_order``)."""
    return quantized_experts(layer, x, [rows], [e], bits, group_size, symmetric, quantizer, act_order)[0]


def quant_distances(layer: MoELayer, sample: ExpertOutputSample, widths: Sequence[int], group_size: int,
                    symmetric: bool, quantizer: str = "rtn", folds: int = 1, act_order: bool = False) -> Tensor:
    """(T, E, J) float64 squared distance between each expert's output and its output at each width (0 at 16).

    ``quantizer`` "gptq": each expert is GPTQ'd on the sample tokens routed to it, or on every sample token when
    fewer than ``group_size`` route to it (apply's rule for starved experts), so the errors are those of the
    quantizer apply runs; "rtn": round-to-nearest (PMQ's cheap proxy, no fit: ``folds`` does not apply).
    ``folds`` > 1 (GPTQ): token t belongs to fold t mod ``folds``; its distances use the expert GPTQ'd on the
    tokens of the other folds (the same routed / starved rule), so every distance is out of sample.
    ``act_order``: GPTQ's static-group column order, as apply's ``QuantizeConfig.act_order``.
    The experts are GPTQ'd in batches (``quantized_experts``) whose working memory stays within
    ``gptq.BATCH_BYTES``.
    """
    if folds < 1:
        raise ValueError(f"folds={folds}: give 1 (in-sample) or more")
    views = expert_weight_views(layer)
    x = sample.x.to(views.up.device, views.up.dtype)
    tokens, num_experts, _ = sample.outputs.shape
    _, ids = layer.route(sample.logits.to(layer.router_weight.device))
    ids = ids.to(x.device)
    dist = torch.zeros(tokens, num_experts, len(widths), dtype=torch.float64)
    fold = torch.arange(tokens, device=x.device) % folds
    parts = [torch.ones(tokens, dtype=torch.bool, device=x.device)] if folds == 1 or quantizer == "rtn" else [
        fold == f for f in range(folds)]
    routed = [(ids == e).any(dim=1) for e in range(num_experts)]  # (T,) each
    starved = [int(r.sum()) < group_size for r in routed]  # as apply decides, on the expert's whole routed count
    up_shape = views.up.shape[1:] if not views.transposed else views.up.shape[1:][::-1]  # (out, in)
    chunk = max(1, BATCH_BYTES // gptq_bytes_per_matrix(int(up_shape[0]), int(up_shape[1])))
    for judged in parts:
        fitted = ~judged if len(parts) > 1 else torch.ones_like(judged)
        rows = []
        for e in range(num_experts):
            mine = routed[e] & fitted
            # no routed tokens to fit: all-token Hessians, as apply's GPTQ does
            rows.append(fitted if starved[e] or not bool(mine.any()) else mine)
        for j, bits in enumerate(widths):
            if bits == KEEP_BITS:
                continue
            for first in range(0, num_experts, chunk):
                experts = list(range(first, min(first + chunk, num_experts)))
                pairs = quantized_experts(layer, x, [rows[e] for e in experts], experts, int(bits), group_size,
                                          symmetric, quantizer, act_order)
                for e, (up, down) in zip(experts, pairs, strict=True):
                    out = expert_forward(layer, x[judged], e, up=up, down=down).double().cpu()
                    dist[judged.cpu(), e, j] = (sample.outputs[judged.cpu(), e].double() - out).pow(2).sum(dim=-1)
    return dist


def skip_error(weights: Tensor, skipped: Tensor, ids: Tensor, outputs: Tensor) -> float:
    """Squared change of the routed output when ``weights`` (T, k) become ``skipped`` (T, k, skipped pairs 0,
    kept ones rescaled), ``ids`` (T, k) the routed experts, ``outputs`` (T, E, H) every expert's output:
    sum_t ||sum_j (skipped_tj - weights_tj) f_{ids_tj}(x_t)||^2."""
    delta = (skipped - weights).to(outputs.dtype)  # (T, k)
    picked = outputs.gather(1, ids.unsqueeze(-1).expand(-1, -1, outputs.shape[2]))  # (T, k, H)
    return float((delta.unsqueeze(-1) * picked).sum(dim=1).double().pow(2).sum())


def size_option(kept: Sequence[int], prune_loss: float, logits: Tensor, route: RouteFn, dist: Tensor,
                skip_beta: float = 0.0, skip_rule: str = "top2", outputs: Tensor | None = None) -> SizeOption:
    """The option of keeping ``kept``: squared pruning loss, kept experts' squared quantization errors (k, J)
    under the pruned routing of the sample's ``logits`` (T, E), and their token shares (k,).

    ``skip_beta`` > 0: the layer also skips (token, expert) pairs by ``skip_rule`` (``methods/skip``), as the
    skipping runtime does on the pruned routing: the skipping error (``skip_error`` on the sample's expert
    ``outputs`` (T, E, H)) adds to the pruning loss (taken as independent, like pruning and quantization), the
    quantization errors weigh the skipped routing's gates, and the token shares count the pairs that still run."""
    num_experts = int(logits.shape[1])
    allowed = allowed_mask(kept, num_experts).to(logits.device)
    weights, ids = route(logits, allowed)  # (T, top-k) as the pruned model routes
    weights, ids = weights.double().cpu(), ids.cpu()
    prune_err = float(prune_loss) ** 2
    if skip_beta > 0:
        if outputs is None:
            raise ValueError("a skipping option needs the sample's expert outputs")
        keep = keep_mask(weights, skip_beta, skip_rule)  # (T, k)
        skipped = rescale_kept(weights, keep)
        prune_err += skip_error(weights, skipped, ids, outputs.cpu())
        weights, ids = skipped, ids.masked_fill(~keep, num_experts)  # skipped pairs route nowhere
    errs = np.zeros((len(kept), dist.shape[2]))
    freq = np.zeros(len(kept))
    for i, e in enumerate(kept):
        gate = expert_gate(weights, ids, e)  # (T,)
        errs[i] = (gate.pow(2)[:, None] * dist[:, e]).sum(dim=0).numpy()
        freq[i] = float((ids == e).any(dim=1).double().mean())
    return SizeOption(kept=tuple(int(e) for e in kept), prune_err=prune_err, quant_err=errs, freq=freq,
                      tokens=int(logits.shape[0]), skip_beta=float(skip_beta))


def size_options(curve: dict[str, dict[str, object]], sizes: Sequence[int], layer: MoELayer,
                 sample: ExpertOutputSample, route: RouteFn, widths: Sequence[int], group_size: int,
                 symmetric: bool, quantizer: str = "rtn", skip_betas: Sequence[float] = (),
                 skip_rule: str = "top2", folds: int = 1, act_order: bool = False) -> list[SizeOption]:
    """Every option of one layer: ``curve`` is the pruning method's {size: {"kept", "loss"}} (all experts at 0);
    with ``skip_betas``, every size also with each skip threshold (size-major: no skipping first); ``folds`` and
    ``act_order``: as ``quant_distances``."""
    dist = quant_distances(layer, sample, widths, group_size, symmetric, quantizer, folds, act_order)
    logits = sample.logits.to(layer.router_weight.device)  # routing may read router buffers (correction bias)
    out = []
    for size in sizes:
        entry = curve[str(size)]
        kept = [int(e) for e in entry["kept"]]  # type: ignore[attr-defined]
        for beta in (0.0, *skip_betas):
            out.append(size_option(sorted(kept), float(entry["loss"]), logits, route, dist,  # type: ignore[arg-type]
                                   beta, skip_rule, sample.outputs))
    return out
