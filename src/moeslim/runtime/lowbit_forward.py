"""Compute with packed low-bit experts: the ``moeslim_lowbit`` experts forward and its installation.

``install_packed(module, name, packed)`` replaces the float parameter ``name`` of ``module`` by a
``PackedExperts`` (runtime/packed.py) kept in the child ``module.moeslim_lowbit[name]``; the attribute
``name`` becomes a meta-device placeholder with the original shape and dtype (it holds no bytes; any
computation with it fails loudly instead of using stale weights).

- Fused experts modules (transformers' ``@use_experts_implementation``) then dispatch to the experts forward
  ``moeslim_lowbit`` registered in ``ALL_EXPERTS_FUNCTIONS``: it groups the (token, expert) pairs by expert
  and computes only the routed experts, each from its packed storage. It honours the standard attributes
  (gate/up split through ``_apply_gate``, biases, transposed layouts, ``post_expert_norm``) and the
  placeholder index ``num_experts`` (no expert). When skipping is installed (``moeslim_skip``) it becomes
  skipping's inner implementation instead, so skip + low-bit compose.
- A plain ``nn.Linear`` (attention projections) becomes a ``LowBitLinear``, the same class with a forward
  that reads the packed weight (torch's own parametrizations re-class modules the same way).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moeslim.methods.quant.fused import LowBitTensor
from moeslim.models.attrs import callable_attr
from moeslim.runtime.packed import PackedExperts, Workspace
from moeslim.runtime.routed_experts import (
    attach_part,
    drops_placeholder,
    fallback_forward,
    routed_forward,
    store_part,
    stored_parts,
)

__all__ = ["IMPLEMENTATION", "STORE", "LowBitLinear", "install_packed", "packed_storage"]

IMPLEMENTATION = "moeslim_lowbit"
STORE = "moeslim_lowbit"  # child nn.ModuleDict {parameter name: PackedExperts}


def packed_storage(module: nn.Module) -> dict[str, PackedExperts]:
    """{parameter name: PackedExperts} held by ``module`` itself (empty when none)."""
    return stored_parts(module, STORE, PackedExperts)


@drops_placeholder
def lowbit_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
                           ) -> Tensor:
    """hidden_states (T, H), top_k_index / top_k_weights (T, k) -> (T, H), only routed experts computed."""
    store = packed_storage(self)
    if not store:  # a layer left in float
        return fallback_forward(self, hidden_states, top_k_index, top_k_weights)
    up_name = "gate_up_proj" if bool(getattr(self, "has_gate")) else "up_proj"  # noqa: B009
    up, down = store.get(up_name), store.get("down_proj")
    if up is not None and down is not None and up.same_grouping(down) and not getattr(
            self, "has_post_expert_norm", False):
        return grouped_forward(self, hidden_states, top_k_index, top_k_weights, up, down)
    return routed_forward(self, hidden_states, top_k_index, top_k_weights, store)


def _bias(experts: nn.Module, name: str, experts_idx: Tensor) -> Tensor | None:
    """(S, out) biases of projection ``name`` for the routed experts ``experts_idx`` (None without biases)."""
    if not getattr(experts, "has_bias", False):
        return None
    bias = getattr(experts, f"{name}_bias", None)
    return None if bias is None else bias[experts_idx]


def grouped_forward(experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                    up: PackedExperts, down: PackedExperts) -> Tensor:
    """``routed_forward`` for experts whose up and down projections are both packed with the same width groups:
    the routed (token, expert) pairs are sorted by width group and each group computes all its pairs at once
    (at decode one gathered kernel call per projection and width, not one per expert).

    hidden_states (T, H), top_k_index / top_k_weights (T, k) -> (T, H).
    """
    k = top_k_index.shape[1]
    has_gate = bool(getattr(experts, "has_gate"))  # noqa: B009
    up_name = "gate_up_proj" if has_gate else "up_proj"
    flat = top_k_index.reshape(-1)  # (P,) pair p = token p // k, slot p % k
    group = up.group_of[flat]  # (P,) width group of each pair; the placeholder expert -> up.n_groups
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=up.n_groups + 1).tolist()  # the one host sync of the layer
    n_pairs = len(order) - counts[-1]  # pairs with a real expert, sorted first
    order = order[:n_pairs]
    expert = flat[order]
    rows = up.row_of[expert]
    x = hidden_states[order // k]  # (S, H)
    act = callable_attr(experts, "_apply_gate" if has_gate else "act_fn")
    outs = []
    start = 0
    workspace = Workspace()  # scratch of the 4-bit GEMM path (long inputs), shared by this layer's matmuls
    for gi, count in enumerate(counts[:-1]):
        if count == 0:
            continue
        sl = slice(start, start + count)
        start += count
        h = up.group_matmul(gi, rows[sl], x[sl], workspace)
        bias = _bias(experts, up_name, expert[sl])
        h = act(h if bias is None else h + bias.to(h.dtype))
        y = down.group_matmul(gi, rows[sl], h, workspace)
        bias = _bias(experts, "down_proj", expert[sl])
        outs.append(y if bias is None else y + bias.to(y.dtype))
    out = torch.zeros_like(hidden_states)
    if not outs:
        return out
    y = outs[0] if len(outs) == 1 else torch.cat(outs)
    y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
    return out.index_add_(0, order // k, y.to(out.dtype))


class LowBitLinear(nn.Linear):
    """``nn.Linear`` whose weight lives packed in ``moeslim_lowbit["weight"]`` (a one-matrix PackedExperts)."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Linear's signature
        packed = packed_storage(self)["weight"]
        y = packed.matmul(0, input.reshape(-1, input.shape[-1])).reshape(*input.shape[:-1], -1)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _is_fused_experts(module: nn.Module) -> bool:
    return hasattr(module, "has_gate") and hasattr(module, "config") and hasattr(type(module).forward, "__wrapped__")


def install_packed(module: nn.Module, name: str, packed: LowBitTensor) -> PackedExperts:
    """Replace float parameter ``name`` of ``module`` by packed storage and route its compute through it."""
    current = module._parameters.get(name)
    if current is None and name not in packed_storage(module):
        raise ValueError(f"{type(module).__name__} has no parameter {name!r} to pack")
    linear = isinstance(module, nn.Linear)
    if linear and name != "weight":
        raise ValueError(f"only the weight of an nn.Linear can be packed, not {name!r}")
    if linear and type(module) not in (nn.Linear, LowBitLinear):
        raise TypeError(f"cannot pack {type(module).__name__}: only plain nn.Linear modules are supported")
    if not linear and not _is_fused_experts(module):
        raise TypeError(f"{type(module).__name__} is not a fused experts module dispatched through transformers' "
                        "ExpertsInterface (nor an nn.Linear): its packed weights could not be computed with")
    shape = tuple(current.shape) if current is not None else None
    expected = (packed.shape[1], packed.shape[2]) if linear else tuple(packed.shape)
    if shape is not None and shape != expected:
        raise ValueError(f"packed tensor of shape {packed.shape} does not fit {name} of shape {shape}")
    device = current.device if current is not None and current.device.type != "meta" else None
    storage = PackedExperts(packed, device=device)
    if linear:
        store_part(module, STORE, name, storage, expected, packed.dtype)
        module.__class__ = LowBitLinear
        return storage
    attach_part(module, STORE, name, storage, expected, packed.dtype, IMPLEMENTATION, lowbit_experts_forward)
    return storage
