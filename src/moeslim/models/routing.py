"""Routing functions of the supported MoE families, as pure tensor functions.

Every function maps raw router logits ``(T, E)`` to ``(weights (T, k) float32, ids (T, k) long)`` exactly as
the family's own router does in eval mode (same ops in the same order, so results match bit for bit), plus an
optional ``allowed`` mask ``(E,)`` bool: experts with ``allowed=False`` are never chosen.

How a mask enters (this is the "masked routing" the pruning search scores, ALGORITHMS.md section 1):
- softmax families: the logits of dropped experts are set to -inf *before* the softmax, so they also leave the
  softmax denominator. This is exactly what a model whose router rows were removed computes, with or without
  renormalisation of the top-k weights.
- sigmoid families (DeepSeek-V3, GLM-4-MoE): each expert's score does not depend on the others; dropped
  experts are only excluded from choice (their choice score is -inf), group scores are computed over
  allowed experts.
- top-k-then-softmax families (gpt-oss, GraniteMoE) and sparsemixer (PhiMoE): logits set to -inf.
- ungrouped sigmoid routers (``sigmoid_topk``, ``logit_topk_sigmoid``): dropped experts are excluded from choice.
- softmax with a choice bias (ERNIE, ``softmax_biased_topk``): -inf logits before the softmax *and* excluded from
  choice (the bias alone could otherwise pick a dropped expert).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

NEG_INF = float("-inf")


def _mask_logits(logits: Tensor, allowed: Tensor | None) -> Tensor:
    """(T, E) logits with dropped experts at -inf (out of place)."""
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed.to(device=logits.device, dtype=torch.bool), NEG_INF)


def softmax_probs(logits: Tensor) -> Tensor:
    """(T, E) -> (T, E) float32 softmax over all experts."""
    return torch.softmax(logits.float(), dim=-1)


def sigmoid_scores(logits: Tensor) -> Tensor:
    """(T, E) -> (T, E) float32 independent sigmoid scores (DeepSeek-V3 / GLM-4-MoE)."""
    return logits.float().sigmoid()


def softmax_topk(
    logits: Tensor, *, top_k: int, renormalize: bool, scaling: float = 1.0, allowed: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE: softmax over experts -> top-k -> optional renormalisation,
    times ``scaling`` (1 for most families).

    logits (T, E), allowed (E,) bool -> weights (T, k) float32, ids (T, k) long.
    """
    probs = torch.softmax(_mask_logits(logits.float(), allowed), dim=-1)  # (T, E)
    weights, ids = torch.topk(probs, top_k, dim=-1)  # (T, k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights if scaling == 1.0 else weights * scaling), ids


def topk_softmax(logits: Tensor, *, top_k: int, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """gpt-oss / GraniteMoE: top-k on raw logits -> softmax over the k chosen logits.

    logits (T, E), allowed (E,) bool -> weights (T, k) float32, ids (T, k) long.
    """
    top_logits, ids = torch.topk(_mask_logits(logits.float(), allowed), top_k, dim=-1)  # (T, k)
    return torch.softmax(top_logits, dim=-1), ids


def _group_mask(group_scores: Tensor, topk_group: int, num_experts: int) -> Tensor:
    """(T, G) group scores -> (T, E) bool: experts in the topk_group best groups."""
    num_group = group_scores.shape[-1]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]  # (T, topk_group)
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    per_group = num_experts // num_group
    return group_mask.unsqueeze(-1).expand(-1, num_group, per_group).reshape(-1, num_experts).bool()


