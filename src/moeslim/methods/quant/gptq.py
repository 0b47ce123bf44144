"""GPTQ and round-to-nearest quantization of one weight matrix, as pure tensor functions.

GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Algorithm 1): quantize the columns of W (out, in) one at a time in the order of the
input dimension; after quantizing column j, spread its error over the not-yet-quantized columns using
the inverse Hessian, i.e. W[:, j:] -= (w_j - q_j) / [H^-1]_jj * [H^-1]_{j, j:}, with H^-1 taken as the
upper Cholesky factor of (H + damp I)^-1. Updates are applied lazily in blocks of ``blocksize`` columns
(in-block updates immediately, the rest of the matrix once per block).

This follows the reference implementation (IST-DASLab/gptq, ``GPTQ.fasterquant`` + ``Quantizer``):
min-max quantizer whose range always includes 0, all-zero groups mapped to [-1, 1], damping
``percdamp * mean(diag H)``, dead columns (diag H == 0) set to zero with H_jj = 1. Two deliberate
differences, both documented where they happen: the Cholesky factorisation runs in float64 (fewer
failures on ill-conditioned Hessians), and the block size is rounded to a multiple of the group size so
each group's min-max sees every earlier error update (the reference reads stale columns when a group
starts in the middle of a block; with group 128 and block 128 both agree).

Two grids, as the reference's ``Quantizer(sym=...)``: asymmetric (the default; MC-MoE) has a scale and an
integer zero point per group, symmetric (``symmetric=True``) has a scale m * 2 / (2^b - 1), m = max |w| of the
group, and the fixed zero point 2^(b-1), i.e. signed codes in [-2^(b-1), 2^(b-1) - 1] with no zero point to
store: the grid of compressed-tensors' symmetric int schemes (llm-compressor's W4A16 / W8A16), which vLLM's
fused-MoE kernels and transformers' experts loader read.

Batches (``gptq_quantize_batch``, ``gptq_quantize_many``): B matrices of one shape share one column loop, each with
its own Hessian, dead columns, damping and act-order permutation. A layer's experts are many small matrices, so
one loop over the batch costs what one matrix's Python steps cost instead of B times that; each result is bit for
bit that of its matrix alone (``gptq_quantize`` is a batch of one).

Shapes: W (out, in) or (B, out, in); H (in, in) or (B, in, in); groups run along the input dimension,
n_groups = ceil(in / group).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "BATCH_BYTES",
    "QuantizedWeight",
    "dequantize",
    "gptq_quantize",
    "gptq_quantize_batch",
    "gptq_bytes_per_matrix",
    "gptq_quantize_many",
    "minmax_params",
    "n_groups",
    "quantize_codes",
    "rtn_quantize",
    "symmetric_params",
    "symmetric_zero",
]


@dataclass(frozen=True)
class QuantizedWeight:
    """Result of quantizing one matrix.

    codes: (out, in) uint8 in [0, 2^bits - 1]; scales: (out, n_groups) float32; zeros: (out, n_groups)
    uint8 integer zero points (all 2^(bits-1) when ``symmetric``: nothing to store); weight: (out, in) float32
    dequantized weight, scales * (codes - zeros).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    weight: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool = False


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def _effective_group(group_size: int | None, n_in: int) -> int:
    """Group size along the input dim; None or -1 (or one larger than the row) means one group per row."""
    if group_size is None or group_size == -1:
        return n_in
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, -1 or None, got {group_size}")
    return min(group_size, n_in)


def n_groups(n_in: int, group_size: int | None) -> int:
    """Number of groups along an input dimension of size ``n_in``."""
    return math.ceil(n_in / _effective_group(group_size, n_in))


