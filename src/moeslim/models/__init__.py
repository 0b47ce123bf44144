"""Family adapters: the only package that knows MoE attribute names.

Discovery (``find_moe_layers``) is structural; family specifics live in one table (``families.py``);
routing functions are pure (``routing.py``); ``select_experts`` slices experts in place.
"""

from .expert_math import ExpertWeights, expert_forward, expert_intermediate, expert_weight_views
from .families import FAMILIES, GENERIC, FamilySpec, UnsupportedModelError, family_of, supported_families
from .layer import MoELayer, attention_module, decoder_layers, find_moe_layers
from .loading import load_model, resolve_model_path
from .select import masked_routing_is_identity, select_experts
from .summary import moe_summary
from .support import (
    EXCLUDED,
    MethodSupport,
    check_config,
    check_config_file,
    check_layerwise,
    method_support,
    refusal,
)

__all__ = [
    "EXCLUDED",
    "FAMILIES",
    "MethodSupport",
    "check_config",
    "check_config_file",
    "check_layerwise",
    "method_support",
    "refusal",
    "GENERIC",
    "FamilySpec",
    "MoELayer",
    "ExpertWeights",
    "UnsupportedModelError",
    "attention_module",
    "decoder_layers",
    "expert_forward",
    "expert_intermediate",
    "expert_weight_views",
    "family_of",
    "find_moe_layers",
    "load_model",
    "masked_routing_is_identity",
    "moe_summary",
    "resolve_model_path",
    "select_experts",
    "supported_families",
]
