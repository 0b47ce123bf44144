"""KL divergence to a reference model's next-token distribution, and top-1 agreement.

What llama.cpp's ``perplexity --kl-divergence`` reports and what compressed models are compared by: perplexity
only scores the one token that came next; KL scores the whole distribution the original predicted.

The reference keeps, per predicted position, either every vocabulary token's log-probability (``k = 0``, the
default: exact KL; float16, N x (L-1) x V x 2 bytes, as llama.cpp keeps 16 bits per logit) or its ``k`` most
likely tokens (large vocabularies: at V = 150k a full reference of 64 windows is gigabytes). With top-k, KL is
computed between the two distributions coarsened to those k tokens plus one bucket for all other tokens:

    KL_k(p || q) = sum_{v in top_k(p)} p_v log(p_v / q_v) + p_rest log(p_rest / q_rest)

with p_rest = 1 - sum_top p, q_rest = 1 - sum_top q. Coarsening never increases a divergence, so KL_k is a lower
bound of the full KL, equal to it as p_rest -> 0. How close depends on the model: on the small demo models, whose
distributions are flat, the top 64 tokens hold only about 70 % of the mass; large models are far more peaked.
Top-1 agreement: the compressed model's most likely token is the reference's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Reference", "ReferenceTop", "kl_full", "kl_top", "reference_top", "top1_agreement", "top_logprobs"]

_REST_FLOOR = 1e-12  # a rest bucket the reference gives no mass contributes nothing; avoids log(0)
_KL_CHUNK = 64  # positions per float64 pass of kl_full: (64, V) temporaries stay in cache


def top_logprobs(logp_all: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """logp_all (B, T, V) log-probabilities -> (values (B, T, k) float32, token ids (B, T, k) int64), descending."""
    values, ids = logp_all.float().topk(min(k, logp_all.shape[-1]), dim=-1)
    return values, ids


def kl_full(ref_logp: Tensor, logp_all: Tensor, chunk: int = _KL_CHUNK) -> Tensor:
    """Per-position KL(p || q) = sum_v p_v (log p_v - log q_v): ref_logp, logp_all (B, T, V) -> (B, T) float64.

    In float64 over ``chunk`` positions at a time: the same numbers as over the whole batch at once, without
    its float64 copies of (B, T, V) (4 of 134 MB at 8 x 255 x 8192), so 2-3x faster on a CPU.
    """
    vocab = ref_logp.shape[-1]
    ref, logp = ref_logp.reshape(-1, vocab), logp_all.reshape(-1, vocab)
    out = torch.empty(ref.shape[0], dtype=torch.float64, device=logp_all.device)
    for start in range(0, ref.shape[0], chunk):
        p = ref[start:start + chunk].double()  # (chunk, V)
        out[start:start + chunk] = (p.exp() * (p - logp[start:start + chunk].double())).sum(-1)
    return out.view(logp_all.shape[:-1])


def kl_top(ref_logp: Tensor, ref_ids: Tensor, logp_all: Tensor) -> Tensor:
    """Per-position KL_k(p || q): ref_logp, ref_ids (B, T, k) of the reference p; logp_all (B, T, V) of q.

    Returns (B, T) float64, >= 0 up to rounding (see the module docstring for the coarsened form).
    """
    p_top = ref_logp.double()
    q_top = logp_all.gather(-1, ref_ids).double()  # (B, T, k)
    top = (p_top.exp() * (p_top - q_top)).sum(-1)
    p_rest = (1 - p_top.exp().sum(-1)).clamp_min(0)
    q_rest = (1 - q_top.exp().sum(-1)).clamp_min(_REST_FLOOR)
    rest = torch.where(p_rest > _REST_FLOOR, p_rest * (p_rest.clamp_min(_REST_FLOOR).log() - q_rest.log()),
                       torch.zeros_like(p_rest))
    return top + rest


def top1_agreement(ref_top1: Tensor, logp_all: Tensor) -> Tensor:
    """(B, T) bool: q's most likely token equals the reference's top-1 token ids ``ref_top1`` (B, T)."""
    return logp_all.argmax(-1) == ref_top1


@dataclass(frozen=True)
class ReferenceTop:
    """The reference model's next-token log-probabilities on fixed windows of one text source.

    windows (N, L) token ids; top1 (N, L-1) int64 the reference's most likely token (taken before any rounding);
    logp (N, L-1, V) float16 (every token) or (N, L-1, k) float32 with ``ids`` (N, L-1, k) int64, the top-k
    token ids in descending order. Position t predicts token t+1.
    """

    windows: Tensor
    top1: Tensor
    logp: Tensor
    ids: Tensor | None = None

    @property
    def top_k(self) -> int:
        """k of a top-k reference, 0 for one that keeps every token."""
        return 0 if self.ids is None else int(self.ids.shape[-1])

    def check_windows(self, windows: Tensor, domain: str) -> None:
        """Refuse windows other than the ones the reference scored (the KL would compare different text)."""
        if windows.shape != self.windows.shape or not torch.equal(windows.cpu(), self.windows.cpu()):
            raise ValueError(f"the KL reference for {domain!r} was computed on other windows "
                             f"({tuple(self.windows.shape)}); evaluate with the same data, seq_len, max_windows and "
                             "seed as the reference")

    def divergence(self, rows: slice, logp_all: Tensor) -> tuple[Tensor, Tensor]:
        """(KL (B, T) float64, top-1 agreement (B, T) bool) of q = ``logp_all`` (B, T, V) on windows ``rows``."""
        ref = self.logp[rows].to(logp_all.device)
        if self.ids is None:
            if ref.shape[-1] != logp_all.shape[-1]:
                raise ValueError(f"the KL reference has {ref.shape[-1]} vocabulary entries, this model "
                                 f"{logp_all.shape[-1]}: it belongs to another tokenizer")
            kl = kl_full(ref, logp_all)
        else:
            kl = kl_top(ref, self.ids[rows].to(logp_all.device), logp_all)
        return kl, top1_agreement(self.top1[rows].to(logp_all.device), logp_all)


@torch.inference_mode()
def reference_top(model: torch.nn.Module, windows: Tensor, k: int = 0, batch_size: int = 8) -> ReferenceTop:
    """``model``'s next-token log-probabilities on ``windows`` (N, L): every token (k = 0) or the top k."""
    from moeslim.evaluate._logits import model_device, next_token_distribution

    device = model_device(model)
    model.eval()
    values, ids, top1 = [], [], []
    for start in range(0, windows.shape[0], batch_size):
        logp_all = next_token_distribution(model, windows[start:start + batch_size].to(device))
        top1.append(logp_all.argmax(-1).cpu())
        if k:
            v, i = top_logprobs(logp_all, k)
            values.append(v.cpu())
            ids.append(i.cpu())
        else:
            values.append(logp_all.half().cpu())
    return ReferenceTop(windows.cpu(), torch.cat(top1), torch.cat(values), torch.cat(ids) if k else None)


