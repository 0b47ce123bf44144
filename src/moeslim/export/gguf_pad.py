"""One expert count per GGUF file for a model whose layers keep different counts (non-uniform pruning).

llama.cpp reads one ``expert_count`` for all layers. A compact non-uniform model (``select_experts(layout=
"compact")``, loaded by ``moeslim.load``) is written with every layer padded to the largest count, exactly as
``select_experts(layout="padded")`` pads a model for stock transformers: the padding experts have zero weights
and a -inf per-expert bias the router adds before choosing (the logit bias ``ffn_gate_inp.bias`` of gpt-oss, the
selection bias ``exp_probs_b`` of sigmoid routers), so llama.cpp never selects them; group-limited routers are
padded per group. Routers without such a bias are refused with ``padding_refusal``'s reason: their padded
row's logit w.x takes both signs, so no finite row (zeros included) is guaranteed to stay out of the top-k.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from moeslim.export.errors import UnsupportedExportError

__all__ = ["ExpertPadding", "expert_padding", "pad_expert_tensor"]

# GGUF tensors with one row per expert; padding rows hold 0, except the biases the router adds before choosing.
_EXPERT_TENSOR = re.compile(r"blk\.(\d+)\.(ffn_gate_inp|ffn_(?:gate|up|down)_exps|exp_probs_b)\.(weight|bias)")
_NEVER_CHOSEN = {("ffn_gate_inp", "bias"), ("exp_probs_b", "bias")}


@dataclass(frozen=True)
class ExpertPadding:
    """width: the file's expert count; sources: {layer: (width,) long, the layer's expert of each slot, -1 =
    padding}."""

    width: int
    sources: dict[int, torch.Tensor]


def expert_padding(model: nn.Module) -> ExpertPadding | None:
    """The padding a model with unequal per-layer expert counts needs (None when the counts are equal); refuses
    (UnsupportedExportError) a layer whose router cannot hold experts it never selects."""
    from moeslim.models import find_moe_layers
    from moeslim.models.select import group_limits, padded_source, padding_refusal

    layers = find_moe_layers(model)
    counts = {layer.layer_idx: layer.num_experts for layer in layers}
    width = max(counts.values())
    if len(set(counts.values())) == 1:
        return None
    for layer in layers:
        why = padding_refusal(layer) if layer.num_experts < width else None
        if why is not None:
            raise UnsupportedExportError(
                f"llama.cpp needs one expert count per file; this model keeps {counts} experts per layer and layer "
                f"{layer.layer_idx} cannot be padded to {width}: {why.split('; use')[0]} (prune with the same number "
                "of kept experts per layer for this family)")
    limits = group_limits(model)
    return ExpertPadding(width, {idx: torch.tensor(padded_source(range(n), width, limits, n), dtype=torch.long)
                                 for idx, n in counts.items()})


def pad_expert_tensor(name: str, data: torch.Tensor, padding: ExpertPadding | None) -> torch.Tensor:
    """``data`` (GGUF tensor ``name``, PyTorch order: experts first, or (1, E)) padded to ``padding.width``
    experts; other tensors and full layers unchanged."""
    match = _EXPERT_TENSOR.fullmatch(name)
    if padding is None or match is None:
        return data
    source = padding.sources[int(match.group(1))]
    dim = 1 if data.ndim == 2 and data.shape[0] == 1 and match.group(2) == "exp_probs_b" else 0
    if data.shape[dim] == padding.width:
        return data
    fill = float("-inf") if (match.group(2), match.group(3)) in _NEVER_CHOSEN else 0.0
    padded = (source < 0).nonzero().flatten().to(data.device)
    out = data.index_select(dim, source.clamp_min(0).to(data.device))
    return out.index_fill(dim, padded, fill)
