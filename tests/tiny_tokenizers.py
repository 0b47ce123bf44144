"""Tiny tokenizers of each kind GGUF export writes, trained in milliseconds with the ``tokenizers`` library.

- ``byte_level_bpe(pre)``: byte-level BPE (llama.cpp ``gpt2`` model). ``pre="gpt2"``: the plain GPT-2 ByteLevel
  pre-tokenizer (moeslim's demo tokenizers); ``pre="split"``: a Qwen2-style Split regex before a regex-free
  ByteLevel, the layout whose regex llama.cpp must know by name.
- ``spm_bpe()``: SentencePiece-style BPE with byte fallback (llama.cpp ``llama`` model, Mixtral / Llama-2): ids
  0-2 ``<unk> <s> </s>``, 3-258 the byte tokens ``<0x00>``..``<0xFF>``, then the learned pieces; Metaspace
  pre-tokenizer; ``<s>`` added in front of every text.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TEXT = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.",
    "def add(a, b):\n    return a + b  # 12 34 567 8910",
    "Über naïve café — 東京 ✅ I've been told they're here, isn't it?",
] * 20
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


def byte_level_bpe(pre: str = "gpt2", vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    if pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.add_tokens(["<tool>"])  # a plain added token: USER_DEFINED
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})  # CONTROL
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    return fast


def spm_bpe(vocab_size: int = 420) -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE: learned on Metaspace-split text, then rebuilt with byte fallback and the
    <unk> <s> </s> + 256 byte-token prefix a SentencePiece model has."""
    metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = metaspace
    learner.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = learner.get_vocab()
    merges = [tuple(m) for m in _merges(learner)]
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab = {text: i for i, text in enumerate(head)}
    for text, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(text, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _merges(tok: Tokenizer) -> list[list[str]]:
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    return [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
