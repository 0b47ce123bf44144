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

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeslim.methods.quant.fused import LowBitTensor
from moeslim.models.attrs import callable_attr
from moeslim.runtime.packed import PackedExperts, Workspace, rows_traced
from moeslim.runtime.planes_native import native_planes_rows_x, native_planes_rows_xf
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
# Decodes of up to this many routed pairs (batch-1 top-2) run one compiled graph per pattern of pairs per width
# group (at most a few patterns: (2, 0), (1, 1), (0, 2) for two groups), each group's kernel on its own pairs;
# more pairs would mean too many patterns to compile, so they run every group on every pair, masked.
SORTED_MAX_PAIRS = 2
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


def masked_up(hidden_states: Tensor, rows: Tensor, mine: Tensor, up: tuple[tuple[Any, ...], ...]) -> Tensor:
    """The up projection of ``grouped_forward`` for a few rows, without sorting or a host sync: every width
    group's kernel runs on every (token, expert) pair and keeps the pairs of its group (a placeholder pair is
    in no group: ``masked_down`` keeps its output at 0). Traceable: compiled as one graph per layer and shape
    (``fuses_decode``); the routing comes in as tensors (computed inside, inductor would recompute the gathers
    in every kernel loop), the groups as tensors and numbers (guards on modules cost more than the kernels).

    hidden_states (T, H); rows, mine (n_groups, P): each pair's row in group g (0 elsewhere) and whether it is
    in g; up: ``PackedExperts.rows_args``; pair p = token p // k -> (P, I) in hidden_states' dtype.
    """
    x = hidden_states.repeat_interleave(rows.shape[1] // hidden_states.shape[0], 0)  # (P, H)
    h = torch.zeros((), dtype=torch.float32, device=x.device)
    for gi, spec in enumerate(up):
        h = torch.where(mine[gi].unsqueeze(-1), rows_traced(spec, rows[gi], x), h)
    return h.to(x.dtype)


def masked_down(h: Tensor, rows: Tensor, mine: Tensor, top_k_weights: Tensor, down: tuple[tuple[Any, ...], ...]
                ) -> Tensor:
    """The down projection and weighted sum of ``grouped_forward`` after ``masked_up`` and the activation (a
    graph of its own: in one graph with the up projection, inductor recomputes the activation inside the down
    kernel's loops).

    h (P, width) activations zero-padded to the down kernels' inputs, rows / mine as ``masked_up``,
    top_k_weights (T, k) -> (T, H).
    """
    n_tokens, k = top_k_weights.shape
    y = torch.zeros((), dtype=torch.float32, device=h.device)
    for gi, spec in enumerate(down):
        y = torch.where(mine[gi].unsqueeze(-1), rows_traced(spec, rows[gi], h), y)
    y = y.to(h.dtype) * top_k_weights.reshape(-1, 1).to(h.dtype)
    return y.view(n_tokens, k, -1).sum(1)


def sorted_up(hidden_states: Tensor, index: Tensor, counts: tuple[int, ...], up: tuple[tuple[Any, ...], ...]
              ) -> Tensor:
    """The up projection of ``grouped_forward`` for a few pairs sorted by width group, traceable (compiled
    per ``counts`` in ``sorted_experts``: each group's kernel runs on its own pairs only, no masked work).

    hidden_states (T, H); index (3, S): each kept pair's token, row in its group and position in the (T, k)
    routing, pairs of group g at ``sum(counts[:g])`` on; counts: pairs per group (static) -> (S, I) in
    hidden_states' dtype.
    """
    rows = index[1]
    x = hidden_states[index[0]]  # (S, H)
    parts, start = [], 0
    for spec, count in zip(up, counts, strict=True):
        if count:
            parts.append(rows_traced(spec, rows[start:start + count], x[start:start + count]))
            start += count
    return torch.cat(parts).to(x.dtype)


def sorted_down(h: Tensor, index: Tensor, top_k_weights: Tensor, counts: tuple[int, ...],
                down: tuple[tuple[Any, ...], ...]) -> Tensor:
    """The down projection and weighted sum of ``grouped_forward`` after ``sorted_up`` and the activation.

    h (S, width) activations zero-padded to the down kernels' inputs; index, counts as ``sorted_up``;
    top_k_weights (T, k) -> (T, H).
    """
    rows = index[1]
    parts, start = [], 0
    for spec, count in zip(down, counts, strict=True):
        if count:
            parts.append(rows_traced(spec, rows[start:start + count], h[start:start + count]))
            start += count
    weights = top_k_weights.reshape(-1)[index[2]]  # (S,)
    y = torch.cat(parts).to(h.dtype) * weights.unsqueeze(-1).to(h.dtype)
    # each token's sum as a masked reduction: index_add would leave the graph for aten's scatter_add (slower)
    tokens = torch.arange(top_k_weights.shape[0], device=h.device).unsqueeze(-1)
    mine = (index[0] == tokens).unsqueeze(-1)  # (T, S, 1)
    return torch.where(mine, y, 0).sum(1)


def sorted_experts(hidden_states: Tensor, index: Tensor, top_k_weights: Tensor, counts: tuple[int, ...],
                   up: tuple[tuple[Any, ...], ...], down: tuple[tuple[Any, ...], ...], width: int,
                   act: Callable[[Tensor], Tensor]) -> Tensor:
    """``sorted_up``, the experts' activation ``act`` (their own ``_apply_gate`` / ``act_fn``), padding to the
    down kernels' inputs ``width``, then ``sorted_down``: a layer's routed experts as one traceable graph (one
    compiled call per layer: at the demo's shapes each call's fixed cost is a good part of the time).

    hidden_states (T, H), index / counts as ``sorted_up``, top_k_weights (T, k) -> (T, H).
    """
    h = act(sorted_up(hidden_states, index, counts, up))
    h = F.pad(h, (0, width - h.shape[1])) if width != h.shape[1] else h
    return sorted_down(h, index, top_k_weights, counts, down).to(hidden_states.dtype)


def _native_decode(experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                   up: PackedExperts, down: PackedExperts) -> Tensor | None:
    """bfloat16 or float32 decode of bit-plane experts through ``planes_native``'s ``planes_rows_x`` /
    ``planes_rows_xf`` (None: it does not run here): the routing read on the host, then per width group one
    native call per projection on the group's pairs, between them the experts' activation. The maths of
    ``sorted_experts`` (each projection's float32 sums in hidden_states' dtype, the activation in that dtype,
    weighted outputs summed per token in it) without a compiled graph: at these shapes its guards and call cost
    more than the kernels, and inductor's bit-plane loops several times more than the native kernel.

    hidden_states (T, H) bfloat16 or float32, top_k_index / top_k_weights (T, k) -> (T, H).
    """
    if hidden_states.dtype == torch.bfloat16:
        kernel = native_planes_rows_x()
    elif hidden_states.dtype == torch.float32:
        kernel = native_planes_rows_xf()
    else:
        return None
    up_args, down_args = up.native_decode_args(), down.native_decode_args()
    if up_args is None or down_args is None or kernel is None:
        return None
    k = top_k_index.shape[1]
    by_group: dict[int, list[tuple[int, int, int]]] = {}  # group -> [(token, row, pair)]
    for p, e in enumerate(top_k_index.reshape(-1).tolist()):
        where = up.slot.get(e)  # the placeholder expert (skipped pairs) is in no group: dropped
        if where is not None:
            by_group.setdefault(where[0], []).append((p // k, where[1], p))
    if not by_group:
        return torch.zeros_like(hidden_states)
    act = callable_attr(experts, "_apply_gate" if bool(getattr(experts, "has_gate")) else "act_fn")  # noqa: B009
    single = hidden_states.shape[0] == 1
    outs, pairs = [], []
    for g in sorted(by_group):
        group = by_group[g]
        rows = torch.tensor([r for _, r, _ in group], device=hidden_states.device)
        # one token: its row repeated without a copy (the kernel reads rows by stride)
        x = (hidden_states.expand(len(group), -1) if single
             else hidden_states[torch.tensor([t for t, _, _ in group], device=hidden_states.device)])
        h = act(kernel(x, rows, *up_args[g]))
        outs.append(kernel(h.contiguous(), rows, *down_args[g]))
        pairs += [p for _, _, p in group]
    y = outs[0] if len(outs) == 1 else torch.cat(outs)  # (S, H) in hidden_states' dtype, pairs in group order
    weights = top_k_weights.reshape(-1)[torch.tensor(pairs, device=y.device)]
    y = y * weights.unsqueeze(-1).to(y.dtype)
    if single:
        return y.sum(0, keepdim=True)
    tokens = torch.tensor([p // k for p in pairs], device=y.device)
    return torch.zeros_like(hidden_states).index_add_(0, tokens, y)


def _sorted_decode(experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                   up: PackedExperts, down: PackedExperts) -> Tensor | None:
    """``sorted_experts`` compiled per width-group pattern (None: no compiler here). The routing is read on
    the host (a few numbers: on CPU there is no device to wait for) and sorted in Python."""
    k = top_k_index.shape[1]
    pairs = sorted((up.slot[e][0], p // k, up.slot[e][1], p) for p, e in enumerate(top_k_index.reshape(-1).tolist())
                   if e in up.slot)  # the placeholder expert (skipped pairs) is in no group: dropped
    if not pairs:
        return torch.zeros_like(hidden_states)
    counts = [0] * up.n_groups
    for g, *_ in pairs:
        counts[g] += 1
    index = torch.tensor([[t for _, t, _, _ in pairs], [r for _, _, r, _ in pairs], [p for *_, p in pairs]],
                         device=hidden_states.device)
    act = callable_attr(experts, "_apply_gate" if bool(getattr(experts, "has_gate")) else "act_fn")  # noqa: B009
    key = (tuple(counts), hidden_states.shape[0], k, hidden_states.dtype, top_k_weights.dtype)
    return up.compiled(sorted_experts, hidden_states, index, top_k_weights, tuple(counts), up.rows_args(),
                       down.rows_args(), down.in_width, act, key=key, serial=True)


def _masked_decode(experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                   up: PackedExperts, down: PackedExperts) -> Tensor | None:
    """``masked_up`` then ``masked_down``, compiled (None: no compiler here)."""
    flat = top_k_index.reshape(-1)
    groups = torch.arange(up.n_groups, device=flat.device).unsqueeze(-1)
    mine = up.group_of[flat] == groups  # (n_groups, P)
    rows = torch.where(mine, up.row_of[flat], 0)
    key = (*top_k_index.shape, hidden_states.dtype, top_k_weights.dtype)
    h = up.compiled(masked_up, hidden_states, rows, mine, up.rows_args(), key=key, serial=True)
    if h is None:
        return None
    h = callable_attr(experts, "_apply_gate" if bool(getattr(experts, "has_gate")) else "act_fn")(h)  # noqa: B009
    width = down.in_width  # the down kernels' padded inputs: padded here, they read h as it is
    h = F.pad(h, (0, width - h.shape[1])) if width != h.shape[1] else h
    y = up.compiled(masked_down, h, rows, mine, top_k_weights, down.rows_args(), key=key, serial=True)
    return None if y is None else y.to(hidden_states.dtype)


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
    n_routed = top_k_index.numel()
    if not getattr(experts, "has_bias", False) and up.fuses_decode(n_routed) and down.fuses_decode(n_routed):
        # Few pairs: one graph per width-group pattern (a handful of patterns, exact work); more pairs: one
        # graph that runs every group on every pair, masked (one compile, however the pairs fall)
        y = _native_decode(experts, hidden_states, top_k_index, top_k_weights, up, down)
        if y is not None:
            return y
        decode = _sorted_decode if n_routed <= SORTED_MAX_PAIRS else _masked_decode
        y = decode(experts, hidden_states, top_k_index, top_k_weights, up, down)
        if y is not None:
            return y
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
    """Whether ``module``'s class, or a base class its forward calls, has transformers' dispatched forward
    (``use_experts_implementation`` wraps it: ``__wrapped__``). Ergo's experts class wraps its base's dispatched
    forward with a per-route norm."""
    dispatched = any(hasattr(vars(cls).get("forward"), "__wrapped__") for cls in type(module).__mro__)
    return hasattr(module, "has_gate") and hasattr(module, "config") and dispatched


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
