"""Packed low-bit expert storage that the model computes from at inference (no float copy of the weights).

``PackedExperts`` holds one fused expert parameter (a ``LowBitTensor``: E expert matrices, each at its own
width) as buffers grouped by width, in the layout the fastest kernel for that width wants:

- ``int4pack``: 4-bit experts in torch's ``_weight_int4pack_mm_for_cpu`` layout (exactly 4 bits a weight);
  the kernel's (scale, zero) pairs are built once, in the model's dtype, and held (``sz``).
- ``int8``: 8-bit experts as int8 codes (code - 128), (G, N, gs) per expert.
- ``planes``: every other width as bit planes of 4/2/1 bits (3 = 2 + 1, 5 = 4 + 1, ...): exactly b bits a
  weight, byte-aligned, unpacked with a mask.
- ``dense``: experts kept at 16 bits, their original slice.
- symmetric tensors (``LowBitTensor.symmetric``) store no zero points: the kernels take the grid's constant
  zero point 2^(b-1) as a number instead of zero-point planes (``ZeroPoints``), so nothing is held for them.
- ``canonical``: the ``LowBitTensor``'s own packed streams, for shapes the layouts above cannot hold (group
  size not a multiple of 8, fewer than 8 zero points): dequantized per routed expert with ``pack.unpack_bits``.

Inputs that are not a multiple of the group size are padded to whole groups at pack time (code 0; inputs
padded with zeros, so the padding adds exactly 0), so every shape the layouts can hold runs their kernels.

Decoding (up to ``FUSED_MAX_ROWS`` rows in one width group) runs one ``torch.compile``d kernel per width group for
all its routed (row, expert) pairs (``planes_rows_kernel``, ``int8_rows_kernel``): each row gathers its expert's
packed bytes inside the kernel, the integer codes meet the input first and scale and zero are applied once per
group, so no dequantized weight is ever materialised. bfloat16 rows of bit-plane groups (any group size up to
128) run ``planes_native``'s AVX512-BF16 kernel instead where the CPU has it (the same sums; 2-2.5x faster at
batch-1 shapes), float32 rows the same kernel on their three bfloat16 parts (exact, and nothing to compile). Calls of
little work (``SERIAL_MAX_WORK``) are compiled single-threaded, and at such shapes a layer's routed pairs can run
as one graph per projection (``rows_traced``, ``fuses_decode``; lowbit_forward's masked decode). Longer inputs
dequantize each routed expert once (compiled) and run a float matmul. 4-bit experts run torch's int4pack kernel on
bf16 inputs below ``INT4_GEMM_MIN_ROWS`` rows of one expert (``INT4_NATIVE_GEMM_MIN_ROWS`` where ``int4_native``
runs the tiles); longer inputs (prefill), and float32 or float16 inputs at any length (the kernel is slow outside
bf16), dequantize the expert a tile of output columns at a time into scratch shared by one layer forward and matmul
each tile while it is in cache (``int4pack_dequant_matmul``): the int4pack kernel's cost grows with every row.

Every buffer is stored with an integer dtype (float16 scales viewed as int16, dense slices viewed as an
integer of the same size), so ``model.to(dtype)`` never re-rounds stored values, while ``model.to(device)``
moves them. Bytes held = bytes of the canonical packed format (``canonical_bytes`` = bytes on disk) plus what
the layouts add (padding, int4pack's (scale, zero) pairs, the expert -> group map: ``nbytes``); ``to_lowbit``
rebuilds the canonical ``LowBitTensor`` bit-exactly (for saving).
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeslim.methods.quant.fused import LowBitTensor
from moeslim.methods.quant.layout_bytes import layout_format
from moeslim.methods.quant.pack import pack_bits, unpack_bits
from moeslim.runtime.int4_native import native_int4_tile
from moeslim.runtime.planes_native import (
    native_group,
    native_index,
    native_planes_rows,
    native_planes_rows_x,
    native_planes_rows_xf,
    planes_native_inputs,
)

__all__ = ["PackedExperts", "Workspace", "int4pack_dequant_kernel", "int4pack_dequant_matmul", "int8_rows_kernel",
           "pack_planes", "plane_split", "planes_inputs", "planes_matmul", "planes_matmul_kernel", "planes_rows_kernel",
           "rows_traced", "unpack_planes"]

log = logging.getLogger(__name__)

_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
# The compiled decode kernels (bit planes, int8) gather each input row's expert and read its packed bytes once
# per row, so they win while a width group sees few rows (decode: the routed pairs of one token); up to this
# many rows of one group they run as one call; longer inputs dequantize each routed expert once (compiled)
# and run a float matmul.
FUSED_MAX_ROWS = 8
# 4-bit experts routed this many bf16 input rows or more (prefill) are dequantized a tile at a time and run as a
# float matmul (``int4pack_dequant_matmul``) instead of torch's int4pack kernel, whose cost grows with every row.
# Measured with benchmarks/int4_gemm_threshold.py on the speed model's shapes (11264 x 2048 and 2048 x 5632, bf16,
# one thread) with the compiled tiles: the int4pack kernel wins up to 32 rows (1.7-1.9x at 16, 0.9-1.0x at 32), the
# GEMM path from 48 (1.15-1.2x at 48, 1.3x at 64, 1.5-1.6x at 96). float32 and float16 inputs always take the GEMM
# path: torch's CPU int4pack kernel is fast only in bf16 (in float32 it took 40 ms for one row of 11264 x 2048,
# 25x its bf16 time and 5x the GEMM path's; 50x the GEMM path at 32 rows).
INT4_GEMM_MIN_ROWS = 48
# The same threshold where the tiles dequantize through ``int4_native`` (bf16, AVX512-BF16): the GEMM path then
# wins from 32 rows (1.3x at 32, 1.7x at 64 rows on both shapes, same benchmark) and the int4pack kernel at 16.
INT4_NATIVE_GEMM_MIN_ROWS = 32
# Weights of one dequantized tile of the 4-bit GEMM path (``int4_tile_columns``): about 1-2 MB of bf16, so the
# tile its matmul reads is still in the L2 cache instead of a whole expert written to DRAM and read back.
INT4_TILE_WEIGHTS = 1 << 20
_INT4_BLOCK = 64  # torch's CPU int4pack layout: 64 output rows a block, rows d and 32 + d share a byte
# Matrices below this many weights (test-sized toys) compute eagerly: a compile (seconds per shape and width)
# would cost more than such a matrix ever takes; every real model's experts are far above it.
COMPILE_MIN_WEIGHTS = 1 << 14
# Decode kernel calls of less work than this (rows x weights of one expert; the demo model's: 0.2-0.5 M) are
# compiled single-threaded: the work is microseconds, and a parallel region's barrier costs more (on a busy
# machine a waiting thread can hold a call for a whole scheduler slice: decode was ~10x slower with 2 threads).
SERIAL_MAX_WORK = 1 << 22


# Zero points of one expert: bit planes (per plane (N * G * w / 8,) uint8), or the constant 2^(b-1) of a
# symmetric grid, which is stored nowhere.
ZeroPoints = tuple[Tensor, ...] | int


def _zero_grid(zero_planes: ZeroPoints, bits: int, n_out: int, n_groups: int) -> Tensor | float:
    """(N, G) float32 zero points from their planes, or a symmetric grid's constant as a number (broadcasts)."""
    if isinstance(zero_planes, int):
        return float(zero_planes)
    return unpack_planes(zero_planes, bits).reshape(n_out, n_groups).float()


def _column(z: Tensor | float) -> Tensor | float:
    return z.unsqueeze(-1) if isinstance(z, Tensor) else z


