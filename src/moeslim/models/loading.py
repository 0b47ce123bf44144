"""Resolve a model name and load it with stock transformers (offline-friendly)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moeslim.hub import hub_offline, hub_reachable

DEMO_NAME = "demo"


def demo_model_path() -> Path:
    """Where the bundled demo MoE lives (``moeslim/assets/demo-moe``)."""
    import moeslim

    return Path(moeslim.__file__).parent / "assets" / "demo-moe"


def resolve_model_path(name: str) -> str:
    """'demo' -> the bundled demo model dir; an existing local dir -> itself; else a hub id, as-is."""
    if name == DEMO_NAME:
        return str(demo_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    return name


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer or None) for "demo", a local dir, or a hub id.

    A hub id is only looked up in the local cache when HF_HUB_OFFLINE is set or the hub is unreachable, and a
    cache miss raises a clear error at once instead of waiting on network timeouts.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    local = Path(path).is_dir()
    if name == DEMO_NAME and not local:
        raise FileNotFoundError(
            f"the bundled demo model is missing at {path}; rebuild it with scripts/train_demo_model.py"
        )
    cache_only = not local and not hub_reachable()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=cache_only)
    except OSError as err:
        if cache_only:
            reason = (
                "offline mode is set (HF_HUB_OFFLINE)" if hub_offline() else "the Hugging Face hub cannot be reached"
            )
            raise OSError(
                f"cannot load {name!r}: it is not a local directory, {reason}, "
                "and it is not in the local cache"
            ) from err
        raise
    model = model.to(device).eval()
    return model, _load_tokenizer(path, cache_only)


def _load_tokenizer(path: str, cache_only: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=cache_only)
    except (OSError, ValueError, KeyError):
        return None  # a checkpoint without tokenizer files (e.g. a tiny test model) is still usable
