"""Tiny, seeded MoE models of every supported family, built from their config classes (no downloads).

Other test modules import this: ``tiny_model(family, seed)``, ``FAMILIES`` (the hand-configured families) and
``all_families()`` (every family of the table; those without a hand config get their defaults shrunk by rule).
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


# -- every other family: its default config, shrunk by rule (no hand-written config per family) ----------------

_LAYER_KEYS = ("num_hidden_layers", "n_layers", "num_layers")
# key -> tiny value, set wherever the key is an int / bool / None (sliding windows only where already set)
_SIZES: dict[str, Any] = {
    # widths and heads
    "vocab_size": VOCAB, "unpadded_vocab_size": VOCAB, "hidden_size": HIDDEN, "d_model": HIDDEN,
    "intermediate_size": 64, "intermediate_size_mlp": 64, "moe_intermediate_size": 32, "ffn_hidden_size": 32,
    "expert_ffn_hidden_size": 32, "shared_expert_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32,
    "shared_experts_intermediate_size": 32, "shared_intermediate_size": 32,
    "num_attention_heads": 4, "n_heads": 4, "num_key_value_heads": 2, "kv_n_heads": 2, "head_dim": 8,
    "kv_channels": 8, "max_position_embeddings": 128, "max_seq_len": 128, "model_max_length": 128,
    "sliding_window": 16, "attention_chunk_size": 16, "global_attn_every_n_layers": 2,
    # multi-head latent attention, sparse-attention indexers
    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "qk_head_dim": 16,
    "index_topk": 8, "index_head_dim": 8, "index_n_heads": 2,
    # experts
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS, "moe_num_experts": EXPERTS,
    "num_experts_per_tok": TOP_K, "num_experts_per_token": TOP_K, "moe_k": TOP_K, "moe_topk": TOP_K,
    "moe_top_k": TOP_K, "router_hidden_size": 16,
    # linear attention / Mamba / conv hybrids
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_head_dim": 8, "linear_num_heads": 4, "mamba_num_heads": 4, "mamba_n_heads": 4, "mamba_head_dim": 8,
    "mamba_d_head": 16, "ssm_state_size": 8, "n_groups": 1, "mamba_d_state": 8, "mamba_dt_rank": 8,
    "chunk_size": 16, "mamba_chunk_size": 16, "block_size": 16, "use_mamba_kernels": False,
    "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
    # per-layer inputs, n-gram embeddings, hyper-connections
    "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": VOCAB, "hc_lowrank": 8, "ple_embed_dim": 16,
    "ngram_vocab_size_base": 512, "split_ngram_parts": 4, "heads_per_ngram": 2,
    # misc
    "num_nextn_predict_layers": 0, "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 2,
}
_ONE_IF_POSITIVE = ("num_shared_experts", "n_shared_experts", "moe_num_shared_experts")
_GROUP_KEYS = ("n_group", "num_expert_group")
_DENSE_PREFIX_KEYS = ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index")


def _per_layer(key: str, values: list[Any], n_layers: int) -> list[Any]:
    """A per-layer list resampled to ``n_layers``, keeping each distinct kind in first-seen order (so a
    'dense, sparse, ...' list gives one dense layer then MoE layers, a hybrid keeps both layer kinds)."""
    if key == "num_attention_heads_per_layer":
        return [4] * n_layers
    if isinstance(values[0], (list, dict)):
        return [values[0]] * n_layers
    distinct = list(dict.fromkeys(values))
    return (distinct + [distinct[-1]] * n_layers)[:n_layers]


def _shrink_value(key: str, value: Any, n_layers: int, old_layers: int | None) -> Any:
    if key in _SIZES and (value is not None or key not in ("sliding_window", "attention_chunk_size")):
        return _SIZES[key] if value is None or isinstance(value, (bool, int)) else value
    if key in _ONE_IF_POSITIVE and (value is None or isinstance(value, int) and value > 0):
        return 1
    if key in _GROUP_KEYS and isinstance(value, int):
        return 2 if value > 1 else 1
    if key == "topk_group" and isinstance(value, int):
        return 1
    if key == "q_lora_rank" and value is not None:
        return 16
    if key in _DENSE_PREFIX_KEYS and isinstance(value, int):
        return min(value, 1)
    if key == "moe_layer_end_index" and isinstance(value, int):
        return n_layers - 1
    if key == "mlp_only_layers" and isinstance(value, list):
        return [0] if value else []
    if key == "moe_layers" and isinstance(value, list):
        return list(range(n_layers))
    if isinstance(value, list) and old_layers and old_layers > 1 and len(value) == old_layers:
        return _per_layer(key, value, n_layers)
    if isinstance(value, dict) and key.endswith("config") and value:
        return _shrink(value, n_layers)
    return value


def _shrink(fields: dict[str, Any], n_layers: int = 3) -> dict[str, Any]:
    """A family's default config fields, shrunk: tiny sizes, 8 experts top-2, 3 layers (per-layer lists keep
    each distinct kind, e.g. one dense then MoE layers), one shared expert, 2 expert groups when grouped."""
    old_layers = next((fields[k] for k in _LAYER_KEYS if isinstance(fields.get(k), int)), None)
    out = {k: n_layers if k in _LAYER_KEYS and isinstance(v, int) else _shrink_value(k, v, n_layers, old_layers)
           for k, v in fields.items()}
    if "per_layer_config" in out:
        out["per_layer_config"] = {}  # per-layer overrides index layers that no longer exist
    if "kv_lora_rank" in out and "num_attention_heads" in out:
        out["num_key_value_heads"] = out["num_attention_heads"]  # MLA has no grouped KV heads
    return out


# What the rules cannot know (validated relations, layer kinds the defaults leave out, upstream config gaps).
_OVERRIDES: dict[str, dict[str, Any]] = {
    "zaya": {"num_experts_per_tok": 1},  # ZAYA supports top-1 only
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "full_attention"]},
    "dots3_note_text": {"head_dim": 16},  # SWA head_dim = qk_nope_head_dim + qk_rope_head_dim
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8,
                       "indexer_compress_ratio": 2, "hc_count": 2},
    # one sliding layer, one indexer, one layer reading the indexer's keys / values and key pool; sequences of the
    # tests (16-24 tokens) exceed the pool and the key budget, so key selection runs
    "kolibri1_1": {"layer_types": ["sliding_attention", "indexed_attention", "indexed_attention"],
                   "index_layers": [1], "kv_source_layers": [0, 1, 1], "head_dim": 16, "index_num_heads": 2,
                   "index_topk": 4, "index_pool_size": 12, "index_compression": 4, "index_num_local_tokens": 4,
                   "index_num_sink_tokens": 2, "mlp_only_intermediate_size": 64},
    "ergo": {"first_dense_intermediate_size": 64},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    "gemma4_text": {"enable_moe_block": True, "num_experts": EXPERTS, "top_k_experts": TOP_K,
                    "moe_intermediate_size": 32},
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

# The hand-configured families (other test modules parametrize over these); ``all_families()`` adds the rest.
FAMILIES: list[str] = list(_BUILDERS)


def all_families() -> list[str]:
    """Every family of the moeslim family table (hand-configured first)."""
    from moeslim.models import supported_families

    return FAMILIES + [f for f in supported_families() if f not in _BUILDERS]


def tiny_config(family: str, vocab: int = VOCAB) -> PretrainedConfig:
    """The tiny config of ``family`` (a model_type): hand-written for ``FAMILIES``, else its defaults shrunk."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if family in _BUILDERS:
        fields = {**_COMMON, **_BUILDERS[family](), "vocab_size": vocab}
        model_type = fields.pop("model_type")
        config = AutoConfig.for_model(model_type, **fields)
    else:
        if family not in CONFIG_MAPPING:
            raise KeyError(f"unknown model_type {family!r}")
        fields = _shrink(CONFIG_MAPPING[family]().to_dict())
        text = fields.get("text_config")
        for part in (fields, text if isinstance(text, dict) else {}):
            part.update({k: vocab for k in ("vocab_size", "unpadded_vocab_size") if k in part})
        parts = [(fields, family)] + ([(text, text.get("model_type"))] if isinstance(text, dict) else [])
        for part, model_type in parts:  # a vision-language config takes its text decoder's overrides too
            for key, value in _OVERRIDES.get(model_type, {}).items():
                part[key] = {**part[key], **value} if isinstance(value, dict) else value
        for key in ("model_type", "transformers_version", "architectures"):
            fields.pop(key, None)
        config = CONFIG_MAPPING[family](**fields)
    config._attn_implementation = "eager"
    return config


