"""Streamed checkpoints: a model skeleton on the meta device, decoder layers read from the shards on demand.

``load_streamed`` builds the model with every parameter on the meta device (no memory), loads the weights
that are not part of a decoder layer (embeddings, final norm, head) once, and leaves the decoder layers
empty. ``ShardedLayers`` then loads one decoder layer's tensors straight from the safetensors shards when the
layer-wise runner reaches it, and frees them after. Peak memory is one layer plus what the runner holds.

Which checkpoint tensors belong to layer ``i`` is decided on the *converted* key (the name the tensor has in
the model after transformers' own renaming/fusing rules, e.g. Mixtral's legacy
``block_sparse_moe.experts.N.w1`` -> ``mlp.experts.gate_up_proj``), and the tensors go through transformers'
own ``convert_and_load_state_dict_in_model``, so every family loads exactly as ``from_pretrained`` loads it.
Buffers are built for real (not on meta): non-persistent ones (rotary ``inv_freq``) are not in checkpoints
and must be computed by the modules' constructors, as accelerate's ``init_empty_weights`` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .layer import decoder_layers
from .loading import check_finite, quiet_loading, resolve_model_path


class StreamingError(OSError):
    """The checkpoint cannot be streamed (no local safetensors, or keys that fit no parameter)."""


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device; buffers stay real (computed by their constructors).

    The recipe of accelerate's ``init_empty_weights(include_buffers=False)``: ``register_parameter`` moves each
    new parameter to meta as it is registered (a large ``torch.empty`` is never touched, so it costs no RSS).
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            current = module._parameters[name]
            assert current is not None
            module._parameters[name] = type(current)(current.to("meta"), requires_grad=current.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def is_streamed(model: nn.Module) -> bool:
    """True when some decoder-layer parameter is on the meta device (a skeleton from ``load_streamed``)."""
    return any(p.is_meta for p in decoder_layers(model).parameters())


def checkpoint_shards(folder: Path) -> list[Path]:
    """The safetensors files of the transformers checkpoint in ``folder`` (its index's, else every one there)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


class CheckpointIndex:
    """Which safetensors file holds each checkpoint key, and which keys belong to each decoder layer.

    Built from the shard headers only (no tensor is read). ``layer_keys[i]``: checkpoint keys whose converted
    name lies under decoder layer ``i``; ``other_keys``: everything else (loaded once).
    """

    def __init__(self, folder: str | Path, model: Any) -> None:  # a transformers PreTrainedModel
        from safetensors import safe_open
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.folder = Path(folder)
        files = checkpoint_shards(self.folder)
        if not files:
            raise StreamingError(f"{self.folder} has no .safetensors files; streaming reads safetensors shards")
        self.file_of: dict[str, Path] = {}
        for file in files:
            with _damaged_shard(file), safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    self.file_of[key] = file
        self.weight_mapping: Any = get_model_conversion_mapping(model)
        renamings = [m for m in self.weight_mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.weight_mapping if isinstance(m, WeightConverter)]
        meta_state = model.state_dict()
        names = {id(m): n for n, m in model.named_modules()}
        prefixes = [names[id(layer)] + "." for layer in decoder_layers(model)]
        self.layer_keys: list[list[str]] = [[] for _ in prefixes]
        self.other_keys: list[str] = []
        for key in self.file_of:
            target, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
            owner = next((i for i, p in enumerate(prefixes) if target.startswith(p)), None)
            (self.other_keys if owner is None else self.layer_keys[owner]).append(key)
        self.layer_prefixes = prefixes
        empty = [i for i, keys in enumerate(self.layer_keys) if not keys]
        if empty:
            raise StreamingError(f"no checkpoint tensor of {self.folder} maps to decoder layer(s) {empty}; "
                                 "the checkpoint does not fit this model's config")

    def load(self, model: Any, keys: list[str], device: torch.device | str, where: str) -> None:
        """Read ``keys`` from the shards into ``model`` (converted by transformers' rules) on ``device``.

        The shard files are memory-mapped only for this call: closing them unmaps the pages, so the process
        does not keep every layer it has read resident.
        """
        from safetensors import safe_open
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        config = LoadStateDictConfig(device_map={"": str(device)}, dtype=_floating_dtype(model),
                                     weight_mapping=self.weight_mapping)
        with ExitStack() as stack:
            files = sorted({self.file_of[k] for k in keys})
            stack.enter_context(_damaged_shard(*files))
            handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}
            state = {k: handles[self.file_of[k]].get_slice(k) for k in keys}
            with _quiet_transformers():
                info, _ = convert_and_load_state_dict_in_model(model, state, config)
        problems = sorted(info.unexpected_keys) + [str(m[0]) for m in info.mismatched_keys]
        if problems or info.conversion_errors:
            raise StreamingError(f"cannot stream {where} of {self.folder}: tensors that fit no parameter "
                                 f"or convert with errors ({', '.join(problems[:3]) or info.conversion_errors})")


