"""The joint planner's judge (``JointConfig.verify_windows``, ``methods/joint/verify.py``): each candidate plan
applied to a copy of the model, GPTQ on the fit windows, its mean KL per token to the original measured on the
held-out calibration windows. Shapes: N windows, S window length, V vocabulary.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moeslim.methods.joint.verify import Judge, mean_kl
from moeslim.plans import Plan

__all__ = ["kl_judge"]


def _logits(model: nn.Module, ids: Tensor, batch_size: int) -> list[Tensor]:
    """(N, S) ids -> per batch (B, S, V) logits."""
    device = next(model.parameters()).device
    out = []
    for batch in ids.split(batch_size):
        result = model(input_ids=batch.to(device), use_cache=False)
        out.append((result.logits if hasattr(result, "logits") else result[0]).float().cpu())
    return out


def kl_judge(model: nn.Module, batch_size: int = 8) -> Judge:
    """A ``verify.Judge`` for ``model`` (not modified): the original's logits on the held-out windows are computed
    once per set of windows and reused for every candidate of every call."""
    from moeslim.appliers import apply

    references: dict[bytes, list[Tensor]] = {}

    @torch.no_grad()
    def judge(plans: Sequence[Plan], fit_ids: Tensor, held_ids: Tensor) -> list[float]:
        key = held_ids.cpu().numpy().tobytes()
        if key not in references:
            references.clear()
            references[key] = _logits(model, held_ids, batch_size)
        refs = references[key]
        out = []
        for plan in plans:
            candidate = copy.deepcopy(model)
            apply(candidate, plan, calibration=fit_ids)
            logits = _logits(candidate, held_ids, batch_size)
            tokens = [int(r.shape[0] * r.shape[1]) for r in refs]
            out.append(sum(mean_kl(r, q) * t for r, q, t in zip(refs, logits, tokens, strict=True)) / sum(tokens))
            del candidate
        return out

    return judge
