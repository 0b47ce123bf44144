"""Quantized fused expert tensors (per-expert widths, PMQ): the packed format and GPTQ/RTN over all experts.

transformers 5 stores the experts of a MoE layer as 3D tensors: ``gate_up_proj [E, 2I, H]`` (out=2I,
in=H) and ``down_proj [E, H, I]`` (out=H, in=I); some families (gpt-oss, Llama-4; ``is_transposed`` on
the experts module) store ``[E, H, 2I]`` and ``[E, I, H]``. With ``transposed=True`` each slice is read
as (in, out), so quantization groups always run along the input dimension, which is what GPTQ's
Hessian (in, in) describes.

Each quantized expert keeps its bit-packed codes, float16 group scales and bit-packed zero points; a
symmetric tensor (``symmetric=True``: every zero point is 2^(b-1), gptq.symmetric_params) stores no zero
points at all; an expert at 16 bits keeps its original slice untouched. ``to_state_dict`` gives flat tensors that
safetensors can save; ``from_state_dict`` rebuilds the same object, so dequantization after a round
trip is bit-identical to dequantization in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from moeslim.methods.quant.gptq import QuantizedWeight, dequantize, gptq_quantize_many, rtn_quantize, symmetric_zero
from moeslim.methods.quant.pack import pack_bits, unpack_bits

__all__ = ["KEEP_BITS", "LowBitTensor", "PackedSlice", "quantize_fused", "quantize_slices"]

KEEP_BITS = 16  # an expert at this width is stored as its original slice
_FORMAT_VERSION = 2  # 2 adds the symmetric flag to qmeta; version 1 files (asymmetric) still load
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SCALE_DTYPE = torch.float16


@dataclass
class LowBitTensor:
    """A fused expert tensor with per-expert storage.

    shape: the original (E, d1, d2) layout; (E, out, in), or (E, in, out) when ``transposed``.
    For expert e: bits[e] in 1..8 gives codes[e] (packed (out * in) codes, row-major over (out, in)),
    scales[e] (out, n_groups) float16 and zeros[e] (packed (out * n_groups) zero points; None for every
    expert when ``symmetric``: the zero point is 2^(bits[e]-1)); bits[e] == 16 gives dense[e], the untouched
    (d1, d2) slice.
    """

    shape: tuple[int, int, int]
    bits: list[int]
    group_size: int
    transposed: bool
    dtype: torch.dtype
    codes: list[torch.Tensor | None]
    scales: list[torch.Tensor | None]
    zeros: list[torch.Tensor | None]
    dense: list[torch.Tensor | None]
    symmetric: bool = False

    @property
    def out_in(self) -> tuple[int, int]:
        """(out, in) of one expert matrix, whatever the stored layout."""
        _, d1, d2 = self.shape
        return (d2, d1) if self.transposed else (d1, d2)

    @property
    def n_groups(self) -> int:
        n_in = self.out_in[1]
        return math.ceil(n_in / min(self.group_size, n_in))

    def stream(self, name: Literal["codes", "scales", "zeros", "dense"], e: int) -> torch.Tensor:
        """Expert e's stored ``codes``/``scales``/``zeros`` (1..8 bits) or ``dense`` slice (16 bits)."""
        t = getattr(self, name)[e]
        if t is None:  # a width stores either the three quantized streams (two: symmetric) or the dense slice
            raise ValueError(f"expert {e} at {self.bits[e]} bits stores no {name}")
        return t

    def zero_points(self, e: int) -> torch.Tensor:
        """Expert e's (out, n_groups) uint8 zero points: unpacked from storage, or 2^(b-1) when symmetric."""
        n_out = self.out_in[0]
        b = self.bits[e]
        if self.symmetric:
            device = self.stream("codes", e).device
            return torch.full((n_out, self.n_groups), symmetric_zero(b), dtype=torch.uint8, device=device)
        return unpack_bits(self.stream("zeros", e), b, n_out * self.n_groups).reshape(n_out, self.n_groups)

    def dequantize_expert(self, e: int) -> torch.Tensor:
        """Expert e's slice in the original layout and dtype: (d1, d2)."""
        if self.bits[e] == KEEP_BITS:
            return self.stream("dense", e)
        n_out, n_in = self.out_in
        b = self.bits[e]
        codes = unpack_bits(self.stream("codes", e), b, n_out * n_in).reshape(n_out, n_in)
        w = dequantize(codes, self.stream("scales", e), self.zero_points(e), self.group_size).to(self.dtype)
        return w.T if self.transposed else w

    def dequantize(self) -> torch.Tensor:
        """The whole tensor (E, d1, d2) in the original layout and dtype."""
        return torch.stack([self.dequantize_expert(e) for e in range(self.shape[0])])

    def nbytes(self) -> int:
        """Bytes actually held by codes, scales, zeros and dense slices (metadata excluded)."""
        parts = [*self.codes, *self.scales, *self.zeros, *self.dense]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat, safetensors-friendly tensors named ``{prefix}.q*``, contiguous and unshared."""
        dtype_id = _DTYPES.index(self.dtype)
        meta = [_FORMAT_VERSION, *self.shape, self.group_size, int(self.transposed), dtype_id, int(self.symmetric)]
        sd = {
            f"{prefix}.qmeta": torch.tensor(meta, dtype=torch.int64),
            f"{prefix}.qbits": torch.tensor(self.bits, dtype=torch.int64),
        }
        for e, b in enumerate(self.bits):
            if b == KEEP_BITS:
                sd[f"{prefix}.qdense.{e}"] = self.stream("dense", e).contiguous().clone()
            else:
                sd[f"{prefix}.qcodes.{e}"] = self.stream("codes", e).clone()
                sd[f"{prefix}.qscales.{e}"] = self.stream("scales", e).contiguous().clone()
                if not self.symmetric:
                    sd[f"{prefix}.qzeros.{e}"] = self.stream("zeros", e).clone()
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str) -> LowBitTensor:
        """Inverse of ``to_state_dict``; raises KeyError naming the first missing tensor."""
        meta = [int(v) for v in _get(sd, f"{prefix}.qmeta")]
        if meta[0] not in (1, _FORMAT_VERSION):
            raise ValueError(f"unsupported low-bit format version {meta[0]} for {prefix}")
        symmetric = meta[0] >= 2 and bool(meta[7])
        shape, group_size = (meta[1], meta[2], meta[3]), meta[4]
        bits = [int(b) for b in _get(sd, f"{prefix}.qbits")]
        n = shape[0]
        codes: list[torch.Tensor | None] = [None] * n
        scales: list[torch.Tensor | None] = [None] * n
        zeros: list[torch.Tensor | None] = [None] * n
        dense: list[torch.Tensor | None] = [None] * n
        for e, b in enumerate(bits):
            if b == KEEP_BITS:
                dense[e] = _get(sd, f"{prefix}.qdense.{e}")
            else:
                codes[e] = _get(sd, f"{prefix}.qcodes.{e}")
                scales[e] = _get(sd, f"{prefix}.qscales.{e}")
                zeros[e] = None if symmetric else _get(sd, f"{prefix}.qzeros.{e}")
        return cls(shape, bits, group_size, bool(meta[5]), _DTYPES[meta[6]], codes, scales, zeros, dense, symmetric)


def _get(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise KeyError(f"missing tensor {key!r} in low-bit state dict")
    return sd[key]


def _check_fused_args(
    tensor: torch.Tensor, bits: Sequence[int], hessians: Sequence[torch.Tensor | None] | None, method: str
) -> None:
    if tensor.ndim != 3:
        raise ValueError(f"expected a fused expert tensor (E, d1, d2), got shape {tuple(tensor.shape)}")
    if tensor.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {tensor.dtype}; expected one of {_DTYPES}")
    if len(bits) != tensor.shape[0]:
        raise ValueError(f"need one width per expert: {tensor.shape[0]} experts, {len(bits)} widths")
    bad = [b for b in bits if b != KEEP_BITS and not (isinstance(b, int) and 1 <= b <= 8)]
    if bad:
        raise ValueError(f"widths must be integers in 1..8 or {KEEP_BITS}, got {bad}")
    if method not in ("gptq", "rtn"):
        raise ValueError(f"method must be 'gptq' or 'rtn', got {method!r}")
    if hessians is not None and len(hessians) != tensor.shape[0]:
        raise ValueError(f"need one Hessian (or None) per expert, got {len(hessians)}")


PackedSlice = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # packed codes, float16 scales, packed zeros


def _has_tokens(hessian: torch.Tensor) -> bool:
    return float(torch.diag(hessian).sum()) != 0.0


def quantize_slices(
    slices: Sequence[torch.Tensor],
    bits: int,
    group_size: int,
    hessians: Sequence[torch.Tensor | None] | None,
    method: Literal["gptq", "rtn"],
    *,
    transposed: bool = False,
    act_order: bool = False,
    percdamp: float = 0.01,
    symmetric: bool = False,
) -> list[PackedSlice]:
    """Expert slices of one shape (stored layout), all at ``bits`` 1..8 -> each one's (packed codes, float16
    scales, packed zero points or None when ``symmetric``), as ``quantize_fused`` stores them.

    GPTQ runs as batches over the slices (``gptq_quantize_many``: each result that of its slice alone). An expert
    that saw no calibration token has H == 0: GPTQ would zero every (dead) column, so such experts, like experts
    without a Hessian, fall back to round-to-nearest.
    """
    mats = [w.detach().float().T if transposed else w.detach().float() for w in slices]  # (out, in) each
    fitted = {i: h for i, h in enumerate(hessians or []) if method == "gptq" and h is not None and _has_tokens(h)}
    results: list[QuantizedWeight | None] = [None] * len(mats)
    gptq = gptq_quantize_many([mats[i] for i in fitted], list(fitted.values()), bits, group_size, percdamp=percdamp,
                              act_order=act_order, scale_dtype=_SCALE_DTYPE, symmetric=symmetric)
    for i, done in zip(fitted, gptq, strict=True):
        results[i] = done
    out: list[PackedSlice] = []
    for W, result in zip(mats, results, strict=True):
        q = result if result is not None else rtn_quantize(W, bits, group_size, scale_dtype=_SCALE_DTYPE,
                                                           symmetric=symmetric)
        out.append((pack_bits(q.codes, bits), q.scales.to(_SCALE_DTYPE), None if symmetric else pack_bits(q.zeros,
                                                                                                          bits)))
    return out


def quantize_fused(
    tensor: torch.Tensor,
    bits: Sequence[int],
    group_size: int = 128,
    hessians: Sequence[torch.Tensor | None] | None = None,
    method: Literal["gptq", "rtn"] = "gptq",
    *,
    transposed: bool = False,
    act_order: bool = False,
    percdamp: float = 0.01,
    symmetric: bool = False,
) -> LowBitTensor:
    """Quantize each expert slice of a fused tensor at its own width.

    Args:
        tensor: (E, out, in), or (E, in, out) with ``transposed=True``.
        bits: (E,) width per expert, 1..8, or 16 to keep the slice as it is.
        group_size: weights per group along the input dimension (one group when in <= group_size).
        hessians: per expert (in, in) input Hessian or None; required for GPTQ, an expert without one
            (or with an all-zero one: no calibration tokens) falls back to round-to-nearest.
        method: "gptq" or "rtn".
        transposed: the family stores expert matrices as (in, out).
        act_order: GPTQ column order by decreasing Hessian diagonal (static groups).
        percdamp: GPTQ damping, as a fraction of the mean Hessian diagonal.
        symmetric: symmetric grids (zero point 2^(b-1), not stored); widths 2..8.

    Scales are rounded to float16 before quantizing, so GPTQ's error feedback sees the stored scales.
    """
    _check_fused_args(tensor, bits, hessians, method)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    n = tensor.shape[0]
    out = LowBitTensor(
        shape=(int(tensor.shape[0]), int(tensor.shape[1]), int(tensor.shape[2])),
        bits=[int(b) for b in bits],
        group_size=group_size,
        transposed=transposed,
        dtype=tensor.dtype,
        codes=[None] * n,
        scales=[None] * n,
        zeros=[None] * n,
        dense=[None] * n,
        symmetric=symmetric,
    )
    for e, b in enumerate(out.bits):
        if b == KEEP_BITS:
            out.dense[e] = tensor[e].detach().clone()
    for b in sorted(set(out.bits) - {KEEP_BITS}):  # the experts of one width GPTQ'd as batches
        experts = [e for e, eb in enumerate(out.bits) if eb == b]
        packed = quantize_slices([tensor[e] for e in experts], b, group_size,
                                 None if hessians is None else [hessians[e] for e in experts], method,
                                 transposed=transposed, act_order=act_order, percdamp=percdamp, symmetric=symmetric)
        for e, (codes, scales, zeros) in zip(experts, packed, strict=True):
            out.codes[e], out.scales[e], out.zeros[e] = codes, scales, zeros
    return out
