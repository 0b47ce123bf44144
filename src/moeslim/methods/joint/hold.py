"""The float dtype a joint plan holds the model in (``JointConfig.hold_dtype``).

A float32 model spends most of a small byte target on what the planner cannot shrink (embeddings, attention,
norms, routers), so the experts must be dropped to fit. Holding every float weight in 16 bits halves those bytes.
The planner prices everything on the model as it will be held: byte tables and option errors are measured on a
cast copy (``as_held``), and apply casts the model first (``appliers/joint.py``). Real checkpoints are already
16-bit; the option only matters for float32 models.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from moeslim.config import ConfigError

__all__ = ["HOLD_DTYPES", "HoldDtype", "as_held", "cast_parameters", "hold_torch_dtype", "needs_cast"]

HoldDtype = Literal["auto", "bfloat16", "float16", "float32"]
HOLD_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                                       "float32": torch.float32}


def hold_torch_dtype(name: str | None) -> torch.dtype | None:
    """"auto" / None -> None (keep the model's dtype); a dtype name -> its torch dtype; else a ConfigError."""
    if name is None or name == "auto":
        return None
    if name not in HOLD_DTYPES:
        raise ConfigError(f"hold_dtype={name!r}: use auto (keep the model's dtype), {', '.join(HOLD_DTYPES)}")
    return HOLD_DTYPES[name]


def needs_cast(model: nn.Module, dtype: torch.dtype | None) -> bool:
    """Whether some float parameter of ``model`` is not in ``dtype`` (None: keep the model's dtype)."""
    return dtype is not None and any(p.is_floating_point() and p.dtype != dtype for p in model.parameters())


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every float parameter of ``model`` to ``dtype`` in place (tied parameters once); buffers (rotary
    frequencies, routing statistics) stay as the model holds them, as a 16-bit checkpoint loads them."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model


def as_held(model: nn.Module, name: str | None) -> nn.Module:
    """``model`` itself when its float parameters are already in ``name``'s dtype ("auto": always), else a copy
    with them cast (what apply does to the model itself). The input is not modified."""
    dtype = hold_torch_dtype(name)
    if dtype is None or not needs_cast(model, dtype):
        return model
    return cast_parameters(copy.deepcopy(model), dtype)

