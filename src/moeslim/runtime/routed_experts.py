"""The routed-experts loop shared by the experts forwards whose projections live outside the fused tensors.

Low-bit (``lowbit_forward``) and low-rank (``lowrank``) experts keep some projections in a child
``nn.ModuleDict`` of parts that compute ``part.matmul(e, x)`` for expert e; this loop computes only the routed
experts, through a part where there is one and through the fused float tensor otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeslim.models.attrs import callable_attr

T = TypeVar("T", bound=nn.Module)


class ExpertPart(Protocol):
    def matmul(self, e: int, x: Tensor) -> Tensor: ...


def stored_parts(module: nn.Module, store: str, kind: type[T]) -> dict[str, T]:
    """{parameter name: part of type ``kind``} held in ``module``'s child ModuleDict ``store`` (empty when none)."""
    held = module._modules.get(store)
    if not isinstance(held, nn.ModuleDict):
        return {}
    return {name: part for name, part in held.items() if isinstance(part, kind)}


def project(experts: nn.Module, name: str, e: int, x: Tensor, parts: Mapping[str, ExpertPart]) -> Tensor:
    """x (n, in) -> (n, out) through expert e's ``name`` projection (+ bias)."""
    if name in parts:
        y = parts[name].matmul(e, x)
    else:
        w = getattr(experts, name)[e]
        y = x @ w.to(x.dtype) if experts.is_transposed else F.linear(x, w.to(x.dtype))
    if getattr(experts, "has_bias", False):
        bias = getattr(experts, f"{name}_bias", None)
        if bias is not None:
            y = y + bias[e].to(y.dtype)
    return y


def routed_forward(experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                   parts: Mapping[str, ExpertPart]) -> Tensor:
    """hidden_states (T, H), top_k_index / top_k_weights (T, k) -> (T, H), only routed experts computed."""
    k = top_k_index.shape[1]
    n_experts = int(getattr(experts, "num_experts"))  # noqa: B009 (an int attribute torch types as Tensor | Module)
    has_gate = bool(getattr(experts, "has_gate"))  # noqa: B009
    up_name = "gate_up_proj" if has_gate else "up_proj"
    flat = top_k_index.reshape(-1)  # (S,) pair p = token p // k, slot p % k
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts + 1).tolist()  # one host sync per layer
    weights = top_k_weights.reshape(-1)
    out = torch.zeros_like(hidden_states)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        start += count
        if e >= n_experts:  # placeholder index: no expert
            continue
        token_idx = pairs // k
        h = project(experts, up_name, e, hidden_states[token_idx], parts)
        h = callable_attr(experts, "_apply_gate" if has_gate else "act_fn")(h)
        y = project(experts, "down_proj", e, h, parts)
        if getattr(experts, "has_post_expert_norm", False):
            y = callable_attr(experts, "post_expert_norm")(y)
        y = y * weights[pairs].unsqueeze(-1).to(y.dtype)
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out
