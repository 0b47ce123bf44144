"""Layer-wise calibration: capture the first decoder layer's inputs once, then run one layer at a time.

Only the current layer's activations live in memory, and only the current layer needs to be on the
accelerator, so the model can be larger than GPU memory. (Loading each layer's weights from disk as it
is reached: ``calibrate/streaming.py``; splitting the batches over torch.distributed processes:
``calibrate/distributed.py``.) Observers hooked on the MoE block see the block's input
tokens; a per-layer callback (the method's search) may return an override of the block's forward that
``propagate="compressed"`` feeds to the next layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from moeslim.calibrate.distributed import batch_share, sync_observers, world
from moeslim.calibrate.observers import Observer
from moeslim.calibrate.resume import LayerCheckpoint
from moeslim.calibrate.streaming import layer_store
from moeslim.models import MoELayer, UnsupportedModelError, check_layerwise, decoder_layers, find_moe_layers
from moeslim.models.attrs import pretrained, tensor_attr
from moeslim.models.loading import check_context, check_token_ids
from moeslim.progress import note as progress_note
from moeslim.progress import steps

Propagate = Literal["original", "compressed"]
BlockOverride = Callable[[torch.Tensor], torch.Tensor]  # (T, H) -> (T, H)


@dataclass(frozen=True)
class LayerDecision:
    """What a method decided for one layer: a result to keep, and optionally the compressed block."""

    result: Any
    override: BlockOverride | None = None


class _StopForward(Exception):
    """Raised by the last recorder once every decoder layer's arguments are recorded."""