def plane_split(bits: int) -> list[tuple[int, int]]:
    """[(plane width, bit offset)] covering a ``bits``-bit code with planes of 4, 2 and 1 bits (low bits first)."""
    out, offset = [], 0
    for width in (4, 2, 1):
        while bits - offset >= width:
            out.append((width, offset))
            offset += width
    return out


def pack_planes(codes: Tensor, bits: int) -> list[Tensor]:
    """codes (..., L) uint8 in [0, 2^bits), L a multiple of 8 -> one (..., L * w / 8) uint8 tensor per plane.

    Plane byte j of a row holds, at bit w * i, the plane value of code i * (L * w / 8) + j: unpacking is one
    shift-and-mask per slot and gives the codes in their natural order.
    """
    n = codes.shape[-1]
    if n % 8:
        raise ValueError(f"plane packing needs rows of a multiple of 8 codes, got {n}")
    out = []
    for width, offset in plane_split(bits):
        slots = 8 // width
        vals = ((codes >> offset) & (2**width - 1)).to(torch.uint8)
        vals = vals.reshape(*codes.shape[:-1], slots, n // slots)  # (..., slots, nb)
        byte = torch.zeros(vals.shape[:-2] + vals.shape[-1:], dtype=torch.uint8, device=codes.device)
        for i in range(slots):
            byte |= vals[..., i, :] << (width * i)
        out.append(byte)
    return out


def _unpack_plane(plane: Tensor, width: int) -> Tensor:
    """(..., nb) uint8 -> (..., nb * 8 / width) plane values.

    Code k = a * (L / 8) + r (L codes, slot a in 0..7) sits in byte (a % w) * (L / 8) + r at shift w * (a // w):
    every width is read on the same (8, L / 8) grid, so planes of different widths combine elementwise (the
    compiled kernels then fuse a 3-bit = 2 + 1 unpack into one loop instead of materialising each plane).
    """
    slots = 8 // width
    per = plane.shape[-1] // width  # L / 8
    grid = plane.reshape(*plane.shape[:-1], 1, width, per).expand(*plane.shape[:-1], slots, width, per)
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=plane.device).view(slots, 1, 1)
    vals = (grid >> shifts) & (2**width - 1)  # (..., slots, w, L / 8)
    return vals.reshape(*plane.shape[:-1], -1)


def unpack_planes(planes: list[Tensor] | tuple[Tensor, ...], bits: int) -> Tensor:
    """Inverse of ``pack_planes``: (..., L) uint8 codes."""
    codes: Tensor | None = None
    for plane, (width, offset) in zip(planes, plane_split(bits), strict=True):
        vals = _unpack_plane(plane, width)
        vals = vals << offset if offset else vals
        codes = vals if codes is None else codes | vals
    assert codes is not None
    return codes


