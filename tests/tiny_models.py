"""Tiny, seeded MoE models of every supported family, built from their config classes (no downloads).

Other test modules import this: ``tiny_model(family, seed)`` and ``FAMILIES``.
Sizes: 2-3 decoder layers, hidden 32, 8 experts (top-2), vocab 128, float32, eager attention.
Weights are re-initialised so that routing is non-trivial: router rows with std 3/sqrt(H) give
well-separated logits (no near-ties between experts), expert weights with std 0.1 give outputs that
differ between experts, and the DeepSeek-V3 / GLM-4-MoE correction bias gets small random values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

VOCAB = 128
HIDDEN = 32
EXPERTS = 8
TOP_K = 2

# Fields every family understands (Llama-like attention, small everything).
_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "num_experts_per_tok": TOP_K,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# DeepSeek multi-head latent attention, shrunk.
_MLA: dict[str, Any] = {
    "kv_lora_rank": 16,
    "q_lora_rank": None,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "head_dim": 8,
    "num_key_value_heads": 4,  # MLA has no grouped KV heads
}


def _mixtral() -> dict[str, Any]:
    return {
        "model_type": "mixtral",
        "num_hidden_layers": 2,
        "intermediate_size": 48,
        "num_local_experts": EXPERTS,
    }


def _qwen2_moe() -> dict[str, Any]:
    # norm_topk_prob=False: the no-renormalisation softmax path (the Qwen1.5-MoE default).
    return {
        "model_type": "qwen2_moe",
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "num_experts": EXPERTS,
        "norm_topk_prob": False,
    }


def _qwen3_moe() -> dict[str, Any]:
    # layer 0 dense: exercises mlp_only_layers discovery.
    return {
        "model_type": "qwen3_moe",
        "num_hidden_layers": 3,
        "intermediate_size": 64,
        "moe_intermediate_size": 32,
        "num_experts": EXPERTS,
        "norm_topk_prob": True,
        "mlp_only_layers": [0],
        "head_dim": 8,
    }


def _olmoe() -> dict[str, Any]:
    return {
        "model_type": "olmoe",
        "num_hidden_layers": 2,
        "intermediate_size": 32,
        "num_experts": EXPERTS,
        "norm_topk_prob": False,
    }


def _deepseek_v2() -> dict[str, Any]:
    # group-limited greedy over 2 groups of 4, no renormalisation, first layer dense.
    return {
        "model_type": "deepseek_v2",
        "num_hidden_layers": 3,
        "intermediate_size": 64,
        "moe_intermediate_size": 32,
        "n_routed_experts": EXPERTS,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "topk_method": "group_limited_greedy",
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 1.5,
        **_MLA,
    }


def _deepseek_v3() -> dict[str, Any]:
    return {
        "model_type": "deepseek_v3",
        "num_hidden_layers": 3,
        "intermediate_size": 64,
        "moe_intermediate_size": 32,
        "n_routed_experts": EXPERTS,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 2,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        **_MLA,
    }


def _glm4_moe() -> dict[str, Any]:
    return {
        "model_type": "glm4_moe",
        "num_hidden_layers": 3,
        "intermediate_size": 64,
        "moe_intermediate_size": 32,
        "n_routed_experts": EXPERTS,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "head_dim": 8,
        "partial_rotary_factor": 0.5,
    }


def _granitemoe() -> dict[str, Any]:
    return {
        "model_type": "granitemoe",
        "num_hidden_layers": 2,
        "intermediate_size": 32,
        "num_local_experts": EXPERTS,
    }


def _phimoe() -> dict[str, Any]:
    return {
        "model_type": "phimoe",
        "num_hidden_layers": 2,
        "intermediate_size": 32,
        "num_local_experts": EXPERTS,
        "router_jitter_noise": 0.01,
        "input_jitter_noise": 0.0,
    }


def _gpt_oss() -> dict[str, Any]:
    return {
        "model_type": "gpt_oss",
        "num_hidden_layers": 2,
        "intermediate_size": 32,
        "num_local_experts": EXPERTS,
        "head_dim": 8,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},  # no YaRN warning at this size
    }


_BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "glm4_moe": _glm4_moe,
    "granitemoe": _granitemoe,
    "phimoe": _phimoe,
    "gpt_oss": _gpt_oss,
}

FAMILIES: list[str] = list(_BUILDERS)


def tiny_config(family: str) -> PretrainedConfig:
    """The tiny config of ``family`` (a key of ``FAMILIES``)."""
    from transformers import AutoConfig

    if family not in _BUILDERS:
        raise KeyError(f"unknown tiny family {family!r}; known: {FAMILIES}")
    fields = {**_COMMON, **_BUILDERS[family]()}
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    config._attn_implementation = "eager"
    return config


@torch.no_grad()
def _reinit(model: PreTrainedModel, seed: int) -> None:
    """Seeded weights that make routing and expert outputs clearly non-degenerate."""
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim == 1 and "norm" in name:
            param.copy_(1.0 + 0.05 * torch.randn(param.shape, generator=gen))  # norms near identity
        elif param.ndim == 1:
            param.copy_(0.05 * torch.randn(param.shape, generator=gen))  # biases: small
        elif (
            ("gate" in name or "router" in name)
            and param.ndim == 2
            and param.shape[-1] == hidden
            and param.shape[0] == EXPERTS
        ):
            param.copy_(3.0 / math.sqrt(hidden) * torch.randn(param.shape, generator=gen))
        elif leaf in ("gate_up_proj", "down_proj", "up_proj") and param.ndim == 3:
            param.copy_(0.1 * torch.randn(param.shape, generator=gen))
        else:
            param.copy_(0.08 * torch.randn(param.shape, generator=gen))
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(0.05 * torch.randn(buf.shape, generator=gen))


def tiny_model(family: str, seed: int = 0) -> PreTrainedModel:
    """A tiny seeded float32 causal LM of ``family`` in eval mode."""
    config = tiny_config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    _reinit(model, seed)
    return model.eval()


def tiny_llama(seed: int = 0) -> nn.Module:
    """A tiny dense (non-MoE) Llama, for the unsupported-model tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def sample_ids(seed: int = 0, batch: int = 2, seq: int = 12) -> torch.Tensor:
    """Seeded token ids (batch, seq) in the tiny vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)