def softmax_group(
    logits: Tensor,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    topk_method: str,
    scaling: float,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """DeepSeek-V2: softmax over experts -> (group-limited) top-k, no renormalisation, times scaling.

    ``topk_method`` is "greedy" or "group_limited_greedy" (group score = best expert score in the group).
    logits (T, E), allowed (E,) bool -> weights (T, k) float32, ids (T, k) long.
    """
    scores = torch.softmax(_mask_logits(logits.float(), allowed), dim=-1)  # (T, E)
    num_experts = scores.shape[-1]
    if topk_method == "group_limited_greedy":
        group_scores = scores.view(-1, n_group, num_experts // n_group).max(dim=-1).values  # (T, G)
        scores = scores.masked_fill(~_group_mask(group_scores, topk_group, num_experts), 0.0)
    elif topk_method != "greedy":
        raise ValueError(f"unknown DeepSeek-V2 topk_method {topk_method!r}")
    weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    return weights * scaling, ids


def _weigh(scores: Tensor, ids: Tensor, renormalize: bool, scaling: float) -> Tensor:
    """Sigmoid routers' weights: the uncorrected scores of the chosen experts, optionally renormalised, scaled.

    scores (T, E), ids (T, k) -> (T, k).
    """
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling


def sigmoid_group(
    logits: Tensor,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
    correction_bias: Tensor | None,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3 / GLM-4-MoE: sigmoid scores + correction bias choose (group = sum of its 2 best), the
    uncorrected scores weigh, optional renormalisation, times scaling.

    logits (T, E), correction_bias (E,), allowed (E,) bool -> weights (T, k) float32, ids (T, k) long.
    """
    scores = logits.float().sigmoid()  # (T, E)
    choice = scores if correction_bias is None else scores + correction_bias
    choice = _mask_logits(choice, allowed)  # dropped experts are never chosen, scores stay independent
    num_experts = scores.shape[-1]
    group_scores = choice.view(-1, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)  # (T, G)
    choice = choice.masked_fill(~_group_mask(group_scores, topk_group, num_experts), NEG_INF)
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]  # (T, k)
    return _weigh(scores, ids, renormalize, scaling), ids


def sigmoid_topk(
    logits: Tensor,
    *,
    top_k: int,
    renormalize: bool,
    scaling: float,
    correction_bias: Tensor | None,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Ungrouped sigmoid routers (Afmoe, Laguna, HY-V3, MiniMax-M2, LFM2-MoE, ...): sigmoid scores (+ the
    correction bias) choose, the uncorrected scores weigh, optional renormalisation, times scaling.

    Same maths as ``sigmoid_group`` with one group, without its "2 best per group" requirement.
    logits (T, E), correction_bias (E,), allowed (E,) bool -> weights (T, k) float32, ids (T, k) long.
    """
    scores = logits.float().sigmoid()  # (T, E)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    ids = torch.topk(_mask_logits(choice, allowed), k=top_k, dim=-1)[1]  # (T, k)
    return _weigh(scores, ids, renormalize, scaling), ids


def softmax_biased_topk(
    logits: Tensor,
    *,
    top_k: int,
    correction_bias: Tensor | None,
    norm_min: float,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """ERNIE-4.5-MoE: softmax probs (+ correction bias) choose, the probs weigh, renormalised by
    ``max(sum, norm_min)``.

    Dropped experts leave the softmax (-inf logits, as pruning does) and are never chosen (-inf choice score:
    their bias alone could otherwise pick them).
    logits (T, E), correction_bias (E,), allowed (E,) bool -> weights (T, k) float32, ids (T, k) long.
    """
    probs = torch.softmax(_mask_logits(logits.float(), allowed), dim=-1)  # (T, E)
    choice = probs if correction_bias is None else probs + correction_bias.float()
    ids = torch.topk(_mask_logits(choice, allowed), k=top_k, dim=-1)[1]  # (T, k)
    weights = probs.gather(1, ids)
    return weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=norm_min), ids


def logit_topk_sigmoid(
    logits: Tensor,
    *,
    top_k: int,
    renormalize: bool,
    scaling: float,
    correction_bias: Tensor | None,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Routers that choose on raw logits (+ correction bias), then weigh by the sigmoid of the chosen logits
    (Kolibri-1): sigmoid is monotone, so this chooses like ``sigmoid_topk`` only without a bias.

    logits (T, E), correction_bias (E,), allowed (E,) bool -> weights (T, k) float32, ids (T, k) long.
    """
    logits = logits.float()
    choice = logits if correction_bias is None else logits + correction_bias.float()
    ids = torch.topk(_mask_logits(choice, allowed), k=top_k, dim=-1)[1]  # (T, k)
    weights = logits.gather(1, ids).sigmoid()
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * scaling, ids


def _sparsemixer_pick(scores: Tensor, masked: Tensor, jitter_eps: float) -> tuple[Tensor, Tensor]:
    """One sparsemixer step: threshold ``masked`` around its max, softmax, pick the max -> (T, 1) x2."""
    threshold, max_ind = masked.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    drop = ((threshold - scores) / factor) > (2 * jitter_eps)
    gates = torch.softmax(masked.masked_fill(drop, NEG_INF), dim=-1)
    return gates.gather(dim=-1, index=max_ind), max_ind


def sparsemixer(
    logits: Tensor, *, top_k: int = 2, jitter_eps: float, allowed: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """PhiMoE sparsemixer in eval mode (always top-2, whatever ``top_k`` says, like the original).

    Pick the best expert; its weight is its softmax among experts within a relative ``2*jitter_eps`` band of
    the max. Then the same on the remaining experts. logits (T, E) -> weights (T, 2) float32, ids (T, 2).
    """
    scores = _mask_logits(logits.float(), allowed)  # (T, E)
    w1, i1 = _sparsemixer_pick(scores, scores, jitter_eps)
    w2, i2 = _sparsemixer_pick(scores, torch.scatter(scores, -1, i1, NEG_INF), jitter_eps)
    return torch.cat((w1, w2), dim=-1), torch.cat((i1, i2), dim=-1)


RoutingFn = Callable[..., tuple[Tensor, Tensor]]

# name (FamilySpec.routing) -> (routing function, pre-top-k gate scores function)
ROUTING: dict[str, tuple[RoutingFn, Callable[[Tensor], Tensor]]] = {
    "softmax_topk": (softmax_topk, softmax_probs),
    "topk_softmax": (topk_softmax, softmax_probs),
    "softmax_group": (softmax_group, softmax_probs),
    "sigmoid_group": (sigmoid_group, sigmoid_scores),
    "sparsemixer": (sparsemixer, softmax_probs),
    "sigmoid_topk": (sigmoid_topk, sigmoid_scores),
    "logit_topk_sigmoid": (logit_topk_sigmoid, sigmoid_scores),
    "softmax_biased_topk": (softmax_biased_topk, softmax_probs),
}
