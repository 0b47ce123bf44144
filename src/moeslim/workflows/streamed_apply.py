"""``apply --stream``: apply prune/skip plans to a checkpoint one decoder layer at a time, shard by shard.

The whole model is never held: for each decoder layer a meta-device skeleton of the *original* model gets
only that layer's tensors from the shards, the plans are applied to it with the ordinary ``apply`` (on meta
tensors slicing is free, so only the real layer costs anything), and the layer's tensors are written, in the
checkpoint's on-disk layout (transformers' own ``revert_weight_conversion``), as one shard. The weights
outside the layers and config.json (with the ``moeslim`` section ``apply`` records) come from one skeleton
with the plans applied. Everything goes into a temp folder that is renamed into place (``outputs.atomic_dir``).
Quantize plans are refused here: their packed experts go through the runtime's own save path.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim.config import ConfigError
from moeslim.plans import Plan

STREAMED_KINDS = ("prune", "skip")


def _skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """A meta-device model of ``config`` (a copy: ``apply`` edits the model's config in place)."""
    from transformers import AutoModelForCausalLM

    from moeslim.models.lazy import params_on_meta

    with params_on_meta():
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype, trust_remote_code=False).eval()


def _apply_all(model: nn.Module, plans: Sequence[Plan], force: bool) -> None:
    from moeslim.appliers import apply

    for plan in plans:
        apply(model, plan, force=force)


def _on_disk(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The checkpoint layout of ``state`` (e.g. Mixtral's per-expert ``w1/w2/w3``), in the storage dtype."""
    from transformers.core_model_loading import revert_weight_conversion

    out = revert_weight_conversion(model, state)
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in out.items()}


def apply_streamed(source: str, plans: Sequence[Plan], out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                   overwrite: bool = False, force: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Apply prune/skip ``plans`` to the checkpoint folder ``source`` and write the result to ``out_dir``.

    Peak memory ~ one decoder layer (in ``dtype``) + the non-layer weights. Tensors are stored in the
    source's storage dtype. The result loads with stock transformers / ``moeslim.load``.
    """
    from safetensors.torch import save_file

    from moeslim.io import checkpoint_dtype
    from moeslim.models import decoder_layers
    from moeslim.models.lazy import CheckpointIndex, free_module, load_streamed
    from moeslim.outputs import atomic_dir

    refused = sorted({p.kind for p in plans} - set(STREAMED_KINDS))
    if refused:
        raise ConfigError(f"apply --stream handles {' and '.join(STREAMED_KINDS)} plans, not {', '.join(refused)}; "
                          "apply quantize plans without --stream")
    storage = checkpoint_dtype(source)
    base, tokenizer = load_streamed(source, dtype)
    original_config = copy.deepcopy(base.config)
    index = CheckpointIndex(original_config._name_or_path, base)
    layer_count = len(decoder_layers(base))
    names = [f"model-{i + 1:05d}-of-{layer_count + 1:05d}.safetensors" for i in range(layer_count + 1)]
    weight_map: dict[str, str] = {}
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        for i in range(layer_count):
            model = _skeleton(original_config, dtype)  # original shapes: layer i's tensors fit
            index.load(model, index.layer_keys[i], "cpu", f"decoder layer {i}")
            _apply_all(model, plans, force)
            layer = decoder_layers(model)[i]
            prefix = next(n for n, m in model.named_modules() if m is layer) + "."
            state = {prefix + k: v for k, v in layer.state_dict().items()}
            tensors = _on_disk(model, state, storage)
            save_file(tensors, str(tmp / names[i]), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, names[i]))
            free_module(layer)
            del model, layer, state, tensors
        _apply_all(base, plans, force)  # the final config (expert counts, moeslim section) + non-layer weights
        layer_params = {id(t) for t in decoder_layers(base).state_dict(keep_vars=True).values()}
        tied = set(getattr(base, "all_tied_weights_keys", {}) or {})
        rest = {k: v for k, v in base.state_dict(keep_vars=True).items()
                if id(v) not in layer_params and k not in tied}
        tensors = _on_disk(base, {k: v.detach() for k, v in rest.items()}, storage)
        save_file(tensors, str(tmp / names[-1]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, names[-1]))
        total = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
        if storage is not None:
            base.config.dtype = storage
        base.config.save_pretrained(tmp)
        generation = Path(original_config._name_or_path) / "generation_config.json"
        if generation.is_file():
            (tmp / generation.name).write_text(generation.read_text())
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
