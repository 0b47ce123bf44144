"""Dynamic expert skipping at inference time, through transformers' ExpertsInterface.

``install_skipping`` registers the experts forward ``moeslim_skip`` and selects it for the model. That forward drops
skipped (token, expert) pairs BEFORE any matmul, then hands the kept ones to the experts implementation the model used
before: forwards that drop the placeholder index ``num_experts`` (``routed_experts.drops_placeholder``: low-bit) get
the (T, k) routing with skipped pairs pointed at the placeholder; transformers' fused float forwards (grouped_mm,
batched_mm) are replaced, when a token skips, by matmuls on the kept experts' slices of the same fused weights (at
decode straight from the routing read once on the host, ``DIRECT_MAX_PAIRS``, where the top-2 rule is decided on
the host too and bfloat16 rows run ``dense_native``'s GEMV; longer inputs through ``routed_forward``); any other
implementation (eager, low-rank) gets the kept pairs as one-expert "tokens", summed
back per token. Kept weights are rescaled to the token's original total; nothing skipped = the original arguments
(bit-identical output) except at decode on fused float weights, where a token keeping every expert runs the same
direct matmuls as one that skips (equal up to float rounding, and cheaper than the fused forward's set-up at a few
pairs), and a layer with beta <= 0 computes no skip decision at all.

Per-module state (attributes on each fused experts module): ``moeslim_beta`` (float), ``moeslim_rule``,
``moeslim_inner`` (name of the implementation that does the matmuls),
``moeslim_counters = {"expert_calls": int, "tokens": int}`` and ``moeslim_protect`` ((T,) bool tokens that keep
every expert in the next forward, or None; written by ``runtime/odp.py`` through ``set_state``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moeslim.methods.skip.thresholds import SKIP_RULES, keep_mask, keep_rows_top2, rescale_kept
from moeslim.models import FAMILIES, MoELayer, find_moe_layers
from moeslim.models.attrs import callable_attr, pretrained
from moeslim.runtime.dense_native import dense_rows
from moeslim.runtime.routed_experts import (
    SKIP_IMPLEMENTATION,
    current_implementation,
    expert_output,
    handles_placeholder,
    register_forward,
    routed_forward,
    use_implementation,
)

IMPLEMENTATION = SKIP_IMPLEMENTATION
_STANDARD_ARGS = 3  # forward(hidden_states, top_k_index, top_k_weights)
_FUSED_FLOAT = ("grouped_mm", "batched_mm")  # transformers' forwards over the fused float expert tensors
# Routings of at most this many (token, expert) pairs (decode) are read on the host once and each kept expert runs
# as plain matmuls on its slice of the fused weights: at one token grouped_mm's set-up (sort, histogram, a matmul
# call per expert) costs more than a small expert's matmuls, and batch-1 decode is bound by reading the weights,
# so a skipped expert saves its whole read.
DIRECT_MAX_PAIRS = 8


class SkippingUnsupportedError(ValueError):
    """The model's experts module cannot take the skipping forward."""


def _inner_forward(experts: nn.Module) -> Any:
    """The experts forward that does the matmuls: the implementation chosen before skipping was installed."""
    name = getattr(experts, "moeslim_inner", "grouped_mm")
    # ``use_experts_implementation`` wraps the class forward with functools.wraps: __wrapped__ is the eager one.
    eager = getattr(type(experts).forward, "__wrapped__", None)
    if name == "eager" or name not in ALL_EXPERTS_FUNCTIONS:
        if eager is None:
            raise SkippingUnsupportedError(f"{type(experts).__name__} has no eager experts forward")
        return eager
    return ALL_EXPERTS_FUNCTIONS[name]


def _keep(experts: nn.Module, top_k_weights: Tensor) -> Tensor | None:
    """(T, k) routed weights -> (T, k) bool pairs that run, or None when every pair runs (beta <= 0: the rule and
    the protection of ODP can only keep more, so nothing is computed to find that out)."""
    beta = float(getattr(experts, "moeslim_beta", 0.0))
    if beta <= 0 or top_k_weights.shape[-1] < 2:
        return None
    keep = keep_mask(top_k_weights, beta, getattr(experts, "moeslim_rule", "top2"))  # (T, k)
    protect = getattr(experts, "moeslim_protect", None)  # (T,) bool, set per forward by the ODP attention hook
    if protect is not None and protect.numel() == keep.shape[0]:
        keep = keep | protect.to(keep.device).unsqueeze(-1)
    return keep


