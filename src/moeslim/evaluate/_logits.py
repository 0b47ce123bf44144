"""Shared forward helpers: next-token log-probs of a batch, the model's device, context length."""

from __future__ import annotations

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the first parameter (models here are never sharded across devices)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def context_length(model: torch.nn.Module, cap: int = 2048) -> int:
    """Longest input we feed: the model's position limit, capped because configs often claim 128k."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or cap
    return int(min(limit, cap))


@torch.inference_mode()
def next_token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-prob each position assigns to the token that follows it.

    input_ids (B, L) -> (B, L-1) float32: out[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1]).
    The log_softmax runs in float32 so a bf16 model is scored as precisely as its logits allow.
    """
    logp, _ = next_token_scores(model, input_ids, attention_mask)
    return logp


@torch.inference_mode()
def next_token_distribution(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids (B, L) -> (B, L-1, V) float32 log-probabilities of every vocabulary token at each next position."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


@torch.inference_mode()
def next_token_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs (B, L-1) float32 of the actual next tokens, greedy-hit mask (B, L-1) bool)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp_all = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, L-1, V)
    targets = input_ids[:, 1:]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, logp_all.argmax(-1) == targets