@dataclass
class _Batch:
    hidden: torch.Tensor  # (B, S, H)
    layer_kwargs: list[dict[str, Any]]  # what the model passes each decoder layer (masks, positions, ...)
    first_window: int = 0  # index of this batch's first window in the calibration set


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during capture: records its arguments, computes nothing.

    The model's own forward decides what each layer gets (sliding vs full attention masks, per-layer
    inputs of hybrids), so recording every layer's arguments keeps those differences; attribute reads the
    forward makes on its layers (``attention_type``, ...) fall through to the real layer.
    """

    def __init__(self, layer: nn.Module, index: int, last: int, sink: list[dict[str, Any]]) -> None:
        super().__init__()
        object.__setattr__(self, "_wrapped", layer)  # not a submodule: the real layer stays where it is
        self._index, self._last, self._sink = index, last, sink

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache")}
        self._sink.append({"hidden": hidden, **rest} if self._index == 0 else rest)
        if self._index == self._last:
            raise _StopForward
        return hidden


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int,
                         share: range | None = None) -> list[_Batch]:
    """The first decoder layer's hidden states and every layer's other arguments, per batch.  # (N, L)

    Runs the model's forward with each decoder layer replaced by a recorder (no layer computes, so layer
    weights may still be on the meta device when streamed); the embedding and the model's mask / position
    code run as in a real forward.
    """
    layers = decoder_layers(model)
    originals = list(layers)
    batches: list[_Batch] = []
    # (decoder layers may be on meta: streamed)
    device = tensor_attr(pretrained(model).get_input_embeddings(), "weight").device
    starts = range(0, input_ids.shape[0], batch_size)
    try:
        for start in (starts[i] for i in (share if share is not None else range(len(starts)))):
            sink: list[dict[str, Any]] = []
            for i, layer in enumerate(originals):
                layers[i] = _Recorder(layer, i, len(originals) - 1, sink)
            try:
                model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            except (TypeError, ValueError) as err:  # the forward wanted more back from a layer than its output
                raise UnsupportedModelError(
                    f"{type(model).__name__}: its forward carries values from one decoder layer to the next "
                    f"({err}); layer-wise calibration cannot replay its layers one at a time") from err
            if len(sink) != len(originals):
                raise UnsupportedModelError(
                    f"{type(model).__name__} called {len(sink)} of its {len(originals)} decoder layers in its "
                    "forward; layer-wise calibration cannot replay it")
            hidden = sink[0].pop("hidden").detach()
            batches.append(_Batch(hidden=hidden, layer_kwargs=sink, first_window=start))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return batches


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@contextmanager
def _block_hook(block: nn.Module, on_input: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call ``on_input`` with the block's (T, H) input; a tensor it returns replaces the block output."""

    def hook(_module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        x = args[0]
        replaced = on_input(x.reshape(-1, x.shape[-1]))
        if replaced is None:
            return None
        new = replaced.reshape(x.shape).to(x.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _run_layer(layer: nn.Module, index: int, batch: _Batch, device: torch.device,
               hidden: torch.Tensor | None = None) -> torch.Tensor:
    source = batch.hidden if hidden is None else hidden
    out = layer(source.to(device), **_to_device(batch.layer_kwargs[index], device))
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _original_pass(layer: nn.Module, index: int, moe: MoELayer | None, hidden: list[torch.Tensor],
                   batches: list[_Batch], device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Run the original layer on the original stream: (its outputs, the MoE block's (T, H) outputs per batch)."""
    captured: list[torch.Tensor] = []

    def record(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        out = moe.block_output(output) if moe is not None else output
        captured.append(out.reshape(-1, out.shape[-1]).detach())

    handle = moe.block.register_forward_hook(record) if moe is not None else None
    try:
        outputs = [_run_layer(layer, index, b, device, h).to(h.device) for h, b in zip(hidden, batches, strict=True)]
    finally:
        if handle is not None:
            handle.remove()
    return outputs, (captured if moe is not None else None)


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    input_ids: torch.Tensor,
    make_observers: Callable[[MoELayer], Sequence[Observer]],
    on_layer: Callable[[MoELayer, Sequence[Observer]], LayerDecision] | None = None,
    propagate: Propagate = "original",
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
    checkpoint: LayerCheckpoint | None = None,
    targets: bool = False,
    label: str = "calibrate",
) -> dict[int, Any]:
    """Observe every MoE layer on ``input_ids`` (N, L); return {decoder layer index: decision result}.

    ``targets`` (with ``propagate="compressed"``): also run the ORIGINAL model alongside and, before each
    observed batch, hand every observer that has ``at_target`` the original block output on the original
    inputs of that batch (T, H): progressive pruning scores against it (the paper's target F(X)).

    ``on_layer`` runs right after a layer is observed (so only that layer's observations are alive)
    and may return an override of the block forward; with ``propagate="compressed"`` the next layer
    sees the overridden output, with ``"original"`` it sees the original model's output.
    ``checkpoint``: write each finished layer's result and output there, and resume from what it holds.
    ``progress``: one line (or a bar on a terminal) per finished layer on stderr, named ``label``; a resumed
    run first says at which layer it resumed.
    """
    if propagate not in ("original", "compressed"):
        raise ValueError(f"propagate={propagate!r} must be 'original' or 'compressed'")
    if targets and propagate != "compressed":
        raise ValueError("targets=True needs propagate='compressed' (with 'original' the inputs are the originals)")
    check_context(model, int(input_ids.shape[-1]), "calibration seq_len")
    check_token_ids(model, input_ids)
    check_layerwise(model)  # families whose decoder layers cannot run one at a time are refused here
    device = torch.device(device) if device is not None else default_device()
    was_training = model.training
    model.eval()
    moe_by_index = {layer.layer_idx: layer for layer in find_moe_layers(model)}
    # Under torchrun each process runs a contiguous share of the batches; observers merge before deciding.
    share = batch_share(-(-int(input_ids.shape[0]) // batch_size), world())
    batches = capture_layer_inputs(model, input_ids, batch_size, share)
    results: dict[int, Any] = {}
    first = 0
    restored = checkpoint.restore() if checkpoint is not None else None
    originals = [b.hidden for b in batches] if targets else None  # the original model's stream
    if restored is not None:  # a killed run: its results and the inputs of its next layer
        results, last, hidden = restored
        first = last + 1
        if originals is not None:  # saved as [compressed..., original...]
            hidden, originals = hidden[: len(batches)], list(hidden[len(batches):])
        for batch, h in zip(batches, hidden, strict=True):
            batch.hidden = h.to(batch.hidden.device, batch.hidden.dtype)
    store = layer_store(model)
    layers = decoder_layers(model)
    shown = progress and world().is_main  # under torchrun, rank 0 speaks for every process
    if checkpoint is not None:
        progress_note(f"{label}: resumed at layer {first} of {len(layers)} (layers 0-{first - 1} restored from "
                      f"{checkpoint.folder})" if restored is not None else
                      f"{label}: nothing to resume in {checkpoint.folder}; starting at layer 0 of {len(layers)}",
                      enabled=shown)
    for index in steps(range(first, len(layers)), label, len(layers), first=first, enabled=shown):
        moe = moe_by_index.get(index)
        with store.on_device(index, device) as layer:
            block_targets = None
            if originals is not None:
                originals, block_targets = _original_pass(layer, index, moe, originals, batches, device)
            if moe is None:
                outputs = [_run_layer(layer, index, b, device) for b in batches]
            else:
                outputs, results[index] = _observe_layer(layer, index, moe, batches, make_observers, on_layer,
                                                         propagate, device, block_targets)
        for batch, out in zip(batches, outputs, strict=True):
            batch.hidden = out.to(batch.hidden.device)
        if checkpoint is not None:
            checkpoint.save_layer(index, results, [b.hidden for b in batches] + (originals or []))
    model.train(was_training)
    return results


def _observe_layer(
    layer: nn.Module,
    index: int,
    moe: MoELayer,
    batches: list[_Batch],
    make_observers: Callable[[MoELayer], Sequence[Observer]],
    on_layer: Callable[[MoELayer, Sequence[Observer]], LayerDecision] | None,
    propagate: Propagate,
    device: torch.device,
    targets: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], Any]:
    observers = list(make_observers(moe))

    def observe(x: torch.Tensor) -> None:
        for observer in observers:
            observer.observe(moe, x)

    outputs = []
    with _block_hook(moe.block, observe):
        for i, batch in enumerate(batches):
            for observer in observers:  # which windows the next block input holds (position-keyed samples)
                note = getattr(observer, "at_batch", None)
                if note is not None:
                    note(batch.first_window, int(batch.hidden.shape[0]))
                target_note = getattr(observer, "at_target", None)
                if targets is not None and target_note is not None:
                    target_note(targets[i])
            outputs.append(_run_layer(layer, index, batch, device))
    sync_observers(observers, device)
    decision = on_layer(moe, observers) if on_layer is not None else LayerDecision(
        result={o.key: o.result() for o in observers})
    if propagate == "compressed" and decision.override is not None:
        override = decision.override
        with _block_hook(moe.block, override):
            outputs = [_run_layer(layer, index, b, device) for b in batches]
    return outputs, decision.result
