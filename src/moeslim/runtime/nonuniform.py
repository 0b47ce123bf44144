"""The compact form of a non-uniformly pruned model: every MoE layer holds only its own kept experts.

Stock transformers has no per-layer expert count for any supported family (one ``num_experts`` in the config),
so this form is for ``moeslim.load`` only; the padded form (``models.select``, layout="padded") is the one stock
loaders read. Layout of a saved compact checkpoint:

- ``config.json``: the config with the LARGEST per-layer count as the expert count and, in its ``moeslim.prune``
  section, ``layout: "compact"`` and ``experts_per_layer`` {layer: count};
- ``moeslim_nonuniform.safetensors``: the state dict (shared tensors written once, aliases in the metadata).
  It is not named ``model.safetensors`` on purpose: stock ``from_pretrained`` then fails loudly instead of
  loading tensors whose shapes do not fit its config.

``load_compact`` builds the model from the config, cuts every layer to its count (``select_experts`` with
layout="compact"; groups stay balanced where the routing is group-limited) and loads the tensors (strict).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from moeslim.runtime.checkpoint_files import read_tensors, saved_tokenizer, write_config, write_tensors

COMPACT_FILE = "moeslim_nonuniform.safetensors"


def is_compact(section: dict[str, Any]) -> bool:
    """Whether a ``moeslim`` config section describes the compact non-uniform form."""
    prune = section.get("prune") or {}
    return prune.get("layout") == "compact"


def save_compact(model: nn.Module, out_dir: Path, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` (non-uniformly pruned, compact) into ``out_dir``; floating tensors in ``dtype`` if given."""
    out_dir = Path(out_dir)
    write_config(model, out_dir, dtype)
    write_tensors(model.state_dict(), out_dir / COMPACT_FILE, dtype)


def compact_kept(config: Any, counts: dict[int, int]) -> dict[int, list[int]]:
    """The ids a full-size model keeps to get the compact shapes: the first experts (of each group)."""
    from moeslim.models import family_of
    from moeslim.models.select import group_limits

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = int(getattr(text, family_of(text).num_experts_key))
    limits = group_limits(text)
    if limits is None:
        return {idx: list(range(n)) for idx, n in counts.items()}
    per_old = width // limits.n_group
    return {idx: [g * per_old + j for g in range(limits.n_group) for j in range(n // limits.n_group)]
            for idx, n in counts.items()}


def load_compact(path: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                 ) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer or None) of a compact non-uniform checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moeslim.models.select import select_experts

    path = Path(path)
    file = path / COMPACT_FILE
    if not file.is_file():
        raise OSError(f"{path} says it holds a compact non-uniform model but has no {COMPACT_FILE}")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    section = getattr(config, "moeslim", None) or {}
    counts = {int(k): int(v) for k, v in section["prune"]["experts_per_layer"].items()}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    select_experts(model, compact_kept(config, counts), layout="compact", groups=compact_select_groups(config))
    state, _ = read_tensors(file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise OSError(f"{file} does not fit its config.json: missing {sorted(missing)[:5]}, unexpected "
                      f"{sorted(unexpected)[:5]}")
    model = model.to(device).eval()
    return model, saved_tokenizer(path)


def compact_select_groups(config: Any) -> Literal["keep", "auto"]:
    """How ``select_experts`` cuts a compact checkpoint's skeleton: balanced groups where routing is grouped."""
    return "keep" if _grouped(config) else "auto"


def _grouped(config: Any) -> bool:
    from moeslim.models.select import group_limits

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return group_limits(text) is not None


def cut_compact(model: nn.Module, config: Any) -> None:
    """A model pruned to unequal per-layer counts (compact layout) and then quantized or made low-rank: cut the
    meta skeleton's layers to their counts, as ``load_compact`` does, before its tensors are installed."""
    section = getattr(config, "moeslim", None) or {}
    if not is_compact(section):
        return
    from moeslim.models.select import select_experts

    counts = {int(k): int(v) for k, v in section["prune"]["experts_per_layer"].items()}
    select_experts(model, compact_kept(config, counts), layout="compact", groups=compact_select_groups(config))
