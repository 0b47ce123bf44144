"""Tokenizer metadata for GGUF, as llama.cpp's convert_hf_to_gguf.py writes it for the same tokenizer.

One small class per tokenizer kind, registered by name (like the families); ``gguf_vocab`` picks the first kind
whose ``matches`` accepts the tokenizer.json of the tokenizer and refuses the rest, naming what it saw:

- ``gpt2`` (byte-level BPE: Qwen2/3, DeepSeek, OLMoE, GraniteMoE, GLM-4.5, gpt-oss's o200k, ...): tokens are the
  byte-level strings by id, merges "left right" in rank order, and ``tokenizer.ggml.pre`` names the pre-tokenizer
  llama.cpp must re-implement, identified by the converter's hash (gguf_pre.py). An unknown hash is refused with
  the hash; the one exception is a tokenizer.json whose pre-tokenizer *is* the plain GPT-2 byte-level regex
  (moeslim's own demo tokenizers), which llama.cpp's ``gpt-2`` implements exactly.
- ``llama`` (SentencePiece-style BPE with byte fallback: Mixtral, Llama-2, ERNIE): tokens with ``scores`` and
  BYTE types for ``<0xNN>``. llama.cpp's SentencePiece tokenizer merges the adjacent pair whose merged token has
  the highest score, so scores must order tokens as the merges do (``LlamaKind.scores``); for a tokenizer converted
  from a SentencePiece BPE model they equal SentencePiece's own, which the converter writes when ``tokenizer.model``
  is there. From tokenizer.json alone the converter writes -1000 for every token, which makes llama.cpp merge left
  to right and split words differently from the model, so we do not copy that.

Token types follow the converter: NORMAL 1, UNKNOWN 2, CONTROL 3 (special added tokens and those that look
special, ``<|...|>``), USER_DEFINED 4 (other added tokens, SentencePiece spaces written as spaces), UNUSED 5 (ids the
tokenizer lacks, ``[PADi]``), BYTE 6. Special ids, add_bos/add_eos, merges and the chat template come from gguf-py's
``SpecialVocab`` (the reader the converter uses) run on the tokenizer saved with the model config.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from moeslim.export.errors import UnsupportedExportError
from moeslim.export.gguf_pre import PRE_TOKENIZER_HASHES, pre_tokenizer_hash

__all__ = ["TOKENIZER_KINDS", "GgufVocab", "gguf_vocab", "write_vocab"]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPM_SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Added tokens the converter types CONTROL although their tokenizer does not mark them special.
_LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


@dataclass(frozen=True)
class GgufVocab:
    """Everything ``write_vocab`` puts under ``tokenizer.ggml.*``."""

    model: str  # llama.cpp tokenizer model: "gpt2" | "llama"
    pre: str  # llama.cpp pre-tokenizer name ("default" for "llama")
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, sep, pad, ...
    add_special: dict[str, bool] = field(default_factory=dict)  # add_bos, add_eos, ...
    chat_template: Any = None
    add_space_prefix: bool | None = None  # tokenizer_config's add_prefix_space (written by some architectures)


def _looks_special(text: str) -> bool:
    return (text in _LOOKS_SPECIAL or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))  # DeepSeek's full-width bars
            or (text.startswith("<unused") and text.endswith(">")))


def _added_token(tokenizer: Any, tid: int, text: str) -> tuple[str, int]:
    """(text, type) of an added token as the converter writes it."""
    info = tokenizer.added_tokens_decoder[tid]
    if not info.normalized:  # llama.cpp assumes added tokens are pre-normalized: take the tokenizer's round trip
        decoded = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
        # ...unless it is not text: a byte-level symbol added as a token (DeepSeek-LLM's "ø", "ö", ...) decodes to a
        # lone byte, U+FFFD; the converter writes those as duplicates, which llama.cpp refuses to load (GGML_ASSERT
        # id_to_token.size() == token_to_id.size()). The token as written still matches its text in the input.
        text = text if "\ufffd" in decoded and "\ufffd" not in text else decoded
    if info.special or _looks_special(text):
        return text, CONTROL
    return text.replace(_SPM_SPACE, " "), USER_DEFINED


def _by_id(tokenizer: Any, vocab_size: int) -> dict[int, str]:
    vocab: dict[str, int] = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UnsupportedExportError(f"the tokenizer has id {max(vocab.values())} but the model only {vocab_size} "
                                     "embedding rows")
    return {tid: text for text, tid in vocab.items()}


class Gpt2Kind:
    """Byte-level BPE (no byte fallback): llama.cpp's ``gpt2`` model with a named pre-tokenizer."""

    name: ClassVar[str] = "gpt2"

    @staticmethod
    def matches(data: dict[str, Any]) -> bool:
        model = data.get("model") or {}
        return model.get("type") == "BPE" and not model.get("byte_fallback", False)

    @staticmethod
    def pre(tokenizer: Any, data: dict[str, Any]) -> str:
        digest = pre_tokenizer_hash(tokenizer)
        if digest in PRE_TOKENIZER_HASHES:
            return PRE_TOKENIZER_HASHES[digest]
        pre = data.get("pre_tokenizer") or {}
        plain_gpt2 = (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                      and not pre.get("add_prefix_space", False) and data.get("normalizer") is None)
        if plain_gpt2:
            return "gpt-2"
        raise UnsupportedExportError(
            f"llama.cpp does not know this BPE pre-tokenizer (pre-tokenizer {pre.get('type')!r}, converter hash "
            f"{digest}): its regex cannot be named in the GGUF file, and another one would split text differently. "
            "Export a tokenizer llama.cpp's convert_hf_to_gguf.py recognises (same hash)")

    def build(self, tokenizer: Any, data: dict[str, Any], vocab_size: int) -> GgufVocab:
        by_id = _by_id(tokenizer, vocab_size)
        added = set(tokenizer.get_added_vocab().values())
        tokens, types = [], []
        for tid in range(vocab_size):
            if tid not in by_id:
                tokens.append(f"[PAD{tid}]")
                types.append(UNUSED)
            elif tid in added:
                text, kind = _added_token(tokenizer, tid, by_id[tid])
                tokens.append(text)
                types.append(kind)
            else:
                tokens.append(by_id[tid])
                types.append(NORMAL)
        return GgufVocab("gpt2", self.pre(tokenizer, data), tokens, types)