def _count(counters: dict[str, int] | None, expert_calls: int, tokens: int) -> None:
    if counters is not None:
        counters["expert_calls"] += expert_calls
        counters["tokens"] += tokens


def skipping_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
                             ) -> Tensor:
    """hidden_states (T, H), top_k_index / top_k_weights (T, k) -> (T, H), skipped pairs never computed."""
    inner = _inner_forward(self)
    tokens, k = top_k_index.shape
    counters = getattr(self, "moeslim_counters", None)
    if tokens * k <= DIRECT_MAX_PAIRS and getattr(self, "moeslim_inner", "grouped_mm") in _FUSED_FLOAT:
        y = _host_decode(self, hidden_states, top_k_index, top_k_weights, counters)
        if y is not None:
            return y
    keep = _keep(self, top_k_weights)
    if keep is None:
        _count(counters, tokens * k, tokens)
        return inner(self, hidden_states, top_k_index, top_k_weights)
    n_experts = int(getattr(self, "num_experts"))  # noqa: B009
    placeholder = handles_placeholder(inner)
    fused = not placeholder and getattr(self, "moeslim_inner", "grouped_mm") in _FUSED_FLOAT
    # Skipped pairs point at the placeholder index (no expert); the routing keeps its (T, k) shape.
    routed = top_k_index.masked_fill(~keep, n_experts) if placeholder or fused else top_k_index
    if placeholder:
        # The inner forward drops pairs routed to the placeholder (weight 0): nothing skipped computes.
        _count(counters, int(keep.sum()), tokens)
        return inner(self, hidden_states, routed, rescale_kept(top_k_weights, keep))
    if fused and tokens * k <= DIRECT_MAX_PAIRS:
        return _direct_decode(self, hidden_states, routed.tolist(), top_k_weights, keep, counters)  # one host read
    if bool(keep.all()):
        # Nothing skipped: the inner implementation on the original arguments (bit-identical output).
        _count(counters, tokens * k, tokens)
        return inner(self, hidden_states, top_k_index, top_k_weights)
    weights = rescale_kept(top_k_weights, keep)
    if fused:
        # transformers' own fused float forwards: each kept expert's rows as one matmul on the fused weights
        # (``routed_forward`` drops the placeholder): no gather of the kept pairs into one-expert tokens and no
        # grouped_mm set-up.
        _count(counters, int(keep.sum()), tokens)
        return routed_forward(self, hidden_states, routed, weights, {})
    token_idx, slot = keep.nonzero(as_tuple=True)  # (S,) kept pairs, token-major order
    pair_ids = top_k_index[token_idx, slot].unsqueeze(-1)  # (S, 1)
    pair_w = weights[token_idx, slot].unsqueeze(-1)  # (S, 1)
    pair_out = inner(self, hidden_states[token_idx], pair_ids, pair_w)  # (S, H), weighted
    out = torch.zeros_like(hidden_states)
    out.index_add_(0, token_idx, pair_out.to(out.dtype))
    _count(counters, int(token_idx.numel()), tokens)
    return out


def _host_decode(experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                 counters: dict[str, int] | None) -> Tensor | None:
    """The decode branch of ``skipping_experts_forward`` on fused float weights with the top-2 rule decided on
    the host (``keep_rows_top2``: the same decisions as ``keep_mask``) from the routing read once, instead of a
    handful of tensor ops per layer and step; None where it does not apply (another rule, beta <= 0, a NaN
    weight): the tensor path runs."""
    beta = float(getattr(experts, "moeslim_beta", 0.0))
    if beta <= 0 or getattr(experts, "moeslim_rule", "top2") != "top2" or top_k_index.shape[1] != 2:
        return None
    keep = keep_rows_top2(top_k_weights.float().tolist(), beta)
    if keep is None:
        return None
    protect = getattr(experts, "moeslim_protect", None)  # (T,) bool, set per forward by the ODP attention hook
    if protect is not None and protect.numel() == len(keep):
        keep = [[True, True] if p else row for row, p in zip(keep, protect.tolist(), strict=True)]
    n_experts = int(getattr(experts, "num_experts"))  # noqa: B009
    pairs = [[e if kp else n_experts for e, kp in zip(row, krow, strict=True)]
             for row, krow in zip(top_k_index.tolist(), keep, strict=True)]
    return _direct_decode(experts, hidden_states, pairs, top_k_weights, keep, counters)


