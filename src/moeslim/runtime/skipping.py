"""Dynamic expert skipping at inference time, through transformers' ExpertsInterface.

``install_skipping`` registers the experts forward ``moeslim_skip`` and selects it for the model. That forward drops
skipped (token, expert) pairs BEFORE any matmul, then hands the kept ones to the experts implementation the model used
before: forwards that drop the placeholder index ``num_experts`` (``routed_experts.drops_placeholder``: low-bit) get
the (T, k) routing with skipped pairs pointed at the placeholder; transformers' fused float forwards (grouped_mm,
batched_mm) are replaced, when a token skips, by ``routed_forward`` on the same fused weights; any other
implementation (eager, low-rank) gets the kept pairs as one-expert "tokens", summed back per token. Kept weights
are rescaled to the token's original total; nothing skipped = the original arguments (bit-identical output).

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

from moeslim.methods.skip.thresholds import SKIP_RULES, keep_mask, rescale_kept
from moeslim.models import FAMILIES, MoELayer, find_moe_layers
from moeslim.models.attrs import pretrained
from moeslim.runtime.routed_experts import (
    SKIP_IMPLEMENTATION,
    current_implementation,
    handles_placeholder,
    register_forward,
    routed_forward,
    use_implementation,
)

IMPLEMENTATION = SKIP_IMPLEMENTATION
_STANDARD_ARGS = 3  # forward(hidden_states, top_k_index, top_k_weights)
_FUSED_FLOAT = ("grouped_mm", "batched_mm")  # transformers' forwards over the fused float expert tensors


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


def skipping_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
                             ) -> Tensor:
    """hidden_states (T, H), top_k_index / top_k_weights (T, k) -> (T, H), skipped pairs never computed."""
    inner = _inner_forward(self)
    beta = float(getattr(self, "moeslim_beta", 0.0))
    keep = keep_mask(top_k_weights, beta, getattr(self, "moeslim_rule", "top2"))  # (T, k)
    tokens, k = top_k_index.shape
    protect = getattr(self, "moeslim_protect", None)  # (T,) bool, set per forward by the ODP attention hook
    if protect is not None and protect.numel() == tokens:
        keep = keep | protect.to(keep.device).unsqueeze(-1)
    counters = getattr(self, "moeslim_counters", None)
    if handles_placeholder(inner):
        # The inner forward drops pairs routed to the placeholder index: skipped pairs point there (weight 0),
        # the routing keeps its (T, k) shape, and nothing skipped computes. Nothing skipped: the same arguments.
        routed = top_k_index.masked_fill(~keep, int(getattr(self, "num_experts")))  # noqa: B009
        if counters is not None:
            counters["expert_calls"] += int(keep.sum())
            counters["tokens"] += tokens
        return inner(self, hidden_states, routed, rescale_kept(top_k_weights, keep))
    if bool(keep.all()):
        # Nothing skipped: the inner implementation on the original arguments (bit-identical output).
        if counters is not None:
            counters["expert_calls"] += tokens * k
            counters["tokens"] += tokens
        return inner(self, hidden_states, top_k_index, top_k_weights)
    weights = rescale_kept(top_k_weights, keep)
    if getattr(self, "moeslim_inner", "grouped_mm") in _FUSED_FLOAT:
        # transformers' own fused float forwards: each kept expert's rows as one matmul on the fused weights
        # (``routed_forward`` drops the placeholder): no gather of the kept pairs into one-expert tokens and no
        # grouped_mm set-up, which at decode costs more than the matmuls.
        routed = top_k_index.masked_fill(~keep, int(getattr(self, "num_experts")))  # noqa: B009
        if counters is not None:
            counters["expert_calls"] += int(keep.sum())
            counters["tokens"] += tokens
        return routed_forward(self, hidden_states, routed, weights, {})
    token_idx, slot = keep.nonzero(as_tuple=True)  # (S,) kept pairs, token-major order
    pair_ids = top_k_index[token_idx, slot].unsqueeze(-1)  # (S, 1)
    pair_w = weights[token_idx, slot].unsqueeze(-1)  # (S, 1)
    pair_out = inner(self, hidden_states[token_idx], pair_ids, pair_w)  # (S, H), weighted
    out = torch.zeros_like(hidden_states)
    out.index_add_(0, token_idx, pair_out.to(out.dtype))
    if counters is not None:
        counters["expert_calls"] += int(token_idx.numel())
        counters["tokens"] += tokens
    return out


def _supported(layer: MoELayer) -> bool:
    experts = layer.experts
    eager = getattr(type(experts).forward, "__wrapped__", None)
    if not hasattr(experts, "has_gate") or not hasattr(experts, "config") or eager is None:
        return False  # not dispatched through ExpertsInterface
    params = [p for p in inspect.signature(eager).parameters.values() if p.name != "self"]
    return len(params) >= _STANDARD_ARGS and all(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params[:_STANDARD_ARGS])


def _check_supported(layers: list[MoELayer]) -> None:
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


SUPPORTED_FAMILIES = tuple(FAMILIES)  # every family of the table (table order) has fused, dispatched experts


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
