"""Router re-calibration: refit the router rows of a compressed MoE block so its output matches the original's.

After pruning, merging or low-rank decomposition the experts differ from the ones the router was trained for.
Nothing but the router is changed here: with the compressed experts' outputs ``O`` (T, K, H) on calibration tokens
``x`` (T, H) fixed, the router weight W (K, H) (and its bias, where the router has one) is fitted to

    min_W  sum_t || sum_{j in topk(route(x_t W^T))} w_j(x_t W^T) O[t, j] - F(x_t) ||^2

with F the original block's routed output (shared experts are identical on both sides and cancel). The top-k
choice is piecewise constant, so the fit is a short full-batch Adam run on the routing weights (gradients flow
through the softmax / sigmoid of the chosen experts and the softmax denominator), started from the current rows,
deterministic (no sampling: same tokens, same order), and the best iterate is kept, so the reported loss after
the fit is never above the loss before it.

The planner reports both losses; ``apply`` re-runs the same fit on the same calibration windows (the rows are
not stored in the plan, as GPTQ's weights are not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moeslim.models import MoELayer
from moeslim.models.routing import ROUTING, sigmoid_scores
from moeslim.plans import Plan

__all__ = ["FIT_LR", "FIT_STEPS", "FIT_TOKENS", "RouterFit", "TokenInputs", "block_loss", "compressed_route",
           "fit_pruned_layer", "fit_router", "is_sigmoid_router", "layer_logits", "original_routed",
           "prune_keeps_groups", "pruned_expert_outputs", "routed_output", "token_inputs"]

_CHUNK = 4096  # tokens per chunk of the helpers below (bounds temporary memory)

FIT_STEPS = 200  # Adam steps of the router fit (full batch)
FIT_LR = 0.02  # Adam step size, relative to the RMS of the initial router weight (scale-free)
FIT_TOKENS = 8192  # calibration tokens the fit and the reported losses use per layer (first ones, window order)

RouteFn = Callable[[Tensor], tuple[Tensor, Tensor]]  # logits (T, K) -> weights (T, k), ids (T, k)


class TokenInputs:
    """Observer: the first ``max_tokens`` block inputs of a layer (window order) and routed counts of all tokens.

    The first tokens, not a random sample: calibration windows are already random draws, and a plan and its
    ``apply`` then see the same tokens whatever the batch size.
    """

    key = "tokens"

    def __init__(self, num_experts: int, max_tokens: int = FIT_TOKENS) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be at least 1")
        self._max = max_tokens
        self._x: list[Tensor] = []
        self._held = 0
        self._counts = torch.zeros(num_experts, dtype=torch.float64)
        self._tokens = 0

    def observe(self, layer: MoELayer, x: Tensor) -> None:
        _, ids = layer.route(layer.router_logits(x))
        self._counts += torch.bincount(ids.reshape(-1).cpu(), minlength=self._counts.numel()).double()
        self._tokens += int(x.shape[0])
        room = self._max - self._held
        if room > 0:
            self._x.append(x[:room].detach().float().cpu())
            self._held += min(room, int(x.shape[0]))

    def sync(self, comm: Any) -> None:
        """Merge across processes (``calibrate.distributed``): counts summed; rank r holds the r-th share of the
        windows and its own first tokens, so the rank-ordered concatenation starts with the global first tokens."""
        tokens = torch.tensor([float(self._tokens)], dtype=torch.float64)
        comm.all_reduce_sum(self._counts)
        comm.all_reduce_sum(tokens)
        self._tokens = int(tokens.item())
        parts = [p for p in comm.all_gather(torch.cat(self._x) if self._x else None) if p is not None]
        self._x = [torch.cat(parts)[:self._max]] if parts else []
        self._held = int(self._x[0].shape[0]) if self._x else 0

    def result(self) -> tuple[Tensor, Tensor, int]:
        """(x (T, H) float32, routed counts (E,) float64, tokens seen)."""
        if not self._x:
            raise ValueError("no calibration tokens reached this layer")
        return torch.cat(self._x), self._counts.clone(), self._tokens


def token_inputs(observers: Sequence[Any]) -> tuple[Tensor, Tensor, int]:
    """The ``TokenInputs`` result among a layer's observers: (x (T, H), routed counts (E,), tokens seen)."""
    found = next((o for o in observers if isinstance(o, TokenInputs)), None)
    if found is None:
        raise ValueError("this layer was observed without a TokenInputs observer")
    return found.result()


