"""Atomic save and load with runtime re-install.

A pruned model is a plain transformers checkpoint. What stock transformers cannot express (skip
thresholds, per-expert bits) lives in the ``moeslim`` section of config.json and is re-installed by
:func:`load`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def save(model: nn.Module, out_dir: str | Path, tokenizer: Any = None, overwrite: bool = False,
         inputs: Iterable[str | Path] = (), dtype: torch.dtype | None = None) -> Path:
    """Write the checkpoint into a temp folder beside ``out_dir``, fsync, then put it in place atomically.

    A killed run leaves at most a hidden temp folder (removed by the next run), never a half-written
    checkpoint. ``overwrite`` replaces only an existing checkpoint folder (see ``moeslim.outputs``);
    ``inputs`` are paths the run read (model folder, plans), which ``out_dir`` must not contain.
    ``dtype``: storage dtype of floating tensors (e.g. ``checkpoint_dtype(source)``, so a bfloat16 source
    computed in float32 is written back in bfloat16); None writes them as the model holds them.
    """
    from moeslim.outputs import atomic_dir
    from moeslim.runtime.serialize import save_pretrained_with_runtime

    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        save_pretrained_with_runtime(model, tmp, dtype=dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
         ) -> tuple[nn.Module, Any]:
    """Load a checkpoint (or ``demo`` / hub id) and re-install what its ``moeslim`` section describes."""
    from moeslim.runtime.serialize import load_with_runtime

    return load_with_runtime(str(path), dtype=dtype, device=device)


def checkpoint_dtype(name: str | Path) -> torch.dtype | None:
    """The floating dtype a local checkpoint (or ``demo``) stores its weights in, or None if unknown.

    Read from the safetensors headers (what is on disk), not config.json, which may say otherwise.
    """
    from collections import Counter

    from safetensors import safe_open

    from moeslim.models import resolve_model_path

    folder = Path(resolve_model_path(str(name)))
    counts: Counter[str] = Counter()
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    sliced = handle.get_slice(key)
                    counts[sliced.get_dtype()] += int(torch.Size(sliced.get_shape()).numel())
        except Exception:  # noqa: BLE001 - unreadable here means unknown; loading reports the damage
            return None
    floating = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    found = [(n, code) for code, n in counts.items() if code in floating]
    return floating[max(found)[1]] if found else None
