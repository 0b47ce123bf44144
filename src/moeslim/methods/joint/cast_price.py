"""The price of holding the model in another float dtype (``JointConfig.hold_dtypes``), in the estimate's unit.

A plan held in a cast dtype has its options measured on the cast copy (``hold.as_held``): their errors are relative
to the cast model, so the cast's own error is missing from the estimate. To weigh "cast to bfloat16" against "keep
float32 and quantize the experts harder", each candidate dtype is priced by the KL per token of the cast model's
next-token distributions against the original's, on the first ``probe_windows`` calibration windows (as
``nonexpert.py`` prices the attention and embedding options), brought into the estimate's unit the same way:
with ``error_scale="kl"`` it is the unit already; with "squared" it is priced at the squared error of the experts'
own quantization that costs the same KL (``kl_price.py``'s curve, measured on the cast model).
A dtype the model already holds ("auto") costs 0, unmeasured. A cast whose next-token probabilities are not finite
(float16's range is 65504: activations past it overflow) is refused with a ConfigError before its options are
measured, rather than priced as NaN.
Shapes: N windows, S window length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from moeslim.config import ConfigError
from moeslim.methods.joint.kl_price import squared_price
from moeslim.methods.joint.probe import _kl, _logits
from moeslim.methods.joint.solve import SizeOption

__all__ = ["cast_error", "cast_kl"]


@torch.no_grad()
def cast_kl(model: nn.Module, held: nn.Module, input_ids: Tensor, windows: int, batch_size: int) -> float:
    """Mean KL per token of ``held`` (``model`` cast) against ``model`` on ``input_ids[:windows]`` (N, S); a
    ConfigError naming the dtype when it is not finite (the cast model overflows)."""
    device = next(held.parameters()).device
    batches = input_ids[:windows].to(device).split(batch_size)
    kl = float(torch.cat([_kl(_logits(model, ids), _logits(held, ids)) for ids in batches]).mean())
    if not math.isfinite(kl):
        dtype = str(next(held.parameters()).dtype).removeprefix("torch.")
        raise ConfigError(f"the model held in {dtype} gives non-finite next-token probabilities on the calibration "
                          f"windows (KL {kl}: its activations overflow {dtype}'s range); leave {dtype} out of "
                          "hold_dtypes")
    return kl


@torch.no_grad()
def cast_error(model: nn.Module, held: nn.Module, input_ids: Tensor, options: Mapping[int, Sequence[SizeOption]],
               group_size: int, symmetric: bool, error_scale: str, windows: int, batch_size: int,
               kl: float | None = None) -> float:
    """The cast's error in the estimate's unit: ``cast_kl`` (or the given ``kl``, measured already), for
    ``error_scale="squared"`` priced on the experts' quantization curve of ``held``; 0 when ``held`` is ``model``
    (no cast). ``options``: the experts'
    options measured on ``held`` (their token counts)."""
    if held is model:
        return 0.0
    device = next(held.parameters()).device
    batches = list(input_ids[:windows].to(device).split(batch_size))
    kl = cast_kl(model, held, input_ids, windows, batch_size) if kl is None else kl
    if error_scale == "kl":
        return max(kl, 0.0)
    refs = [_logits(held, ids) for ids in batches]
    return squared_price(held, batches, refs, options, group_size, symmetric)(kl)