def _direct_decode(experts: nn.Module, hidden_states: Tensor, pairs: list[list[int]], top_k_weights: Tensor,
                   keep: Tensor | list[list[bool]], counters: dict[str, int] | None) -> Tensor:
    """A few routed pairs on fused float weights, the routing on the host: pairs (T, k) expert ids
    (``num_experts``: skipped), top_k_weights (T, k), keep (T, k) as a tensor or host bools -> (T, H)."""
    n_experts = int(getattr(experts, "num_experts"))  # noqa: B009
    tokens, k = top_k_weights.shape
    kept = sum(e < n_experts for row in pairs for e in row)
    _count(counters, kept, tokens)
    if kept == tokens * k:
        # Nothing skipped: the same direct matmuls on the original weights, which at these few pairs cost less
        # than the fused forward's set-up (equal to it up to float rounding, not bit for bit).
        return _direct_forward(experts, hidden_states, pairs, top_k_weights)
    if kept == 1:  # one token keeping one expert (top-2 decode): that expert alone
        return _one_pair_forward(experts, hidden_states, pairs[0], top_k_weights)
    mask = keep if isinstance(keep, Tensor) else torch.tensor(keep, device=top_k_weights.device)
    return _direct_forward(experts, hidden_states, pairs, rescale_kept(top_k_weights, mask))


def _one_pair_forward(experts: nn.Module, hidden_states: Tensor, routed: list[int], top_k_weights: Tensor) -> Tensor:
    """hidden_states (1, H), routed (k,) expert ids with exactly one below ``num_experts``, top_k_weights (1, k)
    -> (1, H): the kept expert at the token's whole top-k weight. ``rescale_kept``'s kept * (total / kept sum) with
    the kept sum = the kept weight (the skipped ones add exact zeros), in three ops instead of its seven; the output
    is ``_direct_forward``'s but for the sign of exact zeros (no zero-filled buffer to add into)."""
    n_experts = int(getattr(experts, "num_experts"))  # noqa: B009
    has_gate = bool(getattr(experts, "has_gate"))  # noqa: B009
    j = next(j for j, e in enumerate(routed) if e < n_experts)
    w = top_k_weights[:, j:j + 1]  # (1, 1)
    w = w * (top_k_weights.sum(-1, keepdim=True) / w)
    y = expert_output(experts, routed[j], hidden_states, {}, "gate_up_proj" if has_gate else "up_proj", has_gate)
    return (y * w.to(y.dtype)).to(hidden_states.dtype)