def _merge_pairs(data: dict[str, Any]) -> list[tuple[str, str]]:
    merges = (data.get("model") or {}).get("merges") or []
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]  # type: ignore[misc]


class LlamaKind:
    """SentencePiece-style BPE with byte fallback: llama.cpp's ``llama`` model (tokens, scores, BYTE tokens)."""

    name: ClassVar[str] = "llama"

    @staticmethod
    def matches(data: dict[str, Any]) -> bool:
        model = data.get("model") or {}
        return model.get("type") == "BPE" and bool(model.get("byte_fallback", False))

    @staticmethod
    def scores(data: dict[str, Any], normal: list[str]) -> dict[str, float]:
        """SentencePiece's scores, rebuilt from the merges: minus the token's place in merge order (the rank of the
        first merge that makes it), then the tokens no merge makes (single characters) in id order after them. For
        a tokenizer converted from a SentencePiece BPE model this is its ``-(id - first piece id)``; in any case
        llama.cpp, which merges the pair whose token scores highest, merges in the tokenizer's order."""
        first: dict[str, int] = {}
        for r, (left, right) in enumerate(_merge_pairs(data)):
            first.setdefault(left + right, r)
        made = sorted((t for t in normal if t in first), key=first.__getitem__)
        rest = [t for t in normal if t not in first]
        return {t: -float(i) for i, t in enumerate(made + rest)}

    def build(self, tokenizer: Any, data: dict[str, Any], vocab_size: int) -> GgufVocab:
        by_id = _by_id(tokenizer, vocab_size)
        added = set(tokenizer.get_added_vocab().values())
        base = set((data.get("model") or {}).get("vocab") or {})  # the pieces of the model, specials included
        unk = tokenizer.unk_token_id
        normal = [by_id[i] for i in sorted(by_id) if i not in added and not _BYTE_TOKEN.fullmatch(by_id[i])]
        piece_scores = self.scores(data, normal)
        tokens, types, scores = [], [], []
        for tid in range(vocab_size):
            text = by_id.get(tid)
            if text is None:
                tokens.append(f"[PAD{tid}]")
                types.append(UNUSED)
                scores.append(-1000.0)
            elif tid in added:
                # SentencePiece's own special pieces (<unk> <s> </s>) keep its types and score 0; tokens added on
                # top of the model get -1000, as the converter gives them
                in_model = text in base
                text, kind = _added_token(tokenizer, tid, text)
                tokens.append(text)
                types.append(UNKNOWN if tid == unk and in_model else kind)
                scores.append(0.0 if in_model else -1000.0)
            else:
                tokens.append(text)
                types.append(UNKNOWN if tid == unk else BYTE if _BYTE_TOKEN.fullmatch(text) else NORMAL)
                scores.append(piece_scores.get(text, 0.0))
        return GgufVocab("llama", "default", tokens, types, scores)


