"""Bytes a compressed model holds, per decision, exactly as ``moeslim.load`` holds them.

A joint plan changes three things a layer holds: the experts it keeps, the width of each kept expert, and
the per-expert rows of the router (and any per-expert bias) that pruning slices away. Everything else
(attention, embeddings, shared experts, dense layers) is untouched, so the held bytes of a plan are

    base - sum_l [ dropped_l * (row_l + dense_l) + sum_{kept e} (dense_l - width_l(b_e)) - maps_l(kept_l) ]

with ``base`` the model's measured bytes (``evaluate.cost.param_bytes``), ``row_l`` the bytes of one expert's
router rows, biases and per-expert norm rows, ``dense_l`` one expert's two weight matrices as stored, and
``width_l(b)`` one expert stored at b bits: codes, float16 group scales and packed zero points, measured on the
real packed format (``LowBitTensor.nbytes`` of one quantized slice of that shape) plus what the CPU runtime layout
adds to it (input padded to whole groups, int4pack's (scale, zero) pairs: ``methods/quant/layout_bytes``), so
scale and zero overhead are included exactly; ``maps_l``: the packed parameters' expert -> group maps, held by every MoE
layer of a quantized model (0 when nothing is quantized). Tests compare this accounting with the bytes measured
on applied models of every family. Low-rank options (``lowrank_options.py``) add ``rank[f]``: one expert held as
whitened-SVD factors at parameter share f, in a layer that holds no packed maps (``saving_lowrank``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from moeslim.methods.quant.fused import KEEP_BITS, quantize_fused
from moeslim.methods.quant.layout_bytes import expert_extra_bytes, map_bytes
from moeslim.models import MoELayer, find_moe_layers
from moeslim.models.expert_math import expert_weight_views, per_expert_norm

__all__ = ["LayerBytes", "layer_bytes", "model_layer_bytes"]


@dataclass(frozen=True)
class LayerBytes:
    """Per-expert bytes of one MoE layer: ``row`` router rows and per-expert biases, ``width[b]`` the two weight
    matrices at width b (``width[16]``: as stored, no quantization)."""

    num_experts: int
    row: int
    width: dict[int, int]
    packed_params: int = 2  # fused expert parameters a quantized layer holds packed (gate_up, down)
    # low-rank options (``lowrank_options.py``): one expert's bytes and (up, down) ranks at each parameter share
    rank: dict[float, int] = field(default_factory=dict)
    rank_ranks: dict[float, tuple[int, int]] = field(default_factory=dict)

    @property
    def dense(self) -> int:
        return self.width[KEEP_BITS]

    def maps(self, kept: int) -> int:
        """Bytes of the packed parameters' expert -> group maps when the layer keeps ``kept`` experts packed."""
        return self.packed_params * map_bytes(kept)

    def saving(self, kept_bits: Sequence[int], packed: bool = True) -> int:
        """Bytes saved against the original layer by keeping ``len(kept_bits)`` experts at those widths;
        ``packed``: the layer's experts are held packed (a quantized model packs every MoE layer), so it also
        holds their maps."""
        dropped = self.num_experts - len(kept_bits)
        maps = self.maps(len(kept_bits)) if packed else 0
        return dropped * (self.row + self.dense) + sum(self.dense - self.width[b] for b in kept_bits) - maps

    def saving_lowrank(self, kept_shares: Sequence[float | None]) -> int:
        """Bytes saved by a low-rank layer keeping ``len(kept_shares)`` experts, each at a rank share (None: dense);
        a low-rank layer holds no packed maps."""
        dropped = self.num_experts - len(kept_shares)
        return dropped * (self.row + self.dense) + sum(0 if f is None else self.dense - self.rank[f]
                                                       for f in kept_shares)

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {"num_experts": self.num_experts, "row": self.row,
                                   "width": {str(b): n for b, n in self.width.items()}}
        if self.rank:
            data["rank"] = {str(f): {"bytes": n, "ranks": list(self.rank_ranks[f])} for f, n in self.rank.items()}
        return data


def _nbytes(t: torch.Tensor) -> int:
    return int(t.numel()) * t.element_size()


def _row_bytes(moe: MoELayer) -> int:
    """Bytes of one expert's slice of every tensor pruning slices, besides the two fused weight matrices: the
    router rows, router / correction biases, per-expert expert biases and per-expert norm rows (what
    ``models.select`` cuts)."""
    views = expert_weight_views(moe)
    skip = {id(views.up), id(views.down)}
    seen: set[int] = set()
    total, n = 0, moe.num_experts
    norm = per_expert_norm(moe.experts)
    for module in (moe.experts, *([] if norm is None else [norm]), *moe.routing_owners()):
        if id(module) in seen:
            continue
        seen.add(id(module))
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        for t in tensors:
            if t is None or id(t) in skip or t.is_meta:
                continue
            if (t.ndim and t.shape[0] == n) or tuple(t.shape) == (1, n):
                total += _nbytes(t) // n
    return total


def _slice_bytes(slice_: torch.Tensor, bits: int, group_size: int, transposed: bool, symmetric: bool,
                 device_type: str = "cpu") -> int:
    """Bytes of one expert matrix (d1, d2) held at ``bits``: the packed format (codes, scales, zeros) plus what
    its runtime layout adds on ``device_type`` (``layout_bytes``)."""
    if bits == KEEP_BITS:
        return _nbytes(slice_)
    zeros = torch.zeros((1, *slice_.shape), dtype=slice_.dtype)  # the size does not depend on the values
    packed = quantize_fused(zeros, [bits], group_size, None, "rtn", transposed=transposed, symmetric=symmetric)
    n_out, n_in = packed.out_in
    extra = expert_extra_bytes(bits, n_out, n_in, group_size, slice_.element_size(), device_type)
    return packed.nbytes() + extra


def layer_bytes(moe: MoELayer, widths: Sequence[int], group_size: int, symmetric: bool) -> LayerBytes:
    """Per-expert bytes of ``moe`` at every width in ``widths`` (16 is always included)."""
    views = expert_weight_views(moe)
    width = {}
    for b in sorted({*widths, KEEP_BITS}):
        width[b] = sum(_slice_bytes(w[0], b, group_size, views.transposed, symmetric) for w in (views.up, views.down))
    return LayerBytes(num_experts=moe.num_experts, row=_row_bytes(moe), width=width)


def model_layer_bytes(model: nn.Module, widths: Sequence[int], group_size: int, symmetric: bool
                      ) -> dict[int, LayerBytes]:
    """{decoder layer index: LayerBytes}; layers of one shape are measured once."""
    cache: dict[tuple[object, ...], LayerBytes] = {}
    out = {}
    for moe in find_moe_layers(model):
        views = expert_weight_views(moe)
        key = (moe.num_experts, tuple(views.up.shape), tuple(views.down.shape), views.up.dtype, _row_bytes(moe))
        if key not in cache:
            cache[key] = layer_bytes(moe, widths, group_size, symmetric)
        out[moe.layer_idx] = cache[key]
    return out
