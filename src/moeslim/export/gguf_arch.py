"""What llama.cpp expects of each exported family: one small class per GGUF architecture, registered by name.

An architecture class knows what convert_hf_to_gguf.py knows of it: which transformers ``model_type`` it takes,
the refusals (routing or layouts llama.cpp's graph for it cannot run, said before any work), the hyper-parameters
it writes, and the tensor transforms (transformers 5 in-memory layout -> llama.cpp's). Tensor *names* come from
gguf-py's own ``TensorNameMap`` for the architecture (the table the converter uses), after the transforms put
each tensor under a name that table knows: fused experts ``mlp.experts.gate_up_proj (E, 2I, H)`` split into
``gate_proj`` / ``up_proj`` (gate rows first), ``down_proj (E, H, I)`` as ``down_proj.weight``. A tensor the table
has no name for is refused (llama.cpp's graph has no slot for it).

Hyper-parameters are a ``{GGUFWriter method: value}`` dict, so a test can read them without writing a file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from moeslim.export.errors import UnsupportedExportError
from moeslim.export.gguf_vocab import GgufVocab

__all__ = ["GGUF_ARCHS", "GGUF_FAMILIES", "GgufArch", "MoeShape", "UnsupportedExportError", "gguf_family",
           "permute_rotary"]


@dataclass(frozen=True)
class MoeShape:
    """The expert layout every MoE layer shares (llama.cpp has one of each per file)."""

    n_experts: int
    top_k: int
    n_ff_exp: int


def permute_rotary(w: Any, n_head: int) -> Any:
    """(n_head * d, H) q or k rows from halves [x0..x_{d/2}, y0..] to interleaved pairs, per head.

    convert_hf_to_gguf.py's ``LlamaModel.permute``: llama.cpp's ``llama`` arch rotates (x_2i, x_2i+1) pairs.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _get(config: Any, *keys: str) -> Any:
    """The first of ``keys`` the config sets (not None), else None."""
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            return value
    return None


def _rope(config: Any) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or {}
    return dict(rope.get("full_attention", rope))


