"""Read and write a MoE layer's experts as plain matrices, for methods that build new expert weights.

Merging and low-rank decomposition compute new expert tensors; they must not know how a family stores them
(``gate_up_proj`` (E, 2I, H) or transposed (E, H, 2I), gate/up halves or interleaved rows, biases). This module
is that knowledge, next to ``expert_math.py``:

- ``read_experts(layer)`` -> ``ExpertMatrices`` in one orientation, (out, in), float32 copies;
- ``neuron_rows(layer)`` -> which rows of the first projection feed each intermediate neuron (so a neuron
  permutation moves gate and up rows together, whatever the family's split);
- ``matrices_forward(layer, mats, e, x)`` -> expert e's output computed from matrices (the family's gate,
  activation and post-expert norm);
- ``write_experts`` / ``write_router`` copy new values into the live tensors (same shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .attrs import callable_attr
from .expert_math import expert_weight_views, per_expert_norm
from .layer import MoELayer

__all__ = ["ExpertMatrices", "compressed_outputs", "matrices_forward", "matrices_intermediate", "neuron_rows",
           "read_experts", "router_bias", "write_experts", "write_router"]


@dataclass(frozen=True)
class ExpertMatrices:
    """A layer's expert weights in (out, in) orientation.

    up: (E, U, H) first projection (U = 2I for gated experts, I otherwise); down: (E, H, I);
    up_bias: (E, U) or None; down_bias: (E, H) or None;
    norm: (E, H) scale rows of a per-expert post-expert norm (``expert_math.per_expert_norm``, Ergo) or None.
    """

    up: Tensor
    down: Tensor
    up_bias: Tensor | None
    down_bias: Tensor | None
    norm: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return int(self.up.shape[0])

    @property
    def intermediate(self) -> int:
        return int(self.down.shape[2])


def _bias_param(layer: MoELayer, name: str) -> Tensor | None:
    experts = layer.experts
    if not getattr(experts, "has_bias", False):
        return None
    bias = getattr(experts, f"{name}_bias", None)
    return bias if isinstance(bias, Tensor) else None


def read_experts(layer: MoELayer) -> ExpertMatrices:
    """float32 copies of the layer's expert weights in (out, in) orientation."""
    views = expert_weight_views(layer)

    def standard(w: Tensor) -> Tensor:
        w = w.detach().float()
        return w.transpose(1, 2).contiguous() if views.transposed else w.clone()

    up_b, down_b = _bias_param(layer, views.up_name), _bias_param(layer, views.down_name)
    norm = _norm_param(layer)
    return ExpertMatrices(
        up=standard(views.up),
        down=standard(views.down),
        up_bias=None if up_b is None else up_b.detach().float().clone(),
        down_bias=None if down_b is None else down_b.detach().float().clone(),
        norm=None if norm is None else norm.detach().float().clone(),
    )


def _norm_param(layer: MoELayer) -> Tensor | None:
    """(E, H) scale rows of the layer's per-expert post-expert norm, or None."""
    norm = per_expert_norm(layer.experts)
    return None if norm is None else getattr(norm, "weight", None)


@torch.no_grad()
def write_experts(layer: MoELayer, mats: ExpertMatrices) -> None:
    """IN PLACE: copy ``mats`` into the live expert tensors (shapes must match the layer's current ones)."""
    views = expert_weight_views(layer)
    for name, live, new in ((views.up_name, views.up, mats.up), (views.down_name, views.down, mats.down)):
        value = new.transpose(1, 2) if views.transposed else new
        if tuple(value.shape) != tuple(live.shape):
            raise ValueError(f"{name}: new shape {tuple(value.shape)} does not fit {tuple(live.shape)}")
        live.data.copy_(value.to(live.dtype))
    for name, new_bias in ((views.up_name, mats.up_bias), (views.down_name, mats.down_bias)):
        live_bias = _bias_param(layer, name)
        if (live_bias is None) != (new_bias is None):
            raise ValueError(f"{name}_bias: the layer {'has' if live_bias is not None else 'has no'} bias")
        if live_bias is not None and new_bias is not None:
            live_bias.data.copy_(new_bias.to(live_bias.dtype))
    live_norm = _norm_param(layer)
    if (live_norm is None) != (mats.norm is None):
        raise ValueError(f"post_expert_norm: the layer {'has' if live_norm is not None else 'has no'} per-expert "
                         "norm rows")
    if live_norm is not None and mats.norm is not None:
        if tuple(mats.norm.shape) != tuple(live_norm.shape):
            raise ValueError(f"post_expert_norm: new shape {tuple(mats.norm.shape)} does not fit "
                             f"{tuple(live_norm.shape)}")
        live_norm.data.copy_(mats.norm.to(live_norm.dtype))


def router_bias(layer: MoELayer) -> Tensor | None:
    """(E,) bias of the router's linear map (gpt-oss), or None."""
    bias = getattr(layer.router, "bias", None)
    return bias if isinstance(bias, Tensor) else None


