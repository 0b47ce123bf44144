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
    spacing: str = "random",
) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens.  # (N, seq_len)

    With ``num_samples`` a subset of the windows in source order, otherwise every window in order.
    ``spacing``: ``random`` draws the subset at random (seeded); ``even`` cuts the source into ``num_samples``
    equal stretches and takes the window at the same offset in each (the offset is ``seed`` modulo the
    stretch length), so the subset covers the whole source evenly.
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
    if spacing == "even":
        return windows[even_indices(count, num_samples, seed)]
    if spacing != "random":
        raise DataSourceError(f"spacing={spacing!r}: use 'random' or 'even'")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(count, generator=generator)[:num_samples].sort().values
    return windows[chosen]


def even_indices(count: int, num_samples: int, offset: int = 0) -> torch.Tensor:
    """Indices (num_samples,) of one window in each of ``num_samples`` equal stretches of ``count`` windows.

    Stretch i starts at floor(i * count / num_samples); every stretch holds at least count // num_samples
    windows, so ``offset`` is taken modulo that and the indices stay increasing and below ``count``.
    """
    if not 1 <= num_samples <= count:
        raise ValueError(f"num_samples={num_samples} must be in [1, {count}]")
    starts = torch.arange(num_samples, dtype=torch.long) * count // num_samples
    return starts + offset % (count // num_samples)
