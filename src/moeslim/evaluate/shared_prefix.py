"""lm-eval's HFLM scoring each distinct context once for all its continuations.

A multiple-choice item asks for N continuations of one context; HFLM runs context + continuation for each of
them and takes the log-softmax over the vocabulary at every position. Here each context runs once (several
contexts per call, left-padded), its KV cache is copied to its continuations, and only the continuation
positions are projected to the vocabulary: the same (log-likelihood, is-greedy) answers, far fewer tokens.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from transformers.cache_utils import DynamicCache, DynamicLayer

logger = logging.getLogger(__name__)

Request = tuple[tuple[str, str] | None, list[int], list[int]]  # ((context, continuation) or None, ctx ids, cont ids)
Answer = tuple[float, bool]  # (summed log-probability of the continuation, every token is the argmax)


KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values, each (batch, kv heads, tokens, head dim)


def shareable_kv(cache: object) -> KV | None:
    """A cache's keys/values if it is a plain full-attention DynamicCache, else None: rows of sliding-window,
    linear-attention (recurrent state) or quantized layers cannot be copied and extended exactly."""
    if not isinstance(cache, DynamicCache) or not cache.layers:
        return None
    kv: KV = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            return None
        kv.append((layer.keys, layer.values))
    return kv


def hooked_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules with forward (pre-)hooks: a hook may act on whole sequences (online dynamic pruning
    protects the top tokens of every forward's sequence), which scoring a context and its continuations in
    separate forwards would change."""
    return [name for name, module in model.named_modules() if module._forward_hooks or module._forward_pre_hooks]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(ids, attention mask, position ids), each (len(seqs), longest), real tokens right-aligned."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def score_rows(logprobs: torch.Tensor, targets: list[int]) -> Answer:
    """logprobs (len(targets), V): one row per continuation token, predicting it."""
    tokens = torch.tensor(targets, dtype=torch.long, device=logprobs.device)
    picked = logprobs.gather(1, tokens[:, None])  # (T, 1)
    return float(picked.sum()), bool((logprobs.argmax(-1) == tokens).all())


def split_calls(widths: Sequence[int], call_tokens: int) -> list[range]:
    """Consecutive pieces of rows sorted by decreasing width, each run as one call padded to its first row's
    width, that minimise padded tokens + call_tokens per call (what a call costs beyond its tokens)."""
    best, cut = [0] + [sys.maxsize] * len(widths), [0] * (len(widths) + 1)
    for end in range(1, len(widths) + 1):
        for start in range(end):
            cost = best[start] + call_tokens + (end - start) * widths[start]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    pieces: list[range] = []
    end = len(widths)
    while end:
        pieces.insert(0, range(cut[end], end))
        end = cut[end]
    return pieces