@torch.no_grad()
def write_router(layer: MoELayer, weight: Tensor, bias: Tensor | None = None, correction: Tensor | None = None
                 ) -> None:
    """IN PLACE: router weight (E, H), its bias (E,) and the choice correction bias (E,) (each None = keep)."""
    live = layer.router_weight
    if tuple(weight.shape) != tuple(live.shape):
        raise ValueError(f"router weight {tuple(weight.shape)} does not fit {tuple(live.shape)}")
    live.data.copy_(weight.to(live.dtype))
    live_bias = router_bias(layer)
    if bias is not None and live_bias is not None:
        live_bias.data.copy_(bias.to(live_bias.dtype))
    live_corr = layer.correction_bias()
    if correction is not None and live_corr is not None:
        live_corr.copy_(correction.to(live_corr.dtype))  # a view of the stored (E,) or (1, E) buffer


@torch.no_grad()
def neuron_rows(layer: MoELayer) -> Tensor:
    """(I, m) long: the rows of the first projection (out, in) that feed each intermediate neuron.

    m = 2 for gated experts (gate row, up row), 1 for ungated ones. The split is probed on the experts' own
    ``_apply_gate`` (halves in most families, interleaved in gpt-oss) rather than read from a table: the layout
    whose neuron permutation commutes with the gate is the one used.
    """
    views = expert_weight_views(layer)
    mats_up = views.up
    width = int(mats_up.shape[1] if not views.transposed else mats_up.shape[2])  # U
    intermediate = int(views.down.shape[2] if not views.transposed else views.down.shape[1])
    if views.up_name != "gate_up_proj":
        return torch.arange(intermediate).unsqueeze(1)
    if width != 2 * intermediate:
        raise ValueError(f"gate_up width {width} is not twice the intermediate size {intermediate}")
    halves = torch.stack((torch.arange(intermediate), torch.arange(intermediate) + intermediate), dim=1)
    interleaved = torch.stack((torch.arange(0, width, 2), torch.arange(1, width, 2)), dim=1)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn((4, width), generator=gen)
    perm = torch.randperm(intermediate, generator=gen)
    reference = callable_attr(layer.experts, "_apply_gate")(h)[:, perm]
    for rows in (halves, interleaved):
        moved = torch.empty_like(h)
        moved[:, rows.reshape(-1)] = h[:, rows[perm].reshape(-1)]  # neuron j takes neuron perm[j]'s rows
        if torch.allclose(callable_attr(layer.experts, "_apply_gate")(moved), reference):
            return rows
    raise ValueError(f"{type(layer.experts).__name__}: gate/up rows are neither halves nor interleaved")


def _act(layer: MoELayer, h: Tensor) -> Tensor:
    name = "_apply_gate" if expert_weight_views(layer).up_name == "gate_up_proj" else "act_fn"
    return callable_attr(layer.experts, name)(h)


@torch.no_grad()
def matrices_intermediate(layer: MoELayer, mats: ExpertMatrices, e: int, x: Tensor) -> Tensor:
    """(T, H) -> (T, I) float32: expert e of ``mats``'s activation on tokens x (the input of its down_proj)."""
    xf = x.float()
    h = xf @ mats.up[e].T.to(xf.device)
    if mats.up_bias is not None:
        h = h + mats.up_bias[e].to(xf.device)
    return _act(layer, h)


@torch.no_grad()
def matrices_forward(layer: MoELayer, mats: ExpertMatrices, e: int, x: Tensor) -> Tensor:
    """(T, H) -> (T, H): expert e of ``mats`` on tokens x, with the layer's gate / activation / post norm."""
    xf = x.float()
    out = matrices_intermediate(layer, mats, e, xf) @ mats.down[e].T.to(xf.device)
    if mats.down_bias is not None:
        out = out + mats.down_bias[e].to(xf.device)
    experts = layer.experts
    if getattr(experts, "has_post_expert_norm", False):
        return callable_attr(experts, "post_expert_norm")(out.to(x.dtype)).float()
    norm = per_expert_norm(experts)
    if (norm is None) != (mats.norm is None):
        raise ValueError(f"{type(experts).__name__} {'has' if norm is not None else 'has no'} per-expert norm "
                         "rows, the matrices do not match")
    if norm is not None and mats.norm is not None:
        # the layer's own norm forward with expert e's row of ``mats`` (merged rows after a merge) as its weight
        ids = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
        row = mats.norm[e:e + 1].to(device=out.device)
        return torch.func.functional_call(norm, {"weight": row}, (out, ids)).float()
    return out


def compressed_outputs(layer: MoELayer, mats: ExpertMatrices, x: Tensor) -> Tensor:
    """(T, H) -> (T, K, H) every expert of ``mats`` on every token."""
    dtype = layer.router_weight.dtype
    return torch.stack([matrices_forward(layer, mats, e, x.to(dtype)).float().cpu()
                        for e in range(mats.num_experts)], dim=1)
