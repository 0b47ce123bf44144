"""Token importance from attention maps (MC-MoE, online dynamic pruning).

Paper score: I_j = ||t_j||_1 * sum_{i >= j} A[i, j] / (L - j): how much the tokens after j attend to
j (a column sum of the causal attention map), averaged over the L - j queries that can see j.
The authors' code sums rows instead, which are softmax-normalised to 1, so its score degenerates to
||t_j||_1; we implement the paper's column sum.
"""

from __future__ import annotations

import math

import torch


def token_importance(attn: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Importance of every token.

    attn: (B, heads, S_q, S_k) attention probabilities, query rows; the last S_q keys are the queries
    themselves (S_k >= S_q when a KV cache precedes them). tokens: (B, S_q, H) the tokens' hidden states.
    Returns (B, S_q). Heads are averaged: the paper's A is one map per layer.
    """
    if attn.dim() != 4 or tokens.dim() != 3:
        raise ValueError(f"attn must be (B, heads, S_q, S_k) and tokens (B, S_q, H); got {attn.shape}, {tokens.shape}")
    s_q, s_k = attn.shape[-2], attn.shape[-1]
    # Only the columns of the current tokens matter (cached keys are not routed again).
    columns = attn.float().mean(dim=1)[..., s_k - s_q :]  # (B, S_q, S_q)
    received = columns.sum(dim=-2)  # (B, S_q) sum over queries i of A[i, j]
    viewers = torch.arange(s_q, 0, -1, device=attn.device, dtype=torch.float32)  # (S_q,) L - j
    return tokens.float().abs().sum(dim=-1) * received / viewers


def protected_tokens(importance: torch.Tensor, share: float) -> torch.Tensor:
    """Mask of the top ``share`` of tokens per sequence by importance (at least one when share > 0).

    importance: (B, S) -> (B, S) bool.
    """
    if not 0 <= share <= 1:
        raise ValueError(f"protect share={share} must be in [0, 1]")
    batch, seq = importance.shape
    count = min(seq, math.ceil(share * seq)) if share > 0 else 0
    mask = torch.zeros(batch, seq, dtype=torch.bool, device=importance.device)
    if count:
        top = importance.topk(count, dim=-1).indices  # (B, count)
        mask.scatter_(1, top, True)
    return mask