@torch.no_grad()
def _reinit(model: PreTrainedModel, seed: int) -> None:
    """Seeded weights that make routing and expert outputs clearly non-degenerate."""
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.get_text_config().hidden_size
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim == 1 and "norm" in name:
            param.copy_(1.0 + 0.05 * torch.randn(param.shape, generator=gen))  # norms near identity
        elif param.ndim == 1 and param.dtype.is_floating_point:
            param.copy_(0.05 * torch.randn(param.shape, generator=gen))  # biases (incl. expert_bias): small
        elif not param.dtype.is_floating_point:
            continue
        elif param.ndim == 2 and param.shape[-1] == hidden and param.shape[0] == EXPERTS:  # router rows
            param.copy_(3.0 / math.sqrt(hidden) * torch.randn(param.shape, generator=gen))
        elif leaf in ("gate_up_proj", "down_proj", "up_proj") and param.ndim == 3:
            param.copy_(0.1 * torch.randn(param.shape, generator=gen))
        else:
            param.copy_(0.08 * torch.randn(param.shape, generator=gen))
    for name, buf in model.named_buffers():
        if name.endswith(("e_score_correction_bias", "expert_bias")) and buf.dtype.is_floating_point:
            buf.copy_(0.05 * torch.randn(buf.shape, generator=gen))


def tiny_model(family: str, seed: int = 0, vocab: int = VOCAB) -> PreTrainedModel:
    """A tiny seeded float32 causal LM of ``family`` in eval mode."""
    config = tiny_config(family, vocab)
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
