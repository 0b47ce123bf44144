"""Keep a subset of experts in every MoE layer, in place, producing a standard transformers checkpoint.

Also what pruning must know to score exactly the model it produces: group-limited routing (``GroupLimits``,
``pruned_routing``) and which routers can hold padding experts they never select (``padding_refusal``), for
non-uniform per-layer counts stored padded (stock transformers) or compact (``runtime/nonuniform.py``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .expert_math import per_expert_norm
from .families import FamilySpec, family_of
from .layer import MoELayer, _text_config, find_moe_layers
from .routing import ROUTING

# (logits (T, E), allowed (E,) bool | None) -> (weights (T, k), ids (T, k)), in the original index space.
RouteFn = Callable[[torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


GroupPolicy = Literal["auto", "keep", "drop"]
Layout = Literal["padded", "compact"]
LAYOUTS: tuple[str, ...] = ("padded", "compact")
# Per-expert tensors whose padded rows get -inf: the router's logit bias and the choice-only correction biases.
_CHOICE_BIASES = ("e_score_correction_bias", "expert_bias")
_LOGIT_BIAS_ROUTINGS = ("softmax_topk", "topk_softmax", "softmax_group", "sparsemixer")
_CHOICE_BIAS_ROUTINGS = ("sigmoid_group", "sigmoid_topk", "logit_topk_sigmoid")


@dataclass(frozen=True)
class GroupLimits:
    """Group-limited routing (DeepSeek-V2/V3, GLM-4-MoE with n_group > 1): experts ``[g*E/G, (g+1)*E/G)`` form
    group g; a token first picks ``topk_group`` groups, then top-k experts inside them.

    A pruned model keeps the groups only when every group of a layer keeps the same count c (the router views
    its experts as (G, E'/G)), with c >= ``min_per_group`` (sigmoid groups are ranked by their 2 best) and
    c * topk_group >= top_k (the chosen groups must hold top-k experts). Then it computes exactly the original's
    masked routing; otherwise it must route without group limits.
    """

    n_group: int
    topk_group: int
    top_k: int
    min_per_group: int

    def counts(self, kept: Sequence[int], num_experts: int) -> list[int]:
        """Kept experts per group (original index space)."""
        per = num_experts // self.n_group
        found = Counter(int(i) // per for i in kept)
        return [found.get(g, 0) for g in range(self.n_group)]

    def size_ok(self, size: int) -> bool:
        """Whether ``size`` kept experts can split into balanced groups the router can run."""
        c, rest = divmod(size, self.n_group)
        return rest == 0 and c >= self.min_per_group and c * self.topk_group >= self.top_k

    def representable(self, kept: Sequence[int], num_experts: int) -> bool:
        counts = self.counts(kept, num_experts)
        return len(set(counts)) == 1 and self.size_ok(len(kept))

    def why_not(self, size: int) -> str:
        return (f"{size} kept experts cannot keep the {self.n_group} routing groups (each group must keep the "
                f"same count c >= {self.min_per_group} with c x topk_group={self.topk_group} >= top_k={self.top_k})")


def group_limits(model_or_config: Any) -> GroupLimits | None:
    """The group limits of a model (or its config), None when routing is not group-limited (n_group <= 1)."""
    config = _text_config(model_or_config) if hasattr(model_or_config, "config") else model_or_config
    family = family_of(config)
    n_group = _n_group(family, config)
    if n_group <= 1:
        return None
    assert family.group_keys is not None
    return GroupLimits(
        n_group=n_group,
        topk_group=int(family.config_value(config, family.group_keys[1], 1)),
        top_k=int(family.config_value(config, family.top_k_key)),
        min_per_group=2 if family.routing == "sigmoid_group" else 1,
    )


def resolve_group_policy(limits: GroupLimits | None, sizes: Iterable[int], policy: GroupPolicy = "auto"
                         ) -> Literal["keep", "drop"] | None:
    """"keep" (the pruned model routes with the groups) or "drop" (n_group = topk_group = 1), None if ungrouped.

    ``sizes``: the kept counts the layers may have. "auto" keeps the groups when every size can be balanced.
    Raises ValueError for "keep" when some size cannot (the message says what to change).
    """
    if limits is None:
        return None
    sizes = list(sizes)
    bad = [s for s in sizes if not limits.size_ok(s)]
    if policy == "drop" or (policy == "auto" and bad):
        return "drop"
    if bad:
        raise ValueError(limits.why_not(bad[0]) + "; keep a multiple of n_group or use groups='drop' "
                         "(the pruned model then routes without group limits)")
    return "keep"


def pruned_routing(layer: MoELayer, policy: Literal["keep", "drop"] | None) -> RouteFn:
    """The routing the pruned model runs, as masked routing in the ORIGINAL index space.

    (logits (T, E), allowed (E,) bool) -> (weights (T, k), ids (T, k)). With the groups kept this is the
    layer's own masked routing (exact for balanced kept sets, see ``GroupLimits``); with the groups dropped it is
    the same routing with n_group = topk_group = 1, which is exactly what ``select_experts`` makes the model run.
    """
    if policy != "drop" or layer.family.group_keys is None:
        return layer.route
    fn = ROUTING[layer.family.routing][0]

    def route(logits: torch.Tensor, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {**layer.routing_kwargs(), "n_group": 1, "topk_group": 1}
        weights, ids = fn(logits, allowed=allowed, **kwargs)
        return weights.float(), ids.long()

    return route


def padding_refusal(layer: MoELayer) -> str | None:
    """Why this layer cannot hold padded experts its router never selects (None when it can).

    A padded expert must be unselectable for every input: softmax / top-k-on-logit routers need a per-expert
    logit bias (-inf: the expert also leaves the softmax denominator, exactly like a removed router row);
    sigmoid routers need a choice-only correction bias (-inf: never chosen; sigmoid scores are independent, so
    the others' weights do not change). A router without such a bias computes w.x for the padded row, and a
    linear function of x takes both signs, so no finite row can keep it out of the top-k.
    """
    routing = layer.family.routing
    bias = getattr(layer.router, "bias", None)
    if routing in _LOGIT_BIAS_ROUTINGS and isinstance(bias, torch.Tensor) and bias.shape == (layer.num_experts,):
        return None
    if routing in _CHOICE_BIAS_ROUTINGS and layer.correction_bias() is not None:
        return None
    return (f"the {layer.family.name} router ({routing}) has no per-expert "
            f"{'correction' if routing in _CHOICE_BIAS_ROUTINGS else 'logit'} bias, so a padded expert cannot be "
            "made unselectable; use layout='compact' (loaded by moeslim.load)")


def select_experts(model: nn.Module, kept: Mapping[int, Sequence[int]], *, groups: GroupPolicy = "auto",
                   layout: Layout | None = None) -> None:
    """IN PLACE: keep only ``kept[layer_idx]`` experts in each MoE decoder layer.

    Slices the fused expert tensors (+ biases) and the router rows (+ router bias,
    ``e_score_correction_bias``), updates module attributes (``num_experts``, ...) and the config's expert
    count; top-k is unchanged. Kept ids are used in sorted order. Keeping all experts is the identity.

    Layers may keep different counts (non-uniform budgets) only with a ``layout``:
    - "padded": every layer is padded to the largest count with experts its router can never select (zero
      weights, -inf logit / choice bias, see ``padding_refusal``): a standard checkpoint stock transformers loads.
    - "compact": every layer holds only its kept experts; the config holds the largest count and the
      ``moeslim`` section the per-layer counts (``runtime/nonuniform.py`` saves and loads it).

    Group-limited routing (``GroupLimits``): ``groups="auto"`` keeps the groups when every layer's kept set is
    balanced (then the pruned model equals masked routing), else sets n_group = topk_group = 1 (the pruned model
    then equals masked routing without group limits, ``pruned_routing(layer, "drop")``); "keep" refuses a kept
    set that is not balanced; "drop" always drops them. Padding keeps groups by padding each group.

    Everything is validated before anything changes: unknown layer index, out-of-range or duplicate ids, fewer
    than top-k kept, unequal counts without a layout, a router that cannot hold padding.
    """
    layers = {moe.layer_idx: moe for moe in find_moe_layers(model)}
    plan = _validated_plan(layers, kept, layout)
    if plan is None:
        return  # every layer keeps all its experts: the identity
    config = _text_config(model)
    family = family_of(config)
    old = _experts_of(layers)
    limits = group_limits(config)
    policy = _group_policy(limits, plan, old, groups)
    sizes = {idx: len(ids) for idx, ids in plan.items()}
    width = max(sizes.values())
    padded = layout == "padded" and len(set(sizes.values())) > 1
    if padded:
        refused = {idx: why for idx in plan if (why := padding_refusal(layers[idx])) is not None}
        if refused:
            raise ValueError(f"layout='padded': layer {min(refused)}: {refused[min(refused)]}")
    for idx, ids in plan.items():
        source = padded_source(ids, width, limits if policy == "keep" else None, old) if padded else ids
        _slice_layer(layers[idx], torch.tensor(source, dtype=torch.long), old)
    _update_counts(model, config, family, old, width)
    if policy == "drop":
        _drop_group_limits(config, family, layers.values())


def masked_routing_is_identity(model_or_config: Any, kept: Mapping[int, Sequence[int]] | None = None) -> bool:
    """Whether the model pruned to ``kept`` (groups="auto") computes exactly the original's masked routing.

    True for every supported family (softmax families mask logits to -inf before the softmax, which removes
    dropped experts from the denominator exactly as pruning does; sigmoid scores are independent), except
    group-limited routing (n_group > 1) when ``select_experts`` has to drop the groups (see its docstring).
    With ``kept=None`` the answer for group-limited routing is False (it depends on the kept experts).
    """
    config = _text_config(model_or_config) if hasattr(model_or_config, "config") else model_or_config
    limits = group_limits(config)
    if limits is None:
        return True
    if kept is None:
        return False
    family = family_of(config)
    num_experts = int(getattr(config, family.num_experts_key))
    return all(limits.representable(list(v), num_experts) for v in kept.values())


# -- validation ----------------------------------------------------------------------------------------


def _experts_of(layers: Mapping[int, MoELayer]) -> int:
    counts = {moe.num_experts for moe in layers.values()}
    if len(counts) != 1:
        raise ValueError(f"MoE layers have different expert counts {sorted(counts)}; cannot select experts")
    return counts.pop()


def _validated_plan(
    layers: Mapping[int, MoELayer], kept: Mapping[int, Sequence[int]], layout: Layout | None = None,
) -> dict[int, list[int]] | None:
    """{layer: sorted kept ids} for every MoE layer, or None when nothing changes. Raises ValueError."""
    num_experts = _experts_of(layers)
    any_layer = next(iter(layers.values()))
    top_k, family = any_layer.top_k, any_layer.family.name
    unknown = sorted(set(int(k) for k in kept) - set(layers))
    if unknown:
        raise ValueError(
            f"layers {unknown} are not MoE layers of this {family} model; MoE layers: {sorted(layers)}"
        )
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: use one of {', '.join(LAYOUTS)} (or None for equal counts)")
    plan = {idx: _validated_ids(idx, kept.get(idx), num_experts, top_k, family) for idx in sorted(layers)}
    counts = {idx: len(ids) for idx, ids in plan.items()}
    if len(set(counts.values())) > 1 and layout is None:
        listed = {idx: n for idx, n in counts.items() if idx in kept}
        raise ValueError(
            f"MoE layers keep different numbers of experts ({listed}"
            + (f", unlisted layers keep all {num_experts}" if len(listed) < len(counts) else "")
            + "); pass layout='padded' (a stock checkpoint, where the router can exclude experts) or "
            "layout='compact' (loaded by moeslim.load)"
        )
    if all(n == num_experts for n in counts.values()):
        return None
    return plan


def _validated_ids(
    idx: int, ids: Sequence[int] | None, num_experts: int, top_k: int, family: str
) -> list[int]:
    if ids is None:
        return list(range(num_experts))
    values = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    bad = sorted(i for i in values if not 0 <= i < num_experts)
    if bad:
        raise ValueError(f"layer {idx}: expert ids {bad} out of range [0, {num_experts})")
    dup = sorted(i for i, n in Counter(values).items() if n > 1)
    if dup:
        raise ValueError(f"layer {idx}: duplicate expert ids {dup}")
    if len(values) < top_k:
        raise ValueError(
            f"layer {idx}: keep={len(values)} is below top_k={top_k} of {family}; "
            f"keep at least {top_k} experts"
        )
    return sorted(values)


# -- group-limited routing -----------------------------------------------------------------------------


def _n_group(family: FamilySpec, config: Any) -> int:
    return int(family.config_value(config, family.group_keys[0], 1)) if family.group_keys else 1


def _group_policy(limits: GroupLimits | None, plan: Mapping[int, Sequence[int]], num_experts: int,
                  groups: GroupPolicy) -> Literal["keep", "drop"] | None:
    if groups not in ("auto", "keep", "drop"):
        raise ValueError(f"groups={groups!r}: use 'auto', 'keep' or 'drop'")
    if limits is None:
        return None
    bad = [idx for idx, ids in plan.items() if not limits.representable(ids, num_experts)]
    if groups == "drop" or (groups == "auto" and bad):
        return "drop"
    if bad:
        counts = limits.counts(plan[bad[0]], num_experts)
        raise ValueError(f"groups='keep': layer {bad[0]} keeps {counts} experts per group; "
                         + limits.why_not(len(plan[bad[0]])) + "; balance the kept set or use groups='drop'")
    return "keep"


def padded_source(ids: Sequence[int], width: int, limits: GroupLimits | None, num_experts: int) -> list[int]:
    """Source expert of every slot of a layer padded to ``width`` slots (-1 = padding), groups padded each."""
    if limits is None:
        return [*ids, *[-1] * (width - len(ids))]
    per_old, per_new = num_experts // limits.n_group, width // limits.n_group
    source: list[int] = []
    for g in range(limits.n_group):
        members = [i for i in ids if i // per_old == g]
        source += [*members, *[-1] * (per_new - len(members))]
    return source


def _drop_group_limits(config: Any, family: FamilySpec, layers: Any) -> None:
    assert family.group_keys is not None
    for key in family.group_keys:
        setattr(config, key, 1)
    for moe in layers:
        for owner in moe.routing_owners():  # wherever the router reads its group settings from
            for attr in ("num_group", "n_group", "num_expert_group", "topk_group"):
                if isinstance(getattr(owner, attr, None), int):
                    setattr(owner, attr, 1)


# -- slicing -------------------------------------------------------------------------------------------


@torch.no_grad()
def _slice_module(module: nn.Module, source: torch.Tensor, num_experts: int, logit_bias: bool = False) -> None:
    """Replace every own parameter / buffer whose first dim is the expert dim by the rows ``source`` names (a
    (1, E) tensor, ERNIE's correction bias, by its columns); slots with source -1 are padding: zero, and -inf
    in a choice bias (and in the router's logit bias when ``logit_bias``) so the router never selects them."""
    for name, param in list(module.named_parameters(recurse=False)):
        dim = _expert_dim(param, num_experts)
        if dim is not None:
            fill = float("-inf") if logit_bias and name == "bias" else 0.0
            rows = _gather(param.data, dim, source, fill)
            setattr(module, name, nn.Parameter(rows, requires_grad=param.requires_grad))
    for name, buf in list(module.named_buffers(recurse=False)):
        dim = None if buf is None else _expert_dim(buf, num_experts)
        if dim is not None:
            module._buffers[name] = _gather(buf, dim, source, float("-inf") if name in _CHOICE_BIASES else 0.0)


def _gather(tensor: torch.Tensor, dim: int, source: torch.Tensor, fill: float) -> torch.Tensor:
    """``tensor`` indexed by ``source`` along ``dim``; -1 slots hold ``fill``."""
    real = source >= 0  # decided on the CPU index: ``tensor`` may be on meta (a streamed skeleton)
    picked = tensor.index_select(dim, source.clamp_min(0).to(tensor.device)).clone()
    if not bool(real.all()):
        picked.index_fill_(dim, (~real).nonzero().flatten().to(tensor.device), fill)
    return picked


def _expert_dim(tensor: torch.Tensor, num_experts: int) -> int | None:
    if tensor.ndim and tensor.shape[0] == num_experts:
        return 0
    if tuple(tensor.shape) == (1, num_experts):
        return 1
    return None


def _slice_layer(moe: MoELayer, source: torch.Tensor, num_experts: int) -> None:
    # The router, its wrappers and the block itself (own tensors only) may hold per-expert rows: router weight
    # and bias, correction biases kept on the block (HY-V3, MiniMax-M2, LFM2-MoE, Afmoe).
    owners = moe.routing_owners()
    logit_bias = moe.family.routing in _LOGIT_BIAS_ROUTINGS
    norm = per_expert_norm(moe.experts)  # found before the experts shrink (it matches their count)
    _slice_module(moe.experts, source, num_experts)
    if norm is not None:  # Ergo: one post-expert norm row per expert, in a child of the experts
        _slice_module(norm, source, num_experts)
    for module in owners:
        _slice_module(module, source, num_experts, logit_bias=logit_bias and module is moe.router)
    new = int(source.numel())
    # Attributes the modules' forwards read (one_hot sizes, histc bins, nn.Linear repr).
    for module in (moe.experts, *owners):
        for attr in ("num_experts", "out_features", "n_routed_experts"):
            if getattr(module, attr, None) == num_experts:
                setattr(module, attr, new)


def _update_counts(model: nn.Module, config: Any, family: FamilySpec, old: int, new: int) -> None:
    setattr(config, family.num_experts_key, new)
    if getattr(model, "num_experts", None) == old:  # CausalLM heads keep a copy for the aux loss
        setattr(model, "num_experts", new)  # noqa: B010 - a plain int attribute on an nn.Module
