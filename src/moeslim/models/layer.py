"""Structural discovery of MoE blocks and the ``MoELayer`` view over one of them.

A MoE block is found by shape, not by class name: the fused experts module is a module holding a 3D
``gate_up_proj`` (or ``up_proj``) Parameter (E, ., .); its parent is the block; the router is the block's module
outside the experts whose 2D ``weight`` is (E, H) (a direct child, or inside a router wrapper such as Afmoe's
``router.gate`` or HunYuan's ``gate.wg``). Routing settings (top-k, renormalisation, scale, groups, correction
bias) are read from the router, its wrappers, then the block, then the config. Family specifics (routing
function, config keys, shared experts) come from the family table (``families.py``); models the adapters are not
exact for are refused first (``support.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .attrs import tensor_attr
from .families import (
    FamilySpec,
    UnsupportedModelError,
    family_of,
    supported_families,
)
from .routing import ROUTING
from .support import refusal

_EXPERT_WEIGHT_NAMES = ("gate_up_proj", "up_proj")
_ROUTER_NAMES = ("gate", "router")
_LAYER_PATHS = (
    "model.layers",
    "layers",
    "model.language_model.layers",
    "model.decoder.layers",
    "transformer.h",
    "transformer.blocks",
)


class MoELayer:
    """A view over one decoder layer's MoE block (holds references, never copies of weights).

    ``block`` maps (B, S, H) -> (B, S, H); for families with ``family.block_returns_tuple`` (gpt-oss) it
    returns ``(hidden, router_scores)``. All methods take flattened tokens (T, H) and run without grad.
    After ``select_experts`` a view stays valid (it reads sizes from the live modules).
    """

    def __init__(
        self,
        layer_idx: int,
        block_name: str,
        block: nn.Module,
        router: nn.Module,
        experts: nn.Module,
        family: FamilySpec,
        config: Any,
    ) -> None:
        self.layer_idx = layer_idx
        self.block_name = block_name  # path of the block inside the decoder layer, e.g. "mlp"
        self.block = block
        self.router = router  # the module holding the (E, H) router weight (maybe nested in a router wrapper)
        self.experts = experts
        self.family = family
        self.config = config

    def __repr__(self) -> str:
        return (
            f"MoELayer(layer={self.layer_idx}, block={self.block_name!r}, family={self.family.name!r}, "
            f"experts={self.num_experts}, top_k={self.top_k}, shared={len(self.shared_modules)})"
        )

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return int(_expert_weight(self.experts).shape[0])

    @property
    def top_k(self) -> int:
        return int(self.routing_kwargs()["top_k"])

    @property
    def hidden_size(self) -> int:
        return int(self.router_weight.shape[1])

    @property
    def router_weight(self) -> Tensor:
        return tensor_attr(self.router, "weight")  # (E, H)

    @property
    def shared_modules(self) -> list[nn.Module]:
        return [
            m for a in self.family.shared_attrs if isinstance(m := getattr(self.block, a, None), nn.Module)
        ]

    @property
    def shared_gate(self) -> nn.Module | None:
        name = self.family.shared_gate_attr
        gate = getattr(self.block, name, None) if name else None
        return gate if isinstance(gate, nn.Module) else None

    # -- routing -----------------------------------------------------------------------------------
    def routing_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of this family's routing function, read from the router (else the config)."""
        fn = ROUTING[self.family.routing][0]
        wanted = set(inspect.signature(fn).parameters) - {"logits", "allowed"}
        return {name: self._routing_setting(name) for name in wanted}

    def routing_owners(self) -> list[nn.Module]:
        """The router, the modules between it and the block, then the block: where routing settings live."""
        path = next((n for n, m in self.block.named_modules() if m is self.router), "")
        parts = path.split(".") if path else []
        owners = [self.block.get_submodule(".".join(parts[:i])) for i in range(len(parts) - 1, 0, -1)]
        # The router's own submodules first (ERNIE keeps its correction bias in ``gate.moe_statics``).
        return [*self.router.modules(), *owners, self.block]

    def correction_bias(self) -> Tensor | None:
        """(E,) bias added to the scores for choice only (``e_score_correction_bias`` / ``expert_bias``)."""
        for owner in self.routing_owners():
            for attr in _BIAS_ATTRS:
                bias = getattr(owner, attr, None)
                if isinstance(bias, torch.Tensor) and bias.shape in ((self.num_experts,), (1, self.num_experts)):
                    return bias.reshape(-1)  # (E,); ERNIE stores (1, E)
        return None

    def _routing_setting(self, name: str) -> Any:
        if name == "correction_bias":
            return self.correction_bias()
        for attr in _SETTING_ATTRS.get(name, ()):
            for owner in self.routing_owners():
                value = getattr(owner, attr, None)
                if value is not None and not isinstance(value, (nn.Module, torch.Tensor)):
                    return value
        fam, cfg = self.family, self.config
        if name == "top_k":
            return fam.config_value(cfg, fam.top_k_key)
        if name == "renormalize":
            return bool(fam.config_value(cfg, fam.renormalize_key, fam.renormalize))
        if name == "scaling":
            return float(fam.config_value(cfg, fam.scaling_key, 1.0))
        if name in ("n_group", "topk_group"):
            key = fam.group_keys[0 if name == "n_group" else 1] if fam.group_keys else None
            return int(fam.config_value(cfg, key, 1))
        defaults = {"topk_method": "greedy", "correction_bias": None, "jitter_eps": 0.0, "norm_min": 0.0}
        return getattr(cfg, name, defaults.get(name))

    @torch.no_grad()
    def router_logits(self, x: Tensor) -> Tensor:
        """(T, H) -> (T, E) float32 raw router logits (before softmax / sigmoid), from the router itself.

        A router whose forward needs more than the hidden states (a correction bias passed by the block) is
        replaced by its own linear map, which is what such routers compute first.
        """
        if _takes_one_argument(self.router):
            out = self.router(x)
            logits = out[0] if isinstance(out, tuple) else out
        else:
            logits = nn.functional.linear(x, self.router_weight, getattr(self.router, "bias", None))
        return logits.float()

    def gate_probs(self, logits: Tensor) -> Tensor:
        """(T, E) -> (T, E) per-expert gate scores before top-k: softmax probs, or sigmoid scores (V3/GLM).

        For top-k-then-softmax (gpt-oss, GraniteMoE) and sparsemixer (PhiMoE), which have no pre-top-k
        probability, this is the softmax over all experts.
        """
        return ROUTING[self.family.routing][1](logits)

    @torch.no_grad()
    def route(self, logits: Tensor, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(T, E) logits, allowed (E,) bool -> weights (T, k) float32, ids (T, k) long, as the router does.

        Experts with ``allowed=False`` are never chosen (see ``routing.py`` for how each family masks).
        The order of the k columns follows the family (DeepSeek/GLM use unsorted top-k).
        """
        if allowed is not None:
            allowed = _check_allowed(allowed, self.num_experts)
        fn = ROUTING[self.family.routing][0]
        weights, ids = fn(logits, allowed=allowed, **self.routing_kwargs())
        return weights.float(), ids.long()

    # -- experts -----------------------------------------------------------------------------------
    @torch.no_grad()
    def expert_outputs(self, x: Tensor, expert_ids: Sequence[int] | None = None) -> Tensor:
        """(T, H) -> (T, n, H) unweighted output of each listed expert (default all) on every token.

        Runs the experts module itself with one expert per token at weight 1, so every layout (transposed,
        biased, interleaved gate/up, custom activation) and the configured experts implementation are
        honoured.
        """
        ids = range(self.num_experts) if expert_ids is None else [int(e) for e in expert_ids]
        tokens = x.shape[0]
        ones = torch.ones((tokens, 1), dtype=x.dtype, device=x.device)
        outs = []
        for e in ids:
            index = torch.full((tokens, 1), e, dtype=torch.long, device=x.device)
            outs.append(self.experts(x, index, ones))
        return torch.stack(outs, dim=1)

    @staticmethod
    def combine(outputs: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """outputs (T, E, H) of all experts, weights / ids (T, k) -> (T, H) routed sum_k w * out[ids]."""
        picked = outputs.gather(1, ids.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]))  # (T, k, H)
        return (picked * weights.unsqueeze(-1).to(picked.dtype)).sum(dim=1)

    @torch.no_grad()
    def shared_output(self, x: Tensor) -> Tensor | None:
        """(T, H) -> (T, H) output of the shared experts incl. their sigmoid gate; None if there are none."""
        modules = self.shared_modules
        if not modules:
            return None
        out = sum(m(x) for m in modules)
        gate = self.shared_gate
        if gate is not None:
            out = torch.sigmoid(gate(x)) * out
        return out

    @torch.no_grad()
    def forward(self, x: Tensor, allowed: Tensor | None = None) -> Tensor:
        """(T, H) -> (T, H) whole block output (routed + shared) under masked routing.

        With ``allowed=None`` this equals the block's own forward (same router maths, same experts call).
        """
        weights, ids = self.route(self.router_logits(x), allowed)
        out = self.experts(x, ids, weights)
        shared = self.shared_output(x)
        return out if shared is None else out + shared

    def block_output(self, output: Any) -> Tensor:
        """The hidden-states part of the block's own forward output (drops gpt-oss' router scores)."""
        return output[0] if isinstance(output, tuple) else output


_BIAS_ATTRS = ("e_score_correction_bias", "expert_bias")
# Module attributes holding each routing setting (routers read their own copy, set from the config at init, so
# these win over the config). Searched on the router, its wrappers, then the block.
_SETTING_ATTRS: dict[str, tuple[str, ...]] = {
    "top_k": ("top_k",),
    "renormalize": ("norm_topk_prob",),
    "scaling": ("routed_scaling_factor", "router_scaling_factor", "route_scale"),
    "n_group": ("num_group", "n_group"),
    "topk_group": ("topk_group",),
    "topk_method": ("topk_method",),
    "jitter_eps": ("router_jitter_noise",),
    "norm_min": ("norm_min",),
}


def _takes_one_argument(module: nn.Module) -> bool:
    """Whether ``module(x)`` is the whole router (no bias or ids argument passed in by the block)."""
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(params) == 1


def _check_allowed(allowed: Tensor, num_experts: int) -> Tensor:
    allowed = torch.as_tensor(allowed, dtype=torch.bool)
    if allowed.shape != (num_experts,):
        raise ValueError(f"allowed must be a ({num_experts},) bool mask, got shape {tuple(allowed.shape)}")
    if not bool(allowed.any()):
        raise ValueError("allowed masks out every expert")
    return allowed


def _expert_weight(module: nn.Module) -> Tensor:
    for name in _EXPERT_WEIGHT_NAMES:
        p = getattr(module, name, None)
        if isinstance(p, torch.Tensor) and p.ndim == 3:
            return p
    raise UnsupportedModelError(f"{type(module).__name__} has no 3D gate_up_proj / up_proj")


def _is_fused_experts(module: nn.Module) -> bool:
    return any(
        isinstance(p := getattr(module, n, None), torch.Tensor) and p.ndim == 3 for n in _EXPERT_WEIGHT_NAMES
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list (``model.model.layers`` for every supported family)."""
    for path in _LAYER_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise UnsupportedModelError(
        f"cannot find the decoder layers of {type(model).__name__} (looked at {list(_LAYER_PATHS)}); "
        f"supported families: {supported_families()}"
    )


