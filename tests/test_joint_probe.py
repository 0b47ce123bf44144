"""The joint planner's KL probes (``methods/joint/probe.py``): the perturbation is the option it stands for."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, sample_ids, tiny_model

from moeslim.appliers import apply
from moeslim.methods.joint import JointConfig, plan_joint
from moeslim.methods.joint.config import MIB
from moeslim.methods.joint.probe import (
    LayerScales,
    _kl,
    _logits,
    _probe,
    _prune_perturbation,
    probe_scales,
    scale_options,
)
from moeslim.methods.joint.solve import SizeOption, min_held_bytes
from moeslim.models import find_moe_layers
from moeslim.plans import Plan, Provenance

IDS = sample_ids(3, 2, 12)


def _model(family: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_model(family)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_prune_probe_is_the_pruned_model(family: str) -> None:
    """The probe's KL per unit error, times its measured error, is the KL of the model pruned in that layer."""
    model = _model(family)
    layer = find_moe_layers(model)[0]
    kept = list(range(layer.top_k, layer.num_experts))
    refs = [_logits(model, IDS)]
    err: list[float] = []
    delta = _prune_perturbation(layer, kept)

    def recording(x: torch.Tensor) -> torch.Tensor:
        d = delta(x)
        err.append(float(d.double().pow(2).sum()) / x.shape[0])
        return d
    scale = _probe(model, layer, [IDS], refs, recording)
    pruned = copy.deepcopy(model)
    plan = Plan(kind="prune", layers={i.layer_idx: (kept if i.layer_idx == layer.layer_idx
                                                     else list(range(i.num_experts)))
                                      for i in find_moe_layers(model)},
                provenance=Provenance.of(model, "tiny", "test", {}, None, None),
                summary={"layout": "compact", "groups": None})
    apply(pruned, plan)
    kl = float(_kl(refs[0], _logits(pruned, IDS)).mean())
    assert kl > 0
    assert scale * err[0] == pytest.approx(kl, rel=1e-4)
    assert next(model.parameters()).is_meta is False  # the hook is gone: the model is unchanged
    torch.testing.assert_close(_logits(model, IDS), refs[0])


def test_scales_are_positive_and_weigh_the_options() -> None:
    model = _model("mixtral")
    layers = find_moe_layers(model)
    options = {layer.layer_idx: [SizeOption(tuple(range(k)), 2.0 * (layer.num_experts - k), np.ones((k, 2)),
                                            np.ones(k) / k, tokens=10)
                                 for k in range(layer.top_k, layer.num_experts + 1)] for layer in layers}
    scales = probe_scales(model, IDS, options, (2, 16), 16, False, windows=2, batch_size=2)
    assert all(s.prune > 0 and s.quant > 0 for s in scales.values())
    fixed = {idx: LayerScales(prune=3.0, quant=0.5) for idx in options}
    scaled = scale_options(options, fixed, {idx: 10 for idx in options})
    for idx, opts in scaled.items():
        for old, new in zip(options[idx], opts, strict=True):
            assert new.prune_err == pytest.approx(old.prune_err * 0.3)
            np.testing.assert_allclose(new.quant_err, old.quant_err * 0.05)
            assert new.kept == old.kept


@pytest.mark.parametrize("family", FAMILIES)
def test_kl_scaled_plan_respects_the_target(family: str) -> None:
    """The probes run on every hand-configured family's block (tuple outputs, shared experts) and the plan fits."""
    model = _model(family)
    layer = find_moe_layers(model)[0]
    min_keep = max(layer.top_k, layer.num_experts - 2)
    base = JointConfig(target_ratio=0.99, min_keep=min_keep, quantizer="rtn").check_model(model)
    low = min_held_bytes(base.base, base.sizes, dict.fromkeys(base.sizes, min_keep), (2, 3, 4, 8, 16))
    target = (base.base + low) // 2
    config = JointConfig(target_mib=target / MIB, min_keep=min_keep, quantizer="rtn", error_scale="kl",
                         probe_windows=2)
    plan = plan_joint(model, sample_ids(0, 4, 16), config, "tiny")
    assert plan.summary["error_scale"] == "kl"
    assert plan.summary["held_bytes"] <= target
    assert plan.summary["estimated_error"] >= 0