def is_sigmoid_router(layer: MoELayer) -> bool:
    """Whether the family's pre-top-k gate scores are independent sigmoids (DeepSeek-V3 / GLM style)."""
    return ROUTING[layer.family.routing][1] is sigmoid_scores


def compressed_route(layer: MoELayer, correction: Tensor | None, keep_groups: bool) -> RouteFn:
    """The routing function of ``layer`` after compression to K experts (differentiable in the logits).

    ``correction``: the compressed (K,) choice bias (None where the family has none); ``keep_groups``: whether
    group limits survive the compression (``select_experts`` drops them otherwise: n_group = topk_group = 1).
    """
    fn = ROUTING[layer.family.routing][0]
    kwargs: dict[str, Any] = layer.routing_kwargs()
    if "correction_bias" in kwargs:
        kwargs["correction_bias"] = None if correction is None else correction.float()
    if not keep_groups:
        for name in ("n_group", "topk_group"):
            if name in kwargs:
                kwargs[name] = 1

    def route(logits: Tensor) -> tuple[Tensor, Tensor]:
        if kwargs.get("correction_bias") is not None:
            kwargs["correction_bias"] = kwargs["correction_bias"].to(logits.device)
        return fn(logits, **kwargs)

    return route


def routed_output(outputs: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
    """outputs (T, K, H), weights / ids (T, k) -> (T, H) = sum_k w * outputs[ids]."""
    picked = outputs.gather(1, ids.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]))  # (T, k, H)
    return (picked * weights.unsqueeze(-1).to(picked.dtype)).sum(dim=1)


