"""PMQ for GGUF (``QuantizeConfig(scope="gguf")``): one llama.cpp quant type per expert tensor.

GGUF stores a layer's experts as one 3D tensor per projection (``ffn_gate_exps``, ``ffn_up_exps``,
``ffn_down_exps``) with one type, so mixed precision there is per tensor (layer x gate/up/down), not per
expert. This module chooses those types under a size budget from the same factors as PMQ (MC-MoE, Huang et
al. 2024; ALGORITHMS.md section 3):

- error eps_{t,i,q}: ||F(X) - F(X; projection t of expert i at type q)||_F on calibration tokens, only that
  projection of that expert replaced (the routed block output; other experts cancel, as in ``factors.py``);
- cost of tensor t at type q: sum_i phi_i^alpha * w_i^beta * eps_{t,i,q}^gamma (``pmq_costs`` summed over
  the experts the tensor holds), so errors of frequently and strongly routed experts weigh more;
- allocation: one type per tensor minimising the summed cost with the summed bytes <= the budget, an exact
  multiple-choice knapsack over byte totals (sizes rounded up to a quantum, so the budget is never exceeded).

Candidate widths map to llama.cpp types: 2 Q2_K, 3 Q3_K, 4 Q4_K, 5 Q5_K, 6 Q6_K, 8 Q8_0, 16 F16. A K-quant
needs rows (the input dimension) divisible by 256; otherwise the type falls back exactly as llama.cpp's
quantizer does (``tensor_type_fallback`` in src/llama-quant.cpp: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0), so the plan states the type the file will really hold and its real size.

Error estimates use the type's real round trip where gguf-py implements it (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, F16, BF16); gguf-py cannot quantize K-quants, so those use round-to-nearest at the K-quant's bits and
sub-block size (``KQUANT_PROXY``), the same kind of cheap estimate the PMQ authors use for ranking (RTN for
GPTQ). The plan records which estimator each type used.

Pure functions up to ``plan_gguf_types``, which only reads the model. Shapes: E experts, I intermediate,
H hidden, T sample tokens, N tensors, J candidate types.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moeslim.methods.quant.allocate import AUTHORS_COST_SETTINGS, pmq_costs

__all__ = [
    "GGUF_BLOCKS",
    "GGUF_WIDTHS",
    "GPY_QUANTIZABLE",
    "KQUANT_PROXY",
    "PROJECTIONS",
    "GgufTensorFactors",
    "allocate_types",
    "gguf_type_for",
    "plan_gguf_types",
    "quant_roundtrip",
    "tensor_bytes",
]

# (block size in weights, bytes per block) of each type: ggml's type traits (gguf.GGML_QUANT_SIZES; a test
# checks the two agree). Kept here so planning needs no optional package for sizes.
GGUF_BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
GGUF_WIDTHS: dict[int, str] = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0", 16: "F16"}
# llama.cpp's fallback for rows not divisible by a K-quant's 256-weight super-block.
_FALLBACK: dict[str, str] = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# Types whose real round trip gguf-py implements (numpy quantize + dequantize).
GPY_QUANTIZABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# K-quant error proxy: (bits, sub-block size) of round-to-nearest asymmetric min-max groups.
KQUANT_PROXY: dict[str, tuple[int, int]] = {"Q2_K": (2, 16), "Q3_K": (3, 16), "Q4_K": (4, 32), "Q5_K": (5, 32),
                                            "Q6_K": (6, 16)}
PROJECTIONS = ("gate", "up", "down")


def gguf_type_for(width: int, n_cols: int) -> str:
    """The llama.cpp type a candidate width gives a tensor whose rows hold ``n_cols`` weights."""
    if width not in GGUF_WIDTHS:
        raise ValueError(f"width {width}: GGUF candidates are {sorted(GGUF_WIDTHS)}")
    qtype = GGUF_WIDTHS[width]
    if n_cols % GGUF_BLOCKS[qtype][0] != 0:
        qtype = _FALLBACK.get(qtype, qtype)
    if n_cols % GGUF_BLOCKS[qtype][0] != 0:
        qtype = "F16"  # llama.cpp: "must use F16 due to unusual shape"
    return qtype


def tensor_bytes(qtype: str, n_rows: int, n_cols: int) -> int:
    """Bytes of an (n_rows, n_cols) matrix stored as ``qtype`` (rows along n_cols)."""
    block, size = GGUF_BLOCKS[qtype]
    if n_cols % block:
        raise ValueError(f"{qtype} needs rows divisible by {block}, got {n_cols}")
    return n_rows * (n_cols // block) * size


def quant_roundtrip(w: Tensor, qtype: str) -> tuple[Tensor, str]:
    """(out, in) float matrix -> (its dequantized copy at ``qtype``, the estimator used).

    gguf-py's exact round trip where it implements the type, else round-to-nearest at the K-quant's bits and
    sub-block size (``KQUANT_PROXY``).
    """
    if qtype in GPY_QUANTIZABLE:
        try:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize, quantize
        except ImportError as err:  # pragma: no cover - the export extra is part of the test install
            raise ImportError("scope='gguf' needs the gguf package: pip install 'moeslim[export]'") from err
        arr = w.detach().float().cpu().numpy()
        kind = GGMLQuantizationType[qtype]
        return torch.from_numpy(np.asarray(dequantize(quantize(arr, kind), kind), dtype=np.float32)), "gguf-py"
    from moeslim.methods.quant.gptq import rtn_quantize

    bits, group = KQUANT_PROXY[qtype]
    return rtn_quantize(w.detach().float().cpu(), bits, group, scale_dtype=torch.float16).weight, f"rtn{bits}g{group}"


@dataclass(frozen=True)
class GgufTensorFactors:
    """Factors of one layer's three expert tensors: err (3, E, J) for ``types`` (3, J) and the expert factors
    freq (E,), weight (E,) mean raw gate probability, weight_sum (E,), counts (E,)."""

    err: Tensor
    types: tuple[tuple[str, ...], ...]
    freq: Tensor
    weight: Tensor
    weight_sum: Tensor
    counts: Tensor


def tensor_costs(f: GgufTensorFactors, alpha: float, beta: float, gamma: float, cost: str) -> np.ndarray:
    """(3, J) cost of each projection tensor at each candidate: the PMQ cost summed over its experts."""
    out = []
    for t in range(len(PROJECTIONS)):
        err = f.err[t].numpy()
        if cost == "authors":
            c = pmq_costs(f.counts.double().numpy(), f.weight_sum.numpy(), err,
                          **AUTHORS_COST_SETTINGS)
        else:
            c = pmq_costs(f.freq.numpy(), f.weight.numpy(), err, alpha, beta, gamma)
        out.append(c.sum(axis=0))
    return np.stack(out)


def allocate_types(costs: np.ndarray, sizes: np.ndarray, budget: float, max_units: int = 200_000) -> np.ndarray:
    """Exact multiple-choice knapsack: (N,) option index per item minimising sum costs[n, j] with
    sum sizes[n, j] <= budget.

    costs, sizes: (N, J) (sizes in bytes, > 0). The DP counts in units of the sizes' gcd (exact); when that
    table would exceed ``max_units`` the unit grows and sizes are rounded UP to it, so a feasible answer never
    exceeds the budget. Ties go to the larger total (the budget is used), then to the earlier option index.
    Raises ValueError when even the smallest options do not fit.
    """
    c = np.asarray(costs, dtype=np.float64)
    s = np.asarray(sizes, dtype=np.float64)
    if c.shape != s.shape or c.ndim != 2 or c.shape[0] == 0:
        raise ValueError(f"costs and sizes must have the same (N, J) shape, got {c.shape} and {s.shape}")
    if not np.all(np.isfinite(c)) or np.any(s <= 0):
        raise ValueError("costs must be finite and sizes positive")
    smallest = float(s.min(axis=1).sum())
    if budget + 1e-9 < smallest:
        raise ValueError(f"budget {budget:.0f} bytes is below the smallest achievable {smallest:.0f} bytes "
                         "(the cheapest candidate type of every tensor, after llama.cpp's shape fallbacks)")
    # Byte sizes share large factors (rows x block bytes): in units of their gcd the DP is exact; only a table
    # larger than max_units rounds sizes up (never over the budget, maybe a little under).
    whole = bool(np.all(s == np.round(s)))
    step = float(np.gcd.reduce(s.astype(np.int64).ravel())) if whole else 1.0
    quantum = step * max(1, math.ceil(float(s.max(axis=1).sum()) / step / max_units))
    units = np.ceil(s / quantum - 1e-9).astype(np.int64)
    cap = int(math.floor(budget / quantum + 1e-9))
    n_items, n_opts = c.shape
    # best[n][u]: least cost of items n.. using exactly u units (inf when impossible), summed from the back.
    best = np.full((n_items + 1, cap + 1), np.inf)
    best[n_items, 0] = 0.0
    for n in range(n_items - 1, -1, -1):
        for j in range(n_opts):
            u = int(units[n, j])
            if u <= cap:
                np.minimum(best[n, u:], c[n, j] + best[n + 1, : cap + 1 - u], out=best[n, u:])
    if not np.isfinite(best[0]).any():
        raise ValueError(f"budget {budget:.0f} bytes is below the smallest achievable {smallest:.0f} bytes "
                         f"(after rounding sizes up to {quantum:.0f}-byte units)")
    total = int(np.flatnonzero(best[0] == best[0].min())[-1])
    choice = np.empty(n_items, dtype=np.int64)
    for n in range(n_items):
        for j in range(n_opts):
            u = int(units[n, j])
            if u <= total and c[n, j] + best[n + 1, total - u] == best[n, total]:
                choice[n], total = j, total - u
                break
        else:  # impossible: best[n] was built from exactly these options
            raise RuntimeError(f"type allocation could not be traced back at item {n}")
    return choice


def _gguf_slices(layer: Any) -> tuple[Callable[[int], dict[str, Tensor]], Callable[[int, str, Tensor], Tensor]]:
    """(read, place) for one layer's experts in GGUF's (out, in) orientation.

    read(e) -> {"gate": (I, H), "up": (I, H), "down": (H, I)}; place(e, proj, w) -> expert e's stored slice of
    the fused tensor with projection ``proj`` replaced by w (the argument ``expert_forward`` takes). The gate/up
    rows come from ``neuron_rows`` (halves in most families, interleaved in gpt-oss), the orientation from the
    layout flag, so transposed experts (gpt-oss) are measured in the layout the GGUF file holds."""
    from moeslim.models.expert_edit import neuron_rows
    from moeslim.models.expert_math import expert_weight_views

    views = expert_weight_views(layer)
    if views.up_name != "gate_up_proj":
        raise ValueError("scope='gguf' needs gated experts (GGUF gate/up/down tensors); this layer has none")
    rows = neuron_rows(layer)  # (I, 2): gate row, up row of each intermediate neuron

    def oriented(w: Tensor) -> Tensor:
        return w.transpose(-1, -2) if views.transposed else w

    def read(e: int) -> dict[str, Tensor]:
        fused = oriented(views.up[e])  # (2I, H)
        return {"gate": fused[rows[:, 0]], "up": fused[rows[:, 1]], "down": oriented(views.down[e])}

    def place(e: int, proj: str, w: Tensor) -> Tensor:
        if proj == "down":
            return oriented(w)
        fused = oriented(views.up[e]).clone()
        fused[rows[:, 0 if proj == "gate" else 1]] = w.to(fused.dtype)
        return oriented(fused)

    return read, place


def layer_tensor_factors(layer: Any, sample: Any, widths: Sequence[int],
                         roundtrip: Callable[[Tensor, str], tuple[Tensor, str]] = quant_roundtrip,
                         estimators: dict[str, str] | None = None) -> GgufTensorFactors:
    """GGUF factors of one MoE layer on its ExpertOutputSample (x (T, H), logits (T, E), outputs (T, E, H))."""
    from moeslim.methods.quant.factors import expert_gate, routed_frequency, routing_weight_sum, swap_error
    from moeslim.models.expert_math import expert_forward

    read, place = _gguf_slices(layer)
    weights, ids = layer.route(sample.logits)  # (T, k)
    probs = layer.gate_probs(sample.logits)  # (T, E)
    weights, ids, probs = weights.cpu(), ids.cpu(), probs.cpu()
    n_experts = int(probs.shape[1])
    freq, counts = routed_frequency(ids, n_experts)
    weight_sum = routing_weight_sum(probs, ids)
    first = read(0)
    n_cols = {p: int(first[p].shape[1]) for p in PROJECTIONS}
    types = tuple(tuple(gguf_type_for(int(w), n_cols[p]) for w in widths) for p in PROJECTIONS)
    err = torch.zeros(len(PROJECTIONS), n_experts, len(widths), dtype=torch.float64)
    x = sample.x.to(first["up"].device, first["up"].dtype)
    outputs = sample.outputs.float()
    for e in range(n_experts):
        if int(counts[e]) == 0:
            continue  # never routed: the block output does not change
        gate_w = expert_gate(weights, ids, e)
        rows = (ids == e).any(dim=1)
        xe = x[rows.to(x.device)]
        mats = read(e)
        for t, proj in enumerate(PROJECTIONS):
            for j, qtype in enumerate(types[t]):
                if qtype in ("F16", "BF16", "F32"):
                    continue  # ~lossless at this scale: error 0, like PMQ's "keep" width
                target = mats[proj]
                deq, how = roundtrip(target, qtype)
                if estimators is not None:
                    estimators[qtype] = how
                stored = place(e, proj, deq.to(target.device, target.dtype))
                out = (expert_forward(layer, xe, e, down=stored) if proj == "down"
                       else expert_forward(layer, xe, e, up=stored))
                err[t, e, j] = swap_error(outputs[rows, e], out.float().cpu(), gate_w[rows])
    return GgufTensorFactors(err, types, freq, weight_sum / counts.double().clamp_min(1), weight_sum, counts)


def _tensor_shape(layer: Any, proj: str) -> tuple[int, int]:
    """(rows of all experts, weights per row) of one projection tensor, in GGUF's (out, in) orientation."""
    from moeslim.models.expert_math import expert_weight_views

    views = expert_weight_views(layer)
    up, down = views.up.shape, views.down.shape  # (E, out, in), or (E, in, out) when transposed
    up_out, up_in = (up[2], up[1]) if views.transposed else (up[1], up[2])
    down_out, down_in = (down[2], down[1]) if views.transposed else (down[1], down[2])
    if proj == "down":
        return int(down[0] * down_out), int(down_in)
    return int(up[0] * up_out // 2), int(up_in)


def gguf_tensor_factors(model: nn.Module, input_ids: Tensor, config: Any, device: torch.device | str | None = None,
                        progress: bool = False) -> tuple[dict[int, GgufTensorFactors], dict[str, str]]:
    """({decoder layer: GgufTensorFactors}, {type: estimator}) on calibration ids (N, L), original-model inputs.

    Depends on candidates, token_fraction, max_tokens, seed and batch_size only: one result serves every budget
    (pass it to ``plan_gguf_types(factors=...)``).
    """
    from moeslim.calibrate import ExpertOutputs, LayerDecision, run_layerwise

    estimators: dict[str, str] = {}
    factors: dict[int, GgufTensorFactors] = run_layerwise(
        model, input_ids,
        make_observers=lambda _layer: [ExpertOutputs(fraction=config.token_fraction, seed=config.seed,
                                                     max_tokens=config.max_tokens)],
        on_layer=lambda layer, obs: LayerDecision(result=layer_tensor_factors(
            layer, obs[0].result(), config.candidates, estimators=estimators)),
        propagate="original", batch_size=config.batch_size, device=device, progress=progress,
    )
    return factors, estimators


def plan_gguf_types(model: nn.Module, calibration: Any, config: Any, model_name: str | None = None,
                    device: torch.device | str | None = None, progress: bool = False,
                    factors: tuple[dict[int, GgufTensorFactors], dict[str, str]] | None = None) -> Any:
    """A "quantize" plan with one llama.cpp type per expert tensor: layers {idx: {"gguf_types": {gate, up,
    down}}}. ``config.bits`` is the budget in bits per expert weight (GGUF bytes x 8 / weights, scales
    included); ``config.candidates`` are widths mapped by ``gguf_type_for``. The model is only read.
    ``factors``: the result of ``gguf_tensor_factors`` on the same model, data and settings (reused across
    budgets)."""
    from moeslim.data.calibration_set import calibration_fields, calibration_spec
    from moeslim.models import find_moe_layers
    from moeslim.plans import Plan, Provenance

    if calibration is None:
        raise ValueError("scope='gguf' needs calibration data: its factors are measured on it")
    input_ids, data_name, data_hash = calibration_fields(calibration)
    start = time.perf_counter()
    layers = {layer.layer_idx: layer for layer in find_moe_layers(model)}
    by_layer, estimators = factors if factors is not None else gguf_tensor_factors(model, input_ids, config, device,
                                                                                    progress)
    if sorted(by_layer) != sorted(layers) or any(len(f.types[0]) != len(config.candidates) for f in by_layer.values()):
        raise ValueError(f"precomputed factors do not fit this model and candidates {list(config.candidates)}")
    factors_of = by_layer
    items = [(idx, p) for idx in sorted(factors_of) for p in PROJECTIONS]
    costs = np.concatenate([tensor_costs(factors_of[idx], config.alpha, config.beta, config.gamma, config.cost)
                            for idx in sorted(factors_of)])
    shapes = [_tensor_shape(layers[idx], p) for idx, p in items]
    types = [factors_of[idx].types[PROJECTIONS.index(p)] for idx, p in items]
    sizes = np.array([[tensor_bytes(q, *shape) for q in row] for row, shape in zip(types, shapes, strict=True)],
                     dtype=np.float64)
    n_weights = sum(r * c for r, c in shapes)
    budget = config.bits * n_weights / 8
    choice = allocate_types(costs, sizes, budget)
    plan_layers: dict[int, dict[str, Any]] = {}
    for (idx, proj), row, j in zip(items, types, choice.tolist(), strict=True):
        plan_layers.setdefault(idx, {"gguf_types": {}})["gguf_types"][proj] = row[j]
    used = float(sum(sizes[n, j] for n, j in enumerate(choice.tolist())))
    summary: dict[str, Any] = {
        "method": "pmq",
        "scope": "gguf",
        "target_bits": config.bits,
        "expert_bytes": int(used),
        "expert_weights": int(n_weights),
        "avg_bits_with_overhead": used * 8 / n_weights,
        "estimators": dict(sorted(estimators.items())),
        "layers": {str(idx): {"costs": {p: [float(v) for v in costs[n]] for n, (i, p) in enumerate(items)
                                        if i == idx},
                              "candidates": {p: list(factors_of[idx].types[t]) for t, p in enumerate(PROJECTIONS)},
                              "freq": [float(v) for v in factors_of[idx].freq]}
                   for idx in sorted(factors_of)},
        "seconds": time.perf_counter() - start,
        "calibration_windows": int(input_ids.shape[0]),
        "calibration": calibration_spec(calibration),
    }
    provenance = Provenance.of(model, model_name, "pmq", config.to_dict(), data_name, data_hash)
    return Plan(kind="quantize", layers=plan_layers, provenance=provenance, summary=summary)
