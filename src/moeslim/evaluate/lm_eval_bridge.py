"""lm-evaluation-harness wrapper around an in-memory model, so the runtime installed on it
(skipping, low-bit experts) is what the harness evaluates. Needs the optional `lm-eval` package."""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from moeslim.evaluate._logits import context_length
from moeslim.evaluate.scoring import (
    cut_at_stops,
    greedy_continuation,
    rolling_loglikelihood,
    score_continuations,
)


class MoeslimLM(TemplateLM):
    """lm-eval `LM` over (model, tokenizer) objects; TemplateLM supplies the context/continuation
    split (trailing spaces move to the continuation, empty contexts get the EOS prefix)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 128,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or context_length(model)
        self.max_gen_toks = max_gen_toks
        self.progress = progress
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer needs an eos token: lm-eval uses it as the empty-context prefix")

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # No BOS by default: the harness prefixes the EOS token itself where a context is empty
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.eot_token_id)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **_: Any,
    ) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        return score_continuations(
            self.model,
            pairs,
            batch_size=self.batch_size,
            max_length=self.max_length,
            pad_id=self._pad_id(),
            progress=self.progress and not disable_tqdm,
        )

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, desc="rolling ll", disable=not self.progress or disable_tqdm, leave=False):
            (string,) = req.args
            out.append(
                rolling_loglikelihood(
                    self.model, self.tok_encode(string), self.prefix_token_id, self.max_length
                )
            )
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, desc="generate", disable=not self.progress or disable_tqdm, leave=False):
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new) :]
            new = greedy_continuation(self.model, ids, max_new, eos_token_id=self.eot_token_id)
            text = cut_at_stops(self.tokenizer.decode(new, skip_special_tokens=True), until)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out
