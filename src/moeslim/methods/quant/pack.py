"""Bit-packing of integer codes (1..8 bits) and the bits-per-weight accounting of low-bit experts.

Layout: code k occupies stream bits [k * bits, (k + 1) * bits), least significant bit first; stream bit
p lives in byte p // 8 at bit position p % 8 (little-endian within bytes). n codes take exactly
ceil(n * bits / 8) bytes, whatever the width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["BitsAccounting", "bits_accounting", "pack_bits", "packed_nbytes", "unpack_bits"]

# Codes per chunk (a multiple of 8, so each chunk starts on a byte boundary for every width):
# bounds the (chunk, bits) bit matrix to a few MiB whatever the tensor size.
_CHUNK = 8 * 2**19


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes taken by n codes of ``bits`` bits: ceil(n * bits / 8)."""
    _check_bits(bits)
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (any shape, integer values in [0, 2^bits)) into a (ceil(n * bits / 8),) uint8 stream."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.is_floating_point() or flat.is_complex():
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits")
    flat = flat.to(torch.uint8)
    out = torch.empty(packed_nbytes(flat.numel(), bits), dtype=torch.uint8, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        out[start * bits // 8 : start * bits // 8 + packed_nbytes(chunk.numel(), bits)] = _pack_chunk(
            chunk, bits
        )
    return out


def _pack_chunk(chunk: torch.Tensor, bits: int) -> torch.Tensor:
    shifts = torch.arange(bits, dtype=torch.uint8, device=chunk.device)
    stream = ((chunk[:, None] >> shifts) & 1).reshape(-1)  # (n * bits,) one bit per entry
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    stream = stream.reshape(-1, 8)
    packed = torch.zeros(stream.shape[0], dtype=torch.uint8, device=chunk.device)
    for k in range(8):
        packed |= stream[:, k] << k
    return packed


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: (n,) uint8 codes from a packed uint8 stream."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != packed_nbytes(n, bits):
        need = packed_nbytes(n, bits)
        raise ValueError(f"{n} codes of {bits} bits need {need} bytes, got {packed.numel()}")
    out = torch.empty(n, dtype=torch.uint8, device=packed.device)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    for start in range(0, n, _CHUNK):
        count = min(_CHUNK, n - start)
        first = start * bits // 8
        chunk = packed[first : first + packed_nbytes(count, bits)]
        stream = ((chunk[:, None] >> shifts) & 1).reshape(-1)[: count * bits].reshape(count, bits)
        codes = torch.zeros(count, dtype=torch.uint8, device=packed.device)
        for k in range(bits):
            codes |= stream[:, k] << k
        out[start : start + count] = codes
    return out


@dataclass(frozen=True)
class BitsAccounting:
    """Storage of a set of experts, in bits.

    avg_bits: code bits per weight (the number papers quote, e.g. MC-MoE's "2.54 bits");
    avg_bits_with_overhead: including group scales and zero points.
    """

    n_params: int
    code_bits: int
    overhead_bits: int
    avg_bits: float
    avg_bits_with_overhead: float


def bits_accounting(
    bits_per_expert: Sequence[int],
    params_per_expert: int | Sequence[int],
    group_size: int,
    scale_bits: int = 16,
    zero_bits: int | None = None,
    in_features: int | None = None,
) -> BitsAccounting:
    """Average bits per weight of experts stored at the given widths, without and with overhead.

    Args:
        bits_per_expert: (E,) width of each expert, 1..8, or 16 for an expert kept in 16-bit floats
            (no scales or zeros).
        params_per_expert: weights per expert (one int for all, or E ints).
        group_size: weights per quantization group along the input dimension.
        scale_bits: bits per stored scale (float16: 16).
        zero_bits: bits per stored zero point; None means the expert's own width (zeros packed like
            codes, as moeslim.methods.quant.fused stores them).
        in_features: row length; when given, groups per row are ceil(in / group_size) (exact for a
            partial last group), otherwise ceil(params / group_size).
    """
    widths = list(bits_per_expert)
    sizes = [params_per_expert] * len(widths) if isinstance(params_per_expert, int) else list(params_per_expert)
    if len(sizes) != len(widths) or not widths:
        raise ValueError(f"need one parameter count per expert: {len(widths)} widths, {len(sizes)} counts")
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    code, overhead = 0, 0
    for b, p in zip(widths, sizes, strict=True):
        if b == 16:
            code += 16 * p
            continue
        _check_bits(b)
        code += b * p
        per_group = scale_bits + (b if zero_bits is None else zero_bits)
        overhead += _n_groups(p, group_size, in_features) * per_group
    n = sum(sizes)
    return BitsAccounting(n, code, overhead, code / n, (code + overhead) / n)


def _n_groups(params: int, group_size: int, in_features: int | None) -> int:
    if in_features is None:
        return math.ceil(params / group_size)
    if params % in_features:
        raise ValueError(f"params {params} is not a multiple of in_features {in_features}")
    return params // in_features * math.ceil(in_features / min(group_size, in_features))
