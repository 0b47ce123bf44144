"""Keep a subset of experts in every MoE layer, in place, producing a standard transformers checkpoint."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .families import FamilySpec, family_of
from .layer import MoELayer, _text_config, find_moe_layers


def select_experts(model: nn.Module, kept: Mapping[int, Sequence[int]]) -> None:
    """IN PLACE: keep only ``kept[layer_idx]`` experts in each MoE decoder layer.

    Slices the fused expert tensors (+ biases) and the router rows (+ router bias,
    ``e_score_correction_bias``), updates module attributes (``num_experts``, ...) and the config's expert
    count; top-k is unchanged.
    Kept ids are used in sorted order. Keeping all experts is the identity.

    Everything is validated before anything changes: unknown layer index, out-of-range or duplicate ids, fewer
    than top-k kept, and unequal counts across layers (the config holds one expert count; unlisted layers keep
    all experts, which is only valid when that count is unchanged).

    Group-limited routing (DeepSeek-V2/V3, GLM-4-MoE with n_group > 1): the groups are kept when every group
    of every layer keeps the same number c of experts with c >= 2 (sigmoid_group ranks groups by their 2
    best) and c * topk_group >= top_k; the pruned model then equals masked routing. Otherwise
    n_group = topk_group = 1 is set, and the pruned model routes without group limits: it equals masked
    routing *without group limits*, not masked routing of the original (see ``masked_routing_is_identity``).
    """
    layers = {moe.layer_idx: moe for moe in find_moe_layers(model)}
    plan = _validated_plan(layers, kept)
    if plan is None:
        return  # every layer keeps all its experts: the identity
    config = _text_config(model)
    family = family_of(config)
    keep_groups = _groups_preserved(family, config, plan, _experts_of(layers))
    old, new = _experts_of(layers), len(next(iter(plan.values())))
    for idx, ids in plan.items():
        _slice_layer(layers[idx], torch.tensor(ids, dtype=torch.long), old)
    _update_counts(model, config, family, old, new)
    if not keep_groups:
        _drop_group_limits(config, family, layers.values())


def masked_routing_is_identity(model_or_config: Any, kept: Mapping[int, Sequence[int]] | None = None) -> bool:
    """Whether the model pruned to ``kept`` computes exactly the original's masked routing.

    True for every supported family (softmax families mask logits to -inf before the softmax, which removes
    dropped experts from the denominator exactly as pruning does; sigmoid scores are independent), except
    group-limited routing (n_group > 1) when ``select_experts`` has to drop the groups (see its docstring).
    With ``kept=None`` the answer for group-limited routing is False (it depends on the kept experts).
    """
    config = _text_config(model_or_config) if hasattr(model_or_config, "config") else model_or_config
    family = family_of(config)
    if _n_group(family, config) <= 1:
        return True
    if kept is None:
        return False
    num_experts = int(getattr(config, family.num_experts_key))
    plan = {int(k): sorted(int(i) for i in v) for k, v in kept.items()}
    return _groups_preserved(family, config, plan, num_experts)


# -- validation ----------------------------------------------------------------------------------------


def _experts_of(layers: Mapping[int, MoELayer]) -> int:
    counts = {moe.num_experts for moe in layers.values()}
    if len(counts) != 1:
        raise ValueError(f"MoE layers have different expert counts {sorted(counts)}; cannot select experts")
    return counts.pop()


def _validated_plan(
    layers: Mapping[int, MoELayer], kept: Mapping[int, Sequence[int]]
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
    plan = {idx: _validated_ids(idx, kept.get(idx), num_experts, top_k, family) for idx in sorted(layers)}
    counts = {idx: len(ids) for idx, ids in plan.items()}
    if len(set(counts.values())) > 1:
        listed = {idx: n for idx, n in counts.items() if idx in kept}
        raise ValueError(
            f"all MoE layers must keep the same number of experts (the config holds one expert count); got "
            f"{listed}" + (f", unlisted layers keep all {num_experts}" if len(listed) < len(counts) else "")
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


def _groups_preserved(
    family: FamilySpec, config: Any, plan: Mapping[int, Sequence[int]], num_experts: int
) -> bool:
    """Whether pruning to ``plan`` can keep the group limits and still equal masked routing."""
    n_group = _n_group(family, config)
    if n_group <= 1:
        return True
    topk_group = int(family.config_value(config, family.group_keys[1], 1))
    top_k = int(family.config_value(config, family.top_k_key))
    per_group = num_experts // n_group
    min_per_group = 2 if family.routing == "sigmoid_group" else 1  # sigmoid groups rank by their 2 best
    for ids in plan.values():
        counts = Counter(int(i) // per_group for i in ids)
        per = {counts.get(g, 0) for g in range(n_group)}
        if len(per) != 1:
            return False
        c = per.pop()
        if c < min_per_group or c * topk_group < top_k:
            return False
    return True


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
def _slice_module(module: nn.Module, index: torch.Tensor, num_experts: int) -> None:
    """Replace every own parameter / buffer whose first dim is the expert dim by its kept rows (a (1, E)
    tensor, ERNIE's correction bias, by its kept columns)."""
    for name, param in list(module.named_parameters(recurse=False)):
        dim = _expert_dim(param, num_experts)
        if dim is not None:
            rows = param.data.index_select(dim, index.to(param.device)).clone()
            setattr(module, name, nn.Parameter(rows, requires_grad=param.requires_grad))
    for name, buf in list(module.named_buffers(recurse=False)):
        dim = None if buf is None else _expert_dim(buf, num_experts)
        if dim is not None:
            module._buffers[name] = buf.index_select(dim, index.to(buf.device)).clone()


def _expert_dim(tensor: torch.Tensor, num_experts: int) -> int | None:
    if tensor.ndim and tensor.shape[0] == num_experts:
        return 0
    if tuple(tensor.shape) == (1, num_experts):
        return 1
    return None


def _slice_layer(moe: MoELayer, index: torch.Tensor, num_experts: int) -> None:
    # The router, its wrappers and the block itself (own tensors only) may hold per-expert rows: router weight
    # and bias, correction biases kept on the block (HY-V3, MiniMax-M2, LFM2-MoE, Afmoe).
    owners = moe.routing_owners()
    _slice_module(moe.experts, index, num_experts)
    for module in owners:
        _slice_module(module, index, num_experts)
    new = int(index.numel())
    # Attributes the modules' forwards read (one_hot sizes, histc bins, nn.Linear repr).
    for module in (moe.experts, *owners):
        for attr in ("num_experts", "out_features", "n_routed_experts"):
            if getattr(module, attr, None) == num_experts:
                setattr(module, attr, new)


def _update_counts(model: nn.Module, config: Any, family: FamilySpec, old: int, new: int) -> None:
    setattr(config, family.num_experts_key, new)
    if getattr(model, "num_experts", None) == old:  # CausalLM heads keep a copy for the aux loss
        model.num_experts = new