class SharedPrefixHFLM(HFLM):
    """HFLM whose causal log-likelihoods run every distinct context once.

    Requests HFLM would treat differently go to HFLM's own ``_loglikelihood_tokens`` (same answers by
    construction, not a weaker method): context + continuation longer than max_length + 1 (HFLM truncates
    from the left), a seq2seq backend, an automatic batch size, models with forward hooks (``hooked_modules``)
    and models whose cache is not a plain full-attention DynamicCache (checked on the first forward)."""

    # what one forward costs beyond its tokens, in tokens: about 15 ms against 0.4 ms per token for the demo
    # model on one CPU thread; it only decides how continuations of different lengths are split into calls
    CALL_TOKENS = 32

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._cache_ok: bool | None = None  # unknown until the first context forward returns its cache
        params = inspect.signature(self.model.forward).parameters
        self._keeps_logits = "logits_to_keep" in params
        # transformers 5 renamed the forward's past_key_values to cache (the old name still works, with a warning)
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[Answer]:
        hooked = hooked_modules(self.model)
        if hooked:
            logger.debug("forward hooks on %s: HFLM scores every request", ", ".join(hooked[:3]))
        own = (isinstance(self.batch_size, int) and self.backend == "causal" and self._cache_ok is not False
               and not hooked)
        shared = [i for i, (_, ctx, cont) in enumerate(requests)
                  if own and ctx and cont and len(ctx) + len(cont) <= self.max_length + 1]
        answers: dict[int, Answer] = {}
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in shared:
            groups.setdefault(tuple(requests[i][1]), []).append(i)
        # longest contexts first (as HFLM orders its batches): rows of one call pad to similar lengths
        order = sorted(groups.items(), key=lambda kv: (-len(kv[0]), kv[0]))
        step = int(self.batch_size) if own else 1
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            scored = self._score_groups([list(ctx) for ctx, _ in chunk],
                                        [[requests[i][2] for i in idx] for _, idx in chunk])
            if scored is None:  # cache not expandable: the rest goes to HFLM below
                break
            for (_, idx), group_answers in zip(chunk, scored, strict=True):
                answers.update(zip(idx, group_answers, strict=True))
        for i, answer in answers.items():
            if requests[i][0] is not None:  # None: loglikelihood_rolling windows, hooked per document
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        rest = [i for i in range(len(requests)) if i not in answers]
        if rest:
            logger.debug("%d of %d log-likelihood requests scored by HFLM's own path", len(rest), len(requests))
            base = super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm, override_bs)
            answers.update(zip(rest, base, strict=True))
        return [answers[i] for i in range(len(requests))]

    def _score_groups(
        self, contexts: list[list[int]], continuations: list[list[list[int]]]
    ) -> list[list[Answer]] | None:
        """Answers per group (continuations[g] follow contexts[g]), or None if the model's cache cannot be
        shared (then remembered: later calls go straight to HFLM)."""
        rows = [(g, cont) for g, conts in enumerate(continuations) for cont in conts]
        ids, mask, positions = left_pad(contexts, self._pad_id(), self.device)  # (G, Lc)
        keep = {"logits_to_keep": 1} if self._keeps_logits else {}
        with torch.no_grad(), self._autocast():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep)
            cache = out.get("cache")
            if cache is None:
                cache = out.get("past_key_values")
            kv = shareable_kv(cache)
            self._cache_ok = kv is not None
            if kv is None:
                logger.debug("%s is not shareable: HFLM scores every request", type(cache).__name__)
                return None
            # the last context position predicts each continuation's first token
            first = F.log_softmax(out.logits[:, -1], dim=-1, dtype=self.softmax_dtype)  # (G, V)
            later = self._continue(kv, mask, rows)
        answers: list[list[Answer]] = [[] for _ in contexts]
        for r, (g, cont) in enumerate(rows):
            logprobs = torch.cat([first[g : g + 1], *([later[r]] if r in later else [])])  # (T, V)
            answers[g].append(score_rows(logprobs, cont))
        return answers

    def _continue(self, kv: KV, mask: torch.Tensor,
                  rows: list[tuple[int, list[int]]]) -> dict[int, torch.Tensor]:
        """{row: log-probs (T - 1, V) at its continuation positions 1..T-1} for rows (context, continuation of
        T > 1 tokens); kv holds the G left-padded contexts, mask (G, Lc) their padding.

        Rows run in calls of similar lengths (``split_calls``), each on a copy of its contexts' cache rows: at
        most G x (choices per context) rows per call, but each only T - 1 tokens long.
        Continuations are right-padded: causal attention never lets padding reach an earlier position."""
        todo = sorted((r for r, (_, cont) in enumerate(rows) if len(cont) > 1), key=lambda r: -len(rows[r][1]))
        found: dict[int, torch.Tensor] = {}
        for piece in split_calls([len(rows[r][1]) - 1 for r in todo], self.CALL_TOKENS):
            members = [todo[k] for k in piece]
            owner = torch.tensor([rows[r][0] for r in members], device=self.device)  # (R,)
            width = len(rows[members[0]][1]) - 1
            ids = torch.full((len(members), width), self._pad_id(), dtype=torch.long)  # (R, W)
            for k, r in enumerate(members):
                ids[k, : len(rows[r][1]) - 1] = torch.tensor(rows[r][1][:-1], dtype=torch.long)
            ctx_mask = mask[owner]  # (R, Lc)
            positions = ctx_mask.sum(-1, keepdim=True) + torch.arange(width, device=self.device)  # (R, W)
            rows_cache = DynamicCache(ddp_cache_data=[(keys[owner], values[owner]) for keys, values in kv])
            out = self.model(input_ids=ids.to(self.device), attention_mask=torch.cat(
                [ctx_mask, torch.ones_like(positions)], dim=1), position_ids=positions, use_cache=True,
                **{self._cache_arg: rows_cache})
            for k, r in enumerate(members):
                found[r] = F.log_softmax(out.logits[k, : len(rows[r][1]) - 1], dim=-1, dtype=self.softmax_dtype)
        return found

    def _pad_id(self) -> int:
        # any real token: left padding is masked out, right padding is never attended to
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

    def _autocast(self) -> torch.autocast:
        # as HFLM's _model_call
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)
