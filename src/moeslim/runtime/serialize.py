"""Save/load of models whose runtime state lives beside the standard weights.

Each runtime that needs more than ``save_pretrained`` registers here by its key in the ``moeslim``
config section: ``skip`` re-installs the skipping experts forward; ``quantize`` stores packed low-bit
experts in their own safetensors file and restores them at load; ``lowrank`` stores the whole state dict with
the experts' SVD factors in ``moeslim_lowrank.safetensors`` (``runtime/lowrank.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim.models.attrs import pretrained


def save_pretrained_with_runtime(model: nn.Module, out_dir: Path, dtype: torch.dtype | None = None) -> None:
    """Save ``model`` (and its runtime sections) into ``out_dir``; floating tensors in ``dtype`` if given.

    ``dtype`` is how the checkpoint is stored, not how the model computes: a bfloat16 checkpoint loaded in
    float32 for calibration is written back in bfloat16, so compressing never makes a checkpoint bigger.
    """
    section = getattr(model.config, "moeslim", None) or {}
    from moeslim.runtime.nonuniform import is_compact

    if is_compact(section):
        if "quantize" in section:
            raise ValueError("a compact non-uniformly pruned model cannot be saved quantized yet; prune with "
                             "layout='padded' (where the router allows) or quantize a uniform plan")
        from moeslim.runtime.nonuniform import save_compact

        save_compact(model, out_dir, dtype=dtype)
        return
    if "quantize" in section:
        from moeslim.runtime.lowbit_io import save_quantized

        save_quantized(model, out_dir, dtype=dtype)
        return
    if "lowrank" in section:
        from moeslim.runtime.lowrank import save_lowrank

        save_lowrank(model, out_dir, dtype=dtype)
        return
    if dtype is None:
        pretrained(model).save_pretrained(out_dir)
        return
    pretrained(model).save_pretrained(out_dir, state_dict=_cast_state(model.state_dict(), dtype))
    # save_pretrained records the dtype of the in-memory parameters; the stored tensors are ``dtype``.
    config_file = Path(out_dir) / "config.json"
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    raw["dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` with floating tensors in ``dtype``; tensors that share memory (tied weights) still share it.

    A per-key ``.to(dtype)`` would give ``lm_head.weight`` and the tied embedding two separate copies, which
    ``save_pretrained`` can no longer recognise as tied, so it would store the matrix twice.
    """
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


def load_with_runtime(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                      ) -> tuple[nn.Module, Any]:
    from moeslim.models import load_model, resolve_model_path
    from moeslim.models.loading import check_finite

    path = Path(resolve_model_path(name))
    section = _moeslim_section(path)
    from moeslim.runtime.nonuniform import is_compact, load_compact

    if is_compact(section):
        model, tokenizer = load_compact(path, dtype=dtype, device=device)
    elif "quantize" in section:
        from moeslim.runtime.lowbit_io import load_quantized

        model, tokenizer = load_quantized(path, dtype=dtype, device=device)
    elif "lowrank" in section:
        from moeslim.runtime.lowrank import load_lowrank

        model, tokenizer = load_lowrank(path, dtype=dtype, device=device)
    else:
        model, tokenizer = load_model(name, dtype=dtype, device=device)  # checks its weights itself
    if is_compact(section) or "quantize" in section or "lowrank" in section:
        check_finite([*model.named_parameters(), *model.named_buffers()], name)
    if "skip" in section:
        from moeslim.runtime.odp import install_skip_section

        install_skip_section(model, section["skip"])
    return model, tokenizer


def _moeslim_section(path: Path) -> dict[str, Any]:
    import json

    config_file = path / "config.json"
    if not config_file.is_file():
        return {}
    return json.loads(config_file.read_text()).get("moeslim") or {}
