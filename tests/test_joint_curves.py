"""The joint planner's quantization distances (``methods/joint/curves.py``): cross-fitted GPTQ errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import tiny_model

from moeslim.calibrate import ExpertOutputSample
from moeslim.methods.joint.curves import quant_distances, quantized_slices
from moeslim.methods.quant.gptq import gptq_quantize
from moeslim.models import find_moe_layers
from moeslim.models.expert_math import expert_forward, expert_weight_views

WIDTHS = (2, 3, 16)


def _sample(family: str, tokens: int, seed: int = 0) -> tuple[torch.nn.Module, ExpertOutputSample]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(family)
    layer = find_moe_layers(model)[0]
    hidden = layer.router_weight.shape[1]
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sample = ExpertOutputSample(x=x, logits=layer.router_logits(x), outputs=layer.expert_outputs(x))
    return model, sample


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_each_folds_distance_comes_from_gptq_on_the_other_fold(family: str) -> None:
    """folds=2: token t's distance is that of the expert GPTQ'd on the routed tokens of the other parity only
    (the starved rule on the expert's whole routed count), recomputed here by hand."""
    model, sample = _sample(family, 96)
    layer = find_moe_layers(model)[0]
    group = 8  # below most experts' routed counts: the routed-token Hessians are the ones used
    with torch.no_grad():
        dist = quant_distances(layer, sample, WIDTHS, group, False, "gptq", folds=2)
        _, ids = layer.route(sample.logits)
        parity = torch.arange(sample.tokens) % 2
        for e in range(sample.outputs.shape[1]):
            routed = (ids == e).any(dim=1)
            for f in (0, 1):
                judged = parity == f
                rows = routed & ~judged if int(routed.sum()) >= group and bool((routed & ~judged).any()) else ~judged
                up, down = quantized_slices(layer, sample.x, rows, e, 2, group, False, "gptq")
                want = (sample.outputs[judged, e] - expert_forward(layer, sample.x[judged], e, up=up, down=down))
                torch.testing.assert_close(dist[judged, e, 0], want.double().pow(2).sum(-1), rtol=1e-4, atol=1e-7)
    assert bool((dist[..., 2] == 0).all())  # 16 bits: untouched


def test_in_sample_gptq_is_optimistic_and_rtn_ignores_folds() -> None:
    """GPTQ judged on the tokens it fitted errs less than judged on tokens it did not fit (a fit's in-sample
    residual), which is why the planner cross-fits; round-to-nearest fits nothing, so folds change nothing."""
    model, sample = _sample("mixtral", 64, seed=1)
    layer = find_moe_layers(model)[0]
    with torch.no_grad():
        inside = quant_distances(layer, sample, WIDTHS, 8, False, "gptq", folds=1)
        crossed = quant_distances(layer, sample, WIDTHS, 8, False, "gptq", folds=2)
        _, ids = layer.route(sample.logits)
        routed = torch.stack([(ids == e).any(dim=1) for e in range(sample.outputs.shape[1])], dim=1)  # (T, E)
        # only routed tokens count (the planner weighs each distance by the squared gate)
        assert float(inside[routed][:, :2].sum()) < float(crossed[routed][:, :2].sum())
        torch.testing.assert_close(quant_distances(layer, sample, WIDTHS, 8, False, "rtn", folds=1),
                                   quant_distances(layer, sample, WIDTHS, 8, False, "rtn", folds=2))
    with pytest.raises(ValueError, match="folds=0"):
        quant_distances(layer, sample, WIDTHS, 8, False, "gptq", folds=0)


def test_act_order_reaches_the_planners_gptq() -> None:
    """``act_order`` (the planner's default, as apply's) is GPTQ's static-group column order: the expert's up
    projection equals gptq_quantize with act_order on its routed tokens' Hessian, and differs from the plain
    order, so the options are priced by the quantizer apply runs."""
    model, sample = _sample("qwen3_moe", 96, seed=2)
    layer = find_moe_layers(model)[0]
    views = expert_weight_views(layer)
    rows = torch.ones(sample.tokens, dtype=torch.bool)
    x = sample.x.float()
    with torch.no_grad():
        up, _ = quantized_slices(layer, sample.x, rows, 0, 2, 8, False, "gptq", act_order=True)
        plain, _ = quantized_slices(layer, sample.x, rows, 0, 2, 8, False, "gptq")
        mat = views.up[0].float().T if views.transposed else views.up[0].float()
        want = gptq_quantize(mat, x.T @ x, 2, 8, scale_dtype=torch.float16, act_order=True).weight
        torch.testing.assert_close(up.float(), want.T if views.transposed else want)
        assert not torch.equal(up, plain)
        assert not torch.equal(quant_distances(layer, sample, WIDTHS, 8, False, "gptq", act_order=True),
                               quant_distances(layer, sample, WIDTHS, 8, False, "gptq"))
