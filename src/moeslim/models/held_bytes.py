"""The bytes a model holds, measured from its tensors (not from any accounting)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["held_bytes", "held_storages", "storage_key"]


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """What identifies the memory a tensor lives in: tied weights and views share one key."""
    return (str(t.device), t.untyped_storage().data_ptr())


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a tensor's bytes: itself, or a tensor subclass' inner tensors (torchao)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, nn.Parameter):
        return [t]
    names, _ = flatten()
    return [leaf for n in names for leaf in _leaves(getattr(t, n))]


def held_storages(model: nn.Module) -> Iterator[tuple[tuple[str, int], torch.Tensor, int]]:
    """(storage key, a tensor in it, the storage's full bytes) for every storage the parameters and buffers hold,
    each once (tied or shared tensors, views); meta-device placeholders hold nothing and are left out."""
    seen: set[tuple[str, int]] = set()
    for t in (leaf for held in [*model.parameters(), *model.buffers()] for leaf in _leaves(held)):
        if t.is_meta:
            continue
        key = storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        yield key, t, t.untyped_storage().nbytes()


def held_bytes(model: nn.Module) -> int:
    """Total bytes of every storage ``model`` holds (``held_storages``)."""
    return sum(nbytes for _, _, nbytes in held_storages(model))
