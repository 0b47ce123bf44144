"""Online dynamic pruning (MC-MoE): dynamic skipping, except for the most important tokens.

A forward hook on each MoE layer's self-attention computes the paper's token importance from the
attention map that layer just produced (how much later tokens attend to each token, see
``methods/odp/importance.py``) and marks the top ``protect`` share of tokens of every sequence; the
skipping experts forward then keeps all experts for those tokens.

What happens where the score is not defined:
- Attention weights are only materialised by the ``eager`` attention implementation, so installing
  ODP switches the model to eager attention (slower than sdpa on long prompts; that is the price of
  reading the map). If an attention module still returns no weights, no token is protected there
  (plain skipping) and a warning is logged once.
- During decoding with a KV cache each step has one query token, which no later token has attended
  to yet: its column sum is undefined, so decode steps use plain skipping. Protection acts on the
  prompt (prefill) tokens, where the paper measures it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from moeslim.methods.odp import protected_tokens, token_importance
from moeslim.models import attention_module, find_moe_layers
from moeslim.models.attrs import pretrained
from moeslim.runtime.skipping import install_skipping, set_state

logger = logging.getLogger(__name__)
_HANDLES = "_moeslim_odp_handles"


def _make_hook(experts: nn.Module, share: float, warned: list[bool]) -> Any:
    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # (B, S, H)
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None  # (B, heads, S, S_k)
        set_state(experts, "protect", None)
        if hidden is None or weights is None:
            if not warned[0]:
                logger.warning("attention weights are not available: ODP protects no token (plain skipping)")
                warned[0] = True
            return
        if hidden.shape[1] < 2:
            return  # a decode step: see the module docstring
        mask = protected_tokens(token_importance(weights, hidden), share)  # (B, S)
        set_state(experts, "protect", mask.reshape(-1))

    return hook


def install_odp(model: nn.Module, betas: Mapping[int, float], rule: str = "top2", protect: float = 0.02) -> None:
    """Skipping with per-layer ``betas`` plus protection of the top ``protect`` share of tokens."""
    if not 0 < protect < 1:
        raise ValueError(f"protect={protect}: use a share of tokens in (0, 1), e.g. 0.02")
    uninstall_odp(model)
    install_skipping(model, betas, rule)
    pretrained(model).set_attn_implementation("eager")
    warned = [False]
    handles = []
    for layer in find_moe_layers(model):
        attn = attention_module(model, layer.layer_idx)
        set_state(layer.experts, "protect", None)
        handles.append(attn.register_forward_hook(_make_hook(layer.experts, protect, warned), with_kwargs=True))
    setattr(model, _HANDLES, handles)


def uninstall_odp(model: nn.Module) -> None:
    """Remove the attention hooks (skipping itself stays installed)."""
    for handle in getattr(model, _HANDLES, []):
        handle.remove()
    setattr(model, _HANDLES, [])
    for layer in find_moe_layers(model):
        if hasattr(layer.experts, "moeslim_protect"):
            set_state(layer.experts, "protect", None)


def protected_share(model: nn.Module) -> float:
    """Share of tokens protected in the last forward, over MoE layers (for reports and tests)."""
    masks = [m for m in (getattr(layer.experts, "moeslim_protect", None) for layer in find_moe_layers(model))
             if isinstance(m, torch.Tensor)]
    return float(torch.cat(masks).float().mean()) if masks else 0.0


def install_skip_section(model: nn.Module, section: Mapping[str, Any]) -> None:
    """Re-install from the ``skip`` entry of config.json's moeslim section: {"rule", "betas": {"0": b, ...}}
    (+ "protect" for online dynamic pruning: skipping with protected tokens, else plain skipping)."""
    betas = {int(k): float(v) for k, v in dict(section.get("betas", {})).items()}
    rule = str(section.get("rule", "top2"))
    protect = float(section.get("protect", 0.0))
    if protect > 0:
        install_odp(model, betas, rule, protect)
    else:
        install_skipping(model, betas, rule)
