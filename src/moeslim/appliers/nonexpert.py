"""Hold the weights outside the experts packed: attention projections per decoder layer, and the token embedding with
the output head (one storage when they are tied). Round-to-nearest, asymmetric min-max groups along the input
(hidden) dimension, the experts' packed format; data-free, so applied after any calibrated step.

Attention projections become ``LowBitLinear`` (``runtime/lowbit_io.install_lowbit``); the embedding and head
become ``LowBitEmbedding`` / ``LowBitHead`` over one ``PackedRows`` (``runtime/packed_rows.py``). The returned
section (``packed_nonexpert``) records the widths and, for loading, which weight names compute from which
stored rows (``rows``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from moeslim.methods.quant.fused import KEEP_BITS, quantize_fused
from moeslim.models.nonexpert import attention_linears_by_layer, token_matrices
from moeslim.plans import PlanError
from moeslim.runtime.lowbit_io import install_lowbit, rows_names
from moeslim.runtime.packed_rows import PackedRows, install_rows, quantize_rows

__all__ = ["pack_attention", "pack_embedding", "pack_nonexpert"]


def _weight(module: nn.Module) -> Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.is_meta:
        raise PlanError(f"{type(module).__name__} holds no float weight to pack (already packed?)")
    return weight


def pack_attention(model: nn.Module, bits: dict[int, int], group_size: int) -> None:
    """Every attention projection of decoder layer l at ``bits[l]`` (16: left as it is)."""
    found = attention_linears_by_layer(model)
    for idx, b in bits.items():
        if idx not in found:
            raise PlanError(f"attention width for decoder layer {idx}, which has no attention projections "
                            f"(layers with some: {sorted(found)})")
        if int(b) == KEEP_BITS:
            continue
        for _, linear in found[idx]:
            install_lowbit(linear, "weight", quantize_fused(_weight(linear).detach()[None], [int(b)], group_size,
                                                            None, "rtn"))


def pack_embedding(model: nn.Module, bits: int, group_size: int) -> None:
    """The token embedding and output head at ``bits``: one ``PackedRows`` when tied, one each otherwise."""
    if int(bits) == KEEP_BITS:
        return
    matrices = token_matrices(model)
    try:
        storage = PackedRows(quantize_rows(_weight(matrices.embedding), int(bits), group_size))
        install_rows(matrices.embedding, storage)
        if matrices.head is not None:
            head = storage if matrices.tied else PackedRows(quantize_rows(_weight(matrices.head), int(bits),
                                                                          group_size))
            install_rows(matrices.head, head)
    except (TypeError, ValueError) as err:
        raise PlanError(f"cannot hold the token embedding packed: {err}") from err


def pack_nonexpert(model: nn.Module, attention: dict[int, int], embedding: int | None, group_size: int
                   ) -> dict[str, Any]:
    """Both of the above; the ``packed_nonexpert`` config section (empty when nothing was packed)."""
    pack_attention(model, attention, group_size)
    if embedding is not None:
        pack_embedding(model, embedding, group_size)
    packed_attention = {str(i): int(b) for i, b in sorted(attention.items()) if int(b) != KEEP_BITS}
    rows = rows_names(model)
    if not packed_attention and not rows:
        return {}
    return {"packed_nonexpert": {"group_size": group_size, "attention": packed_attention,
                                 "embedding": None if embedding is None else int(embedding), "rows": rows}}