def planes_inputs(x: Tensor, bits: int, group_size: int) -> tuple[tuple[Tensor, ...], Tensor]:
    """x (M, K) -> (per plane (M, 1, G, 8, gs / 8) float32 inputs, (M, 1, G) float32 group sums of x).

    Plane (w, offset) holds slot a's value v at bits w * (a // w) of its byte: ``byte & (mask << w * (a // w))``
    is v * 2^(w * (a // w)) exactly, so the decode kernel masks without shifting and the power of two (with the
    plane's 2^offset) is folded into x here, once per call (exact in float32).
    """
    xa = x.float().reshape(x.shape[0], 1, -1, 8, group_size // 8)  # slot a, position r: input a * gs / 8 + r
    out = []
    for width, offset in plane_split(bits):
        slot_shift = torch.arange(8, device=x.device) // width * width  # (8,) w * (a // w)
        out.append(xa * torch.exp2((offset - slot_shift).float()).view(1, 1, 1, 8, 1))
    return tuple(out), xa.sum((3, 4))


def planes_matmul_kernel(xp: tuple[Tensor, ...], xsum: Tensor, planes: tuple[Tensor, ...],
                         zero_planes: ZeroPoints, scales: Tensor, bits: int, group_size: int) -> Tensor:
    """(M, N) float32 = x @ W^T, W = s * (codes - z) per group, from ``planes_inputs(x)`` and the bit planes.

    planes: per plane (N, G, gs * w / 8) uint8; zero_planes: per plane (N * G * w / 8,); scales (N, G) float16.
    y = sum_g s_g * (x_g . q_g - z_g * sum(x_g)): the integer codes meet x first, scale and zero are applied
    once per group. Written for ``torch.compile``: inductor emits one reduction loop that reads each plane
    byte once (widened to int32 once, then one AND + convert + FMA per slot), no dequantized matrix anywhere.
    """
    n_out, n_groups = scales.shape
    per = group_size // 8
    term: Tensor | None = None
    for plane, xq, (width, _offset) in zip(planes, xp, plane_split(bits), strict=True):
        p = plane.to(torch.int32).reshape(n_out, n_groups, width, per)
        for a in range(8):  # constant masks: a tensor of shifts would make inductor materialise the codes
            vals = (p[:, :, a % width, :] & ((2**width - 1) << (width * (a // width)))).float()  # (N, G, per)
            t = xq[:, :, :, a, :] * vals  # (M, N, G, per)
            term = t if term is None else term + t
    assert term is not None
    zeros = _zero_grid(zero_planes, bits, n_out, n_groups)  # (N, G)
    return (scales.float() * (term.sum(-1) - zeros * xsum)).sum(-1)  # (M, N)


def planes_matmul(x: Tensor, planes: tuple[Tensor, ...], zero_planes: ZeroPoints, scales: Tensor,
                  bits: int, group_size: int) -> Tensor:
    """x (M, K) -> (M, N) in x's dtype: ``planes_matmul_kernel`` run eagerly (the reference of the compiled one)."""
    xp, xsum = planes_inputs(x, bits, group_size)
    return planes_matmul_kernel(xp, xsum, planes, zero_planes, scales, bits, group_size).to(x.dtype)


def planes_rows_kernel(x: Tensor, rows: Tensor, planes: tuple[Tensor, ...], zero_planes: tuple[Tensor, ...] | int,
                       scales: Tensor, bits: int, group_size: int) -> Tensor:
    """x (S, K) float32, rows (S,) int64 -> (S, N) float32: y_i = x_i @ W_{rows_i}^T from the stacked bit planes.

    planes: per plane (n, N, G, gs * w / 8) uint8; zero_planes: per plane (n, N * G * w / 8) uint8, or the
    symmetric constant; scales (n, N, G) float16. Each input row meets its own expert's bytes (gathered inside
    the kernel: the routed experts of one width are one call); the maths is ``planes_matmul_kernel``'s, with
    the powers of two of ``planes_inputs`` applied per slot (exact in float32).
    """
    n_rows = x.shape[0]
    _, n_out, n_groups = scales.shape
    per = group_size // 8
    xa = x.float().reshape(n_rows, 1, n_groups, 8, per)  # slot a, position r: input a * gs / 8 + r
    term: Tensor | None = None
    for plane, (width, offset) in zip(planes, plane_split(bits), strict=True):
        p = plane[rows].to(torch.int32).reshape(n_rows, n_out, n_groups, width, per)
        for a in range(8):  # constant masks: a tensor of shifts would make inductor materialise the codes
            shift = width * (a // width)
            vals = (p[:, :, :, a % width, :] & ((2**width - 1) << shift)).float()  # (S, N, G, per)
            t = xa[:, :, :, a, :] * vals * float(2.0 ** (offset - shift))
            term = t if term is None else term + t
    assert term is not None
    if isinstance(zero_planes, int):
        zeros: Tensor | float = float(zero_planes)
    else:
        zeros = unpack_planes(tuple(z[rows] for z in zero_planes), bits).reshape(n_rows, n_out, n_groups).float()
    xsum = xa.sum((3, 4))  # (S, 1, G)
    return (scales[rows].float() * (term.sum(-1) - zeros * xsum)).sum(-1)  # (S, N)


def rows_traced(spec: tuple[Any, ...], rows: Tensor, x: Tensor) -> Tensor:
    """x (S, K), rows (S,) -> (S, N) float32 through one width group's gathered decode kernel, uncompiled, from
    its ``_WidthGroup.rows_args``: for a caller that compiles a whole layer around it (``fuses_decode``)."""
    fmt, bits, group_size, k_pad, planes, zplanes, scales = spec
    xp = (F.pad(x, (0, k_pad - x.shape[1])) if x.shape[1] != k_pad else x).float()
    if fmt == "int8":
        return int8_rows_kernel(xp, rows, planes[0], zplanes, scales.view(torch.float16))
    return planes_rows_kernel(xp, rows, planes, zplanes, scales.view(torch.float16), bits, group_size)


def int8_rows_kernel(x: Tensor, rows: Tensor, w8: Tensor, zero_planes: tuple[Tensor, ...] | int, scales: Tensor
                     ) -> Tensor:
    """x (S, K) float32, rows (S,) int64, w8 (n, G, N, gs) int8 = code - 128 -> (S, N) float32, each row through
    its own expert: sum_g s_g * (x_g . (q_g - 128) + (128 - z_g) * sum(x_g)) (``int8_matmul_kernel`` gathered)."""
    n_rows = x.shape[0]
    _, n_groups, n_out, group_size = w8.shape
    xg = x.float().reshape(n_rows, n_groups, 1, group_size)
    dot = (xg * w8[rows].float()).sum(-1)  # (S, G, N)
    if isinstance(zero_planes, int):
        zeros: Tensor | float = float(zero_planes)
    else:
        zeros = unpack_planes(tuple(z[rows] for z in zero_planes), 8).reshape(n_rows, n_out, n_groups)
        zeros = zeros.float().transpose(1, 2)  # (S, G, N)
    s = scales[rows].float().transpose(1, 2)  # (S, G, N)
    return (s * (dot + (128 - zeros) * xg.sum(-1))).sum(1)


def planes_dequant(planes: tuple[Tensor, ...], zero_planes: ZeroPoints, scales: Tensor, bits: int,
                   group_size: int, dtype: torch.dtype) -> Tensor:
    """(N, K) weights s * (codes - z) in ``dtype`` from bit planes, computed in float32 as ``gptq.dequantize``."""
    n_out, n_groups = scales.shape
    per = group_size // 8
    codes = torch.zeros((n_out, n_groups, 8, per), device=scales.device)
    for plane, (width, offset) in zip(planes, plane_split(bits), strict=True):  # constant shifts (see above)
        p = plane.reshape(n_out, n_groups, width, per)
        slots = [((p >> (width * slot)) & (2**width - 1)) for slot in range(8 // width)]
        codes = codes + float(2**offset) * torch.cat(slots, dim=2).float()  # (N, G, 8, per)
    codes = codes.reshape(n_out, n_groups, group_size)
    zeros = _column(_zero_grid(zero_planes, bits, n_out, n_groups))
    return (scales.float().unsqueeze(-1) * (codes - zeros)).reshape(n_out, n_groups * group_size).to(dtype)


def int8_dequant(w8: Tensor, zero_planes: ZeroPoints, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, K) weights from int8 codes (G, N, gs) holding code - 128."""
    n_groups, n_out, group_size = w8.shape
    zeros = _column(_zero_grid(zero_planes, 8, n_out, n_groups))
    codes = w8.permute(1, 0, 2).float() + 128  # (N, G, gs)
    return (scales.float().unsqueeze(-1) * (codes - zeros)).reshape(n_out, n_groups * group_size).to(dtype)


def int4_scales_and_zeros(scales: Tensor, zero_planes: ZeroPoints, dtype: torch.dtype) -> Tensor:
    """(G, N, 2) (scale, zero) pairs of the int4pack kernel, w = (q - 8) * scale + zero, from s (N, G) and 4-bit
    zero points z: zero = s * (8 - z), so w = s * (q - z)."""
    n_out, n_groups = scales.shape
    s = scales.float()
    z = _zero_grid(zero_planes, 4, n_out, n_groups)
    return torch.stack([s, s * (8 - z)], -1).transpose(0, 1).contiguous().to(dtype)


class Workspace:
    """Scratch tensors of the 4-bit GEMM path, reused by every expert matmul of one layer forward (the caller
    creates one per forward and drops it after): fresh tensors of an expert's size per matmul would each cost
    their page faults, about as much as the dequantization itself."""

    def __init__(self) -> None:
        self.flat: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A tensor of ``shape`` (contents undefined), sharing storage with earlier requests of ``name``."""
        n = 1
        for d in shape:
            n *= d
        key = (name, dtype, device)
        buf = self.flat.get(key)
        if buf is None or buf.numel() < n:
            buf = self.flat[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


def int4pack_dequant_kernel(q: Tensor, scale: Tensor, offset: Tensor, out: Tensor) -> Tensor:
    """Writes W^T (K, n) into ``out`` from q (n / 64, K, 32) uint8 (torch's CPU int4pack layout, n output columns):
    w = q * scale + offset per group, scale and offset (G, n) float32 (offset = zero - 8 * scale), rounded once
    to out's dtype.

    Written for ``torch.compile``: output row k is read from 32 contiguous bytes per block of 64 columns (low
    nibbles the first 32, high nibbles the next). Both nibbles come from the byte by float arithmetic, exact
    for codes < 256 (high = floor(byte / 16), low = byte - 16 high, selected by the half index h in {0, 1}), so
    inductor emits one vectorised loop that reads each byte and writes each weight once (slicing the two halves
    into ``out`` separately made it read the output back and compute both halves).
    """
    n_blocks, k, half = q.shape
    n_groups = scale.shape[0]
    codes = q.permute(1, 0, 2).reshape(n_groups, k // n_groups, n_blocks, 1, half).float()  # (G, gs, n / 64, 1, 32)
    high = torch.floor(codes * 0.0625)
    low = codes - 16 * high
    h = torch.arange(2, device=q.device, dtype=torch.float32).view(1, 1, 1, 2, 1)
    vals = low + h * (high - low)  # (G, gs, n / 64, 2, 32)
    s = scale.view(n_groups, 1, n_blocks, 2, half)
    z = offset.view(n_groups, 1, n_blocks, 2, half)
    out.view(n_groups, k // n_groups, n_blocks, 2, half).copy_(vals * s + z)
    return out


def int4_gemm(rows: int, dtype: torch.dtype) -> bool:
    """Whether ``rows`` rows of one 4-bit expert run ``int4pack_dequant_matmul`` instead of the int4pack kernel:
    always outside bf16 (see ``INT4_GEMM_MIN_ROWS``); bf16 decode never consults, hence never builds, the native
    kernel."""
    if rows >= INT4_GEMM_MIN_ROWS or dtype != torch.bfloat16:
        return True
    return rows >= INT4_NATIVE_GEMM_MIN_ROWS and dtype == torch.bfloat16 and native_int4_tile() is not None


def int4_tile_columns(k: int) -> int:
    """Output columns of one dequantized tile of the 4-bit GEMM path for K inputs: a multiple of the int4pack
    block (64) holding about ``INT4_TILE_WEIGHTS`` weights, so a tile is still in cache when its matmul reads it."""
    return max(_INT4_BLOCK, INT4_TILE_WEIGHTS // k // _INT4_BLOCK * _INT4_BLOCK)


def int4pack_dequant_matmul(x: Tensor, w4: Tensor, sz: Tensor, group_size: int, workspace: Workspace | None = None,
                            compiled: _Compiled | None = None) -> Tensor:
    """x (M, K) -> (M, N) = x @ W^T with W dequantized from torch's CPU int4pack layout into x's dtype, then one
    float matmul (the GEMM path of long inputs).

    w4: (N, K / 2) uint8 from ``_convert_weight_to_int4pack_for_cpu`` (N a multiple of 64): bytes laid out
    (N / 64, K, 32), the low nibble of byte (b, k, d) is code (64 b + d, k), the high nibble code (64 b + 32 + d, k).
    sz: (G, N, 2) the kernel's (scale, zero) pairs, w = (q - 8) * scale + zero, as the int4pack kernel computes
    (scale and zero in the model's dtype). W is written transposed, (K, N): every operation then runs along N
    with contiguous operands. With ``compiled``, W is dequantized a tile of ``int4_tile_columns(K)`` output
    columns at a time (1-2 MB) into scratch and each tile is matmuled into its output columns while it is still in
    cache (a whole expert, 23-46 MB in bf16, went to DRAM and back); the tile's dequantization is one compiled
    pass (``int4pack_dequant_kernel``; one compile per tile width), or for bf16 on CPUs with AVX512-BF16 the
    hand-vectorised ``int4_native.native_int4_tile`` (same maths, about 4x faster). Without a compiler: the eager
    passes below, over the whole matrix.
    """
    n_out = sz.shape[1]
    k = x.shape[1]
    n_groups = sz.shape[0]
    ws = workspace if workspace is not None else Workspace()
    if compiled is not None and n_out * k >= COMPILE_MIN_WEIGHTS:
        blocks = w4.view(n_out // _INT4_BLOCK, k, _INT4_BLOCK // 2)
        pairs = sz.float()  # (G, N, 2): split once per call, so the kernel reads both contiguously
        scale, offset = pairs[..., 0].contiguous(), torch.add(pairs[..., 1], pairs[..., 0], alpha=-8)
        cols = int4_tile_columns(k)
        native = native_int4_tile() if x.dtype == torch.bfloat16 and x.device.type == "cpu" else None
        y = torch.empty((x.shape[0], n_out), dtype=x.dtype, device=x.device)
        for n0 in range(0, n_out, cols):  # the last tile may be narrower (N a multiple of 64 only)
            n1 = min(n0 + cols, n_out)
            w = ws.get("tile", (k, n1 - n0), x.dtype, x.device)
            args = (blocks[n0 // _INT4_BLOCK:n1 // _INT4_BLOCK], scale[:, n0:n1], offset[:, n0:n1], w)
            if native is not None:
                native(*args)
            # the key names the slices' strides (N): each matrix shape compiles its full and last tile once
            elif compiled(int4pack_dequant_kernel, *args, key=(n_out, k, n1 - n0, n_groups, x.dtype),
                          shared=True) is None:
                break  # no compiler here: the eager passes below
            torch.mm(x, w, out=y[:, n0:n1])
        else:
            return y
    q = w4.view(n_out // _INT4_BLOCK, k, _INT4_BLOCK // 2).permute(1, 0, 2)  # (K, N / 64, 32)
    codes = ws.get("codes", (k, n_out // _INT4_BLOCK, 2, _INT4_BLOCK // 2), torch.uint8, x.device)
    torch.bitwise_and(q, 15, out=codes[:, :, 0])
    torch.bitwise_right_shift(q, 4, out=codes[:, :, 1])
    w = ws.get("weights", (k, n_out), x.dtype, x.device)
    w.copy_(codes.view(k, n_out))
    pairs = sz.to(x.dtype)
    scale = pairs[..., 0].contiguous().unsqueeze(1)  # (G, 1, N), contiguous along N (vectorised)
    offset = torch.add(pairs[..., 1], pairs[..., 0], alpha=-8).unsqueeze(1)  # zero - 8 * scale, one rounding
    wg = w.view(n_groups, group_size, n_out)
    torch.addcmul(offset, wg, scale, out=wg)
    return x @ w


def _own_code(kernel: Callable[..., Any], tag: int | str) -> Callable[..., Any]:
    """A copy of ``kernel`` with its own code object: dynamo keeps compiled specialisations (and checks their
    guards) per code object, so each copy holds one specialisation and finds it with one guard check."""
    code = kernel.__code__.replace(co_name=f"{kernel.__name__}_{tag}")
    return types.FunctionType(code, kernel.__globals__, code.co_name, kernel.__defaults__, kernel.__closure__)


def _compile(kernel: Callable[..., Any], tag: int | str, serial: bool) -> Callable[..., Tensor]:
    """``kernel``'s own copy (``_own_code``) compiled with static shapes (``serial``: no parallel region)."""
    options: dict[str, str | int | bool | Callable[..., Any]] | None = {"cpp.threads": 1} if serial else None
    return torch.compile(_own_code(kernel, tag), dynamic=False, options=options)


@functools.cache
def _shared_kernel(kernel: Callable[..., Any], serial: bool, full: tuple[Any, ...]) -> Callable[..., Tensor]:
    """One compiled copy of a pure module-level ``kernel`` per process and ``full`` key (``_Compiled(shared=True)``;
    ``serial`` as ``_compile``, also named in ``full``).

    A process-wide cache, on purpose: a pure kernel whose key names every shape, dtype and constant of its
    arguments compiles to the same graph whichever layer, projection or model calls it, and the compiled
    function holds no tensors (its inputs are arguments; dynamo still guards them, so a call that does not
    match recompiles instead of computing wrong). Kept per ``_Compiled`` it compiled once per layer and
    projection, and again for every ``copy.deepcopy`` of a model (minutes on a cold inductor cache); torch's
    own dynamo and inductor caches are per process the same way. Graphs that read a layer's own objects (the
    decode graphs of ``lowbit_forward``: the experts' activation, per-layer expert counts) are not shared."""
    return _compile(kernel, f"s{abs(hash(full)) % 10**9}", serial)


class _Compiled:
    """``torch.compile``d kernels (static shapes), one compiled copy per kernel and ``key``, built on first use;
    every call returns None when this machine cannot compile, and the caller runs the same maths eagerly.

    ``key`` names everything that selects a specialisation (the kernel's argument shapes, widths, dtypes):
    each key gets its own copy of the kernel (``_own_code``), so no call ever recompiles or walks a list of
    guards, and the recompile limit is never reached (no ``config.patch`` on the hot path). With ``shared``
    the copy comes from the process-wide ``_shared_kernel`` (pure kernels whose key determines the graph), so
    every layer and model calling it with that key runs one compiled graph.
    """

    def __init__(self) -> None:
        self.fns: dict[tuple[Any, ...], Callable[..., Tensor]] = {}
        self.failed = False

    def __deepcopy__(self, memo: dict[int, Any]) -> _Compiled:
        # a compiled function does not copy: the copy compiles its own on first use (shared kernels: looks them up)
        return _Compiled()

    def __call__(self, kernel: Callable[..., Any], *args: Any, key: tuple[Any, ...] | None = None,
                 serial: bool = False, shared: bool = False) -> Any:
        """``kernel(*args)`` compiled (None: no compiler here); ``serial``: compiled without a parallel region;
        ``shared``: ``kernel`` is pure and ``key`` names everything its graph depends on (``_shared_kernel``)."""
        if self.failed:
            return None
        full = (kernel.__name__, torch.is_grad_enabled(), serial,
                *(key if key is not None else _shape_key(args)))
        try:
            fn = self.fns.get(full)
            if fn is None:
                fn = self.fns[full] = (_shared_kernel(kernel, serial, full) if shared and key is not None
                                       else _compile(kernel, len(self.fns), serial))
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - no compiler / unsupported backend: the eager path is exact
            self.failed = True
            log.warning("torch.compile of the low-bit kernels failed (%s): low-bit experts of widths other than "
                        "4 dequantize eagerly per routed expert instead (slower)", exc)
            return None

    def kernels(self) -> set[str]:
        """Names of the kernels compiled so far."""
        return {k[0] for k in self.fns}


def _shape_key(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What selects a specialisation of a call with ``args``: tensor shapes and dtypes, other values as given."""
    out: list[Any] = []
    for a in args:
        if isinstance(a, Tensor):
            out.append((tuple(a.shape), a.dtype))
        elif isinstance(a, tuple):
            out.append(_shape_key(a))
        else:
            out.append(a)
    return tuple(out)


def fast_unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """``pack.unpack_bits`` for n a multiple of 8: 8 codes fill exactly ``bits`` bytes, read as one integer."""
    if n % 8:
        return unpack_bits(packed, bits, n)
    words = packed.reshape(-1, bits).to(torch.int64)  # (n / 8, bits) little-endian bytes
    word = words[:, 0].clone()
    for j in range(1, bits):
        word |= words[:, j] << (8 * j)
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=packed.device)
    return ((word.unsqueeze(-1) >> shifts) & (2**bits - 1)).to(torch.uint8).reshape(-1)


def fast_pack(codes: Tensor, bits: int) -> Tensor:
    """``pack.pack_bits`` for a multiple of 8 codes (the inverse of ``fast_unpack``), without a bit matrix."""
    flat = codes.reshape(-1)
    if flat.numel() % 8:
        return pack_bits(flat, bits)
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=flat.device)
    word = (flat.reshape(-1, 8).to(torch.int64) << shifts).sum(-1)  # (n / 8,) disjoint bit fields
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=flat.device)
    return ((word.unsqueeze(-1) >> byte_shifts) & 255).to(torch.uint8).reshape(-1)


def _as_int(t: Tensor) -> Tensor:
    """Float tensor -> same bytes viewed as an integer dtype (so module dtype casts leave it alone)."""
    t = t.contiguous()
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def _fmt_for(bits: int, packed: LowBitTensor, device: torch.device) -> str:
    n_out, n_in = packed.out_in
    return layout_format(bits, n_out, n_in, packed.group_size, device.type)


_UNPACK_CHUNK = 1 << 20  # codes unpacked at a time while building the layouts: bounds the int64 temporaries


def _unpack_chunked(packed: Tensor, bits: int, n: int) -> Tensor:
    """``fast_unpack`` in chunks of ``_UNPACK_CHUNK`` codes (n a multiple of 8): (n,) uint8."""
    if n % 8:
        return unpack_bits(packed, bits, n)
    out = torch.empty(n, dtype=torch.uint8, device=packed.device)
    for start in range(0, n, _UNPACK_CHUNK):
        stop = min(start + _UNPACK_CHUNK, n)
        out[start:stop] = fast_unpack(packed[start * bits // 8: stop * bits // 8], bits, stop - start)
    return out


class _WidthGroup(nn.Module):
    """The experts of one width in one layout; buffers stacked over those experts (non-persistent).

    Inputs not a multiple of the group size are padded at pack time: the last group's codes run on to a whole
    group with code 0 and inputs are padded with zeros, so every shape the planes / int8 / int4pack layouts
    can hold runs their kernels (the padding contributes exactly 0; it is held, not saved).
    """

    # Buffers of the layouts (registered by ``_buf``; which exist depends on ``fmt``).
    dense: Tensor  # (n, d1, d2) as an integer view
    scales: Tensor  # (n, N, G) float16 viewed as int16
    w4: Tensor  # int4pack layout
    sz: Tensor  # (n, G, N, 2) int4pack (scale, zero) pairs in ``dtype``, viewed as an integer
    w8: Tensor  # (n, G, N, gs) int8
    n_zplanes: int

    def __init__(self, bits: int, fmt: str, experts: list[int], packed: LowBitTensor) -> None:
        super().__init__()
        self.bits, self.fmt, self.experts = bits, fmt, experts
        self.symmetric, self.dtype, self.transposed = packed.symmetric, packed.dtype, packed.transposed
        n_out, n_in = packed.out_in
        self.n_out, self.n_in, self.n_groups = n_out, n_in, packed.n_groups
        self.group_size = min(packed.group_size, n_in)
        self.k_pad = self.n_groups * self.group_size  # n_in rounded up to whole groups
        self.n_planes = self.n_zplanes = 0
        if fmt == "dense":
            self._buf("dense", _as_int(torch.stack([packed.stream("dense", e) for e in experts])))
            return
        if fmt == "canonical":
            for i, e in enumerate(experts):
                self._buf(f"codes{i}", packed.stream("codes", e))
                self._buf(f"scales{i}", _as_int(packed.stream("scales", e)))
                if not self.symmetric:
                    self._buf(f"zeros{i}", packed.stream("zeros", e))
            return
        self._buf("scales", _as_int(torch.stack([packed.stream("scales", e) for e in experts])))  # (n, N, G) fp16
        if not self.symmetric:  # symmetric: the kernels take the constant zero point (``_zplanes``)
            zeros = [_unpack_chunked(packed.stream("zeros", e), bits, n_out * self.n_groups) for e in experts]
            zplanes = pack_planes(torch.stack(zeros), bits)  # per plane (n, N * G * w / 8)
            for j, z in enumerate(zplanes):
                self._buf(f"zp{j}", z)
            self.n_zplanes = len(zplanes)
        # Codes one expert (planes, int8: one block of rows) at a time into preallocated buffers: small
        # temporaries only, so loading holds little beyond the layouts themselves.
        n = len(experts)
        if fmt == "int4pack":
            for i, e in enumerate(experts):
                codes = _unpack_chunked(packed.stream("codes", e), bits, n_out * n_in).reshape(n_out, n_in)
                w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self._padded(codes).to(torch.int32), 1)
                self._store(i, n, "w4", w, None)
        else:
            step = max(8, _UNPACK_CHUNK // max(n_in, 1) // 8 * 8)  # rows per block: a multiple of 8 (byte-aligned)
            for i, e in enumerate(experts):
                stream = packed.stream("codes", e)
                for r0 in range(0, n_out, step):
                    r1 = min(r0 + step, n_out)
                    part = stream[r0 * n_in * bits // 8: (r1 * n_in * bits + 7) // 8]
                    codes = self._padded(_unpack_chunked(part, bits, (r1 - r0) * n_in).reshape(r1 - r0, n_in))
                    self._fill_rows(i, n, r0, r1, codes)
        if fmt == "int4pack":  # the kernel's (scale, zero) pairs, built once in the model's dtype
            sz = [int4_scales_and_zeros(self._scales(i), self._zplanes(i), self.dtype) for i in range(len(experts))]
            self._buf("sz", _as_int(torch.stack(sz)))

    def _padded(self, codes: Tensor) -> Tensor:
        """(rows, n_in) codes -> (rows, k_pad): the last group runs on to a whole group with code 0."""
        return F.pad(codes, (0, self.k_pad - self.n_in)) if self.k_pad != self.n_in else codes

    def _fill_rows(self, i: int, n: int, r0: int, r1: int, codes: Tensor) -> None:
        """Store output rows r0:r1 of expert ``i`` of ``n`` from their (r1 - r0, k_pad) uint8 codes."""
        rows = codes.reshape(r1 - r0, self.n_groups, self.group_size)
        if self.fmt == "int8":
            self._store(i, n, "w8", (rows.transpose(0, 1).to(torch.int16) - 128).to(torch.int8), (1, r0, r1))
            return
        planes = pack_planes(rows, self.bits)  # per plane (rows, G, gs * w / 8)
        self.n_planes = len(planes)
        for j, plane in enumerate(planes):
            self._store(i, n, f"p{j}", plane, (0, r0, r1))

    def _store(self, i: int, n: int, name: str, t: Tensor, block: tuple[int, int, int] | None) -> None:
        """Copy ``t`` into expert ``i`` of buffer ``name`` (allocated for ``n`` experts on first use), at
        ``block`` = (dim, start, stop) of the expert's full (out-rows) shape, or whole when None."""
        if not hasattr(self, name):
            shape = list(t.shape)
            if block is not None:
                shape[block[0]] = self.n_out
            self._buf(name, torch.empty((n, *shape), dtype=t.dtype, device=t.device))
        target = getattr(self, name)[i]
        if block is not None:
            target = target.narrow(block[0], block[1], block[2] - block[1])
        target.copy_(t)

    def _buf(self, name: str, t: Tensor) -> None:
        self.register_buffer(name, t.contiguous(), persistent=False)

    # ------------------------------------------------------------------ per expert
    def _scales(self, row: int) -> Tensor:
        return self.scales[row].view(torch.float16)  # (N, G)

    def _zplanes(self, row: int) -> ZeroPoints:
        """Zero points of expert ``row``: its planes, or the symmetric grid's constant 2^(b-1)."""
        if self.symmetric:
            return 1 << (self.bits - 1)
        return tuple(getattr(self, f"zp{j}")[row] for j in range(self.n_zplanes))

    def _all_zplanes(self) -> tuple[Tensor, ...] | int:
        """Zero-point planes stacked over the group's experts (per plane (n, N * G * w / 8)), or the constant."""
        if self.symmetric:
            return 1 << (self.bits - 1)
        return tuple(getattr(self, f"zp{j}") for j in range(self.n_zplanes))

    def _zeros(self, row: int) -> Tensor:
        """(N, G) uint8 zero points of expert ``row``."""
        zp = self._zplanes(row)
        if isinstance(zp, int):
            return torch.full((self.n_out, self.n_groups), zp, dtype=torch.uint8, device=self.scales.device)
        return unpack_planes(list(zp), self.bits).reshape(self.n_out, self.n_groups)

    def _codes(self, row: int) -> Tensor:
        """(N, K) uint8 codes of the group's expert ``row`` (the layouts' inverse, padding dropped; for saving)."""
        if self.fmt == "int4pack":
            codes = _int4pack_codes(self.w4[row], self.n_out, self.k_pad)
        elif self.fmt == "int8":
            codes = (self.w8[row].to(torch.int16) + 128).to(torch.uint8).transpose(0, 1).reshape(self.n_out, -1)
        else:
            planes = [getattr(self, f"p{j}")[row] for j in range(self.n_planes)]
            codes = unpack_planes(planes, self.bits).reshape(self.n_out, self.k_pad)
        return codes[:, :self.n_in].contiguous()

    def dequantize(self, row: int, dtype: torch.dtype) -> Tensor:
        """(N, K) weights of expert ``row`` in (out, in) orientation, as the canonical dequantization gives."""
        if self.fmt == "dense":
            w = self.dense[row].view(self.dtype).to(dtype)
            return w.T if self.transposed else w
        if self.fmt == "canonical":
            codes = unpack_bits(getattr(self, f"codes{row}"), self.bits, self.n_out * self.n_in)
            scales = getattr(self, f"scales{row}").view(torch.float16)
            if self.symmetric:
                zeros = torch.full((self.n_out * self.n_groups,), 1 << (self.bits - 1), device=codes.device)
            else:
                zeros = unpack_bits(getattr(self, f"zeros{row}"), self.bits, self.n_out * self.n_groups)
            codes, zeros = codes.reshape(self.n_out, self.n_in), zeros.reshape(self.n_out, self.n_groups)
            cols = torch.arange(self.n_in, device=codes.device) // self.group_size
            return (scales.float()[:, cols] * (codes.float() - zeros.float()[:, cols])).to(dtype)
        codes = F.pad(self._codes(row), (0, self.k_pad - self.n_in)).reshape(self.n_out, self.n_groups, -1)
        s, z = self._scales(row).float(), self._zeros(row).float()
        w = s.unsqueeze(-1) * (codes.float() - z.unsqueeze(-1))  # (N, G, gs) float32, as gptq.dequantize
        return w.reshape(self.n_out, self.k_pad)[:, :self.n_in].to(dtype)

    def _pad(self, x: Tensor) -> Tensor:
        return F.pad(x, (0, self.k_pad - x.shape[1])) if self.k_pad != x.shape[1] else x

    def matmul(self, row: int, x: Tensor, compiled: _Compiled, workspace: Workspace | None = None) -> Tensor:
        """x (M, K) -> (M, N) = x @ W_row^T from the packed storage (``workspace``: scratch of the 4-bit GEMM
        path, shared by the calls of one layer forward)."""
        if self.fmt == "dense":
            w = self.dense[row].view(self.dtype).to(x.dtype)  # stored layout (d1, d2)
            return x @ w if self.transposed else F.linear(x, w)
        if self.fmt == "int4pack":
            if x.device.type != "cpu":
                raise RuntimeError(f"4-bit experts were packed in the CPU int4pack layout; to run on {x.device}, "
                                   f"load the checkpoint with device={x.device.type!r} instead of moving the model")
            if x.dtype == self.dtype:
                sz = self.sz[row].view(self.dtype)
            else:
                sz = int4_scales_and_zeros(self._scales(row), self._zplanes(row), x.dtype)
            if self.n_out % _INT4_BLOCK == 0 and int4_gemm(x.shape[0], x.dtype):
                return int4pack_dequant_matmul(self._pad(x), self.w4[row], sz, self.group_size, workspace,
                                               compiled)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(self._pad(x).contiguous(), self.w4[row],
                                                             self.group_size, sz)
        if self.fmt in ("int8", "planes") and x.shape[0] <= FUSED_MAX_ROWS:
            rows = torch.full((x.shape[0],), row, dtype=torch.int64, device=x.device)
            y = self._rows_kernel(rows, x, compiled)
            if y is not None:
                return y
        if self.n_out * self.n_in < COMPILE_MIN_WEIGHTS:
            return F.linear(x, self.dequantize(row, x.dtype))
        if self.fmt == "int8":
            w = compiled(int8_dequant, self.w8[row], self._zplanes(row), self._scales(row), x.dtype,
                         key=(self.fmt, self.symmetric, self.n_out, self.k_pad, self.group_size, x.dtype), shared=True)
            return F.linear(self._pad(x), w) if w is not None else F.linear(x, self.dequantize(row, x.dtype))
        if self.fmt == "planes":
            planes = tuple(getattr(self, f"p{j}")[row] for j in range(self.n_planes))
            w = compiled(planes_dequant, planes, self._zplanes(row), self._scales(row), self.bits, self.group_size,
                         x.dtype, key=(self.fmt, self.bits, self.symmetric, self.n_out, self.k_pad, self.group_size,
                                       x.dtype), shared=True)
            if w is not None:
                return F.linear(self._pad(x), w)
        return F.linear(x, self.dequantize(row, x.dtype))

    def _rows_kernel(self, rows: Tensor, x: Tensor, compiled: _Compiled) -> Tensor | None:
        """x (S, K), rows (S,) -> (S, N) through the compiled gathered decode kernel (None: not compiled here)."""
        if self.n_out * self.n_in < COMPILE_MIN_WEIGHTS:
            return None
        if self.fmt == "planes":
            y = self._native_rows(rows, x)
            if y is not None:
                return y
        n_rows = x.shape[0]
        bucket = 1 << (n_rows - 1).bit_length()  # 1, 2, 4, 8 rows: four specialisations per shape, not eight
        xp = self._pad(x).float()
        if bucket != n_rows:  # padded rows: zero inputs through expert row 0, dropped below
            xp = F.pad(xp, (0, 0, 0, bucket - n_rows))
            rows = F.pad(rows, (0, bucket - n_rows))
        scales = self.scales.view(torch.float16)
        # every argument's shape follows from the key (inputs float32, buffers contiguous): shared by all layers
        key = (self.fmt, self.bits, self.symmetric, len(self.experts), self.n_out, self.k_pad, self.group_size,
               bucket)
        serial = bucket * self.n_out * self.k_pad < SERIAL_MAX_WORK
        if self.fmt == "int8":
            y = compiled(int8_rows_kernel, xp, rows, self.w8, self._all_zplanes(), scales, key=key, serial=serial,
                         shared=True)
        else:
            planes = tuple(getattr(self, f"p{j}") for j in range(self.n_planes))
            y = compiled(planes_rows_kernel, xp, rows, planes, self._all_zplanes(), scales, self.bits,
                         self.group_size, key=key, serial=serial, shared=True)
        if y is None:
            return None
        return (y if bucket == n_rows else y[:n_rows]).to(x.dtype)

    def _native_rows(self, rows: Tensor, x: Tensor) -> Tensor | None:
        """x (S, K) bfloat16 or float32, rows (S,) -> (S, N) in x's dtype through ``planes_native`` (None: other
        inputs, a CPU without AVX512-BF16, or a group size the kernel does not read (``native_group``); the
        compiled kernel runs instead). float32 inputs run ``planes_rows_xf``: exact as the compiled float32 kernel."""
        if x.device.type != "cpu" or not native_group(self.group_size):
            return None
        if x.dtype == torch.float32:
            xf = native_planes_rows_xf()
            args = self.native_decode_args()
            if xf is None or args is None:
                return None
            return xf(x if x.stride(-1) == 1 else x.contiguous(), rows, *args)
        if x.dtype != torch.bfloat16:
            return None
        kernel = native_planes_rows()
        if kernel is None:
            return None
        split = plane_split(self.bits)
        xv, xs = planes_native_inputs(self._pad(x), tuple(w for w, _ in split), self.group_size)
        zplanes = self._all_zplanes()
        out = torch.empty((x.shape[0], self.n_out), dtype=torch.float32, device=x.device)
        kernel(xv, xs, rows.contiguous(), [getattr(self, f"p{j}") for j in range(self.n_planes)],
               [] if isinstance(zplanes, int) else list(zplanes), zplanes if isinstance(zplanes, int) else 0,
               self.scales, [w for w, _ in split], [o for _, o in split], self.group_size, out)
        return out.to(x.dtype)

    def native_decode_args(self) -> tuple[Any, ...] | None:
        """What ``planes_rows_x`` takes besides the inputs and rows (planes, zero planes, zero constant, scales,
        plane widths and offsets, group size, input index), or None where it does not run (not a bit-plane group
        of a group size the kernel reads, not on CPU, no AVX512-BF16 kernel here)."""
        if self.fmt != "planes" or not native_group(self.group_size) or self.scales.device.type != "cpu":
            return None
        if native_planes_rows_x() is None:
            return None
        split = plane_split(self.bits)
        zplanes = self._all_zplanes()
        return ([getattr(self, f"p{j}") for j in range(self.n_planes)],
                [] if isinstance(zplanes, int) else list(zplanes), zplanes if isinstance(zplanes, int) else 0,
                self.scales, [w for w, _ in split], [o for _, o in split], self.group_size,
                native_index(tuple(w for w, _ in split), self.group_size))

    def rows_args(self) -> tuple[Any, ...]:
        """The arguments of ``rows_traced`` that describe this group (tensors and numbers only: a compiled
        caller then guards on them cheaply, not on modules)."""
        planes = tuple(getattr(self, f"p{j}") for j in range(self.n_planes)) if self.fmt == "planes" else (self.w8,)
        return self.fmt, self.bits, self.group_size, self.k_pad, planes, self._all_zplanes(), self.scales

    def matmul_rows(self, rows: Tensor, x: Tensor, compiled: _Compiled, workspace: Workspace | None = None
                    ) -> Tensor:
        """x (S, K), rows (S,) int64 expert rows of this group -> (S, N): y_i = x_i @ W_{rows_i}^T.

        Few rows (decode): one gathered kernel call for all of them. Otherwise each expert once: its rows
        through ``matmul`` (longer inputs dequantize the expert once and run a float matmul).
        """
        if self.fmt in ("int8", "planes") and x.shape[0] <= FUSED_MAX_ROWS:
            y = self._rows_kernel(rows, x, compiled)
            if y is not None:
                return y
        if len(self.experts) == 1:
            return self.matmul(0, x, compiled, workspace)
        order = torch.argsort(rows, stable=True)
        counts = torch.bincount(rows, minlength=len(self.experts)).tolist()
        out: Tensor | None = None
        start = 0
        for row, count in enumerate(counts):
            if count == 0:
                continue
            idx = order[start:start + count]
            start += count
            y = self.matmul(row, x[idx], compiled, workspace)
            if out is None:
                out = torch.empty((x.shape[0], y.shape[1]), dtype=y.dtype, device=y.device)
            out[idx] = y
        assert out is not None
        return out

    def canonical(self, row: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(packed codes, float16 scales, packed zeros or None when symmetric) of expert ``row`` in the
        LowBitTensor format."""
        if self.fmt == "canonical":
            zeros = None if self.symmetric else getattr(self, f"zeros{row}").clone()
            scales = getattr(self, f"scales{row}").view(torch.float16).clone()
            return getattr(self, f"codes{row}").clone(), scales, zeros
        return (fast_pack(self._codes(row), self.bits), self._scales(row).clone(),
                None if self.symmetric else fast_pack(self._zeros(row), self.bits))


def _int4pack_codes(w4: Tensor, n_out: int, n_in: int) -> Tensor:
    """(N, K) uint8 codes back from torch's int4pack layout: the layout is a fixed permutation of the nibbles,
    read off by converting the nibble positions themselves (4 bits of the position per conversion)."""
    n = n_out * n_in
    pos = torch.arange(n, dtype=torch.int64, device=w4.device)
    where = torch.zeros(n, dtype=torch.int64, device=w4.device)  # where[slot] = canonical position
    for digit in range((max(n - 1, 1).bit_length() + 3) // 4):
        probe = ((pos >> (4 * digit)) & 15).to(torch.int32).reshape(n_out, n_in)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).reshape(-1)
        where |= _nibbles(packed).to(torch.int64) << (4 * digit)
    codes = torch.empty(n, dtype=torch.uint8, device=w4.device)
    codes[where] = _nibbles(w4.reshape(-1))
    return codes.reshape(n_out, n_in)


def _nibbles(b: Tensor) -> Tensor:
    return torch.stack([b & 15, b >> 4], -1).reshape(-1)


class PackedExperts(nn.Module):
    """One fused expert parameter held packed, grouped by width (see the module docstring).

    ``shape``/``transposed``/``dtype``/``group_size``/``bits`` are those of the ``LowBitTensor`` it was built
    from; ``matmul(e, x)`` computes x @ W_e^T with W_e in (out, in) orientation, whatever the stored layout.
    """

    def __init__(self, packed: LowBitTensor, device: torch.device | str | None = None) -> None:
        super().__init__()
        dev = torch.device(device) if device is not None else _device_of(packed)
        self.shape, self.transposed, self.dtype = packed.shape, packed.transposed, packed.dtype
        self.group_size, self.bits, self.symmetric = packed.group_size, list(packed.bits), packed.symmetric
        by_fmt: dict[tuple[int, str], list[int]] = {}
        for e, b in enumerate(packed.bits):
            by_fmt.setdefault((b, _fmt_for(b, packed, dev)), []).append(e)
        self.groups = nn.ModuleList(_WidthGroup(b, fmt, experts, packed) for (b, fmt), experts in by_fmt.items())
        self.slot: dict[int, tuple[int, int]] = {}
        for gi in range(len(self.groups)):
            for row, e in enumerate(self._group(gi).experts):
                self.slot[e] = (gi, row)
        # (E + 1,) group and row of each expert; index E (the placeholder "no expert") maps to group n_groups.
        n = len(packed.bits)
        where = [self.slot[e] for e in range(n)] + [(len(self.groups), 0)]
        self.group_of: Tensor
        self.row_of: Tensor
        self.register_buffer("group_of", torch.tensor([g for g, _ in where], device=dev), persistent=False)
        self.register_buffer("row_of", torch.tensor([r for _, r in where], device=dev), persistent=False)
        self.canonical_bytes = packed.nbytes()  # the LowBitTensor format = bytes on disk
        self.compiled = _Compiled()
        # What decode asks on every layer call, kept until the buffers move (``_apply``): building the
        # tuples and walking the groups cost about as much as a small kernel at the demo's shapes.
        self._rows_args: tuple[tuple[Any, ...], ...] | None = None
        self._fuses: dict[int, bool] = {}
        self._native_args: tuple[tuple[Any, ...], ...] | None | bool = False  # False: not asked yet

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> PackedExperts:
        self._rows_args = None  # ``.to()`` / ``.cuda()`` replace the buffers the cached tuple holds
        self._native_args = False
        return super()._apply(fn, recurse)

    def _group(self, gi: int) -> _WidthGroup:
        group = self.groups[gi]
        if not isinstance(group, _WidthGroup):  # only __init__ fills self.groups
            raise TypeError(f"group {gi} is a {type(group).__name__}, not a width group")
        return group

    def formats(self) -> dict[int, str]:
        """{expert: layout name}."""
        return {e: self._group(gi).fmt for e, (gi, _) in self.slot.items()}

    def nbytes(self) -> int:
        """Bytes held: the canonical format's (``canonical_bytes``) plus what the runtime layouts add (groups
        padded to whole groups, int4pack's (scale, zero) pairs, the expert -> group map)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def matmul(self, e: int, x: Tensor) -> Tensor:
        """x (M, in) -> (M, out) through expert e."""
        gi, row = self.slot[e]
        return self._group(gi).matmul(row, x, self.compiled)

    def group_matmul(self, gi: int, rows: Tensor, x: Tensor, workspace: Workspace | None = None) -> Tensor:
        """x (S, in), rows (S,) rows of width group ``gi`` (``row_of`` of the routed experts) -> (S, out)."""
        return self._group(gi).matmul_rows(rows, x, self.compiled, workspace)

    def rows_args(self) -> tuple[tuple[Any, ...], ...]:
        """Per width group, what ``rows_traced`` needs to compute it (see ``_WidthGroup.rows_args``)."""
        if self._rows_args is None:
            self._rows_args = tuple(self._group(gi).rows_args() for gi in range(self.n_groups))
        return self._rows_args

    def native_decode_args(self) -> tuple[tuple[Any, ...], ...] | None:
        """Per width group ``_WidthGroup.native_decode_args`` when every group has them (bfloat16 decode can then
        call ``planes_rows_x`` once per group and projection, no compiled graph), else None. Kept until the
        buffers move."""
        if self._native_args is False:
            args = [self._group(gi).native_decode_args() for gi in range(self.n_groups)]
            self._native_args = None if any(a is None for a in args) else tuple(a for a in args if a is not None)
        return self._native_args if isinstance(self._native_args, tuple) else None

    @property
    def in_width(self) -> int:
        """Inputs the kernels read: the largest padded input width over the width groups (all equal unless
        the group size exceeds the inputs)."""
        return max(self._group(gi).k_pad for gi in range(self.n_groups))

    def fuses_decode(self, n_rows: int) -> bool:
        """Whether ``n_rows`` routed rows are small work for every width group here (all gathered-kernel
        layouts, each call under ``SERIAL_MAX_WORK``): then a whole layer's decode can be one compiled graph
        that runs every group on every row (masked) instead of one kernel call per group and projection, whose
        per-call overhead is most of the time at such shapes."""
        if self.compiled.failed:
            return False
        fuses = self._fuses.get(n_rows)
        if fuses is None:
            groups = [self._group(gi) for gi in range(self.n_groups)]
            fuses = self._fuses[n_rows] = (
                n_rows <= FUSED_MAX_ROWS
                and all(g.fmt in ("int8", "planes") and g.n_out * g.n_in >= COMPILE_MIN_WEIGHTS
                        and n_rows * g.n_out * g.k_pad * self.n_groups < SERIAL_MAX_WORK for g in groups))
        return fuses

    def same_grouping(self, other: PackedExperts) -> bool:
        """Whether ``other`` puts every expert in the same group at the same row (up and down projections of
        one quantization do), so both can be computed per group from one routing."""
        return self.slot == other.slot

    def dequantize_expert(self, e: int) -> Tensor:
        """Expert e in the original layout and dtype (d1, d2), equal to ``LowBitTensor.dequantize_expert``."""
        group = self._group(self.slot[e][0])
        row = self.slot[e][1]
        if group.fmt == "dense":
            return group.dense[row].view(self.dtype)
        w = group.dequantize(row, self.dtype)
        return w.T if self.transposed else w

    def to_lowbit(self) -> LowBitTensor:
        """The canonical ``LowBitTensor`` (bit-exact) on CPU, for saving."""
        n = self.shape[0]
        codes: list[Tensor | None] = [None] * n
        scales: list[Tensor | None] = [None] * n
        zeros: list[Tensor | None] = [None] * n
        dense: list[Tensor | None] = [None] * n
        for e, (gi, row) in self.slot.items():
            group = self._group(gi)
            if group.fmt == "dense":
                dense[e] = group.dense[row].view(self.dtype).cpu().clone()
            else:
                c, s, z = group.canonical(row)
                codes[e], scales[e], zeros[e] = c.cpu(), s.cpu(), None if z is None else z.cpu()
        return LowBitTensor(self.shape, list(self.bits), self.group_size, self.transposed, self.dtype,
                            codes, scales, zeros, dense, self.symmetric)


def _device_of(packed: LowBitTensor) -> torch.device:
    for t in (*packed.codes, *packed.dense):
        if t is not None:
            return t.device
    return torch.device("cpu")
