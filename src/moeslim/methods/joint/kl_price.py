"""A measured KL in the experts' squared-error unit (``error_scale="squared"``): the price of the attention /
embedding options (``nonexpert.py``) and of a hold dtype's cast (``cast_price.py``) beside the experts' options.

The experts' options are priced by summed squared block-output errors over each layer's T_l sample tokens; the
attention / embedding options and the cast by a measured mean KL per token. To put both on one scale the experts'
own quantization is measured as a curve: for each width b of ``CURVE_WIDTHS``, every MoE layer's experts
round-to-nearest at b at once (``probe._quant_perturbation``; each layer's error taken on its input as the earlier
layers left it), the model's mean KL per token to the unperturbed model, K_b, and the summed squared error
E_b = sum_l T_l * mse_l(b). A measured KL x is priced at the E where the curve's K equals x: the squared error of
expert quantization that costs the same KL (linear in log K -> log E between points; below the smallest and above
the largest measured K, proportional to x from the nearest point).

Why a curve and not one factor: over the sizes that matter KL is far from proportional to the squared error. On
demo-fine (8 calibration windows, all four MoE layers at once) E/K is 453 (in units of T) at 2 bits, 189 at 4, 86 at
5 and 17 at 8. The previous unit, one factor from 2-bit probes of one layer at a time (mean_l T_l / s_l), priced
the float16 cast (KL 4e-5) at 51.5 against 18.2 for the whole float32 plan at 25 % of the bytes, whose measured KL
is 1.1e-4: 2.8x the plan where it measures 0.4x. The curve prices that cast near the 8-bit point, where a float16
rounding of the weights belongs.
Shapes: N windows, S window length, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from moeslim.methods.joint.probe import _perturbed, _quant_perturbation
from moeslim.methods.joint.solve import SizeOption
from moeslim.models import find_moe_layers

__all__ = ["CURVE_WIDTHS", "SquaredPrice", "squared_price"]

CURVE_WIDTHS = (2, 3, 4, 5, 6, 7, 8)  # from the widest errors the planner offers to those a 16-bit cast makes


@dataclass(frozen=True)
class SquaredPrice:
    """The experts' quantization curve: ``kl`` increasing, ``squared`` the summed squared error at each point."""

    kl: tuple[float, ...]
    squared: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.kl or len(self.kl) != len(self.squared):
            raise ValueError("a price curve needs one squared error per KL, and at least one point")
        if any(k <= 0 or e <= 0 or not (math.isfinite(k) and math.isfinite(e)) for k, e in zip(self.kl, self.squared,
                                                                                                 strict=True)):
            raise ValueError(f"price curve points must be positive and finite: {self.to_dict()}")
        if any(b <= a for a, b in zip(self.kl, self.kl[1:], strict=False)):
            raise ValueError(f"price curve KLs must increase: {list(self.kl)}")

    def __call__(self, kl: float) -> float:
        """The squared error whose expert quantization costs ``kl`` (0 for a KL of 0 or below)."""
        if kl <= 0:
            return 0.0
        if kl <= self.kl[0]:
            return self.squared[0] * kl / self.kl[0]
        if kl >= self.kl[-1]:
            return self.squared[-1] * kl / self.kl[-1]
        return float(np.exp(np.interp(math.log(kl), np.log(self.kl), np.log(self.squared))))

    def to_dict(self) -> dict[str, list[float]]:
        return {"kl": list(self.kl), "squared": list(self.squared)}


def curve_points(points: Sequence[tuple[float, float]]) -> SquaredPrice:
    """(KL, squared error) measurements -> the curve: points that changed nothing dropped, sorted by KL, and a
    point whose KL does not exceed the previous one's dropped (the curve stays a function of KL)."""
    kept: list[tuple[float, float]] = []
    for k, e in sorted((k, e) for k, e in points if k > 0 and e > 0):
        if not kept or k > kept[-1][0]:
            kept.append((k, e))
    if not kept:
        raise ValueError("no width's expert quantization changed the model's output: cannot weigh the attention, "
                         "embedding or cast errors against the experts'; use error_scale='kl'")
    return SquaredPrice(tuple(k for k, _ in kept), tuple(e for _, e in kept))


@torch.no_grad()
def squared_price(model: nn.Module, batches: list[Tensor], refs: list[Tensor],
                  options: Mapping[int, Sequence[SizeOption]], group_size: int, symmetric: bool) -> SquaredPrice:
    """The curve of ``model`` as held on the probe ``batches`` ((B, S) each) with their ``refs`` ((B, S, V) logits of
    ``model``): one forward per width of ``CURVE_WIDTHS`` (every MoE layer perturbed at once); T_l are the
    ``options``' sample token counts (the unit of their errors)."""
    layers = find_moe_layers(model)
    points = []
    for bits in CURVE_WIDTHS:
        kl, mse = _perturbed(model, [(layer, _quant_perturbation(layer, bits, group_size, symmetric))
                                     for layer in layers], batches, refs)
        points.append((kl, sum(options[layer.layer_idx][0].tokens * m for layer, m in zip(layers, mse,
                                                                                             strict=True))))
    return curve_points(points)
