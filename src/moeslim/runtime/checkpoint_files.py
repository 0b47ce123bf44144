"""What every checkpoint writer does to its files: floating tensors in the storage dtype, and config.json saying it.

``save_pretrained`` records the dtype of the in-memory parameters; a model computed in float32 and stored in
bfloat16 (``io.checkpoint_dtype``) must say bfloat16, or loaders would take the file for what it is not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["cast_floating", "record_dtype"]


def cast_floating(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``state`` with floating tensors in ``dtype`` (None: as they are); tensors that share memory (tied weights)
    still share it after the cast.

    A per-key ``.to(dtype)`` would give ``lm_head.weight`` and the tied embedding two separate copies, which
    ``save_pretrained`` can no longer recognise as tied, so it would store the matrix twice.
    """
    if dtype is None:
        return dict(state)
    cast: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tuple(tensor.shape), tensor.stride())
        if key not in cast:
            cast[key] = tensor.to(dtype)
        out[name] = cast[key]
    return out


def record_dtype(folder: str | Path, dtype: torch.dtype | None) -> None:
    """Write the storage ``dtype`` into ``folder/config.json`` (nothing to do for None: stored as computed)."""
    if dtype is None:
        return
    config_file = Path(folder) / "config.json"
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    raw["dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
