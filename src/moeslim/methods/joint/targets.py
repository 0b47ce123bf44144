"""The joint planner's targets in bytes, resolved against a model before any calibration."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moeslim.config import ConfigError
from moeslim.evaluate.cost import param_bytes
from moeslim.methods.joint.config import MIB, JointConfig
from moeslim.methods.joint.sizes import LayerBytes, model_layer_bytes
from moeslim.methods.joint.solve import min_held_bytes
from moeslim.methods.prune import PruneConfig
from moeslim.methods.prune.config import PruneShape
from moeslim.methods.prune.enumerate import count_subsets
from moeslim.models import find_moe_layers


@dataclass(frozen=True)
class JointTargets:
    """``base`` the original's held bytes; ``target`` the held-bytes cap (``base`` when only the active target is
    set); ``active`` the cap on expert bytes read per token (None: none); ``sizes`` per-layer byte tables;
    ``kept_sizes`` the kept-set sizes each layer may take; ``prune`` the pruning settings of the loss curves."""

    base: int
    target: int
    active: float | None
    sizes: dict[int, LayerBytes]
    kept_sizes: tuple[int, ...]
    prune: PruneConfig
    shape: PruneShape


def _prune_config(config: JointConfig, num_experts: int, min_keep: int) -> PruneConfig:
    method = config.prune_method
    if method == "auto":
        count = sum(count_subsets(num_experts, k) for k in range(min_keep, num_experts))
        method = "enumerate" if count <= config.max_subsets else "search"
    return PruneConfig(keep=min_keep, method=method, allocation="global", min_keep=min_keep, layout="compact",
                       max_subsets=config.max_subsets, budget=config.search_budget, seed=config.seed,
                       token_fraction=config.token_fraction, max_tokens=config.max_tokens)


def resolve_targets(model: nn.Module, config: JointConfig) -> JointTargets:
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ConfigError("the joint planner measures the held bytes of the whole model, and some of its tensors are "
                          "not loaded (meta: a streamed or partly loaded model); load it whole (drop --stream)")
    layers = find_moe_layers(model)
    experts, top_k = layers[0].num_experts, layers[0].top_k
    if any(layer.num_experts != experts for layer in layers):
        raise ConfigError("the joint planner needs every MoE layer to hold the same number of experts "
                          f"(got {sorted({layer.num_experts for layer in layers})}); plan the unpruned model")
    min_keep = config.min_keep if config.min_keep is not None else top_k
    if not top_k <= min_keep < experts:
        raise ConfigError(f"min_keep={min_keep}: use a count in {top_k}..{experts - 1} (top_k..experts - 1)")
    prune = _prune_config(config, experts, min_keep)
    shape = prune.check_model(model)
    low = min(shape.sizes)
    kept_sizes = tuple(sorted({k for k in shape.sizes if (k - low) % config.size_step == 0} | {experts}))
    sizes = model_layer_bytes(model, config.widths, config.group_size, config.symmetric)
    base = int(param_bytes(model)["total"])
    smallest = min_held_bytes(base, sizes, {idx: low for idx in sizes}, config.widths)
    target = base
    if config.target_mib is not None or config.target_ratio is not None:
        target = (int(config.target_mib * MIB) if config.target_mib is not None
                  else int(config.target_ratio * base))  # type: ignore[operator]
        asked = (f"target_mib={config.target_mib}" if config.target_mib is not None
                 else f"target_ratio={config.target_ratio} ({target / MIB:.3f} MiB)")
        if target < smallest:
            raise ConfigError(
                f"{asked} is below the smallest size a joint plan reaches on this model: {smallest / MIB:.3f} MiB "
                f"({smallest / base:.1%} of the original's {base / MIB:.3f} MiB; every MoE layer keeping {low} "
                f"experts at {min(config.widths)} bits): raise the target, or lower min_keep / add a narrower width")
        if target >= base:
            raise ConfigError(f"{asked} is not below the original's held {base / MIB:.3f} MiB: nothing to compress")
    active = None
    if config.target_active_mib is not None:
        active = config.target_active_mib * MIB
        least = sum(top_k * min(lb.width[b] for b in config.widths) for lb in sizes.values())
        if active < least:
            raise ConfigError(
                f"target_active_mib={config.target_active_mib} is below the least a token reads: {least / MIB:.4f} "
                f"MiB ({top_k} routed experts per MoE layer at {min(config.widths)} bits); raise the target")
    return JointTargets(base=base, target=target, active=active, sizes=sizes, kept_sizes=kept_sizes, prune=prune,
                        shape=shape)
