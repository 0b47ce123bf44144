"""Perplexity over fixed non-overlapping windows, or the sliding-window method of the transformers docs."""

from __future__ import annotations

import math

import torch

from moeslim.evaluate._logits import model_device, next_token_distribution, next_token_logprobs
from moeslim.evaluate.divergence import ReferenceTop
from moeslim.models.loading import check_context, check_token_ids
from moeslim.progress import steps


def _result(nll: float, tokens: int, method: str, **extra: int) -> dict:
    if not math.isfinite(nll):  # one NaN/inf log-probability makes every number built on it meaningless
        raise ValueError(f"perplexity: the model's log-probabilities are {nll} (NaN or infinite) on the scored text; "
                         "its weights or its compression are broken, so no result is written")
    return {
        "method": method,
        "ppl": math.exp(nll / tokens) if tokens else float("nan"),
        "nll": nll,
        "tokens": tokens,
        **extra,
    }


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
    reference: ReferenceTop | None = None,
    label: str = "perplexity",
    per_window: bool = False,
) -> dict:
    """Perplexity of `windows` (N, L), each window scored independently (L-1 predictions each).

    Returns {"method": "fixed", "ppl", "nll" (summed over all predicted tokens, float64),
    "tokens", "windows", "seq_len"}. Windows are independent, so the first tokens of each window
    have little context: this is the usual, slightly pessimistic, calibration-style number.
    With ``reference`` (a reference model's distributions on the same windows), also "kl" (mean KL per
    predicted token, see ``divergence``) and "top1" (share of positions whose most likely token is the
    reference's), from the same forward passes. With ``per_window``, also "window_nll": each window's summed
    NLL (N floats), for paired comparisons of two models on the same windows.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (N, L>=2), got {tuple(windows.shape)}")
    check_context(model, int(windows.shape[1]), "eval seq_len")
    check_token_ids(model, windows, "the evaluation text")
    device = torch.device(device) if device is not None else model_device(model)
    model.eval()
    nll, tokens, kl, agree = 0.0, 0, 0.0, 0
    rows: list[float] = []
    batches = range(0, windows.shape[0], batch_size)
    for start in steps(batches, label, len(batches), unit="batches", enabled=progress):
        batch = windows[start : start + batch_size].to(device)
        if reference is None:
            logp = next_token_logprobs(model, batch)  # (B, L-1)
        else:
            logp_all = next_token_distribution(model, batch)  # (B, L-1, V)
            logp = logp_all.gather(-1, batch[:, 1:].unsqueeze(-1)).squeeze(-1)
            div, hit = reference.divergence(slice(start, start + batch_size), logp_all)
            kl += div.sum().item()
            agree += int(hit.sum())
        # float64 sum: millions of float32 terms would otherwise lose digits the comparison needs
        nll -= logp.double().sum().item()
        tokens += logp.numel()
        if per_window:
            rows += (-logp.double().sum(dim=1)).tolist()
    result = _result(nll, tokens, "fixed", windows=int(windows.shape[0]), seq_len=int(windows.shape[1]))
    if per_window:
        result["window_nll"] = rows
    if reference is not None and tokens:
        result.update(kl=kl / tokens, top1=agree / tokens, kl_top_k=reference.top_k)
    return result


def sliding_perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    window: int,
    stride: int,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict:
    """Sliding-window perplexity of one token stream (T,).

    The method of the transformers docs ("Perplexity of fixed-length models"):

    Windows of `window` tokens start every `stride` tokens; each scores only the tokens not scored by
    the previous window, so every token after the first is predicted once, with up to
    window - stride tokens of extra context. stride == window gives fixed non-overlapping windows.
    """
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    check_context(model, window, "window")
    ids = token_ids.reshape(-1)
    device = torch.device(device) if device is not None else model_device(model)
    model.eval()
    nll, tokens, prev_end = 0.0, 0, 0
    total = ids.numel()
    starts = range(0, total, stride)
    for begin in steps(starts, "sliding ppl", len(starts), unit="windows", enabled=progress):
        end = min(begin + window, total)
        if end - begin < 2:
            break
        logp = next_token_logprobs(model, ids[begin:end].unsqueeze(0).to(device))[0]  # (end-begin-1,)
        # logp[j] predicts position begin+j+1: keep only targets past what the last window scored
        first_new = max(prev_end, begin + 1) - (begin + 1)
        scored = logp[first_new:]
        nll -= scored.double().sum().item()
        tokens += scored.numel()
        prev_end = end
        if end == total:
            break
    return _result(nll, tokens, "sliding", window=window, stride=stride)