def minmax_params(
    w: torch.Tensor, bits: int, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max parameters per row of ``w`` (out, g): scale (out,) float32, zero (out,).

    As in the reference ``Quantizer.find_params``: the range is widened to include 0 (so 0 and dead
    columns are exact) and an all-zero row gets the range [-1, 1]. ``scale_dtype`` rounds the scale to
    the dtype it will be stored in, so that quantization sees the stored value.
    """
    maxq = 2**bits - 1
    w = w.float()
    zero_ = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zero_)
    xmax = torch.maximum(w.max(dim=1).values, zero_)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -1.0, xmin)
    xmax = torch.where(both_zero, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).float().clamp_min(torch.finfo(scale_dtype).tiny)
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def symmetric_zero(bits: int) -> int:
    """The fixed zero point of a symmetric ``bits``-bit grid: code c stands for the signed value c - 2^(bits-1)."""
    return 1 << (bits - 1)


def symmetric_params(
    w: torch.Tensor, bits: int, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric parameters per row of ``w`` (out, g): scale (out,) float32 = 2 m / (2^bits - 1), m = max |w|
    (an all-zero row: m = 1), and the zero (out,) fixed at 2^(bits-1).

    The reference ``Quantizer(sym=True)`` grid, equal to compressed-tensors' symmetric int scale
    m / ((q_max - q_min) / 2): rounding w / scale and clamping to [-2^(b-1), 2^(b-1) - 1] gives the same codes
    (offset by 2^(b-1)) as llm-compressor's quantizer.
    """
    if bits < 2:
        raise ValueError("a symmetric grid needs at least 2 bits (1 bit would be {-2m, 0})")
    maxq = 2**bits - 1
    m = w.float().abs().amax(dim=1)
    m = torch.where(m == 0, torch.ones_like(m), m)
    scale = 2 * m / maxq
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).float().clamp_min(torch.finfo(scale_dtype).tiny)
    return scale, torch.full_like(scale, float(symmetric_zero(bits)))


def _params(
    w: torch.Tensor, bits: int, scale_dtype: torch.dtype | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return symmetric_params(w, bits, scale_dtype) if symmetric else minmax_params(w, bits, scale_dtype)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes clamp(round(w / scale) + zero, 0, 2^bits - 1); w (out, g), scale and zero (out,)."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2**bits - 1)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None
) -> torch.Tensor:
    """(out, in) float32 scales * (codes - zeros); codes (out, in), scales and zeros (out, n_groups)."""
    n_in = codes.shape[1]
    gs = _effective_group(group_size, n_in)
    group_of_col = torch.arange(n_in, device=codes.device) // gs  # (in,)
    s = scales.float()[:, group_of_col]
    z = zeros.float()[:, group_of_col]
    return s * (codes.float() - z)


def _result(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, q: torch.Tensor, bits: int, gs: int,
    symmetric: bool,
) -> QuantizedWeight:
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scales.float(),
        zeros=zeros.to(torch.uint8),
        weight=q,
        bits=bits,
        group_size=gs,
        symmetric=symmetric,
    )


def rtn_quantize(
    W: torch.Tensor, bits: int, group_size: int | None = 128, scale_dtype: torch.dtype | None = None,
    symmetric: bool = False,
) -> QuantizedWeight:
    """Round-to-nearest with the same quantizer as GPTQ (min-max, or symmetric). W (out, in) -> QuantizedWeight."""
    _check_bits(bits)
    W = W.float()
    n_out, n_in = W.shape
    gs = _effective_group(group_size, n_in)
    scales, zeros, codes = [], [], []
    for start in range(0, n_in, gs):
        chunk = W[:, start : start + gs]
        s, z = _params(chunk, bits, scale_dtype, symmetric)
        scales.append(s)
        zeros.append(z)
        codes.append(quantize_codes(chunk, s, z, bits))
    S, Z, C = torch.stack(scales, 1), torch.stack(zeros, 1), torch.cat(codes, 1)
    return _result(C, S, Z, dequantize(C, S, Z, gs), bits, gs, symmetric)


