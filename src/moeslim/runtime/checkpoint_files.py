"""What the writers and readers of moeslim's own checkpoint forms (compact, low-bit, low-rank) share.

Writing: a state dict into one safetensors file (``write_tensors``, read back by ``read_tensors``) with tied
tensors stored once (``tensors_written_once``), floating tensors in the storage dtype
(``cast_floating``), config.json and generation_config.json (``write_config``), config.json saying the storage
dtype (``record_dtype``: ``save_pretrained`` records the dtype of the in-memory parameters; a model computed in
float32 and stored in bfloat16 (``io.checkpoint_dtype``) must say bfloat16, or loaders would take the file for
what it is not). Reading a model built on the meta device: the
buffers no file holds (``materialize_buffers``) and the tokenizer saved beside it (``saved_tokenizer``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim.models.attrs import hf_config

__all__ = ["cast_floating", "materialize_buffers", "read_tensors", "record_dtype", "saved_tokenizer",
           "tensors_written_once", "write_config", "write_tensors"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tensors_written_once(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({name: tensor on the CPU, contiguous}, {alias: name}): a tensor that shares memory with an earlier one
    (tied weights) is not written again but listed as an alias of it, which the readers restore."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors, aliases


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


def write_tensors(state: Mapping[str, torch.Tensor], file: Path, dtype: torch.dtype | None) -> None:
    """Write ``state`` into the safetensors ``file``: tied tensors once (their aliases in the file's metadata),
    floating tensors in ``dtype`` (None: as held)."""
    from safetensors.torch import save_file

    tensors, aliases = tensors_written_once(state)
    save_file(cast_floating(tensors, dtype), str(file), metadata={"format": "pt", "aliases": json.dumps(aliases)})


def read_tensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({name: tensor}, {alias: name}) of a ``write_tensors`` file, every alias holding its tensor again."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        aliases: dict[str, str] = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    for alias, source in aliases.items():
        tensors[alias] = tensors[source]
    return tensors, aliases


def write_config(model: nn.Module, folder: str | Path, dtype: torch.dtype | None) -> None:
    """config.json (saying the storage ``dtype``, see ``record_dtype``) and generation_config.json of ``model``."""
    hf_config(model).save_pretrained(folder)
    record_dtype(folder, dtype)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)


def materialize_buffers(model: nn.Module, root: Path) -> None:
    """Compute the buffers of a model built on the meta device that no file holds (non-persistent: rotary
    frequencies) with the model's own init; refuse a model left with a tensor that has no value."""
    init = getattr(model, "_init_weights", None)
    for module in model.modules():
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if init is None:
            raise ValueError(f"{root}: cannot compute buffers of {type(module).__name__} without _init_weights")
        module.to_empty(device="cpu", recurse=False)
        init(module)
    still = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still:
        raise ValueError(f"{root}: tensors {still[:5]} have no stored or computed value")


def saved_tokenizer(root: Path) -> Any:
    """The tokenizer saved in ``root``, None when it holds none or one transformers cannot read."""
    from transformers import AutoTokenizer

    # Without tokenizer files some model types build an empty tokenizer from config.json alone.
    if not any((root / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError):
        return None
