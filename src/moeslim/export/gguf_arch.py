"""What llama.cpp expects of each exported family: architecture name, tensor names, hyper-parameters.

This is the engine's format knowledge (as llama.cpp's convert_hf_to_gguf.py has it), written against the
transformers 5 in-memory state dict (fused experts ``mlp.experts.gate_up_proj (E, 2I, H)`` and
``mlp.experts.down_proj (E, H, I)``, router ``mlp.gate.weight (E, H)``), not against the legacy
per-expert file layout. Supported: Mixtral (GGUF arch ``llama``, q/k rows permuted to llama.cpp's rotary
layout) and Qwen3-MoE (arch ``qwen3moe``: neox rotary, q/k norms, always renormalised top-k).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["GGUF_FAMILIES", "GgufFamily", "UnsupportedExportError", "gguf_family", "gguf_tensor_name",
           "permute_rotary"]


class UnsupportedExportError(ValueError):
    """The model (family, routing, tokenizer, layer layout) cannot be written in a format an engine loads."""


@dataclass(frozen=True)
class GgufFamily:
    """model_type -> GGUF arch; permute_qk: llama.cpp's ``llama`` arch rotates adjacent pairs (HF rotates
    halves), so q/k rows are permuted as convert_hf_to_gguf.py's ``LlamaModel.permute``; qk_norm: the family
    has per-head q/k RMS norms (Qwen3)."""

    model_type: str
    arch: str
    permute_qk: bool
    qk_norm: bool


GGUF_FAMILIES: dict[str, GgufFamily] = {
    "mixtral": GgufFamily("mixtral", "llama", permute_qk=True, qk_norm=False),
    "qwen3_moe": GgufFamily("qwen3_moe", "qwen3moe", permute_qk=False, qk_norm=True),
}

# state-dict key (decoder layer part) -> GGUF name; experts and the router are handled with them.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_family(config: Any) -> GgufFamily:
    """The family entry of a model config; refuses other families and layouts llama.cpp cannot run."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_FAMILIES:
        raise UnsupportedExportError(
            f"GGUF export supports the families {', '.join(sorted(GGUF_FAMILIES))}; this model is "
            f"{model_type!r}")
    family = GGUF_FAMILIES[model_type]
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedExportError(f"GGUF export writes plain rotary embeddings; this model uses rope_type="
                                     f"{rope.get('rope_type')!r}")
    if model_type == "qwen3_moe":
        if list(getattr(config, "mlp_only_layers", []) or []) or int(getattr(config, "decoder_sparse_step", 1)) != 1:
            raise UnsupportedExportError("llama.cpp's qwen3moe runs a MoE block in every layer; this model has dense "
                                         "layers (mlp_only_layers / decoder_sparse_step)")
        if not getattr(config, "norm_topk_prob", True):
            raise UnsupportedExportError("llama.cpp's qwen3moe renormalises the top-k weights; this model has "
                                         "norm_topk_prob=False")
    return family


def gguf_tensor_name(key: str) -> str | None:
    """GGUF name of a state-dict key (None for the fused gate_up tensor, which splits into two)."""
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    match = _LAYER_KEY.match(key)
    if match is None:
        raise UnsupportedExportError(f"no GGUF name for tensor {key!r}")
    idx, rest = match.groups()
    if rest == "mlp.experts.gate_up_proj":
        return None
    if rest not in _LAYER_NAMES:
        raise UnsupportedExportError(f"no GGUF name for tensor {key!r} (llama.cpp's graph has no slot for it)")
    return f"blk.{idx}.{_LAYER_NAMES[rest]}"


def permute_rotary(w: Any, n_head: int) -> Any:
    """(n_head * d, H) q or k rows from halves [x0..x_{d/2}, y0..] to interleaved pairs, per head.

    convert_hf_to_gguf.py's ``LlamaModel.permute``: llama.cpp's ``llama`` arch rotates (x_2i, x_2i+1) pairs.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