def _logits(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out = x @ weight.T
    return out if bias is None else out + bias


def block_loss(x: Tensor, outputs: Tensor, target: Tensor, route: RouteFn, weight: Tensor,
               bias: Tensor | None = None) -> float:
    """||F'(X) - F(X)||_F (unsquared, as the pruning loss) with router rows ``weight`` (K, H), bias (K,).

    x (T, H), outputs (T, K, H) compressed experts' outputs, target (T, H) original routed output.
    """
    with torch.no_grad():
        w, ids = route(_logits(x, weight.float(), None if bias is None else bias.float()))
        diff = routed_output(outputs, w, ids) - target
        return float(diff.double().pow(2).sum().sqrt())


@dataclass(frozen=True)
class RouterFit:
    """Refitted router rows (K, H), bias (K,) or None, and the block losses before / after the fit."""

    weight: Tensor
    bias: Tensor | None
    loss_before: float
    loss_after: float
    steps: int

    def summary(self) -> dict[str, float | int]:
        return {"loss_before": self.loss_before, "loss_after": self.loss_after, "steps": self.steps}


def fit_router(x: Tensor, outputs: Tensor, target: Tensor, route: RouteFn, weight: Tensor,
               bias: Tensor | None = None, steps: int = FIT_STEPS, lr: float = FIT_LR) -> RouterFit:
    """Fit router rows (K, H) (+ bias) to minimise the block's output error; keep the best iterate.

    x (T, H), outputs (T, K, H), target (T, H); ``weight`` / ``bias`` are the starting rows.
    """
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0")
    x, outputs, target = x.float(), outputs.float(), target.float()
    w = weight.detach().float().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().float().clone().requires_grad_(True)
    params = [w] if b is None else [w, b]
    scale = float(w.detach().pow(2).mean().sqrt()) or 1.0
    opt = torch.optim.Adam(params, lr=lr * scale)
    norm = float(target.pow(2).sum()) or 1.0  # scale-free objective: Adam steps do not depend on output size
    before = block_loss(x, outputs, target, route, w.detach(), None if b is None else b.detach())
    best, best_w, best_b = float("inf"), w.detach().clone(), None if b is None else b.detach().clone()
    with torch.enable_grad():
        for step in range(steps + 1):
            opt.zero_grad(set_to_none=True)
            gw, ids = route(_logits(x, w, b))
            loss = (routed_output(outputs, gw, ids) - target).pow(2).sum() / norm
            if float(loss.detach()) < best:  # the loss of the current rows, before this step moves them
                best, best_w = float(loss.detach()), w.detach().clone()
                best_b = None if b is None else b.detach().clone()
            if step == steps:
                break
            loss.backward()
            opt.step()
    after = block_loss(x, outputs, target, route, best_w, best_b)
    if after > before:  # float32 selection vs the float64 report: never hand back rows worse than the start
        best_w, best_b, after = weight.detach().float().clone(), None if bias is None else bias.detach().float(), before
    return RouterFit(weight=best_w, bias=best_b, loss_before=before, loss_after=after, steps=steps)


def _chunks(layer: MoELayer, x: Tensor) -> Iterator[Tensor]:
    device, dtype = layer.router_weight.device, layer.router_weight.dtype
    for start in range(0, x.shape[0], _CHUNK):
        yield x[start:start + _CHUNK].to(device=device, dtype=dtype)


@torch.no_grad()
def layer_logits(layer: MoELayer, x: Tensor) -> Tensor:
    """(T, H) -> (T, E) float32 router logits, on CPU."""
    return torch.cat([layer.router_logits(c).cpu() for c in _chunks(layer, x)])


@torch.no_grad()
def original_routed(layer: MoELayer, x: Tensor) -> Tensor:
    """(T, H) -> (T, H) the original block's routed output (shared experts excluded), float32 on CPU."""
    outs = []
    for chunk in _chunks(layer, x):
        w, ids = layer.route(layer.router_logits(chunk))
        outs.append(layer.experts(chunk, ids, w.to(chunk.dtype)).float().cpu())
    return torch.cat(outs)


@torch.no_grad()
def pruned_expert_outputs(layer: MoELayer, x: Tensor, kept: Sequence[int]) -> Tensor:
    """(T, H) -> (T, K, H) the kept experts' own outputs, float32 on CPU."""
    return torch.cat([layer.expert_outputs(c, kept).float().cpu() for c in _chunks(layer, x)])


def fit_pruned_layer(layer: MoELayer, kept: Sequence[int], x: Tensor, keep_groups: bool) -> RouterFit:
    """Refit the router rows of the ``kept`` experts (sorted ids) of ``layer`` on tokens x (T, H)."""
    index = torch.tensor(sorted(int(e) for e in kept))
    weight = layer.router_weight.detach().float().cpu()[index]
    bias = getattr(layer.router, "bias", None)
    bias = bias.detach().float().cpu()[index] if isinstance(bias, Tensor) else None
    corr = layer.correction_bias()
    corr = None if corr is None else corr.detach().float().cpu()[index]
    route = compressed_route(layer, corr, keep_groups)
    return fit_router(x, pruned_expert_outputs(layer, x, index.tolist()), original_routed(layer, x), route,
                      weight, bias)


def prune_keeps_groups(model: nn.Module, plan: Plan) -> bool:
    """Whether the pruned model keeps its routing groups (the plan's group policy, as ``apply_prune`` uses it)."""
    from moeslim.models import masked_routing_is_identity

    policy = plan.summary.get("groups") or "auto"
    if policy == "drop":
        return False
    return policy == "keep" or masked_routing_is_identity(model, {int(k): v for k, v in plan.layers.items()})


def check_uniform(plan: Plan) -> None:
    sizes = {len(v) for v in plan.layers.values()}
    if len(sizes) != 1:
        raise ValueError("recalibrate_router supports prune plans where every layer keeps the same count "
                         f"(got {sorted(sizes)}); use allocation='uniform'")