class GgufArch:
    """The converter's ``TextModel``: hyper-parameters every architecture writes, generic tensor transforms."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    permute_qk: ClassVar[bool] = False  # llama's "norm" rotary: q/k rows from halves to adjacent pairs

    def check(self, config: Any) -> None:
        """Refuse (UnsupportedExportError) what llama.cpp's graph for this architecture cannot run."""
        rope_type = _rope(config).get("rope_type", "default")
        if rope_type not in ("default", "linear", "yarn"):
            raise UnsupportedExportError(f"GGUF export writes plain, linear and YaRN rotary embeddings for "
                                         f"{self.name}; this model uses rope_type={rope_type!r}")

    def vocab(self, vocab: GgufVocab, config: Any) -> GgufVocab:
        """The tokenizer metadata as the converter writes it for this architecture (most drop add_space_prefix)."""
        return replace(vocab, add_space_prefix=None)

    def hparams(self, config: Any, moe: MoeShape) -> dict[str, Any]:
        """{GGUFWriter method: value}, in the converter's order; a later assignment replaces an earlier one, as a
        repeated key does in the converter's writer."""
        import gguf

        out: dict[str, Any] = {"add_block_count": int(config.num_hidden_layers)}
        ctx = _get(config, "max_position_embeddings")
        if ctx is not None:
            out["add_context_length"] = int(ctx)
        out["add_embedding_length"] = int(config.hidden_size)
        n_ff = _get(config, "dense_intermediate_size", "intermediate_size")
        if n_ff is not None:
            out["add_feed_forward_length"] = int(n_ff)
        out["add_head_count"] = int(config.num_attention_heads)
        out["add_head_count_kv"] = int(config.num_key_value_heads)
        rope = _rope(config)
        factor = rope.get("factor")
        if rope.get("rope_type") == "linear" and factor is not None:
            out["add_rope_scaling_type"] = gguf.RopeScalingType.LINEAR
            out["add_rope_scaling_factor"] = float(factor)
        elif rope.get("rope_type") == "yarn" and factor is not None:
            out["add_rope_scaling_type"] = gguf.RopeScalingType.YARN
            out["add_rope_scaling_factor"] = float(factor)
            out["add_rope_scaling_orig_ctx_len"] = int(rope["original_max_position_embeddings"])
            for method, key in (("add_rope_scaling_yarn_ext_factor", "extrapolation_factor"),
                                ("add_rope_scaling_yarn_attn_factor", "attention_factor"),
                                ("add_rope_scaling_yarn_beta_fast", "beta_fast"),
                                ("add_rope_scaling_yarn_beta_slow", "beta_slow")):
                if rope.get(key) is not None:
                    out[method] = float(rope[key])
        theta = rope.get("rope_theta", _get(config, "rope_theta"))
        if theta is not None:
            out["add_rope_freq_base"] = float(theta)
        eps = _get(config, "rms_norm_eps")
        if eps is not None:
            out["add_layer_norm_rms_eps"] = float(eps)
        out["add_expert_count"] = moe.n_experts
        out["add_expert_used_count"] = moe.top_k
        groups, groups_used = _get(config, "n_group"), _get(config, "topk_group")
        if groups is not None:
            if moe.n_experts % int(groups):
                raise UnsupportedExportError(f"llama.cpp splits the experts into n_group={groups} equal groups; this "
                                             f"model has {moe.n_experts} experts per layer (prune to a multiple)")
            out["add_expert_group_count"] = int(groups)
        if groups_used is not None:
            out["add_expert_group_used_count"] = int(groups_used)
        scoring = _get(config, "scoring_func")
        if scoring in ("sigmoid", "softmax"):
            out["add_expert_gating_func"] = gguf.ExpertGatingFuncType[scoring.upper()]
        head_dim = config.to_dict().get("head_dim")
        if head_dim is not None:
            out["add_key_length"] = out["add_value_length"] = int(head_dim)
        return out

    def transform(self, key: str, tensor: torch.Tensor, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """(transformers name the TensorNameMap knows, tensor in llama.cpp's layout) for one state-dict entry."""
        if key.endswith(".experts.gate_up_proj"):  # (E, 2I, H), gate rows first
            half = tensor.shape[1] // 2
            base = key.removesuffix(".gate_up_proj")
            yield f"{base}.gate_proj.weight", tensor[:, :half]
            yield f"{base}.up_proj.weight", tensor[:, half:]
        elif key.endswith(".experts.down_proj"):
            yield f"{key}.weight", tensor
        elif key.endswith(".e_score_correction_bias"):  # the selection bias of sigmoid routers: exp_probs_b
            yield key.removesuffix("_bias") + ".bias", tensor
        elif self.permute_qk and key.endswith(("q_proj.weight", "q_proj.bias")):
            yield key, permute_rotary(tensor, int(config.num_attention_heads))
        elif self.permute_qk and key.endswith(("k_proj.weight", "k_proj.bias")):
            yield key, permute_rotary(tensor, int(config.num_key_value_heads))
        else:
            yield key, tensor


def _refuse_dense_layers(arch: str, config: Any) -> None:
    dense = list(getattr(config, "mlp_only_layers", []) or [])
    if dense or int(getattr(config, "decoder_sparse_step", 1) or 1) != 1:
        raise UnsupportedExportError(f"llama.cpp's {arch} runs a MoE block in every layer; this model has dense "
                                     "layers (mlp_only_layers / decoder_sparse_step)")


def _require_norm_topk(arch: str, config: Any, want: bool) -> None:
    if bool(getattr(config, "norm_topk_prob", want)) != want:
        raise UnsupportedExportError(
            f"llama.cpp's {arch} {'renormalises' if want else 'does not renormalise'} the top-k routing weights; "
            f"this model has norm_topk_prob={not want}")


class LlamaArch(GgufArch):
    """Mixtral: GGUF arch ``llama`` (rotary on adjacent pairs, so q/k rows are permuted)."""

    name = "llama"
    model_types = ("mixtral",)
    permute_qk = True

    def vocab(self, vocab: GgufVocab, config: Any) -> GgufVocab:
        # the converter's Llama family keeps add_prefix_space, and tells llama.cpp not to add BOS for Granite's
        # small-model vocabulary (49152 tokens), which has none
        if int(config.vocab_size) == 49152:
            return replace(vocab, add_special={**vocab.add_special, "bos": False})
        return vocab

    def hparams(self, config: Any, moe: MoeShape) -> dict[str, Any]:
        head_dim = config.to_dict().get("head_dim") or int(config.hidden_size) // int(config.num_attention_heads)
        return {**super().hparams(config, moe), "add_vocab_size": int(config.vocab_size),
                "add_rope_dimension_count": int(head_dim)}


class Qwen2MoeArch(GgufArch):
    """Qwen1.5/Qwen2-MoE: softmax top-k without renormalisation, a shared expert behind a sigmoid gate."""

    name = "qwen2moe"
    model_types = ("qwen2_moe",)

    def check(self, config: Any) -> None:
        super().check(config)
        _refuse_dense_layers(self.name, config)
        _require_norm_topk(self.name, config, want=False)

    def hparams(self, config: Any, moe: MoeShape) -> dict[str, Any]:
        out = {**super().hparams(config, moe), "add_expert_feed_forward_length": moe.n_ff_exp}
        shared = _get(config, "shared_expert_intermediate_size")
        if shared is not None:
            out["add_expert_shared_feed_forward_length"] = int(shared)
        return out


class Qwen3MoeArch(Qwen2MoeArch):
    """Qwen3-MoE: neox rotary, per-head q/k norms, always renormalised top-k."""

    name = "qwen3moe"
    model_types = ("qwen3_moe",)

    def check(self, config: Any) -> None:
        GgufArch.check(self, config)
        _refuse_dense_layers(self.name, config)
        _require_norm_topk(self.name, config, want=True)


class OlmoeArch(GgufArch):
    """OLMoE: q/k norms over all heads, softmax top-k without renormalisation."""

    name = "olmoe"
    model_types = ("olmoe",)

    def check(self, config: Any) -> None:
        super().check(config)
        _require_norm_topk(self.name, config, want=False)
        if int(config.num_key_value_heads) != int(config.num_attention_heads):
            raise UnsupportedExportError(
                f"llama.cpp's {self.name} normalises k over the full hidden width (no grouped KV heads); this model "
                f"has {config.num_key_value_heads} KV heads for {config.num_attention_heads} query heads")

    def hparams(self, config: Any, moe: MoeShape) -> dict[str, Any]:
        # the converter writes rms eps 1e-5 for every OLMoE (the published value), whatever config.json says
        return {**super().hparams(config, moe), "add_layer_norm_rms_eps": 1e-5}


class GraniteMoeArch(LlamaArch):
    """GraniteMoE: llama layout plus Granite's four multipliers; the router is ``block_sparse_moe.router``."""

    name = "granitemoe"
    model_types = ("granitemoe",)

    def hparams(self, config: Any, moe: MoeShape) -> dict[str, Any]:
        # Granite ignores head_dim: no key/value length, rotary over hidden / heads
        out = {m: v for m, v in super().hparams(config, moe).items() if m not in ("add_key_length", "add_value_length")}
        out["add_rope_dimension_count"] = int(config.hidden_size) // int(config.num_attention_heads)
        for method, key in (("add_attention_scale", "attention_multiplier"),
                            ("add_embedding_scale", "embedding_multiplier"),
                            ("add_residual_scale", "residual_multiplier"), ("add_logit_scale", "logits_scaling")):
            value = _get(config, key)
            if value:  # the converter skips unset and zero multipliers
                out[method] = float(value)
        return out

    def transform(self, key: str, tensor: torch.Tensor, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
        # transformers 5 keeps GraniteMoE's experts under block_sparse_moe; the name table knows them as mlp
        yield from super().transform(key.replace(".block_sparse_moe.router.", ".mlp.gate.")
                                     .replace(".block_sparse_moe.experts.", ".mlp.experts."), tensor, config)


class Glm4MoeArch(GgufArch):
    """GLM-4.5/4.6: sigmoid router with selection bias, shared expert, leading dense layers, partial neox rotary.

    The multi-token-prediction layers transformers drops on load are not in the model, so none are written (the
    converter's ``--no-mtp``)."""

    name = "glm4moe"
    model_types = ("glm4_moe",)
    # special ids the converter takes from GLM's added tokens where the tokenizer files name none (its bos is
    # [gMASK]; eot <|user|>: ending at <|endoftext|> would generate forever)
    special_tokens: ClassVar[dict[str, str]] = {"bos": "[gMASK]", "eot": "<|user|>", "unk": "<|endoftext|>",
                                                "eom": "<|observation|>"}

    def vocab(self, vocab: GgufVocab, config: Any) -> GgufVocab:
        ids = dict(vocab.special_ids)
        for typ, text in self.special_tokens.items():
            if typ not in ids and text in vocab.tokens:
                ids[typ] = vocab.tokens.index(text)
        return replace(super().vocab(vocab, config), special_ids=ids)

    def hparams(self, config: Any, moe: MoeShape) -> dict[str, Any]:
        import gguf

        out = super().hparams(config, moe)
        head_dim = config.to_dict().get("head_dim") or int(config.hidden_size) // int(config.num_attention_heads)
        out["add_rope_dimension_count"] = int(head_dim * _rope(config).get("partial_rotary_factor", 0.5))
        out["add_expert_count"] = moe.n_experts
        out["add_expert_feed_forward_length"] = moe.n_ff_exp
        for method, key in (("add_expert_shared_count", "n_shared_experts"),
                            ("add_leading_dense_block_count", "first_k_dense_replace")):
            if _get(config, key) is not None:
                out[method] = int(_get(config, key))
        out["add_expert_gating_func"] = gguf.ExpertGatingFuncType.SIGMOID
        if _get(config, "routed_scaling_factor") is not None:
            out["add_expert_weights_scale"] = float(config.routed_scaling_factor)
        if _get(config, "norm_topk_prob") is not None:
            out["add_expert_weights_norm"] = bool(config.norm_topk_prob)
        return out


class Deepseek2Arch(GgufArch):
    """DeepSeek-V2/V3: multi-head latent attention (kv_b split into per-head k_b, v_b), shared experts, leading
    dense layers, softmax (V2) or sigmoid with selection bias (V3) routing, scaled and optionally renormalised.

    llama.cpp scores an expert group by the sum of its two best experts (V3's ``noaux_tc``); V2's
    ``group_limited_greedy`` scores it by its best expert, so a V2 model that limits groups is refused."""

    name = "deepseek2"
    model_types = ("deepseek_v2", "deepseek_v3")

    def check(self, config: Any) -> None:
        super().check(config)
        if int(_get(config, "moe_layer_freq") or 1) != 1:
            raise UnsupportedExportError(f"llama.cpp's {self.name} runs a MoE block in every layer after the leading "
                                         f"dense ones; this model has moe_layer_freq={config.moe_layer_freq}")
        layers, vocab = int(config.num_hidden_layers), int(config.vocab_size)
        lite = layers in (26, 27) or (layers == 48 and vocab == 128256)
        if _get(config, "q_lora_rank") is None and not lite:
            raise UnsupportedExportError(
                f"llama.cpp's {self.name} takes a model without a q LoRA (q_lora_rank=None) only at the layer counts "
                f"of the published Lite models (26, 27; 48 with 128256 tokens); this model has {layers} layers")
        groups, used = int(_get(config, "n_group") or 1), int(_get(config, "topk_group") or 1)
        method = _get(config, "topk_method") or "noaux_tc"
        if groups > 1 and used < groups and method != "noaux_tc":
            raise UnsupportedExportError(
                f"llama.cpp picks expert groups by the sum of their top-2 scores (DeepSeek-V3's noaux_tc); this "
                f"model's topk_method={method!r} with n_group={groups}, topk_group={used} picks them differently")

    def hparams(self, config: Any, moe: MoeShape) -> dict[str, Any]:
        import gguf

        out = super().hparams(config, moe)
        out["add_head_count_kv"] = 1  # MLA: one latent KV head
        out.setdefault("add_layer_norm_rms_eps", 1e-6)
        out["add_leading_dense_block_count"] = int(_get(config, "first_k_dense_replace") or 0)
        out["add_vocab_size"] = int(config.vocab_size)
        if _get(config, "q_lora_rank") is not None:
            out["add_q_lora_rank"] = int(config.q_lora_rank)
        kv_lora, rope_dim = int(config.kv_lora_rank), int(config.qk_rope_head_dim)
        out["add_kv_lora_rank"] = kv_lora
        out["add_key_length"] = kv_lora + rope_dim
        out["add_value_length"] = kv_lora
        out["add_key_length_mla"] = int(config.qk_nope_head_dim) + rope_dim
        out["add_value_length_mla"] = int(config.v_head_dim)
        out["add_expert_feed_forward_length"] = moe.n_ff_exp
        out["add_expert_count"] = moe.n_experts
        out["add_expert_shared_count"] = int(_get(config, "n_shared_experts") or 0)
        if _get(config, "routed_scaling_factor") is not None:
            out["add_expert_weights_scale"] = float(config.routed_scaling_factor)
        if _get(config, "norm_topk_prob"):
            out["add_expert_weights_norm"] = True
        out["add_rope_dimension_count"] = rope_dim
        if "add_expert_gating_func" not in out:
            # transformers 5 configs carry no scoring_func, and llama.cpp then assumes softmax: name the router
            # transformers runs (V2 softmax, V3 sigmoid) instead of leaving V3 misrouted (the converter leaves it)
            func = "SIGMOID" if config.model_type == "deepseek_v3" else "SOFTMAX"
            out["add_expert_gating_func"] = gguf.ExpertGatingFuncType[func]
        mscale = _rope(config).get("mscale_all_dim")
        if mscale is not None:
            out["add_rope_scaling_yarn_log_mul"] = 0.1 * float(mscale)
        return out

    def transform(self, key: str, tensor: torch.Tensor, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
        if not key.endswith("kv_b_proj.weight"):
            yield from super().transform(key, tensor, config)
            return
        # (heads * (nope + v), kv_lora) -> k_b (heads, kv_lora, nope) and v_b (heads, v, kv_lora): llama.cpp
        # absorbs them into q and the output instead of expanding the latent
        nope, v_dim = int(config.qk_nope_head_dim), int(config.v_head_dim)
        kv_b = tensor.view(int(config.num_attention_heads), nope + v_dim, tensor.shape[-1])
        k_b, v_b = torch.split(kv_b, [nope, v_dim], dim=1)
        yield key.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2)
        yield key.replace("kv_b_proj", "v_b_proj"), v_b


class GptOssArch(GgufArch):
    """gpt-oss: experts stored transposed (E, H, 2I) with gate/up interleaved by column, expert biases,
    attention sinks, alternating sliding-window layers."""

    name = "gpt-oss"
    model_types = ("gpt_oss",)

    def hparams(self, config: Any, moe: MoeShape) -> dict[str, Any]:
        return {**super().hparams(config, moe), "add_sliding_window": int(config.sliding_window),
                "add_expert_feed_forward_length": moe.n_ff_exp}

    def transform(self, key: str, tensor: torch.Tensor, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
        base = key.rsplit(".", 1)[0]
        if key.endswith(".experts.gate_up_proj"):  # (E, H, 2I), columns gate0, up0, gate1, ...
            fused = tensor.transpose(-1, -2)
            yield f"{base}.gate_proj.weight", fused[:, ::2]
            yield f"{base}.up_proj.weight", fused[:, 1::2]
        elif key.endswith(".experts.gate_up_proj_bias"):  # (E, 2I), interleaved the same way
            yield f"{base}.gate_proj.bias", tensor[..., ::2]
            yield f"{base}.up_proj.bias", tensor[..., 1::2]
        elif key.endswith(".experts.down_proj"):  # (E, I, H)
            yield f"{key}.weight", tensor.transpose(-1, -2)
        elif key.endswith(".experts.down_proj_bias"):
            yield f"{base}.down_proj.bias", tensor
        elif key.endswith(".self_attn.sinks"):
            yield f"{key}.weight", tensor
        else:
            yield from super().transform(key, tensor, config)


class Ernie45MoeArch(GgufArch):
    """ERNIE-4.5-MoE: softmax router whose top-k is chosen with a per-expert bias (``moe_statics``) and then
    renormalised, shared experts, leading dense layers, a MoE layer every ``moe_layer_interval`` layers."""

    name = "ernie4_5-moe"
    model_types = ("ernie4_5_moe",)

    def check(self, config: Any) -> None:
        super().check(config)
        end = _get(config, "moe_layer_end_index")
        if end is not None and int(end) not in (-1, int(config.num_hidden_layers) - 1):
            raise UnsupportedExportError(f"llama.cpp's {self.name} runs MoE blocks up to the last layer; this model "
                                         f"stops them at moe_layer_end_index={end}")

    def vocab(self, vocab: GgufVocab, config: Any) -> GgufVocab:
        return vocab  # the converter keeps tokenizer_config's add_prefix_space for ERNIE

    def hparams(self, config: Any, moe: MoeShape) -> dict[str, Any]:
        out = super().hparams(config, moe)
        out["add_interleave_moe_layer_step"] = int(config.moe_layer_interval)
        out["add_leading_dense_block_count"] = int(config.moe_layer_start_index)
        out["add_expert_feed_forward_length"] = moe.n_ff_exp
        shared = _get(config, "moe_num_shared_experts")
        if shared is not None:
            out["add_expert_shared_count"] = int(shared)
            if shared > 0:  # the converter's value (the shared experts' width over the KV heads), kept for parity
                out["add_expert_shared_feed_forward_length"] = (int(config.intermediate_size)
                                                                 // int(config.num_key_value_heads))
        return out

    def transform(self, key: str, tensor: torch.Tensor, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
        # transformers 5 keeps the selection bias inside the router: the name table knows it as mlp.moe_statics
        old = ".mlp.gate.moe_statics.e_score_correction_bias"
        if key.endswith(old):
            yield key.replace(old, ".mlp.moe_statics.e_score_correction.bias"), tensor
            return
        yield from super().transform(key, tensor, config)


class HunyuanMoeArch(GgufArch):
    """HunYuan-MoE (Hunyuan-A13B): softmax top-k renormalised, one shared MLP beside the experts, q/k norms, and
    NTK-alpha rotary scaling written as llama.cpp reads it (a larger rotary base, 256k context)."""

    name = "hunyuan-moe"
    model_types = ("hunyuan_v1_moe",)
    # The one alpha whose context length is published (Hunyuan-A13B's technical report: 256k at alpha 1000).
    alpha_context: ClassVar[dict[float, int]] = {1000.0: 256 * 1024}

    def check(self, config: Any) -> None:
        rope = _rope(config)
        if rope.get("rope_type") == "dynamic":
            if float(rope.get("alpha", 1000)) not in self.alpha_context:
                raise UnsupportedExportError(f"llama.cpp's {self.name} context length is known for NTK alpha "
                                             f"{sorted(self.alpha_context)}; this model has alpha={rope.get('alpha')}")
            return
        super().check(config)

    def vocab(self, vocab: GgufVocab, config: Any) -> GgufVocab:
        # the converter sets BOS to <|bos|> (its config.json bos_token_id names another token)
        vocab = super().vocab(vocab, config)
        if "<|bos|>" in vocab.tokens:
            return replace(vocab, special_ids={**vocab.special_ids, "bos": vocab.tokens.index("<|bos|>")})
        return vocab

    def hparams(self, config: Any, moe: MoeShape) -> dict[str, Any]:
        import gguf

        out = super().hparams(config, moe)
        out["add_expert_shared_feed_forward_length"] = int(config.intermediate_size)
        out["add_expert_feed_forward_length"] = moe.n_ff_exp
        out["add_expert_used_count"] = moe.top_k
        shared = _get(config, "num_shared_expert")
        out["add_expert_shared_count"] = int(shared[0] if isinstance(shared, list) else shared or 1)
        rope = _rope(config)
        if rope.get("rope_type") == "dynamic":
            alpha, base = float(rope.get("alpha", 1000)), float(rope.get("rope_theta", 10000.0))
            dim = int(config.hidden_size) // int(config.num_attention_heads)
            out["add_rope_freq_base"] = base * alpha ** (dim / (dim - 2))
            out["add_rope_scaling_type"] = gguf.RopeScalingType.NONE
            out["add_rope_scaling_factor"] = 1.0
            out["add_rope_scaling_orig_ctx_len"] = out["add_context_length"] = self.alpha_context[alpha]
        return out


GGUF_ARCHS: dict[str, GgufArch] = {arch.name: arch for arch in (
    LlamaArch(), Qwen2MoeArch(), Qwen3MoeArch(), OlmoeArch(), GraniteMoeArch(), Glm4MoeArch(), Deepseek2Arch(),
    GptOssArch(), Ernie45MoeArch(), HunyuanMoeArch())}
# model_type -> architecture
GGUF_FAMILIES: dict[str, GgufArch] = {mt: arch for arch in GGUF_ARCHS.values() for mt in arch.model_types}


def gguf_family(config: Any) -> GgufArch:
    """The architecture of a model config; refuses other families and layouts llama.cpp cannot run."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_FAMILIES:
        raise UnsupportedExportError(
            f"GGUF export supports the families {', '.join(sorted(GGUF_FAMILIES))}; this model is {model_type!r}")
    arch = GGUF_FAMILIES[model_type]
    arch.check(config)
    return arch


def tensor_name_map(arch: GgufArch, n_blocks: int) -> Any:
    """gguf-py's table of transformers -> GGUF tensor names for ``arch``."""
    import gguf

    by_name = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(by_name[arch.name], n_blocks)


def gguf_tensor_name(names: Any, key: str) -> str:
    """GGUF name of a transformed key (``names``: tensor_name_map); refuses keys llama.cpp has no slot for."""
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UnsupportedExportError(f"no GGUF name for tensor {key!r} (llama.cpp's graph has no slot for it)")
    return str(name)
