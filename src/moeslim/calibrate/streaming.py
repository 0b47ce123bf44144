"""Where the layer-wise runner gets decoder layer ``i`` from: memory, or the checkpoint's shards.

``ResidentLayers``: the whole model is in memory; a layer is moved to the compute device while it runs and
moved back after (``MappedLayers``: placed across devices by accelerate, left where they are).
``ShardedLayers`` (``models/lazy.py``): the model is a meta-device skeleton; a layer is read
from the safetensors shards straight onto the compute device and freed after. The runner does not care which.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch
from torch import nn

from moeslim.models import decoder_layers


class LayerStore(Protocol):
    def on_device(self, index: int, device: torch.device) -> AbstractContextManager[nn.Module]:
        """Decoder layer ``index`` with its weights on ``device`` for the duration of the context."""


class ResidentLayers:
    """Layers of an in-memory model: moved to the compute device for their turn, then back."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = decoder_layers(model)

    @contextmanager
    def on_device(self, index: int, device: torch.device) -> Iterator[nn.Module]:
        layer = self.layers[index]
        original = next(layer.parameters()).device
        layer.to(device)
        try:
            yield layer
        finally:
            layer.to(original)


class MappedLayers:
    """Layers of a model accelerate placed across devices (``--device-map``): each runs where it was put
    (accelerate's hooks move its inputs there), never moved, since one device may not hold it."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = decoder_layers(model)

    @contextmanager
    def on_device(self, index: int, device: torch.device) -> Iterator[nn.Module]:
        yield self.layers[index]


def layer_store(model: nn.Module) -> LayerStore:
    """Streams from the checkpoint the model was built from when its layers are on meta; leaves layers where a
    multi-device ``device_map`` put them; else moves each resident layer to the compute device for its turn."""
    from moeslim.models.lazy import ShardedLayers, is_streamed

    if is_streamed(model):
        return ShardedLayers(model)
    if len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1:
        return MappedLayers(model)
    return ResidentLayers(model)
