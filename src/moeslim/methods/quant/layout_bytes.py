"""Which runtime layout a packed expert gets, and the bytes that layout holds beyond the canonical format.

Stated here, below both the runtime that builds the layouts (``runtime/packed.py``) and the planners that count
held bytes before anything is packed (the joint planner), so the two cannot disagree; the runtime tests check
these numbers against the buffers the layouts hold.
"""

from __future__ import annotations

from moeslim.methods.quant.fused import KEEP_BITS

__all__ = ["INT4_GROUPS", "expert_extra_bytes", "layout_format", "map_bytes"]

INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4pack kernels take


def layout_format(bits: int, n_out: int, n_in: int, group_size: int, device_type: str) -> str:
    """The layout of one expert matrix (n_out, n_in) at ``bits``: dense, canonical, int4pack, int8 or planes."""
    gs = min(group_size, n_in)
    n_groups = -(-n_in // gs)
    if bits == KEEP_BITS:
        return "dense"
    if gs % 8 or (n_out * n_groups) % 8:
        return "canonical"
    if bits == 4 and device_type == "cpu" and gs in INT4_GROUPS and n_out % 16 == 0:
        return "int4pack"
    if bits == 8:
        return "int8"
    return "planes"


def expert_extra_bytes(bits: int, n_out: int, n_in: int, group_size: int, dtype_bytes: int, device_type: str) -> int:
    """Bytes one expert's layout holds beyond its canonical packed bytes: codes of the input padded to whole
    groups, and int4pack's (scale, zero) pairs in the model's dtype (``dtype_bytes`` per value)."""
    fmt = layout_format(bits, n_out, n_in, group_size, device_type)
    gs = min(group_size, n_in)
    n_groups = -(-n_in // gs)
    extra = 0
    if fmt in ("planes", "int8", "int4pack"):
        extra += n_out * (n_groups * gs - n_in) * bits // 8
    if fmt == "int4pack":
        extra += n_groups * n_out * 2 * dtype_bytes
    return extra


def map_bytes(n_experts: int) -> int:
    """Bytes of one packed parameter's expert -> (width group, row) maps: two int64 vectors of E + 1."""
    return 2 * 8 * (n_experts + 1)
