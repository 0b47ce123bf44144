"""Greedy continuations of fixed prompts from several models, side by side (a smell test for damage
that perplexity averages away)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from moeslim.evaluate._logits import model_device
from moeslim.models.attrs import generating


@torch.inference_mode()
def greedy_continuation(
    model: torch.nn.Module,
    input_ids: Sequence[int],
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> list[int]:
    """Greedy new tokens after input_ids (one prompt, no padding issues)."""
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=model_device(model))
    out = generating(model).generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id if eos_token_id is not None else 0,
    )
    return out[0, ids.shape[1] :].tolist()


DEFAULT_PROMPTS = (
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "The module provides functions for",
    "A Mixture-of-Experts model routes each token to",
)


def side_by_side(
    models: Mapping[str, nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = 32,
) -> dict[str, dict[str, str]]:
    """{prompt: {model name: greedy continuation text}} (no sampling, so reruns agree)."""
    out: dict[str, dict[str, str]] = {}
    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        out[prompt] = {
            name: _decode(tokenizer, greedy_continuation(model, ids, max_new_tokens, tokenizer.eos_token_id))
            for name, model in models.items()
        }
    return out


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)  # one sequence in, one string out
    if not isinstance(text, str):
        raise TypeError(f"{type(tokenizer).__name__}.decode gave {type(text).__name__} for one sequence")
    return text
