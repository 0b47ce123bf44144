"""Tokenise a text source into fixed-length windows."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from moeslim.data.sources import DataSourceError, TextSource


def token_stream(source: TextSource, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """All documents concatenated, EOS between them.  # (total_tokens,)"""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in source.documents:
        ids.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def token_windows(
    source: TextSource,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    num_samples: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens.  # (N, seq_len)

    With ``num_samples`` a seeded random subset of the windows (sorted, so the order does not
    depend on the draw), otherwise every window in order.
    """
    if seq_len < 2:
        raise DataSourceError(f"seq_len={seq_len} is too short; use at least 2 tokens")
    stream = token_stream(source, tokenizer)
    count = stream.numel() // seq_len
    if count == 0:
        raise DataSourceError(
            f"{source.name} has {stream.numel()} tokens, fewer than one window of seq_len={seq_len}; "
            "lower --seq-len or add text"
        )
    windows = stream[: count * seq_len].view(count, seq_len)
    if num_samples is None or num_samples >= count:
        return windows
    if num_samples < 1:
        raise DataSourceError(f"samples={num_samples} must be at least 1")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(count, generator=generator)[:num_samples].sort().values
    return windows[chosen]
