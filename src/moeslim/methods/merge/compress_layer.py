"""MC-SMoE's compression stage on one merged layer: covariances of the tokens each merged expert serves, then
low-rank + structured-sparse projections (``compress.py``) with the residual rows chosen across the layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moeslim.methods.merge.compress import (
    CompressedProjection,
    compress_projection,
    compressed_params,
    rank_for_share,
    select_rows,
)
from moeslim.methods.merge.config import MergeConfig
from moeslim.methods.router_fit import RouteFn
from moeslim.models import MoELayer
from moeslim.models.expert_edit import ExpertMatrices, matrices_intermediate

__all__ = ["CompressedExperts", "compress_merged", "served_covariances"]

_DAMP = 0.01  # covariance damping of the whitening, relative to its mean diagonal (as low-rank experts use)

Sparse = tuple[Tensor, Tensor] | None  # (rows (k,) long, values (k, in)) of one stored expert's residual


@dataclass(frozen=True)
class CompressedExperts:
    """K compressed merged experts: per expert its up / down factors ((W,) dense or (A, B), (out, in) orientation)
    and kept residual rows; ``dense`` what they compute as (K, ...) matrices (for losses and overrides)."""

    up: list[tuple[Tensor] | tuple[Tensor, Tensor]]
    down: list[tuple[Tensor] | tuple[Tensor, Tensor]]
    up_sparse: list[Sparse]
    down_sparse: list[Sparse]
    dense: ExpertMatrices
    info: dict[str, Any]


@torch.no_grad()
def served_covariances(layer: MoELayer, experts: ExpertMatrices, x: Tensor, route: RouteFn, weight: Tensor,
                       bias: Tensor | None, slots: list[int] | None) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Per merged expert j the routing-weight^2 weighted input covariances of its two projections on the tokens
    it serves: up (H, H) of the block inputs, down (I, I) of its own activations; None when no token reaches it.

    x (T, H); the router rows ``weight`` (R, H) (+ bias) choose slots through ``route``; slot s computes merged
    expert ``slots[s]`` (None: slot s is expert s), two slots of one group add their routing weights.
    """
    logits = x.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    w, ids = route(logits)  # (T, k)
    merged_ids = ids if slots is None else torch.tensor(slots)[ids]
    gate = torch.zeros(x.shape[0], experts.num_experts, dtype=torch.float64)
    gate.scatter_add_(1, merged_ids, w.double())  # (T, K) each merged expert's total routing weight
    ups: list[Tensor | None] = []
    downs: list[Tensor | None] = []
    for j in range(experts.num_experts):
        served = torch.nonzero(gate[:, j] > 0).flatten()
        if served.numel() == 0:
            ups.append(None)
            downs.append(None)
            continue
        xs, g2 = x[served].double(), gate[served, j].pow(2)[:, None]  # (n, H), (n, 1)
        h = matrices_intermediate(layer, experts, j, x[served]).double()  # (n, I)
        ups.append((xs * g2).T @ xs)
        downs.append((h * g2).T @ h)
    return ups, downs


def _rank(config: MergeConfig, out: int, inp: int) -> int:
    if config.compress_rank is not None:
        return config.compress_rank
    return rank_for_share(float(config.compress_ratio or 1.0), config.compress_sparse, out, inp)


def compress_merged(experts: ExpertMatrices, covariances: tuple[list[Tensor | None], list[Tensor | None]] | None,
                    config: MergeConfig) -> CompressedExperts:
    """Compress the K merged experts (``config.compress_*``); ``covariances`` from ``served_covariances`` (None:
    unwhitened, the authors' plain SVD and magnitude rows)."""
    k = experts.num_experts
    covs = covariances if covariances is not None else ([None] * k, [None] * k)
    kinds: list[tuple[list[CompressedProjection], list[Tensor]]] = []
    info: dict[str, Any] = {}
    params = dense = 0
    for name, weights, cov in (("up", experts.up, covs[0]), ("down", experts.down, covs[1])):
        _, out, inp = weights.shape
        rank = _rank(config, out, inp)
        parts = [compress_projection(weights[j], cov[j], rank, _DAMP, config.compress_whiten) for j in range(k)]
        factored = [j for j, p in enumerate(parts) if len(p.factors) == 2]
        total = round(config.compress_sparse * out * len(factored))
        rows = select_rows([parts[j].row_error for j in factored], total)
        kept = [torch.zeros(0, dtype=torch.long) for _ in range(k)]
        for j, r in zip(factored, rows, strict=True):
            kept[j] = r
        kinds.append((parts, kept))
        info[f"{name}_rank"] = min(rank, min(out, inp))
        info[f"{name}_sparse_rows"] = [int(r.numel()) for r in kept]
        params += sum(compressed_params(rank, int(r.numel()), out, inp) for r in kept)
        dense += k * out * inp
    info["param_ratio"] = params / dense
    (ups, up_rows), (downs, down_rows) = kinds
    merged = ExpertMatrices(up=torch.stack([p.dense(r) for p, r in zip(ups, up_rows, strict=True)]),
                            down=torch.stack([p.dense(r) for p, r in zip(downs, down_rows, strict=True)]),
                            up_bias=experts.up_bias, down_bias=experts.down_bias, norm=experts.norm)
    return CompressedExperts(
        up=[p.factors for p in ups], down=[p.factors for p in downs],
        up_sparse=[p.part(r) for p, r in zip(ups, up_rows, strict=True)],
        down_sparse=[p.part(r) for p, r in zip(downs, down_rows, strict=True)],
        dense=merged, info=info)
