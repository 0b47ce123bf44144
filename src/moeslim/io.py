"""Atomic save and load with runtime re-install.

A pruned model is a plain transformers checkpoint. What stock transformers cannot express (skip
thresholds, per-expert bits) lives in the ``moeslim`` section of config.json and is re-installed by
:func:`load`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def save(model: nn.Module, out_dir: str | Path, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write the checkpoint into a temp dir beside ``out_dir``, fsync, then rename it into place.

    A killed run leaves at most a hidden ``.tmp`` folder, never a half-written checkpoint.
    """
    from moeslim.runtime.serialize import save_pretrained_with_runtime

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_pretrained_with_runtime(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
         ) -> tuple[nn.Module, Any]:
    """Load a checkpoint (or ``demo`` / hub id) and re-install what its ``moeslim`` section describes."""
    from moeslim.runtime.serialize import load_with_runtime

    return load_with_runtime(str(path), dtype=dtype, device=device)