def attention_module(model: nn.Module, layer_idx: int) -> nn.Module:
    """The self-attention module of decoder layer ``layer_idx`` (``self_attn`` in every supported family)."""
    layer = decoder_layers(model)[layer_idx]
    attn = getattr(layer, "self_attn", None)
    if isinstance(attn, nn.Module):
        return attn
    raise UnsupportedModelError(
        f"decoder layer {layer_idx} of {type(model).__name__} has no self_attn module "
        f"(children: {[name for name, _ in layer.named_children()]})"
    )


def _find_block(layer: nn.Module) -> tuple[str, nn.Module, nn.Module] | None:
    """(block path, block, fused experts) inside one decoder layer, or None for a dense layer."""
    for name, module in layer.named_modules():
        if _is_fused_experts(module):
            block_name = name.rsplit(".", 1)[0] if "." in name else ""
            block = layer.get_submodule(block_name) if block_name else layer
            return block_name, block, module
    return None


def _find_router(block: nn.Module, experts: nn.Module, hidden: int, layer_idx: int) -> nn.Module:
    """The block's module (outside the experts) whose weight is (E, H); a child named gate/router wins if
    several match. The router may sit inside a wrapper (``router.gate``, ``gate.wg``)."""
    num_experts = _expert_weight(experts).shape[0]
    inside_experts = {id(m) for m in experts.modules()}
    found = {
        name: child
        for name, child in block.named_modules()
        if name
        and id(child) not in inside_experts
        and isinstance(w := getattr(child, "weight", None), torch.Tensor)
        and tuple(w.shape) == (num_experts, hidden)
    }
    named = [found[n] for n in found if n.split(".")[0] in _ROUTER_NAMES]
    if len(named) == 1 or (named and len(found) > 1):
        return named[0]
    if len(found) == 1:
        return next(iter(found.values()))
    raise UnsupportedModelError(
        f"layer {layer_idx}: {type(block).__name__} has fused experts ({num_experts} experts) but "
        f"{'no' if not found else 'an ambiguous'} router child with a ({num_experts}, {hidden}) weight "
        f"(candidates: {sorted(found)}); supported families: {supported_families()}"
    )


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """One ``MoELayer`` per decoder layer that has a MoE block (dense layers are skipped).

    Raises ``UnsupportedModelError`` for models without fused MoE blocks or with an unknown layout.
    """
    config = _text_config(model)
    layers = decoder_layers(model)
    blocks = {idx: hit for idx, layer in enumerate(layers) if (hit := _find_block(layer)) is not None}
    refused = refusal(model.config)
    if not blocks:
        raise UnsupportedModelError(_no_moe_message(model, layers) + (f" ({refused})" if refused else ""))
    if refused is not None:
        raise UnsupportedModelError(refused)
    if any(name == "" for name, _, _ in blocks.values()):
        raise UnsupportedModelError(
            f"{type(model).__name__}: the fused experts sit directly in the decoder layer (no separate MoE "
            f"block), so moeslim cannot tell the MoE output from the rest of the layer; "
            f"supported families: {supported_families()}"
        )
    family = family_of(config)  # after discovery, so a dense model gets the message that names its layers
    hidden = int(config.hidden_size)
    found = [
        MoELayer(idx, name, block, _find_router(block, experts, hidden, idx), experts, family, config)
        for idx, (name, block, experts) in blocks.items()
    ]
    if family.name == "generic":
        family = _probe_generic_routing(found[0], family)
        for moe in found:
            moe.family = family
    return found


