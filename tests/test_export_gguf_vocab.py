"""GGUF tokenizer metadata (moeslim.export.gguf_vocab) for each tokenizer kind, on tiny tokenizers built with the
``tokenizers`` library (tests/tiny_tokenizers.py), read back from exported files with gguf-py's GGUFReader.

Expected values are derived from the tokenizers themselves (tokens by id, merges in rank order, types from the
added-token flags). That these equal what llama.cpp's converter writes for the same folder, and that llama.cpp
tokenizes real vocabularies equally through our files, is checked by benchmarks/gguf_parity.py and
benchmarks/engines.py (they need llama.cpp's source tree).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from tiny_models import _reinit, tiny_config
from tiny_tokenizers import TEXT, byte_level_bpe, spm_bpe
from transformers import AutoModelForCausalLM

from moeslim.export import UnsupportedExportError, export_gguf
from moeslim.export import gguf_vocab as vocab_module
from moeslim.export.gguf_pre import CHECK_TEXT, pre_tokenizer_hash
from moeslim.export.gguf_vocab import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, gguf_vocab

EXTRA_ROWS = 3  # embedding rows beyond the tokenizer: written as [PADi], type UNUSED


def _model(vocab_size: int, tokenizer) -> torch.nn.Module:
    config = tiny_config("qwen3_moe", vocab_size)
    config.mlp_only_layers = []
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit(model, 0)
    return model.eval()


def _export(tokenizer, tmp_path: Path) -> dict:
    model = _model(len(tokenizer) + EXTRA_ROWS, tokenizer)
    out = export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype="F32")
    reader = GGUFReader(str(out.path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _backend(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def test_check_text_is_the_converters() -> None:
    # The converter's chktxt, verified character for character against llama.cpp's convert_hf_to_gguf (b0.3.36);
    # the hash of any tokenizer only matches the converter's table if this text is unchanged.
    assert hashlib.sha256(CHECK_TEXT.encode()).hexdigest() == (
        "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da")


def test_gpt2_kind(tmp_path: Path) -> None:
    tok = byte_level_bpe("gpt2")
    fields = _export(tok, tmp_path)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # the plain GPT-2 ByteLevel regex, recognised from its JSON
    by_id = {i: t for t, i in tok.get_vocab().items()}
    n = len(tok)
    assert fields["tokenizer.ggml.tokens"] == [by_id[i] for i in range(n)] + [f"[PAD{i}]" for i in range(n, n + 3)]
    types = fields["tokenizer.ggml.token_type"]
    added = tok.get_added_vocab()
    assert types[added["<|endoftext|>"]] == CONTROL and types[added["<|im_start|>"]] == CONTROL
    assert types[added["<tool>"]] == USER_DEFINED
    assert types[n:] == [UNUSED] * EXTRA_ROWS
    assert set(types[:n]) - {CONTROL, USER_DEFINED} == {NORMAL}
    merges = _backend(tok)["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.chat_template"] == tok.chat_template
    assert "tokenizer.ggml.scores" not in fields


def test_named_pre_tokenizer_comes_from_the_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = byte_level_bpe("split")
    digest = pre_tokenizer_hash(tok)
    ids = tok.encode(CHECK_TEXT)
    assert digest == hashlib.sha256(str(ids).encode()).hexdigest()
    # unknown to llama.cpp: refused with the hash (never written as gpt-2, whose regex splits differently)
    with pytest.raises(UnsupportedExportError, match=digest):
        gguf_vocab(tok, len(tok))
    monkeypatch.setattr(vocab_module, "PRE_TOKENIZER_HASHES", {digest: "qwen2"})
    assert _export(tok, tmp_path)["tokenizer.ggml.pre"] == "qwen2"


def _spm_reference(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm): symbols are characters; repeatedly merge the
    adjacent pair whose concatenation is a token with the highest score (leftmost on ties); symbols that are not
    tokens fall back to their UTF-8 bytes <0xNN>."""
    ids = {t: i for i, t in enumerate(tokens)}
    symbols = list(("\u2581" + text).replace(" ", "\u2581"))
    while True:
        best = None
        for k in range(len(symbols) - 1):
            joined = symbols[k] + symbols[k + 1]
            if joined in ids and (best is None or scores[ids[joined]] > best[0]):
                best = (scores[ids[joined]], k)
        if best is None:
            break
        k = best[1]
        symbols[k:k + 2] = [symbols[k] + symbols[k + 1]]
    out: list[int] = []
    for s in symbols:
        out += [ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()]
    return out