@dataclass(frozen=True)
class Reference:
    """Reference distributions per evaluated domain, of the model named ``model``; ``k`` as in ``reference_top``."""

    model: str
    k: int
    domains: Mapping[str, ReferenceTop]

    def save(self, path: str | Path) -> Path:
        """One safetensors file (what ``eval --reference FILE`` reads), written atomically."""
        from safetensors.torch import save_file

        from moeslim.outputs import atomic_file

        tensors: dict[str, Tensor] = {}
        for domain, top in self.domains.items():
            tensors[f"{domain}/windows"] = top.windows.contiguous()
            tensors[f"{domain}/logp"] = top.logp.contiguous()
            tensors[f"{domain}/top1"] = top.top1.to(torch.int32).contiguous()
            if top.ids is not None:
                tensors[f"{domain}/ids"] = top.ids.to(torch.int32).contiguous()  # vocabularies fit 31 bits
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": _FORMAT, "model": self.model, "k": str(self.k)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("format") != _FORMAT:
                    raise ValueError(f"{path} is not a moeslim KL reference (write one with eval --save-reference)")
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except SafetensorError as err:
            raise OSError(f"cannot read the KL reference {path}: the file is damaged or truncated ({err})") from err
        domains = sorted({key.rsplit("/", 1)[0] for key in tensors})
        return cls(model=meta.get("model", ""), k=int(meta.get("k", "0")),
                   domains={d: ReferenceTop(tensors[f"{d}/windows"], tensors[f"{d}/top1"].long(), tensors[f"{d}/logp"],
                                            tensors[f"{d}/ids"].long() if f"{d}/ids" in tensors else None)
                            for d in domains})


_FORMAT = "moeslim.kl-reference"
