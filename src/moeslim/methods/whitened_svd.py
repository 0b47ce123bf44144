"""Activation-aware (whitened) truncated SVD of one expert projection, pure maths.

For W (out, in) and the input covariance C = sum_t g_t^2 x_t x_t^T (in, in) of the tokens routed to the expert,
the output error of a replacement W' on those tokens is ||(W - W') X||^2 = tr((W - W') C (W - W')^T). With
C = L L^T (Cholesky, damped) the best rank-r W' is the truncated SVD of W L, mapped back by L^{-1}:

    W L = U S V^T,   W_r = (U_r S_r) (V_r^T L^{-1}) = A B,   error(r) = sum_{j >= r} s_j^2

(SVD-LLM's truncation-aware whitening). The squared singular values are what each extra rank buys, in the units
of the layer's output error, which is what the rank allocation compares across experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["WhitenedSVD", "is_dense", "whitened_svd", "whitening"]


def whitening(cov: Tensor | None, size: int, damp: float) -> Tensor:
    """(in, in) lower-triangular L with L L^T = cov + damp * mean(diag(cov)) I, float64; identity without cov."""
    if cov is None or float(cov.diagonal().mean()) <= 0:
        return torch.eye(size, dtype=torch.float64)
    c = cov.double()
    c = c + damp * float(c.diagonal().mean()) * torch.eye(size, dtype=torch.float64)
    return torch.linalg.cholesky(c)


@dataclass(frozen=True)
class WhitenedSVD:
    """SVD of W L: u (out, r), s (r,), vt (r, in) with r = min(out, in), and L (in, in)."""

    u: Tensor
    s: Tensor
    vt: Tensor
    chol: Tensor

    @property
    def energies(self) -> Tensor:
        """(r,) s_j^2: the whitened output error each singular direction removes."""
        return self.s.pow(2)

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """A (out, rank) = U_r S_r, B (rank, in) = V_r^T L^{-1}, float32; A B is the best rank-``rank`` W."""
        a = self.u[:, :rank] * self.s[:rank]
        b = torch.linalg.solve_triangular(self.chol, self.vt[:rank], upper=False, left=False)  # X L = V_r^T
        return a.float(), b.float()


def whitened_svd(weight: Tensor, chol: Tensor) -> WhitenedSVD:
    """weight (out, in), chol (in, in) -> the SVD of weight @ chol (float64)."""
    u, s, vt = torch.linalg.svd(weight.double() @ chol, full_matrices=False)
    return WhitenedSVD(u, s, vt, chol)


def is_dense(rank: int, out: int, inp: int) -> bool:
    """A projection of this rank is stored as its dense (original) matrix: factors would not be smaller."""
    return rank * (out + inp) >= out * inp
