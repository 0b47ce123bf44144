"""MoBE-style shared bases: every expert's projection W_e (out, in) as A_e B_e with B_e = sum_j mix_ej B_j, pure maths.

MoBE (Chen et al. 2025, "Mixture of Basis Experts") factorises each expert matrix as W_e = A_e B_e, A_e (out, r)
its own, and B_e a per-expert mixture of m basis matrices B_j (r, in) shared by all experts of the layer (the
mixing weights a softmax of learned logits), learned by Adam on the reconstruction error. Its code also puts an
activation around the mixture (SiLU by default); here the mixture stays linear, so expert e is an ordinary rank-r
factorisation (the low-rank runtime computes x -> (x B_e^T) A_e^T) and the shared-basis cost is paid once.

The objective is the same activation-aware error as the per-expert methods: sum_e ||(W_e - A_e B_e) L_e||^2 with
L_e L_e^T the expert's damped input covariance (``whitened_svd.whitening``). Start: one basis for all, the top-r
right singular vectors of the stacked experts (the best shared basis for the plain Frobenius error), each A_e
its exact least-squares solution; then full-batch Adam on (A, bases, mixing logits) from deterministically
perturbed copies of that basis; last, every A_e is re-solved exactly for its final B_e, and the better of start
and end is kept (the fit never ends worse than the single shared basis).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moeslim.methods.whitened_svd import whitening

__all__ = ["MOBE_LR", "MOBE_STEPS", "MoBEFit", "fit_mobe", "mobe_params", "mobe_rank"]

MOBE_STEPS = 60  # Adam steps (full batch over the layer's experts)
MOBE_LR = 0.01  # Adam step size, relative to the RMS of the starting parameters (scale-free)


@dataclass(frozen=True)
class MoBEFit:
    """a (E, out, r), bases (m, r, in), mix (E, m) rows summing to 1; errors relative to sum_e ||W_e L_e||^2."""

    a: Tensor
    bases: Tensor
    mix: Tensor
    error_start: float
    error: float

    def basis(self, e: int) -> Tensor:
        """(r, in) expert e's mixed basis B_e."""
        return torch.einsum("m,mri->ri", self.mix[e], self.bases)


def mobe_params(experts: int, bases: int, rank: int, out: int, inp: int) -> int:
    """Stored parameters: every A_e, the shared bases and the mixing weights."""
    return experts * out * rank + bases * rank * inp + experts * bases


def mobe_rank(experts: int, bases: int, out: int, inp: int, budget: int, min_rank: int) -> int:
    """Largest rank r <= in with ``mobe_params`` <= budget; ValueError when ``min_rank`` does not fit."""
    spare = budget - experts * bases
    rank = min(max(spare, 0) // (experts * out + bases * inp), inp)
    if rank < max(min_rank, 1):
        raise ValueError(f"{bases} shared bases and rank-{max(min_rank, 1)} factors for {experts} experts "
                         f"({out}x{inp}) do not fit the budget of {budget} parameters; raise the ratio or use "
                         "fewer bases")
    return rank


def _solve_a(w: Tensor, cov: Tensor, b: Tensor) -> Tensor:
    """Exact A (out, r) minimising ||(W - A B) L||^2 = tr((W - A B) C (W - A B)^T): A = W C B^T (B C B^T)^-1."""
    bc = b @ cov  # (r, in)
    gram = bc @ b.T
    gram = gram + 1e-10 * float(gram.diagonal().mean().clamp_min(1e-30)) * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, (w @ bc.T).T).T


def _whitenings(covariances: Sequence[Tensor | None], inp: int, damp: float) -> Tensor:
    """(E, in, in) lower-triangular L_e; an expert no token reached gets a small multiple of the identity (its
    error then counts little, as it adds nothing to the calibration loss)."""
    routed = [c for c in covariances if c is not None and float(c.diagonal().mean()) > 0]
    small = 1e-3 * (float(torch.stack([c.diagonal().mean() for c in routed]).mean()) ** 0.5 if routed else 1.0)
    eye = torch.eye(inp, dtype=torch.float64)
    return torch.stack([whitening(c, inp, damp) if c is not None and float(c.diagonal().mean()) > 0
                        else small * eye for c in covariances])


def fit_mobe(weights: Tensor, covariances: Sequence[Tensor | None], rank: int, bases: int, damp: float,
             steps: int = MOBE_STEPS) -> MoBEFit:
    """weights (E, out, in), per-expert input covariances (in, in) or None -> the shared-basis factorisation."""
    n, out, inp = weights.shape
    if not 1 <= rank <= inp:
        raise ValueError(f"rank={rank} must be in [1, {inp}] (the basis spans at most the {inp} inputs)")
    if not 1 <= bases <= n:
        raise ValueError(f"bases={bases} must be in [1, {n}] experts")
    w = weights.double()
    chol = _whitenings(covariances, inp, damp)  # (E, in, in)
    cov = chol @ chol.transpose(1, 2)
    target = w @ chol  # (E, out, in) W_e L_e
    total = max(float(target.pow(2).sum()), 1e-30)

    def error(a: Tensor, b: Tensor, ls: Tensor, tw: Tensor) -> Tensor:  # a (E, out, r), b (E, r, in)
        return (tw - a @ (b @ ls)).pow(2).sum() / total

    _, _, vt = torch.linalg.svd(w.reshape(n * out, inp), full_matrices=False)
    b0 = vt[:rank]  # (r, in) the best shared basis for the plain error
    a0 = torch.stack([_solve_a(w[e], cov[e], b0) for e in range(n)])
    start = float(error(a0, b0.expand(n, -1, -1), chol, target))
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((bases, rank, inp), generator=gen, dtype=torch.float64)
    basis = (b0 + 0.05 * noise * float(b0.pow(2).mean().sqrt())).float().requires_grad_(True)  # (m, r, in)
    logits = torch.zeros(n, bases, requires_grad=True)
    a = a0.float().requires_grad_(True)
    if steps > 0 and start > 1e-12:
        ls, tw = chol.float(), target.float()  # the Adam loop in float32: it only refines, A is re-solved exactly
        lrs = [MOBE_LR * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-12)) for p in (a, basis)]
        opt = torch.optim.Adam([{"params": [a], "lr": lrs[0]}, {"params": [basis], "lr": lrs[1]},
                                {"params": [logits], "lr": MOBE_LR * 10}])
        with torch.enable_grad():  # the calibration pass runs under no_grad
            for _ in range(steps):
                opt.zero_grad()
                loss = error(a, torch.einsum("em,mri->eri", torch.softmax(logits, 1), basis), ls, tw)
                loss.backward()
                opt.step()
    with torch.no_grad():
        mix = torch.softmax(logits.double(), 1)
        mixed = torch.einsum("em,mri->eri", mix, basis.double())
        a_end = torch.stack([_solve_a(w[e], cov[e], mixed[e]) for e in range(n)])
        end = float(error(a_end, mixed, chol, target))
    if end <= start:
        return MoBEFit(a_end.float(), basis.detach().float(), mix.float(), start, end)
    uniform = torch.full((n, bases), 1.0 / bases, dtype=torch.float32)
    return MoBEFit(a0.float(), b0.float().expand(bases, -1, -1).clone(), uniform, start, start)