TOKENIZER_KINDS: dict[str, Gpt2Kind | LlamaKind] = {kind.name: kind for kind in (Gpt2Kind(), LlamaKind())}


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise UnsupportedExportError("GGUF export needs a fast (tokenizers) tokenizer to read its vocabulary")
    data: dict[str, Any] = json.loads(backend.to_str())
    return data


def _special_vocab(tokenizer: Any, config: Any, n_vocab: int, merges: bool) -> tuple[Any, Any]:
    """gguf-py's SpecialVocab of the tokenizer saved (with config.json) in a temporary folder: the files the
    converter reads, so special ids, add_bos/add_eos, merges and chat template are decided by the same code."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="moeslim-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)
        if config is not None:
            (Path(tmp) / "config.json").write_text(json.dumps(config.to_dict(), default=str))
        special = gguf.SpecialVocab(tmp, load_merges=merges, n_vocab=n_vocab)
        tok_config = Path(tmp) / "tokenizer_config.json"
        add_prefix = json.loads(tok_config.read_text()).get("add_prefix_space") if tok_config.is_file() else None
    return special, add_prefix


def gguf_vocab(tokenizer: Any, vocab_size: int, config: Any = None) -> GgufVocab:
    """The GGUF tokenizer metadata of ``tokenizer`` for a model with ``vocab_size`` embedding rows (``config``: the
    model config, whose ``*_token_id`` fill special ids the tokenizer does not name, as config.json does for the
    converter)."""
    if tokenizer is None:
        raise UnsupportedExportError("GGUF export needs the model's tokenizer (llama.cpp reads the vocabulary from "
                                     "the file); save the model with its tokenizer")
    data = _backend_json(tokenizer)
    kind = next((k for k in TOKENIZER_KINDS.values() if k.matches(data)), None)
    if kind is None:
        model = data.get("model") or {}
        raise UnsupportedExportError(
            f"GGUF export writes the tokenizer kinds {', '.join(TOKENIZER_KINDS)} (BPE without / with byte "
            f"fallback); this tokenizer is {model.get('type')!r} with pre-tokenizer "
            f"{(data.get('pre_tokenizer') or {}).get('type')!r}")
    vocab = kind.build(tokenizer, data, vocab_size)
    special, add_prefix = _special_vocab(tokenizer, config, len(vocab.tokens), merges=vocab.model == "gpt2")
    return GgufVocab(vocab.model, vocab.pre, vocab.tokens, vocab.token_types, vocab.scores, list(special.merges),
                     dict(special.special_token_ids), dict(special.add_special_token), special.chat_template,
                     add_prefix if isinstance(add_prefix, bool) else None)


def write_vocab(writer: Any, vocab: GgufVocab) -> None:
    """Write ``vocab`` with a gguf.GGUFWriter, in the converter's order of keys."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for typ, tid in vocab.special_ids.items():
        getattr(writer, f"add_{typ}_token_id")(tid)
    for typ, value in vocab.add_special.items():
        getattr(writer, f"add_add_{typ}_token")(value)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
