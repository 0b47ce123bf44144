"""MC-SMoE's compression stage: every merged expert's projections become low-rank + structured sparse, pure maths.

MC-SMoE (Li et al., ICLR 2024, "Merge, then Compress") decomposes each merged projection W (out, in) as

    W ~ A B + S,   A (out, r), B (r, in) from the truncated SVD,  S = W - A B with only a few whole rows kept

(LoSparse's low-rank + structured-sparse form; its rank is the ``low_rank_factor``, its kept share of S's rows the
``final_threshold``, 0.10 in the authors' scripts). The authors keep S's rows by a sensitivity |S * grad S| from
language-model gradients, pruned on a schedule, globally over the model. Here, without backprop, the measure is
layer-local: with C the projection's input covariance on the tokens the merged expert serves (routing weight^2
weighted, so errors are in the block output's units), dropping row o of S costs exactly s_o C s_o^T of output
error (rows are separate outputs), and the rows worth most are kept across the layer's merged experts of one
projection kind (``select_rows``). The low-rank part is the whitened SVD of ``methods.whitened_svd`` (the
best rank r for that same error; ``whiten=False`` gives the paper's plain SVD and magnitude rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moeslim.methods.whitened_svd import is_dense, whitened_svd, whitening

__all__ = ["CompressedProjection", "compress_projection", "compressed_params", "rank_for_share", "select_rows"]


@dataclass(frozen=True)
class CompressedProjection:
    """One merged projection: ``factors`` (W,) dense (out, in) or (A (out, r), B (r, in)); ``residual`` S (out, in)
    and ``row_error`` (out,) s_o C s_o^T (zero when dense). ``part(rows)`` keeps the given rows of S."""

    factors: tuple[Tensor] | tuple[Tensor, Tensor]
    residual: Tensor
    row_error: Tensor

    def part(self, rows: Tensor) -> tuple[Tensor, Tensor] | None:
        """(rows (k,) long sorted, S[rows] (k, in)) or None when no row is kept."""
        if rows.numel() == 0:
            return None
        rows = rows.sort().values
        return rows, self.residual[rows].clone()

    def dense(self, rows: Tensor) -> Tensor:
        """(out, in) the matrix the compressed projection computes with these rows of S kept."""
        w = self.factors[0] if len(self.factors) == 1 else self.factors[0] @ self.factors[1]
        return w.index_add(0, rows, self.residual[rows]) if rows.numel() else w


def compress_projection(weight: Tensor, cov: Tensor | None, rank: int, damp: float, whiten: bool = True
                        ) -> CompressedProjection:
    """weight (out, in), cov (in, in) or None (never routed) -> rank-``rank`` factors and the residual's rows.

    A rank that would not save parameters keeps the matrix dense (then S = 0 exactly).
    """
    out, inp = weight.shape
    if is_dense(rank, out, inp):
        w = weight.float().clone()
        return CompressedProjection((w,), torch.zeros_like(w), torch.zeros(out, dtype=torch.float64))
    chol = whitening(cov if whiten else None, inp, damp)
    a, b = whitened_svd(weight, chol).factors(rank)
    residual = weight.float() - a @ b
    c = torch.eye(inp, dtype=torch.float64) if (cov is None or not whiten) else cov.double()
    row_error = ((residual.double() @ c) * residual.double()).sum(1)  # (out,) s_o C s_o^T
    return CompressedProjection((a, b), residual, row_error)


def select_rows(errors: Sequence[Tensor], total: int) -> list[Tensor]:
    """The ``total`` rows of largest error over all experts of a layer: errors[j] (out,) -> per expert sorted
    row ids (k_j,) with sum k_j = min(total, rows). Ties: lower expert, then lower row."""
    if total < 0:
        raise ValueError(f"total={total} must be >= 0")
    if not errors:
        return []
    flat = torch.cat([e.double() for e in errors])
    sizes = [int(e.numel()) for e in errors]
    owner = torch.repeat_interleave(torch.arange(len(errors)), torch.tensor(sizes))
    offset = torch.cumsum(torch.tensor([0, *sizes[:-1]]), 0)
    order = torch.sort(flat, descending=True, stable=True).indices[:min(total, flat.numel())].tolist()
    picked: list[list[int]] = [[] for _ in errors]
    for i in order:
        j = int(owner[i])
        picked[j].append(i - int(offset[j]))
    return [torch.tensor(sorted(p), dtype=torch.long) for p in picked]


def compressed_params(rank: int, rows: int, out: int, inp: int) -> int:
    """Parameters of one compressed projection: the factors (or the dense matrix) plus the kept rows of S."""
    if is_dense(rank, out, inp):
        return out * inp
    return rank * (out + inp) + rows * inp


def rank_for_share(share: float, sparse: float, out: int, inp: int) -> int:
    """The largest rank whose factors plus ``sparse`` x out rows of S fit ``share`` x out x in parameters.

    Raises ValueError when the rows alone exceed the share."""
    spare = share * out * inp - sparse * out * inp
    if spare < 0:
        raise ValueError(f"the kept rows of S alone ({sparse:.3f} of the matrix) exceed compress_ratio={share}")
    return min(int(spare // (out + inp)), min(out, inp))