@contextmanager
def _damaged_shard(*files: Path) -> Iterator[None]:
    """A truncated or overwritten shard gets the same clean error as a full load, naming the files."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        names = ", ".join(str(f) for f in files)
        raise StreamingError(f"cannot read {names}: a safetensors file is damaged or truncated ({err}); download or "
                             "copy the checkpoint again") from err


def _floating_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """One tensor at a time, without a "Loading weights" bar per layer (transformers' own switches, restored).

    transformers materialises tensors on a thread pool unless ``HF_DEACTIVATE_ASYNC_LOAD`` is set; for one
    layer that only raises the peak (measured: +0.5 GiB on a 0.9 GB layer) for no speed we need.
    """
    previous = os.environ.get(_SEQUENTIAL)
    os.environ[_SEQUENTIAL] = "1"
    try:
        with quiet_loading():
            yield
    finally:
        if previous is None:
            os.environ.pop(_SEQUENTIAL, None)
        else:
            os.environ[_SEQUENTIAL] = previous


_SEQUENTIAL = "HF_DEACTIVATE_ASYNC_LOAD"


def free_module(module: nn.Module) -> None:
    """Put every parameter of ``module`` back on the meta device (its memory is released)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and not param.is_meta:
                sub._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)


class ShardedLayers:
    """Decoder layers of a streamed skeleton, loaded from the shards one at a time."""

    def __init__(self, model: nn.Module, folder: str | Path | None = None) -> None:
        folder = folder if folder is not None else getattr(model.config, "_name_or_path", "")
        if not folder or not Path(str(folder)).is_dir():
            raise StreamingError(f"a streamed model must come from a local checkpoint folder (got {folder!r})")
        self.model = model
        self.index = CheckpointIndex(str(folder), model)
        self.layers = decoder_layers(model)

    @contextmanager
    def on_device(self, index: int, device: torch.device) -> Iterator[nn.Module]:
        layer = self.layers[index]
        self.index.load(self.model, self.index.layer_keys[index], device, f"decoder layer {index}")
        left = [n for n, p in layer.named_parameters() if p.is_meta]
        if left:
            free_module(layer)
            raise StreamingError(f"decoder layer {index}: {len(left)} parameter(s) are not in the checkpoint "
                                 f"(e.g. {left[0]}); it would run with empty weights")
        try:
            check_finite(layer.named_parameters(prefix=self.index.layer_prefixes[index].rstrip(".")),
                         str(self.index.folder))
        except OSError:
            free_module(layer)
            raise
        try:
            yield layer
        finally:
            free_module(layer)


def load_streamed(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(skeleton model in eval mode, tokenizer or None): non-layer weights loaded, decoder layers on meta.

    ``name``: "demo" or a local checkpoint folder with safetensors shards (hub ids: download first).
    The layer-wise runner loads each decoder layer from the shards as it reaches it (``ShardedLayers``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .loading import _load_tokenizer

    path = resolve_model_path(name)
    if not Path(path).is_dir():
        raise StreamingError(f"cannot stream {name!r}: streaming needs a local checkpoint folder; download it "
                             "first (e.g. `hf download NAME --local-dir DIR`) and pass the folder")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.config._name_or_path = path  # what from_pretrained records: where the weights come from
    index = CheckpointIndex(path, model)
    index.load(model, index.other_keys, "cpu", "the non-layer weights")
    model.tie_weights()
    layer_params = {id(p) for p in decoder_layers(model).parameters()}
    missing = [n for n, p in model.named_parameters() if p.is_meta and id(p) not in layer_params]
    if missing:
        raise StreamingError(f"cannot stream {name!r}: {len(missing)} weight(s) outside the decoder layers are "
                             f"missing from the checkpoint (e.g. {', '.join(missing[:3])})")
    check_finite(model.named_parameters(), name)
    return model.eval(), _load_tokenizer(path, cache_only=True)
