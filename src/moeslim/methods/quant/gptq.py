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

Shapes: W (out, in); H (in, in); groups run along the input dimension, n_groups = ceil(in / group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "QuantizedWeight",
    "dequantize",
    "gptq_quantize",
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
    """Upper Cholesky factor of (H + damp I)^-1, as float32. H (in, in), already without dead columns."""
    H = H.double()
    damp = percdamp * torch.mean(torch.diag(H))
    H = H + damp * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
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
    _check_bits(bits)
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"need W (out, in) and H (in, in); got {tuple(W.shape)} and {tuple(H.shape)}")
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    n_out, n_in = W.shape
    gs = _effective_group(group_size, n_in)
    blocksize = _aligned_blocksize(blocksize, gs, n_in)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    n_grp = math.ceil(n_in / gs)
    scales = torch.zeros(n_out, n_grp, device=W.device)
    zeros = torch.zeros(n_out, n_grp, device=W.device)
    if act_order:
        for g in range(n_grp):
            scales[:, g], zeros[:, g] = _params(W[:, g * gs : (g + 1) * gs], bits, scale_dtype, symmetric)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(n_in, device=W.device)
    group_of = perm // gs  # (in,) group of the column quantized at each position

    Hinv = _inverse_hessian_factor(H, percdamp)
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(group_of[col])
            if not act_order and col % gs == 0:
                # A group inside the block reads W1 (in-block updates); one spanning blocks starts at
                # a block start, where W is fully updated.
                end = min(col + gs, n_in)
                group_w = W1[:, i : end - i1] if end <= i2 else W[:, col:end]
                scales[:, g], zeros[:, g] = _params(group_w, bits, scale_dtype, symmetric)
            w = W1[:, i]
            c = quantize_codes(w[:, None], scales[:, g], zeros[:, g], bits)[:, 0]
            q = scales[:, g] * (c - zeros[:, g])
            codes[:, col], Q[:, col] = c, q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if act_order:
        inv = torch.argsort(perm)
        Q, codes = Q[:, inv], codes[:, inv]
    return _result(codes, scales, zeros, Q, bits, gs, symmetric)
