"""Resolve a model name and load it with stock transformers (offline-friendly)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from moeslim._package import assets_dir
from moeslim.hub import hub_offline, hub_reachable

from .support import check_config_file

DEMO_NAME = "demo"
# Names of the bundled demo models -> their asset folders. "demo" is the Mixtral-layout one.
BUNDLED_MODELS = {DEMO_NAME: "demo-moe", "demo-moe": "demo-moe", "demo-fine": "demo-fine"}


def demo_model_path(name: str = DEMO_NAME) -> Path:
    """Where a bundled demo MoE lives (``moeslim/assets/demo-moe`` for "demo", ``demo-fine`` for the 64-expert one)."""
    return assets_dir() / BUNDLED_MODELS[name]


def resolve_model_path(name: str) -> str:
    """'demo' / 'demo-fine' -> the bundled model dir; an existing local dir -> itself; else a hub id, as-is."""
    if name in BUNDLED_MODELS:
        return str(demo_model_path(name))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    return name


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               device_map: str | dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer or None) for "demo", a local dir, or a hub id.

    A hub id is only looked up in the local cache when HF_HUB_OFFLINE is set or the hub is unreachable, and a
    cache miss raises a clear error at once instead of waiting on network timeouts.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    local = Path(path).is_dir()
    if local:
        check_config_file(Path(path))  # refuse unsupported families before reading any weight
    if name in BUNDLED_MODELS and not local:
        raise FileNotFoundError(
            f"the bundled demo model is missing at {path}; rebuild it with scripts/train_demo_model.py"
        )
    from safetensors import SafetensorError

    cache_only = not local and not hub_reachable()
    try:
        # Never run code from a model folder (auto_map), never unpickle weights: safetensors only.
        # output_loading_info=True returns (model, info), which transformers' annotation does not say.
        with quiet_loading():  # our own error names what is missing; no load report or bar before it
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, local_files_only=cache_only, trust_remote_code=False, use_safetensors=True,
                output_loading_info=True, **({"device_map": device_map} if device_map is not None else {}),
            )
        model, info = loaded
    except SafetensorError as err:
        raise OSError(f"cannot load {name!r}: a safetensors file is damaged or truncated ({err}); "
                      "download or copy the checkpoint again") from err
    except RuntimeError as err:  # tensors whose shapes do not fit the config
        raise OSError(f"cannot load {name!r}: its weights do not fit its config.json "
                      f"({' '.join(str(err).split())[:300]})") from err
    except OSError as err:
        if cache_only:
            reason = (
                "offline mode is set (HF_HUB_OFFLINE)" if hub_offline() else "the Hugging Face hub cannot be reached"
            )
            raise OSError(
                f"cannot load {name!r}: it is not a local directory, {reason}, "
                "and it is not in the local cache"
            ) from err
        if local and not any(Path(path).glob("*.safetensors")):
            raise OSError(f"cannot load {name!r}: it has no .safetensors weights; moeslim does not unpickle "
                          ".bin/.pt files (they can run code). Convert them to safetensors first") from err
        raise
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise OSError(f"cannot load {name!r}: {len(missing)} weight(s) are missing from the checkpoint "
                      f"(e.g. {', '.join(missing[:3])}); it would run with random weights")
    check_finite(model.named_parameters(), name)
    # ``device_map`` (validated by ``moeslim.devices.resolve_device_map``): accelerate placed the model already.
    model = (model if device_map is not None else model.to(device)).eval()
    return model, _load_tokenizer(path, cache_only)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' "Loading weights" bar and load report off for the block (its own switches, restored)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if enabled:
            hf_logging.enable_progress_bar()


_FINITE_CHUNK = 1 << 24  # elements per check: bounds the boolean temporaries on large tensors


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Refuse weights that hold NaN or +inf (damaged bytes read as floats): they evaluate to NaN with no other sign.

    -inf is allowed: it is how a padded non-uniform checkpoint keeps the router from choosing a padding expert.
    """
    for key, tensor in tensors:
        if tensor.is_meta or not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), _FINITE_CHUNK):
            chunk = flat[start:start + _FINITE_CHUNK]
            if bool(torch.isnan(chunk).any()) or bool(torch.isposinf(chunk).any()):
                raise OSError(f"cannot load {source!r}: weight {key} holds NaN or infinite values; the checkpoint "
                              "is damaged, copy or download it again")


def _load_tokenizer(path: str, cache_only: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=cache_only, trust_remote_code=False)
    except (OSError, ValueError, KeyError):
        return None  # a checkpoint without tokenizer files (e.g. a tiny test model) is still usable


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position encoding was built for, if its config says."""
    text = getattr(config, "text_config", None) or config
    for key in _POSITION_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(model: Any, length: int, what: str = "--seq-len") -> None:
    """Refuse windows longer than the model's maximum positions (they score far worse, with no other sign)."""
    from moeslim.config import ConfigError

    limit = max_positions(model.config)
    if limit is not None and length > limit:
        raise ConfigError(f"{what}={length} is longer than the model's maximum of {limit} positions; "
                          f"use {what} {limit} or less")


def check_token_ids(model: Any, input_ids: Any, what: str = "the calibration text") -> None:
    """Refuse token ids the model has no embedding row for (a tokenizer larger than the model's vocab)."""
    from moeslim.config import ConfigError

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None or input_ids.numel() == 0:
        return
    largest = int(input_ids.max())
    if largest >= rows:
        raise ConfigError(f"{what} has token id {largest}, but the model embeds only {rows} tokens: the tokenizer "
                          "does not belong to this model; use the tokenizer saved with the checkpoint")
