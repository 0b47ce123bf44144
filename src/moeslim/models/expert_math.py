"""One routed expert's maths, read from the transformers 5 fused experts module.

transformers 5 experts modules (``@use_experts_implementation``) hold ``gate_up_proj`` (or ``up_proj`` when
``has_gate`` is False) and ``down_proj`` as 3D tensors, laid out (E, out, in), or (E, in, out) when
``is_transposed``; optional biases ``gate_up_proj_bias`` / ``up_proj_bias`` / ``down_proj_bias`` when
``has_bias``; the gating through ``_apply_gate`` (gate/up split, family-specific: gpt-oss interleaves and
clamps) and an optional ``post_expert_norm``. These helpers only read those standard attributes, so they
work for every family the experts integration covers. One variant is not declared through the integration: a
``post_expert_norm`` with a scale row per expert, called as ``norm(y, expert_ids)`` by an experts class whose own
forward wraps the dispatched one (Ergo: each route's output is normalised before the weighted sum);
``per_expert_norm`` finds it and ``post_expert`` applies either kind.

Quantization needs what the experts forward hides: the intermediate activation (input of ``down_proj``)
for the down projection's GPTQ Hessian, and expert e's output with replacement weights (quantization error
of one expert without touching the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .attrs import callable_attr, tensor_attr
from .layer import MoELayer

__all__ = ["ExpertWeights", "expert_forward", "expert_intermediate", "expert_weight_views", "per_expert_norm",
           "post_expert"]


@dataclass(frozen=True)
class ExpertWeights:
    """The two fused expert tensors of a layer, as stored (no copies).

    up: (E, out, in) — or (E, in, out) when ``transposed`` — of the first projection, named ``up_name``
        (``gate_up_proj``, or ``up_proj`` for experts without a gate).
    down: same convention for ``down_proj``.
    """

    up_name: str
    up: Tensor
    down_name: str
    down: Tensor
    transposed: bool


def _has_gate(experts: torch.nn.Module) -> bool:
    return bool(getattr(experts, "has_gate", True)) and isinstance(getattr(experts, "gate_up_proj", None), Tensor)


def expert_weight_views(layer: MoELayer) -> ExpertWeights:
    """The layer's fused expert tensors and their layout flag (views of the live parameters)."""
    experts = layer.experts
    up_name = "gate_up_proj" if _has_gate(experts) else "up_proj"
    return ExpertWeights(
        up_name=up_name,
        up=tensor_attr(experts, up_name),
        down_name="down_proj",
        down=tensor_attr(experts, "down_proj"),
        transposed=bool(getattr(experts, "is_transposed", False)),
    )


def per_expert_norm(experts: torch.nn.Module) -> torch.nn.Module | None:
    """The experts' ``post_expert_norm`` when it holds one scale row per expert ((E, H) weight) and takes the
    expert ids (``norm(y (n, H), expert_ids (n,))``), else None. Its rows are per-expert tensors: pruning slices
    them, merging averages them."""
    norm = getattr(experts, "post_expert_norm", None)
    weight = getattr(norm, "weight", None)
    if not isinstance(norm, torch.nn.Module) or not isinstance(weight, Tensor) or weight.ndim != 2:
        return None
    up = getattr(experts, "gate_up_proj", getattr(experts, "up_proj", None))
    return norm if isinstance(up, Tensor) and weight.shape[0] == up.shape[0] else None


def post_expert(experts: torch.nn.Module, y: Tensor, e: int) -> Tensor:
    """(n, H) -> (n, H): expert e's down-projection output through its post-expert norm (the integration's shared
    one, or a per-expert one), unchanged when the experts have none."""
    if getattr(experts, "has_post_expert_norm", False):
        return callable_attr(experts, "post_expert_norm")(y)
    norm = per_expert_norm(experts)
    if norm is None:
        return y
    return norm(y, torch.full((y.shape[0],), e, dtype=torch.long, device=y.device))


def _linear(x: Tensor, w: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """x (T, in), w (out, in) — or (in, out) when transposed — -> (T, out)."""
    out = x @ w.to(x.dtype) if transposed else x @ w.to(x.dtype).T
    return out if bias is None else out + bias.to(x.dtype)


def _bias(experts: torch.nn.Module, name: str, e: int) -> Tensor | None:
    if not getattr(experts, "has_bias", False):
        return None
    b = getattr(experts, f"{name}_bias", None)
    return None if b is None else b[e]


@torch.no_grad()
def expert_intermediate(layer: MoELayer, x: Tensor, e: int, up: Tensor | None = None) -> Tensor:
    """(T, H) -> (T, I): expert e's activation entering ``down_proj``, i.e. gate(x W_up^T + b).

    ``up`` optionally replaces expert e's first-projection slice (stored layout, (out, in) or (in, out)).
    """
    views = expert_weight_views(layer)
    experts = layer.experts
    w = views.up[e] if up is None else up
    h = _linear(x, w, _bias(experts, views.up_name, e), views.transposed)  # (T, 2I) or (T, I)
    return callable_attr(experts, "_apply_gate" if views.up_name == "gate_up_proj" else "act_fn")(h)


@torch.no_grad()
def expert_forward(layer: MoELayer, x: Tensor, e: int, up: Tensor | None = None, down: Tensor | None = None
                   ) -> Tensor:
    """(T, H) -> (T, H): expert e's unweighted output, optionally with replaced weight slices.

    With no replacement this equals ``layer.expert_outputs(x, [e])[:, 0]``.
    """
    views = expert_weight_views(layer)
    experts = layer.experts
    h = expert_intermediate(layer, x, e, up)
    w = views.down[e] if down is None else down
    return post_expert(experts, _linear(h, w, _bias(experts, views.down_name, e), views.transposed), e)