def _text_config(model: nn.Module) -> Any:
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _no_moe_message(model: nn.Module, layers: nn.ModuleList) -> str:
    first = layers[0]
    children = ", ".join(f"{n}: {type(c).__name__}" for n, c in first.named_children())
    return (
        f"no MoE block found in {type(model).__name__} "
        f"(model_type {getattr(model.config, 'model_type', None)!r}, {len(layers)} decoder layers of "
        f"{type(first).__name__} with {children}): moeslim needs fused experts "
        f"(a module with a 3D gate_up_proj / up_proj parameter) and a router; "
        f"supported families: {supported_families()}"
    )


@torch.no_grad()
def _probe_generic_routing(moe: MoELayer, family: FamilySpec) -> FamilySpec:
    """Identify an unlisted family's routing by comparing its router's own output with each candidate."""
    gen = torch.Generator().manual_seed(0)
    weight = moe.router_weight
    x = torch.randn((16, weight.shape[1]), generator=gen).to(dtype=weight.dtype, device=weight.device)
    out = moe.router(x)
    if not (isinstance(out, tuple) and len(out) == 3):
        raise UnsupportedModelError(
            f"unlisted model_type {getattr(moe.config, 'model_type', None)!r}: its router "
            f"{type(moe.router).__name__} does not return (logits, weights, ids); "
            f"supported families: {supported_families()}"
        )
    logits, ref_w, ref_ids = out
    # A router that carries its own renormalisation flag is only tried with it (it wins in routing_kwargs).
    own = getattr(moe.router, _SETTING_ATTRS["renormalize"][0], None)
    renorm_options = [True, False] if own is None else [bool(own)]
    candidates = [
        replace(family, routing="softmax_topk", renormalize=r, renormalize_key=None) for r in renorm_options
    ] + [replace(family, routing="topk_softmax")]
    for spec in candidates:
        moe.family = spec
        w, ids = moe.route(logits.float())
        if _same_routing(w, ids, ref_w.float(), ref_ids):
            return spec
    raise UnsupportedModelError(
        f"unlisted model_type {getattr(moe.config, 'model_type', None)!r}: its router matches none of "
        f"softmax->top-k (with or without renormalisation) or top-k->softmax; "
        f"supported families: {supported_families()}"
    )


def _same_routing(w: Tensor, ids: Tensor, ref_w: Tensor, ref_ids: Tensor) -> bool:
    """Equal up to the order of the k columns."""
    if w.shape != ref_w.shape:
        return False
    order, ref_order = ids.argsort(dim=-1), ref_ids.argsort(dim=-1)
    same_ids = torch.equal(ids.gather(1, order), ref_ids.long().gather(1, ref_order))
    return same_ids and torch.allclose(w.gather(1, order), ref_w.gather(1, ref_order), atol=1e-5)
