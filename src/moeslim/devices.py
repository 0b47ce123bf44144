"""``--device`` / ``--dtype``: where layers compute and in which floating type (validated, no silent fallback)."""

from __future__ import annotations

import torch

from moeslim.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """"auto" -> CUDA when available, else CPU; under torchrun on CUDA each process takes ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: moeslim runs on cpu or cuda")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA, float32 on CPU (bfloat16 matmuls are slow and less exact on most CPUs)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# ``--device-map``: accelerate's placement of a model across devices, for models one device cannot hold.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_RUNTIME_SECTIONS = ("quantize", "skip", "lowrank")  # checkpoints loaded by moeslim's own runtime loaders


def resolve_device_map(value: str | None) -> str | dict[str, str | int] | None:
    """``--device-map`` -> what transformers' ``from_pretrained(device_map=...)`` takes (accelerate places it).

    ``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential`` pass through; a JSON object maps module
    names to devices (``'{"": "cpu"}'``, ``'{"model.embed_tokens": 0, "model.layers": 1, ...}'``). Raises if
    accelerate is not installed (transformers needs it for any device_map) or the value is not one of those.
    """
    import importlib.util
    import json

    if value is None:
        return None
    if importlib.util.find_spec("accelerate") is None:
        raise ConfigError("--device-map needs the accelerate package (pip install accelerate); or use --device")
    if value in DEVICE_MAPS:
        return value
    try:
        mapping = json.loads(value) if value.lstrip().startswith("{") else None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--device-map {value!r} is not valid JSON ({err.msg})") from err
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError(f"--device-map {value!r}: use {', '.join(DEVICE_MAPS)}, or a JSON object of module name -> "
                          "device such as '{\"\": \"cpu\"}'")
    placed: dict[str, str | int] = {}
    for module, where in mapping.items():
        if isinstance(where, bool) or not isinstance(where, (str, int)):
            raise ConfigError(f"--device-map: {module!r} -> {where!r} is not a device (cpu, disk, cuda:N or N)")
        if isinstance(where, int) or where == "disk":
            if isinstance(where, int) and where >= (torch.cuda.device_count() if torch.cuda.is_available() else 0):
                raise ConfigError(f"--device-map: {module!r} -> GPU {where}, but this machine has "
                                  f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
            placed[str(module)] = where
        else:
            placed[str(module)] = str(resolve_device(where))
    return placed


def check_device_map_checkpoint(folder: str) -> None:
    """Refuse ``--device-map`` for checkpoints that moeslim's runtime loads itself (packed experts, skipping,
    low-rank factors): accelerate places stock transformers checkpoints (original or pruned models).
    ``folder``: the resolved checkpoint folder (a hub id that is not a folder has no moeslim section)."""
    import json
    from pathlib import Path

    config = Path(folder) / "config.json"
    section = (json.loads(config.read_text()).get("moeslim") or {}) if config.is_file() else {}
    found = [k for k in _RUNTIME_SECTIONS if k in section]
    if found:
        raise ConfigError(f"--device-map places stock checkpoints; {folder} has moeslim runtime state "
                          f"({', '.join(found)}): load it with --device instead")
