"""Token-level scoring shared by the lm-eval wrapper and the built-in scorer (no lm-eval import here)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from moeslim.evaluate._logits import context_length, model_device, next_token_scores


def _pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding keeps every real token at the same position, so causal scores are unchanged."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def score_continuations(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    max_length: int | None = None,
    pad_id: int = 0,
    progress: bool = True,
) -> list[tuple[float, bool]]:
    """Sum of log p(continuation tokens | context) and whether greedy decoding yields exactly them.

    pairs: (context ids, continuation ids), context non-empty. Inputs longer than max_length are cut
    on the left (context side). Requests run longest first so a batch wastes little padding.
    """
    max_length = max_length or context_length(model)
    device = model_device(model)
    model.eval()
    seqs = [(list(ctx) + list(cont))[-max_length:] for ctx, cont in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="loglikelihood", disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        ids, mask = _pad_right([seqs[i] for i in idx], pad_id)
        logp, greedy = next_token_scores(model, ids.to(device), mask.to(device))  # (B, W-1)
        for row, i in enumerate(idx):
            n_seq = len(seqs[i])
            n_cont = min(len(pairs[i][1]), n_seq - 1)  # a continuation cut by max_length loses its head
            # position t predicts token t+1: the continuation's n_cont tokens end at n_seq - 1
            span = slice(n_seq - 1 - n_cont, n_seq - 1)
            out[i] = (float(logp[row, span].double().sum()), bool(greedy[row, span].all()))
    return out


def rolling_loglikelihood(
    model: torch.nn.Module, token_ids: Sequence[int], prefix_id: int, max_length: int | None = None
) -> float:
    """log p(whole token sequence | prefix token), every token predicted once, in chunks that each
    see up to max_length tokens of input (the lm-eval `loglikelihood_rolling` contract)."""
    max_length = max_length or context_length(model)
    device = model_device(model)
    seq = [prefix_id, *token_ids]
    total = 0.0
    chunk = max_length - 1  # targets per chunk, so that chunk + its first context token fit
    for a in range(1, len(seq), chunk):
        b = min(a + chunk, len(seq))  # targets are seq[a:b]
        s = max(0, b - max_length)  # as much left context as fits
        ids = torch.tensor([seq[s:b]], dtype=torch.long, device=device)
        logp, _ = next_token_scores(model, ids)  # predicts seq[s+1:b]
        total += float(logp[0, -(b - a) :].double().sum())
    return total


@torch.inference_mode()
def greedy_continuation(
    model: torch.nn.Module,
    input_ids: Sequence[int],
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> list[int]:
    """Greedy new tokens after input_ids (one prompt, no padding issues)."""
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=model_device(model))
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id if eos_token_id is not None else 0,
    )
    return out[0, ids.shape[1] :].tolist()


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """Text up to the first stop string (lm-eval `until` semantics)."""
    cut = len(text)
    for stop in stops:
        if stop and (pos := text.find(stop)) != -1:
            cut = min(cut, pos)
    return text[:cut]
