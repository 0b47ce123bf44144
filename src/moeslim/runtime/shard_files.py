"""Writing checkpoint shards: tensors in the checkpoint's own layout, and safetensors files joined without loading.

Shared by the streamed writers (``apply --stream``, ``export --stream``), which write each decoder layer as a
part file and join the parts at the end.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["merge_safetensors", "on_disk_layout", "safetensors_header"]

_CHUNK = 64 << 20  # bytes copied at a time when joining files


def on_disk_layout(model: Any, state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The checkpoint layout of ``state`` (e.g. Mixtral's per-expert ``w1/w2/w3``), in the storage dtype."""
    from transformers.core_model_loading import revert_weight_conversion

    out = revert_weight_conversion(model, state)
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in out.items()}


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header without metadata, byte offset of the data section) of a safetensors file."""
    with path.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def merge_safetensors(parts: Sequence[Path], out: Path, metadata: dict[str, str]) -> None:
    """Write the tensors of ``parts`` (in their order) into one safetensors file, copying bytes, not tensors.

    The tensors are never loaded: the merged header is built from the parts' headers and each tensor's bytes
    are copied in chunks, so memory stays at one chunk whatever the size of the files.
    """
    entries: list[tuple[str, dict[str, Any], Path, int]] = []
    for part in parts:
        header, data_start = safetensors_header(part)
        entries.extend((name, info, part, data_start) for name, info in header.items())
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"tensors appear in several parts of {out.name}")
    merged: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, info, _, _ in entries:
        begin, end = info["data_offsets"]
        merged[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    blob = json.dumps(merged, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with out.open("wb") as sink:
        sink.write(struct.pack("<Q", len(blob)))
        sink.write(blob)
        for _, info, part, data_start in entries:
            begin, end = info["data_offsets"]
            with part.open("rb") as source:
                source.seek(data_start + begin)
                left = end - begin
                while left:
                    chunk = source.read(min(left, _CHUNK))
                    if not chunk:
                        raise OSError(f"{part} is shorter than its header says")
                    sink.write(chunk)
                    left -= len(chunk)