def _inverse_hessian_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factors of (H_b + damp_b I)^-1, as float32. H (B, in, in), already without dead columns;
    damp_b = ``percdamp`` * mean(diag H_b)."""
    H = H.double()
    damp = percdamp * torch.diagonal(H, dim1=1, dim2=2).mean(dim=1)  # (B,)
    H = H + damp[:, None, None] * torch.eye(H.shape[1], dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True).float()


def _aligned_blocksize(blocksize: int, gs: int, n_in: int) -> int:
    """Block size such that every group either lies inside one block or starts at a block start.

    That way a group's min-max always reads columns carrying every earlier error update.
    """
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if gs <= blocksize:
        return gs * (blocksize // gs)
    if gs % blocksize == 0 or gs >= n_in:
        return blocksize
    return gs


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int | None = 128,
    *,
    percdamp: float = 0.01,
    blocksize: int = 128,
    act_order: bool = False,
    scale_dtype: torch.dtype | None = None,
    symmetric: bool = False,
) -> QuantizedWeight:
    """GPTQ-quantize W (out, in) given the Hessian H (in, in) = sum_t x_t x_t^T.

    act_order quantizes columns by decreasing diag(H). Its groups are *static* (the reference's
    ``static_groups=True``): each group's scale/zero is computed once from the contiguous original
    columns before any update, so storage needs no g_idx and groups stay contiguous along the input.
    Without act_order, a group's parameters are computed when GPTQ reaches its first column, from the
    error-updated weights (the reference's default). ``symmetric``: the symmetric grid (module docstring).

    Returns QuantizedWeight with codes (out, in), scales/zeros (out, n_groups) and the dequantized
    weight as computed inside the GPTQ loop (equal to ``dequantize(codes, scales, zeros)``).
    """
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"need W (out, in) and H (in, in); got {tuple(W.shape)} and {tuple(H.shape)}")
    return gptq_quantize_batch(W[None], H[None], bits, group_size, percdamp=percdamp, blocksize=blocksize,
                               act_order=act_order, scale_dtype=scale_dtype, symmetric=symmetric)[0]


def _batched_params(
    w: torch.Tensor, bits: int, scale_dtype: torch.dtype | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_params`` of every row of w (B, out, g): scale and zero (B, out)."""
    batch, n_out, width = w.shape
    scale, zero = _params(w.reshape(batch * n_out, width), bits, scale_dtype, symmetric)
    return scale.view(batch, n_out), zero.view(batch, n_out)


def gptq_quantize_batch(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int | None = 128,
    *,
    percdamp: float = 0.01,
    blocksize: int = 128,
    act_order: bool = False,
    scale_dtype: torch.dtype | None = None,
    symmetric: bool = False,
) -> list[QuantizedWeight]:
    """``gptq_quantize`` of B matrices of one shape at once: W (B, out, in), H (B, in, in) -> B results.

    One column loop serves the whole batch (each step updates all B matrices), so many small matrices (a
    layer's experts) cost one matrix's Python steps instead of B; every matrix keeps its own Hessian, dead
    columns, act-order permutation and damping. Each result is that of ``gptq_quantize`` on its own matrix.
    """
    _check_bits(bits)
    if W.ndim != 3 or H.shape != (W.shape[0], W.shape[2], W.shape[2]):
        raise ValueError(f"need W (B, out, in) and H (B, in, in); got {tuple(W.shape)} and {tuple(H.shape)}")
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    batch, n_out, n_in = W.shape
    maxq = 2**bits - 1
    gs = _effective_group(group_size, n_in)
    blocksize = _aligned_blocksize(blocksize, gs, n_in)

    diag = torch.diagonal(H, dim1=1, dim2=2)  # (B, in), a view: writing it sets H's diagonal
    dead = diag == 0
    diag[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)

    n_grp = math.ceil(n_in / gs)
    scales = torch.zeros(batch, n_out, n_grp, device=W.device)
    zeros = torch.zeros(batch, n_out, n_grp, device=W.device)
    if act_order:
        for g in range(n_grp):
            scales[..., g], zeros[..., g] = _batched_params(W[..., g * gs : (g + 1) * gs], bits, scale_dtype,
                                                            symmetric)
        # stable: equal diagonals (dead columns) keep the input order, whatever the batch
        perm = torch.argsort(torch.diagonal(H, dim1=1, dim2=2), dim=1, descending=True, stable=True)  # (B, in)
        W = W.gather(2, perm[:, None, :].expand(batch, n_out, n_in))
        H = H.gather(1, perm[:, :, None].expand(batch, n_in, n_in)).gather(2, perm[:, None, :].expand(
            batch, n_in, n_in))
        # (B, out, in): the scale / zero of the column quantized at each position (its static group)
        col_group = (perm // gs)[:, None, :].expand(batch, n_out, n_in)
        col_scale, col_zero = scales.gather(2, col_group), zeros.gather(2, col_group)

    Hinv = _inverse_hessian_factor(H, percdamp)  # (B, in, in)
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        W1 = W[..., i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if act_order:
                s, z = col_scale[..., col], col_zero[..., col]
            else:
                g = col // gs
                if col % gs == 0:
                    # A group inside the block reads W1 (in-block updates); one spanning blocks starts at
                    # a block start, where W is fully updated.
                    end = min(col + gs, n_in)
                    group_w = W1[..., i : end - i1] if end <= i2 else W[..., col:end]
                    scales[..., g], zeros[..., g] = _batched_params(group_w, bits, scale_dtype, symmetric)
                s, z = scales[..., g], zeros[..., g]
            w = W1[..., i]  # (B, out)
            c = torch.clamp(torch.round(w / s) + z, 0, maxq)
            q = s * (c - z)
            codes[..., col], Q[..., col] = c, q
            err = (w - q) / Hinv1[:, i, i, None]  # (B, out)
            W1[..., i:] -= err[:, :, None] * Hinv1[:, i, None, i:]
            Err1[..., i] = err
        W[..., i2:] -= Err1 @ Hinv[:, i1:i2, i2:]

    if act_order:
        inv = torch.argsort(perm, dim=1)[:, None, :].expand(batch, n_out, n_in)
        Q, codes = Q.gather(2, inv), codes.gather(2, inv)
    return [_result(codes[b], scales[b], zeros[b], Q[b], bits, gs, symmetric) for b in range(batch)]


# Working memory of one ``gptq_quantize_many`` batch: 32 MiB. The column loop rereads each block of the batch's
# weights once per column, so a batch that outgrows the CPU caches turns memory-bound: on a 2-core Xeon, 64 experts
# of 160 x 256 in one batch ran 0.76x as fast as one call per expert, and in batches of 8-16 (23-47 MiB) 2.7x
# (benchmarks/gptq_batch.py). Matrices above the bound (a 1536 x 2048 expert: 197 MB) go one at a time.
BATCH_BYTES = 1 << 25


def gptq_bytes_per_matrix(n_out: int, n_in: int) -> int:
    """Working bytes one matrix adds to a ``gptq_quantize_batch`` call: float32 copies of W, its codes,
    dequantized result and per-column scales / zeros (5 x out x in x 4), the float32 Hessian and inverse factor
    and the float64 Cholesky steps (2 x in^2 x 4 + 3 x in^2 x 8)."""
    return 20 * n_out * n_in + 32 * n_in * n_in


def gptq_quantize_many(
    weights: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    bits: int,
    group_size: int | None = 128,
    *,
    percdamp: float = 0.01,
    act_order: bool = False,
    scale_dtype: torch.dtype | None = None,
    symmetric: bool = False,
    batch_bytes: int = BATCH_BYTES,
) -> list[QuantizedWeight]:
    """``gptq_quantize`` of each (W (out, in), H (in, in)) pair, run as ``gptq_quantize_batch`` calls over
    consecutive pairs of one shape, each batch's working memory within ``batch_bytes`` (at least one matrix)."""
    if len(weights) != len(hessians):
        raise ValueError(f"need one Hessian per weight: {len(weights)} weights, {len(hessians)} Hessians")
    out: list[QuantizedWeight] = []
    start = 0
    while start < len(weights):
        shape = tuple(weights[start].shape)
        if len(shape) != 2:
            raise ValueError(f"need W (out, in); got {shape}")
        per = max(1, batch_bytes // gptq_bytes_per_matrix(*shape))
        stop = start + 1
        while stop < len(weights) and stop - start < per and tuple(weights[stop].shape) == shape:
            stop += 1
        out += gptq_quantize_batch(torch.stack([w.detach().float() for w in weights[start:stop]]),
                                   torch.stack([h.detach().float() for h in hessians[start:stop]]), bits,
                                   group_size, percdamp=percdamp, act_order=act_order, scale_dtype=scale_dtype,
                                   symmetric=symmetric)
        start = stop
    return out
