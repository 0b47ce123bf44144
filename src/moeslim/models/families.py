"""The family table: everything moeslim knows about a MoE family by name, keyed by ``config.model_type``.

Structure (where the experts / router / shared experts sit) is discovered from the modules themselves
(see ``layer.py``); this table only holds what the modules cannot tell: which config keys hold the expert
count, top-k, renormalisation and group limits, which routing function the router runs, and the attribute
names of shared experts, whether the block (not the router) applies the routed scale, config values the adapter
needs, and why layer-wise calibration cannot run a family. A model whose model_type is not listed but has the
standard layout goes through ``GENERIC`` (its routing function is identified by probing its router, see
``layer.py``). MoE families moeslim refuses, with the reason, are in ``support.EXCLUDED``; the rows below the
first ten were added from each family's router and block source and are tested like them.
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
    scaling_in_block: the router's weights exclude the routed scale, the block multiplies its routed sum by it
        (``route`` includes it either way: the block output is linear in the weights).
    requires: (config key, value) pairs the adapter is exact for; another value is refused (``check_config``).
    layerwise_blocker: why layer-wise calibration (prune, calibrated skip / PMQ / GPTQ) cannot run this family's
        decoder layers one at a time; empty when it can. Discovery, routing, select_experts and uniform RTN
        quantization still work.
    skip_blocker: why dynamic expert skipping (skip / ODP plans, a joint plan's skip thresholds) cannot run this
        family; empty when it can. Everything else still works.
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
    scaling_in_block: bool = False
    requires: tuple[tuple[str, Any], ...] = ()
    layerwise_blocker: str = ""
    skip_blocker: str = ""
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

# -- families added for issue 15: structure as above, facts from each family's router and block source ------------
_SHARED = ("shared_experts",)
_BLOCK_STATES = ("its decoder layers take `block_states` produced by earlier layers, which layer-wise calibration "
                 "does not pass")
_DS_GROUPS = ("n_group", "topk_group")


def _sigmoid_group(name: str, experts_key: str = "n_routed_experts", **kw: Any) -> FamilySpec:
    """DeepSeek-V3-like router: sigmoid + correction bias, group-limited choice, renormalised, scaled."""
    fields: dict[str, Any] = {
        "routing": "sigmoid_group",
        "renormalize_key": "norm_topk_prob",
        "scaling_key": "routed_scaling_factor",
        "group_keys": _DS_GROUPS,
        "shared_attrs": _SHARED,
        "notes": "DeepSeek-V3 router. " + _GROUP_NOTE,
    }
    fields.update(kw)
    return FamilySpec(name, experts_key, **fields)


def _sigmoid(name: str, experts_key: str, **kw: Any) -> FamilySpec:
    """Ungrouped sigmoid router (correction bias when the family has one), renormalised by default."""
    return FamilySpec(name, experts_key, routing="sigmoid_topk", **kw)


_NEW: tuple[FamilySpec, ...] = (
    # softmax -> top-k (-> renormalise)
    FamilySpec("aria_text", "moe_num_experts", top_k_key="moe_topk", shared_attrs=_SHARED,
               notes="text decoder of Aria; experts transposed"),
    FamilySpec("flex_olmo", "num_experts", renormalize_key="norm_topk_prob", renormalize=False),
    FamilySpec("jamba", "num_experts", renormalize=False, dense_rule="expert_layer_period / expert_layer_offset",
               notes="Mamba hybrid; no renormalisation"),
    FamilySpec("hunyuan_v1_moe", "num_experts", top_k_key="moe_topk", shared_attrs=("shared_mlp",),
               notes="router is `gate.wg`"),
    FamilySpec("lara_mini", "num_experts", renormalize_key="norm_topk_prob", shared_attrs=("shared_expert",)),
    FamilySpec("mellum", "num_local_experts", renormalize_key="norm_topk_prob", dense_rule="mlp_layer_types"),
    FamilySpec("minimax", "num_local_experts", notes="linear-attention hybrid",
               layerwise_blocker="its linear-attention layers need the 2D padding mask, while layer-wise "
               "calibration replays the first layer's 4D causal mask to every layer"),
    FamilySpec("qwen3_next", "num_experts", renormalize_key="norm_topk_prob", shared_attrs=("shared_expert",),
               shared_gate_attr="shared_expert_gate", dense_rule="mlp_only_layers",
               notes="linear-attention hybrid; shared expert scaled by sigmoid(shared_expert_gate(x))"),
    FamilySpec("qwen3_5_moe_text", "num_experts", shared_attrs=("shared_expert",),
               shared_gate_attr="shared_expert_gate",
               notes="text decoder of Qwen3.5-MoE; shared expert scaled by sigmoid(shared_expert_gate(x))"),
    FamilySpec("qwen4_exp_text", "num_experts", renormalize_key="norm_topk_prob", shared_attrs=("shared_expert",),
               shared_gate_attr="shared_expert_gate",
               notes="text decoder of Qwen4-Exp; shared expert scaled by sigmoid(shared_expert_gate(x))"),
    FamilySpec("ernie4_5_moe", "moe_num_experts", top_k_key="moe_k", routing="softmax_biased_topk",
               shared_attrs=_SHARED, dense_rule="moe_layer_start_index / moe_layer_end_index / moe_layer_interval",
               notes="softmax + correction bias (gate.moe_statics, (1, E)) for choice; renormalised by "
               "max(sum, moe_norm_min)"),
    # top-k -> softmax
    FamilySpec("cohere2_moe", "num_experts", routing="topk_softmax", dense_rule="mlp_layer_types",
               requires=(("expert_selection_fn", "softmax"), ("num_shared_experts", 0)),
               notes="expert_selection_fn='softmax' only; no shared experts"),
    FamilySpec("granitemoe_swa", "num_local_experts", routing="topk_softmax"),
    FamilySpec("granitemoeshared", "num_local_experts", routing="topk_softmax",
               notes="shared MLP sits outside the MoE block (untouched)"),
    FamilySpec("granitemoehybrid", "num_local_experts", routing="topk_softmax",
               notes="Mamba hybrid; shared MLP outside the MoE block"),
    # sigmoid, group-limited (DeepSeek-V3 router)
    _sigmoid_group("deepseek_v32", dense_rule="first_k_dense_replace"),
    _sigmoid_group("glm4_moe_lite", dense_rule="mlp_layer_types"),
    _sigmoid_group("glm_moe_dsa", dense_rule="first_k_dense_replace",
                   layerwise_blocker="each decoder layer passes its sparse-attention top-k indices to the next "
                   "(prev_topk_indices), which layer-wise calibration does not carry from layer to layer"),
    _sigmoid_group("sarvam_mla", dense_rule="first_k_dense_replace"),
    _sigmoid_group("sarvam_moe", dense_rule="first_k_dense_replace"),
    _sigmoid_group("solar_open"),
    _sigmoid_group("dots3_note_text", dense_rule="mlp_layer_types", notes="text decoder of dots3-note. " + _GROUP_NOTE),
    _sigmoid_group("hy_v4", dense_rule="mlp_layer_types",
                   layerwise_blocker="its shared sparse-attention layers reuse the top-k indices of an earlier "
                   "indexer layer, which layer-wise calibration does not carry from layer to layer"),
    _sigmoid_group("axk2", dense_rule="mlp_layer_types"),
    _sigmoid_group("dots1", renormalize=False, dense_rule="first_k_dense_replace"),
    _sigmoid_group("param2moe", dense_rule="first_k_dense_replace",
                   notes="runs the GLM-4-MoE model classes (DeepSeek-V3 router). " + _GROUP_NOTE),
    _sigmoid_group("minicpm5_moe", dense_rule="mlp_layer_types",
                   notes="DeepSeek-V3 router computed in float32; gated attention. " + _GROUP_NOTE),
    _sigmoid_group("mimo_v2_flash", shared_attrs=(), dense_rule="mlp_layer_types"),
    _sigmoid_group("exaone_moe", "num_experts", dense_rule="first_k_dense_replace"),
    _sigmoid_group("beam", "num_experts", shared_attrs=(), scaling_in_block=True, dense_rule="mlp_layer_types",
                   notes="DeepSeek-V3 router; routed_scaling_factor applied by the block. " + _GROUP_NOTE),
    _sigmoid_group("nemotron_h", dense_rule="layers_block_type",
                   notes="Mamba hybrid; experts without gate (relu2). " + _GROUP_NOTE),
    _sigmoid_group("bailing_hybrid", "num_experts", top_k_key="num_experts_per_token",
                   renormalize_key="moe_renormalize", group_keys=("num_expert_group", "topk_group"),
                   dense_rule="first_k_dense_replace", notes="linear-attention hybrid. " + _GROUP_NOTE),
    _sigmoid_group("kimi_linear", "num_experts", top_k_key="num_experts_per_token",
                   renormalize_key="moe_renormalize", group_keys=("num_expert_group", "topk_group"),
                   dense_rule="mlp_layer_types", notes="linear-attention hybrid. " + _GROUP_NOTE),
    # sigmoid, ungrouped
    _sigmoid("afmoe", "num_experts", scaling_key="route_scale", shared_attrs=_SHARED, dense_rule="num_dense_layers",
             notes="router `router.gate`; correction bias `expert_bias` on the block"),
    _sigmoid("flint", "num_experts", renormalize_key="norm_topk_prob", shared_attrs=("shared_expert",),
             dense_rule="mlp_only_layers", notes="sigmoid without correction bias"),
    _sigmoid("hy_v3", "num_experts", scaling_key="router_scaling_factor", shared_attrs=_SHARED,
             dense_rule="mlp_layer_types", notes="correction bias on the block"),
    _sigmoid("minimax_m2", "num_local_experts", notes="correction bias on the block"),
    _sigmoid("lfm2_moe", "num_experts", renormalize_key="norm_topk_prob", scaling_key="routed_scaling_factor",
             dense_rule="num_dense_layers", notes="conv hybrid; correction bias `expert_bias` on the block"),
    _sigmoid("laguna", "num_experts", scaling_key="moe_routed_scaling_factor", shared_attrs=_SHARED,
             dense_rule="mlp_layer_types",
             requires=(("moe_router_logit_softcapping", 0.0), ("moe_apply_router_weight_on_input", False)),
             notes="no router logit softcapping"),
    _sigmoid("minimax_m3_vl_text", "num_local_experts", scaling_key="routed_scaling_factor",
             scaling_in_block=True, shared_attrs=_SHARED, dense_rule="mlp_layer_types",
             notes="text decoder of MiniMax-M3-VL; routed_scaling_factor applied by the block"),
    _sigmoid("ergo", "num_experts", scaling_key="moe_routed_scaling_factor", shared_attrs=_SHARED,
             dense_rule="mlp_layer_types / num_dense_blocks",
             skip_blocker="its experts forward normalises each route's output (post_expert_norm) around transformers' "
             "experts dispatch, so the dispatched forward that skipping replaces gets one route per row at weight 1, "
             "not the routing weights it decides on",
             notes="router `gate.linear`; each expert's output passes its own RMSNorm (post_expert_norm, (E, H)); "
             "experts without gate (relu2)"),
    _sigmoid("inkling2_text", "n_routed_experts", scaling_key="route_scale", layerwise_blocker=_BLOCK_STATES),
    _sigmoid("inkling2_loop_text", "n_routed_experts", scaling_key="route_scale", layerwise_blocker=_BLOCK_STATES),
    FamilySpec("kolibri1", "num_local_experts", routing="logit_topk_sigmoid", renormalize_key="norm_topk_prob",
               renormalize=False, shared_attrs=_SHARED,
               notes="chooses on logits + correction bias, weighs by sigmoid of the chosen logits"),
    FamilySpec("kolibri1_1", "num_local_experts", routing="logit_topk_sigmoid", renormalize_key="norm_topk_prob",
               renormalize=False, shared_attrs=_SHARED, dense_rule="mlp_only_layers",
               layerwise_blocker="its decoder layers pass on the key pool of the latest indexer layer "
               "(index_pool) and read keys / values of earlier layers (shared_kv_states), which layer-wise "
               "calibration does not carry from layer to layer",
               notes="Kolibri-1 MoE block; chooses on logits + correction bias, weighs by sigmoid of the chosen "
               "logits"),
)

FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (*_TABLE, *_NEW)}

# Fallback for unlisted model types with a Mixtral-like layout; routing is identified by probing the router.
GENERIC = FamilySpec(
    "generic",
    "num_experts",
    renormalize=True,
    shared_attrs=("shared_expert", "shared_experts", "shared_mlp"),
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
