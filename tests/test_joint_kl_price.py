"""A measured KL in the experts' squared-error unit (``methods/joint/kl_price.py``): the curve's points are the
model with every expert quantized, and a KL is priced on the curve between them."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from tiny_models import sample_ids, tiny_model

from moeslim.methods.joint.kl_price import CURVE_WIDTHS, SquaredPrice, curve_points, squared_price
from moeslim.methods.joint.probe import _kl, _logits
from moeslim.methods.joint.solve import SizeOption
from moeslim.methods.quant.driver import rtn_slice
from moeslim.models import find_moe_layers
from moeslim.models.expert_math import expert_weight_views

IDS = sample_ids(5, 2, 12)


def test_a_kl_is_priced_between_the_curves_points_in_log_log() -> None:
    curve = SquaredPrice(kl=(1e-4, 1e-3, 1e-2), squared=(10.0, 50.0, 100.0))
    assert curve(1e-4) == pytest.approx(10.0) and curve(1e-3) == pytest.approx(50.0)
    assert curve(math.sqrt(1e-4 * 1e-3)) == pytest.approx(math.sqrt(10.0 * 50.0))
    assert curve(1e-5) == pytest.approx(1.0)  # below the curve: proportional to the smallest point
    assert curve(1e-1) == pytest.approx(1000.0)  # above it: proportional to the largest
    assert curve(0.0) == 0.0 and curve(-1e-9) == 0.0
    prices = [curve(k) for k in np.geomspace(1e-6, 1.0, 50)]
    assert all(b > a for a, b in zip(prices, prices[1:], strict=False))


def test_points_that_change_nothing_or_fold_back_are_dropped() -> None:
    curve = curve_points([(2e-3, 40.0), (0.0, 0.0), (1e-4, 2.0), (2e-3, 45.0), (5e-4, 9.0)])
    assert curve.kl == (1e-4, 5e-4, 2e-3) and curve.squared == (2.0, 9.0, 40.0)
    with pytest.raises(ValueError, match="error_scale='kl'"):
        curve_points([(0.0, 1.0), (1e-3, 0.0)])
    with pytest.raises(ValueError, match="increase"):
        SquaredPrice(kl=(1e-3, 1e-4), squared=(1.0, 2.0))


def _quantized(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for layer in find_moe_layers(out):
            views = expert_weight_views(layer)
            for e in range(layer.num_experts):
                views.up[e].copy_(rtn_slice(views.up[e], bits, 16, views.transposed))
                views.down[e].copy_(rtn_slice(views.down[e], bits, 16, views.transposed))
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_the_curves_kls_are_the_model_with_every_expert_quantized(family: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(family)
    layers = find_moe_layers(model)
    options = {layer.layer_idx: [SizeOption(tuple(range(layer.num_experts)), 0.0, np.ones((layer.num_experts, 1)),
                                            np.ones(layer.num_experts), tokens=24)] for layer in layers}
    refs = [_logits(model, IDS)]
    curve = squared_price(model, [IDS], refs, options, 16, False)
    measured = sorted(float(_kl(refs[0], _logits(_quantized(model, b), IDS)).mean()) for b in CURVE_WIDTHS)
    assert len(curve.kl) == len(CURVE_WIDTHS)
    np.testing.assert_allclose(curve.kl, measured, rtol=1e-3)
    # wider experts err less: the squared error falls with the KL
    assert all(b > a for a, b in zip(curve.squared, curve.squared[1:], strict=False))
    torch.testing.assert_close(_logits(model, IDS), refs[0])  # the probes' hooks are gone