def _direct_forward(experts: nn.Module, hidden_states: Tensor, routed: list[list[int]], weights: Tensor) -> Tensor:
    """``routed_forward`` on a routing already on the host: hidden_states (T, H), routed (T, k) expert ids
    (``num_experts``: skipped), weights (T, k) rescaled -> (T, H). Each kept expert runs once on its tokens' rows,
    as two matmuls on its slice of the fused weights, and adds into the output in expert order (the same sums as
    ``routed_forward``)."""
    n_experts = int(getattr(experts, "num_experts"))  # noqa: B009
    has_gate = bool(getattr(experts, "has_gate"))  # noqa: B009
    up_name = "gate_up_proj" if has_gate else "up_proj"
    if len(routed) == 1:
        y = _two_pairs_native(experts, hidden_states, routed[0], weights, up_name, has_gate)
        if y is not None:
            return y
    by_expert: dict[int, list[tuple[int, int]]] = {}
    for t, row in enumerate(routed):
        for j, e in enumerate(row):
            if e < n_experts:
                by_expert.setdefault(e, []).append((t, j))
    out = torch.zeros_like(hidden_states)
    for e in sorted(by_expert):
        pairs = by_expert[e]
        if len(pairs) == 1:  # decode: one token's rows by slicing, no index tensors
            t, j = pairs[0]
            y = expert_output(experts, e, hidden_states[t:t + 1], {}, up_name, has_gate)
            out[t:t + 1] += (y * weights[t:t + 1, j:j + 1].to(y.dtype)).to(out.dtype)
            continue
        token_idx = torch.tensor([t for t, _ in pairs], device=hidden_states.device)
        slot = torch.tensor([j for _, j in pairs], device=hidden_states.device)
        y = expert_output(experts, e, hidden_states[token_idx], {}, up_name, has_gate)
        y = y * weights[token_idx, slot].unsqueeze(-1).to(y.dtype)
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def _two_pairs_native(experts: nn.Module, hidden_states: Tensor, routed: list[int], weights: Tensor, up_name: str,
                      has_gate: bool) -> Tensor | None:
    """``_direct_forward`` for one token keeping exactly two experts, both at once through the native GEMV
    (``dense_native``: each row through its own expert), or None where that does not apply (not two kept pairs,
    transposed weights, biases, a post-expert norm, not bfloat16 on a CPU with the kernel).

    hidden_states (1, H), routed (k,) expert ids (``num_experts``: skipped), weights (1, k) -> (1, H). The same
    per-row sums as two ``expert_output`` calls and the same sum of two weighted bfloat16 outputs (one rounding)
    in four torch ops and two kernel calls instead of about twenty ops.
    """
    n_experts = int(getattr(experts, "num_experts"))  # noqa: B009
    slots = [j for j, e in enumerate(routed) if e < n_experts]
    if (len(slots) != 2 or experts.is_transposed or getattr(experts, "has_bias", False)
            or getattr(experts, "has_post_expert_norm", False)):
        return None
    ids = [routed[j] for j in slots]
    h = dense_rows(hidden_states.expand(2, -1), getattr(experts, up_name), ids)
    if h is None:
        return None
    h = callable_attr(experts, "_apply_gate" if has_gate else "act_fn")(h)
    y = dense_rows(h.contiguous(), getattr(experts, "down_proj"), ids)  # noqa: B009
    if y is None:
        return None
    w = weights.reshape(-1, 1) if len(routed) == 2 else weights.reshape(-1)[slots].unsqueeze(-1)  # (2, 1)
    return (y * w.to(y.dtype)).sum(0, keepdim=True).to(hidden_states.dtype)


def _supported(layer: MoELayer) -> bool:
    experts = layer.experts
    eager = getattr(type(experts).forward, "__wrapped__", None)
    if not hasattr(experts, "has_gate") or not hasattr(experts, "config") or eager is None:
        return False  # not dispatched through ExpertsInterface
    params = [p for p in inspect.signature(eager).parameters.values() if p.name != "self"]
    return len(params) >= _STANDARD_ARGS and all(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params[:_STANDARD_ARGS])


def _check_supported(layers: list[MoELayer]) -> None:
    blocked = [layer.family for layer in layers if layer.family.skip_blocker]
    if blocked:
        raise SkippingUnsupportedError(
            f"{blocked[0].name}: dynamic expert skipping cannot run this family: {blocked[0].skip_blocker}")
    bad = [layer for layer in layers if not _supported(layer)]
    if bad:
        raise SkippingUnsupportedError(
            f"dynamic skipping needs fused experts dispatched through transformers' ExpertsInterface with forward"
            f"(hidden_states, top_k_index, top_k_weights); {type(bad[0].experts).__name__} "
            f"({bad[0].family.name}) does not. Supported: {', '.join(SUPPORTED_FAMILIES)}"
        )


def check_skipping_supported(model: nn.Module) -> None:
    """Raise ``SkippingUnsupportedError`` (a ValueError) when some MoE layer cannot take the skipping forward."""
    _check_supported(find_moe_layers(model))


# every family of the table (table order) has fused, dispatched experts; those with a skip_blocker wrap them
SUPPORTED_FAMILIES = tuple(name for name, spec in FAMILIES.items() if not spec.skip_blocker)


