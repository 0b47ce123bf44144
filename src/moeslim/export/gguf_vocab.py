"""Tokenizer metadata for GGUF: a byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer model.

The keys convert_hf_to_gguf.py's ``_set_vocab_gpt2`` writes: ``tokenizer.ggml.model = "gpt2"``,
``tokenizer.ggml.pre`` (the pre-tokenizer regex llama.cpp applies; ``gpt-2`` for the GPT-2 byte-level
regex), ``tokens`` (the byte-level strings, index = token id; ids the tokenizer lacks become ``[PADi]`` of
type UNUSED), ``token_type`` (NORMAL 1, CONTROL 3 for special added tokens, USER_DEFINED 4 for other added
tokens, UNUSED 5), ``merges`` ("left right" strings in rank order) and the special token ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from moeslim.export.gguf_arch import UnsupportedExportError

__all__ = ["GgufVocab", "gguf_vocab"]

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass(frozen=True)
class GgufVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int | None
    pad: int | None
    unk: int | None
    add_bos: bool


def _is_gpt2_byte_level(pre: Any) -> bool:
    return isinstance(pre, dict) and pre.get("type") == "ByteLevel" and bool(pre.get("use_regex", True))


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise UnsupportedExportError("GGUF export needs a fast (tokenizers) tokenizer to read its vocabulary")
    return json.loads(backend.to_str())


def gguf_vocab(tokenizer: Any, vocab_size: int) -> GgufVocab:
    """The GGUF tokenizer metadata of ``tokenizer`` for a model with ``vocab_size`` embedding rows."""
    if tokenizer is None:
        raise UnsupportedExportError("GGUF export needs the model's tokenizer (llama.cpp reads the vocabulary from "
                                     "the file); save the model with its tokenizer")
    data = _backend_json(tokenizer)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not _is_gpt2_byte_level(data.get("pre_tokenizer")):
        raise UnsupportedExportError(
            "GGUF export writes byte-level BPE tokenizers with the GPT-2 pre-tokenizer (llama.cpp 'gpt2' model, "
            f"pre 'gpt-2'); this tokenizer is {model.get('type')!r} with pre-tokenizer "
            f"{(data.get('pre_tokenizer') or {}).get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    for tid, tok in added.items():
        vocab[tok["content"]] = tid
    if max(vocab.values()) >= vocab_size:
        raise UnsupportedExportError(f"the tokenizer has id {max(vocab.values())} but the model only "
                                     f"{vocab_size} embedding rows")
    by_id = {tid: text for text, tid in vocab.items()}
    tokens, types = [], []
    for tid in range(vocab_size):
        if tid not in by_id:
            tokens.append(f"[PAD{tid}]")
            types.append(UNUSED)
        elif tid in added:
            tokens.append(by_id[tid])
            types.append(CONTROL if added[tid].get("special") else USER_DEFINED)
        else:
            tokens.append(by_id[tid])
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def special(name: str) -> int | None:
        value = getattr(tokenizer, f"{name}_token_id", None)
        return int(value) if isinstance(value, int) else None

    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = special("bos")
    add_bos = bos is not None and len(probe) > len(plain) and probe[0] == bos
    return GgufVocab(tokens, types, merges, "gpt-2", bos, special("eos"), special("pad"), special("unk"), add_bos)