def test_llama_kind(tmp_path: Path) -> None:
    tok = spm_bpe()
    fields = _export(tok, tmp_path)
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    tokens, types, scores = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    by_id = {i: t for t, i in tok.get_vocab().items()}
    n = len(tok)
    assert tokens[:n] == [by_id[i] for i in range(n)] and len(tokens) == n + EXTRA_ROWS
    # SentencePiece's types: <unk> UNKNOWN, <s> </s> CONTROL, <0xNN> BYTE
    assert types[:3] == [UNKNOWN, CONTROL, CONTROL] and types[3:259] == [BYTE] * 256 and set(types[259:n]) == {NORMAL}
    assert scores[:259] == [0.0] * 259
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.unknown_token_id"] == 0
    assert fields["tokenizer.ggml.add_bos_token"] is True  # the post-processor puts <s> first
    assert fields.get("tokenizer.ggml.add_eos_token", False) is False
    # scores: the tokens merges make, in the order of their first merge, then the rest (for a tokenizer converted
    # from a SentencePiece model, whose pieces are numbered that way, SentencePiece's own scores:
    # benchmarks/gguf_parity.py --tiny mixtral:spm)
    merges = _backend(tok)["model"]["merges"]
    first = {}
    for rank, m in enumerate(merges):
        first.setdefault("".join(m) if isinstance(m, list) else m.replace(" ", ""), rank)
    made = sorted((t for t in first if tok.get_vocab().get(t, 0) >= 259), key=first.__getitem__)
    assert [scores[tok.get_vocab()[t]] for t in made] == [-float(i) for i in range(len(made))]
    for text in [*TEXT[:3], "naïve fox, 東京!", "the lazy brown dogs"]:
        assert _spm_reference(text, tokens, scores) == tok(text, add_special_tokens=False)["input_ids"], text
    # what equal scores (the converter's tokenizer.json-only placeholder, -1000 each) would do: merge left to
    # right, splitting words differently
    flat = [-1000.0] * len(scores)
    text = "the lazy brown dogs"
    assert _spm_reference(text, tokens, flat) != tok(text, add_special_tokens=False)["input_ids"]


def test_unsupported_tokenizer_kinds_are_refused() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    word = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    with pytest.raises(UnsupportedExportError, match="gpt2, llama.*'WordLevel'"):
        gguf_vocab(word, 2)
    with pytest.raises(UnsupportedExportError, match="embedding rows"):
        gguf_vocab(spm_bpe(), 10)


def test_added_byte_symbols_keep_their_text() -> None:
    """A byte-level symbol added as a non-normalized token decodes to U+FFFD; written as such, several of them are
    duplicate tokens llama.cpp refuses to load (DeepSeek-LLM's added "ø", "ö", ...): they keep their own text."""
    from tokenizers import AddedToken

    tokenizer = byte_level_bpe("gpt2")
    tokenizer.add_tokens([AddedToken("ø", normalized=False), AddedToken("ö", normalized=False),
                          AddedToken("<tool2>", normalized=False)])
    vocab = gguf_vocab(tokenizer, len(tokenizer))
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("ø", "ö", "<tool2>")]
    assert [vocab.tokens[i] for i in ids] == ["ø", "ö", "<tool2>"]
    assert len(set(vocab.tokens)) == len(vocab.tokens)
