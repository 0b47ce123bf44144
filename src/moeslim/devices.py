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