def install_skipping(model: nn.Module, betas: Mapping[int, float], rule: str = "top2") -> None:
    """Skip experts in every MoE layer with per-layer thresholds ``betas`` {decoder layer index: beta}.

    Layers without a beta get 0 (skip nothing). Counters start at zero. Calling it again replaces the thresholds.
    """
    if rule not in SKIP_RULES:
        raise ValueError(f"unknown skip rule {rule!r}; use one of {SKIP_RULES}")
    layers = find_moe_layers(model)
    _check_supported(layers)
    unknown = sorted(set(betas) - {layer.layer_idx for layer in layers})
    if unknown:
        raise ValueError(f"betas for layers {unknown} that are not MoE layers; MoE layers: "
                         f"{[layer.layer_idx for layer in layers]}")
    register_forward(IMPLEMENTATION, skipping_experts_forward)
    hf_model = pretrained(model)
    previous = current_implementation(hf_model.config)
    for layer in layers:
        experts = layer.experts
        if previous != IMPLEMENTATION:
            set_state(experts, "inner", previous or "grouped_mm")
        elif not hasattr(experts, "moeslim_inner"):
            set_state(experts, "inner", "grouped_mm")
        set_state(experts, "beta", float(betas.get(layer.layer_idx, 0.0)))
        set_state(experts, "rule", rule)
        set_state(experts, "counters", {"expert_calls": 0, "tokens": 0})
    hf_model.set_experts_implementation(IMPLEMENTATION)
    for layer in layers:
        use_implementation(layer.experts, IMPLEMENTATION)


def uninstall_skipping(model: nn.Module) -> None:
    """Back to the experts implementation used before ``install_skipping``."""
    layers = find_moe_layers(model)
    inner = next((getattr(layer.experts, "moeslim_inner", None) for layer in layers), None)
    if inner is None:
        return
    pretrained(model).set_experts_implementation(inner)
    for layer in layers:
        use_implementation(layer.experts, inner)
        for name in ("moeslim_beta", "moeslim_rule", "moeslim_inner", "moeslim_counters"):
            if hasattr(layer.experts, name):
                delattr(layer.experts, name)


def set_state(experts: nn.Module, name: str, value: object) -> None:
    """Set the per-module runtime state ``moeslim_<name>`` (listed in the module docstring).

    Plain attributes, not buffers: settings and counters that are never saved or moved with the weights.
    """
    setattr(experts, f"moeslim_{name}", value)


def has_counters(model: nn.Module) -> bool:
    """Whether a skipping runtime counts expert calls in this model's MoE layers."""
    return any(isinstance(getattr(layer.experts, "moeslim_counters", None), dict) for layer in find_moe_layers(model))


def reset_counters(model: nn.Module) -> None:
    for layer in find_moe_layers(model):
        set_state(layer.experts, "counters", {"expert_calls": 0, "tokens": 0})


def counters(model: nn.Module) -> dict[int, dict[str, int]]:
    """{decoder layer index: {"expert_calls", "tokens"}} since the last reset."""
    return {layer.layer_idx: dict(getattr(layer.experts, "moeslim_counters", {"expert_calls": 0, "tokens": 0}))
            for layer in find_moe_layers(model)}


def calls_per_token_per_layer(model: nn.Module) -> float:
    """Routed expert calls per token in ONE MoE layer, averaged over layers (top_k without skipping).

    The per-layer view of the counters; ``evaluate.expert_calls_per_token`` reports the model's total (the sum
    over layers), which is what the side-by-side table shows.
    """
    per_layer = [c["expert_calls"] / c["tokens"] for c in counters(model).values() if c["tokens"]]
    return sum(per_layer) / len(per_layer) if per_layer else float("nan")


def installed_rule(model: nn.Module) -> str | None:
    """The skip rule installed in ``model`` (``install_skipping``), None when it skips nothing."""
    return next((str(getattr(layer.experts, "moeslim_rule", "top2")) for layer in find_moe_layers(model)
                 if getattr(layer.experts, "moeslim_inner", None) is not None), None)
