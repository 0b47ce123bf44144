"""The family table: everything moeslim knows about a MoE family by name, keyed by ``config.model_type``.

Structure (where the experts / router / shared experts sit) is discovered from the modules themselves
(see ``layer.py``); this table only holds what the modules cannot tell: which config keys hold the expert
count, top-k, renormalisation and group limits, which routing function the router runs, and the attribute
names of shared experts. A model whose model_type is not listed but has the standard layout goes through
``GENERIC`` (its routing function is identified by probing its router, see ``layer.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .routing import ROUTING


class UnsupportedModelError(ValueError):
    """The model has no MoE block moeslim can handle; the message names what was found."""


@dataclass(frozen=True)
class FamilySpec:
    """One row of the family table.

    name: family name (== the model_type it was registered under, "generic" for the fallback row).
    num_experts_key / top_k_key: config keys holding the routed expert count and top-k.
    routing: a key of ``routing.ROUTING``.
    renormalize_key: config key of "renormalise top-k weights" (None: fixed ``renormalize``).
    renormalize: value used when ``renormalize_key`` is None or absent from the config.
    scaling_key: config key of the routed weight scale (DeepSeek ``routed_scaling_factor``), None: 1.0.
    group_keys: (n_group, topk_group) config keys for group-limited routing, None when ungrouped.
    shared_attrs: attribute names on the MoE block of shared-expert MLPs (always-on experts).
    shared_gate_attr: attribute name of a (H -> 1) linear whose sigmoid scales the shared output (Qwen2-MoE).
    shared_count_key: config key of the number of shared experts (else 1 per shared module found).
    dense_rule: how the family keeps some decoder layers dense (documentation only: discovery is structural).
    block_returns_tuple: the block's forward returns (hidden, router_scores) instead of hidden (gpt-oss).
    notes: caveats shown in the README table.
    """

    name: str
    num_experts_key: str
    top_k_key: str = "num_experts_per_tok"
    routing: str = "softmax_topk"
    renormalize_key: str | None = None
    renormalize: bool = True
    scaling_key: str | None = None
    group_keys: tuple[str, str] | None = None
    shared_attrs: tuple[str, ...] = ()
    shared_gate_attr: str | None = None
    shared_count_key: str | None = None
    dense_rule: str = "none"
    block_returns_tuple: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        if self.routing not in ROUTING:
            raise ValueError(
                f"family {self.name}: unknown routing {self.routing!r}; known: {sorted(ROUTING)}"
            )

    def config_value(self, config: Any, key: str | None, default: Any = None) -> Any:
        """``config.<key>`` or ``default`` when the key is None or unset."""
        if key is None:
            return default
        value = getattr(config, key, None)
        return default if value is None else value


_GROUP_NOTE = (
    "group-limited routing: select_experts keeps the groups when every group keeps the same number of "
    "experts (>= 2 for sigmoid_group, and topk_group * per-group >= top_k); otherwise it sets "
    "n_group = topk_group = 1, "
    "and the pruned model then routes WITHOUT group limits, which differs from masked routing."
)

_TABLE: tuple[FamilySpec, ...] = (
    FamilySpec("mixtral", "num_local_experts", notes="renormalises always (no config key)"),
    FamilySpec(
        "qwen2_moe",
        "num_experts",
        renormalize_key="norm_topk_prob",
        renormalize=False,
        shared_attrs=("shared_expert",),
        shared_gate_attr="shared_expert_gate",
        dense_rule="mlp_only_layers",
        notes="one shared expert scaled by sigmoid(shared_expert_gate(x)); also decoder_sparse_step",
    ),
    FamilySpec(
        "qwen3_moe",
        "num_experts",
        renormalize_key="norm_topk_prob",
        renormalize=False,
        dense_rule="mlp_only_layers",
        notes="also decoder_sparse_step",
    ),
    FamilySpec("olmoe", "num_experts", renormalize_key="norm_topk_prob", renormalize=False),
    FamilySpec(
        "deepseek_v2",
        "n_routed_experts",
        routing="softmax_group",
        renormalize=False,
        scaling_key="routed_scaling_factor",
        group_keys=("n_group", "topk_group"),
        shared_attrs=("shared_experts",),
        shared_count_key="n_shared_experts",
        dense_rule="first_k_dense_replace",
        notes="no renormalisation; topk_method greedy | group_limited_greedy. " + _GROUP_NOTE,
    ),
    FamilySpec(
        "deepseek_v3",
        "n_routed_experts",
        routing="sigmoid_group",
        renormalize_key="norm_topk_prob",
        scaling_key="routed_scaling_factor",
        group_keys=("n_group", "topk_group"),
        shared_attrs=("shared_experts",),
        shared_count_key="n_shared_experts",
        dense_rule="first_k_dense_replace",
        notes="e_score_correction_bias sliced with the router. " + _GROUP_NOTE,
    ),
    FamilySpec(
        "glm4_moe",
        "n_routed_experts",
        routing="sigmoid_group",
        renormalize_key="norm_topk_prob",
        scaling_key="routed_scaling_factor",
        group_keys=("n_group", "topk_group"),
        shared_attrs=("shared_experts",),
        shared_count_key="n_shared_experts",
        dense_rule="first_k_dense_replace",
        notes="same router as DeepSeek-V3. " + _GROUP_NOTE,
    ),
    FamilySpec(
        "granitemoe",
        "num_local_experts",
        routing="topk_softmax",
        notes="block is `block_sparse_moe`, router is `router`",
    ),
    FamilySpec(
        "phimoe",
        "num_local_experts",
        routing="sparsemixer",
        notes="sparsemixer is always top-2 (eval mode); router is an nn.Linear",
    ),
    FamilySpec(
        "gpt_oss",
        "num_local_experts",
        routing="topk_softmax",
        block_returns_tuple=True,
        notes="experts transposed (E, H, 2I) with biases and interleaved gate/up; router has a bias; "
        "block returns (hidden, router_scores)",
    ),
)

FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in _TABLE}

# Fallback for unlisted model types with a Mixtral-like layout; routing is identified by probing the router.
GENERIC = FamilySpec(
    "generic",
    "num_experts",
    renormalize=True,
    shared_attrs=("shared_expert", "shared_experts"),
    shared_gate_attr="shared_expert_gate",
    notes="unlisted model_type; routing identified by probing the router",
)

_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def supported_families() -> list[str]:
    """Model types with a row in the family table."""
    return sorted(FAMILIES)


def _config_of(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def family_of(model_or_config: Any) -> FamilySpec:
    """The family row of a model or config (``GENERIC``, with its expert-count key found, when unlisted)."""
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    key = next((k for k in _EXPERT_COUNT_KEYS if isinstance(getattr(config, k, None), int)), None)
    if key is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a known MoE family and its config has no expert count "
            f"(looked for {list(_EXPERT_COUNT_KEYS)}); supported families: {supported_families()}"
        )
    return _generic_with(num_experts_key=key)


def _generic_with(**changes: Any) -> FamilySpec:
    return replace(GENERIC, **changes)


# Router module attribute holding each routing setting (the router reads its own copy, set from the config
# at init, so these win over the config when both exist). Keys: keyword arguments of the routing functions.
ROUTER_ATTRS: dict[str, str] = {
    "top_k": "top_k",
    "renormalize": "norm_topk_prob",
    "scaling": "routed_scaling_factor",
    "n_group": "num_group",
    "topk_group": "topk_group",
    "topk_method": "topk_method",
    "correction_bias": "e_score_correction_bias",
    "jitter_eps": "router_jitter_noise",
}
