"""Parameter and layer accounting of a MoE model (what compression is measured against)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .families import family_of
from .layer import _text_config, decoder_layers, find_moe_layers


def _numel(modules: list[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:  # a parameter shared between modules counts once
                seen.add(id(p))
                total += p.numel()
    return total


def moe_summary(model: nn.Module) -> dict[str, Any]:
    """Layers, experts and parameter counts of a MoE model.

    params.activated_per_token = non-expert + shared + top_k / E of the routed expert parameters (routers
    count as non-expert). All counts are element counts.
    """
    moe_layers = find_moe_layers(model)
    config = _text_config(model)
    family = family_of(config)
    n_layers = len(decoder_layers(model))
    moe_ids = [m.layer_idx for m in moe_layers]
    first = moe_layers[0]
    routed = _numel([m.experts for m in moe_layers])
    shared_modules = [s for m in moe_layers for s in m.shared_modules]
    shared_modules += [g for m in moe_layers if (g := m.shared_gate) is not None]
    shared = _numel(shared_modules)
    total = _numel([model])
    n_shared = len(first.shared_modules)
    if n_shared and family.shared_count_key:
        n_shared = int(family.config_value(config, family.shared_count_key, n_shared))
    activated = total - routed + round(routed * first.top_k / first.num_experts)
    return {
        "family": family.name,
        "layers": n_layers,
        "moe_layers": moe_ids,
        "dense_layers": [i for i in range(n_layers) if i not in set(moe_ids)],
        "experts": first.num_experts,
        "top_k": first.top_k,
        "shared_experts": n_shared,
        "params": {
            "total": total,
            "expert": routed,
            "shared": shared,
            "non_expert": total - routed - shared,
            "activated_per_token": activated,
        },
    }
