"""The float dtype a joint plan holds the model in (``JointConfig.hold_dtype``).

A float32 model spends most of a small byte target on what the planner cannot shrink (embeddings, attention,
norms, routers), so the experts must be dropped to fit. Holding every float weight in 16 bits halves those bytes.
The planner prices everything on the model as it will be held: byte tables and option errors are measured on a
cast copy (``as_held``), and apply casts the model first (``appliers/joint.py``). Real checkpoints are already
16-bit; the option only matters for float32 models.
"""

from __future__ import annotations

import copy
import re
from typing import Literal

import torch
from torch import nn

from moeslim.config import ConfigError
from moeslim.models.attrs import pretrained

__all__ = ["HOLD_DTYPES", "HoldDtype", "as_held", "cast_parameters", "hold_torch_dtype", "kept_in_float32",
           "needs_cast"]

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
    """Whether ``cast_parameters`` would change a float parameter of ``model`` (None: keep the model's dtype)."""
    if dtype is None:
        return False
    keep = [re.compile(p) for p in kept_in_float32(model, dtype)]
    return any(p.is_floating_point() and p.dtype != (torch.float32 if any(k.search(n) for k in keep) else dtype)
               for n, p in model.named_parameters())


def kept_in_float32(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Name patterns of the parameters transformers' loader keeps in float32 when it loads ``model`` in ``dtype``
    (the class' ``_keep_in_fp32_modules_strict`` for 16-bit dtypes, ``_keep_in_fp32_modules`` for float16:
    routers of some families), so the cast holds what ``moeslim.load`` of the saved model holds."""
    hf = pretrained(model)
    patterns: list[str] = []
    if dtype in (torch.float16, torch.bfloat16):
        patterns += sorted(getattr(hf, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        patterns += sorted(getattr(hf, "_keep_in_fp32_modules", None) or ())
    return patterns


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the float parameters of ``model`` to ``dtype`` in place (tied ones once), as the loader does: those
    matching ``kept_in_float32`` stay float32; buffers (rotary frequencies, routing statistics) stay as held."""
    keep = [re.compile(p) for p in kept_in_float32(model, dtype)]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.is_floating_point() or param.dtype == dtype:
                continue
            param.data = param.data.to(torch.float32 if any(k.search(name) for k in keep) else dtype)
    return model


def as_held(model: nn.Module, name: str | None) -> nn.Module:
    """``model`` itself when its float parameters are already in ``name``'s dtype ("auto": always), else a copy
    with them cast (what apply does to the model itself). The input is not modified."""
    dtype = hold_torch_dtype(name)
    if dtype is None or not needs_cast(model, dtype):
        return model
    return cast_parameters(copy.deepcopy(model), dtype)

