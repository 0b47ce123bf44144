"""Dynamic skipping: threshold maths, the ExpertsInterface runtime, plans, and composition with pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, sample_ids, tiny_model

from moeslim.appliers.prune import apply_prune
from moeslim.appliers.skip import apply_skip
from moeslim.config import ConfigError
from moeslim.methods.prune import PruneConfig, plan_prune
from moeslim.methods.skip import SkipConfig, calibrate_beta, keep_mask, plan_skip, rescale_kept, skip_rates
from moeslim.models import find_moe_layers
from moeslim.plans import Plan
from moeslim.runtime.odp import install_skip_section
from moeslim.runtime.skipping import (
    calls_per_token_per_layer,
    counters,
    install_skipping,
    reset_counters,
    uninstall_skipping,
)

IDS = sample_ids(seed=3, batch=8, seq=32)  # 256 tokens per layer


# -- pure threshold maths ----------------------------------------------------------------------------------
def test_top2_rule_and_rescale() -> None:
    w = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])
    keep = keep_mask(w, beta=0.5, rule="top2")  # skip when w2 < 0.5 w1
    assert keep.tolist() == [[True, False], [False, True], [True, True]]
    torch.testing.assert_close(rescale_kept(w, keep), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
    # without renormalisation the remaining expert gets the token's whole top-k weight
    torch.testing.assert_close(rescale_kept(w * 0.5, keep), torch.tensor([[0.5, 0.0], [0.0, 0.5], [0.25, 0.25]]))
    assert keep_mask(w, 0.0, "top2").all()


def test_topk_rule_keeps_smallest_sufficient_prefix() -> None:
    w = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.25, 0.3, 0.4]])
    # beta = 0.25: row 0 tails 0.5, 0.2, 0.05 -> prefix of 2 (0.2 < 0.25); row 1 sorted 0.4,0.3,0.25,0.05 -> tails
    # 0.6, 0.3, 0.05 -> prefix of 3.
    keep = keep_mask(w, 0.25, "topk")
    assert keep.tolist() == [[True, True, False, False], [False, True, True, True]]
    assert keep_mask(w, 0.0, "topk").all()
    # k = 2: equivalent to the top2 rule with beta / (1 - beta)
    w2 = torch.rand(500, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep_mask(w2, 0.3, "topk"), keep_mask(w2, 0.3 / 0.7, "top2"))


def test_calibrated_beta_skips_the_requested_share() -> None:
    w = torch.rand(1001, 2, generator=torch.Generator().manual_seed(1)).sort(-1, descending=True).values
    for q in (0.25, 0.5, 0.8):
        for rule in ("top2", "topk"):
            rate = skip_rates(w, calibrate_beta(w, rule, q), rule)["token_skip_rate"]
            assert abs(rate - q) < 0.01


# -- runtime on tiny models --------------------------------------------------------------------------------
def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_beta_zero_reproduces_original(family: str) -> None:
    model = tiny_model(family)
    ids = IDS[:2]
    reference = _logits(model, ids)
    install_skipping(model, {layer.layer_idx: 0.0 for layer in find_moe_layers(model)})
    torch.testing.assert_close(_logits(model, ids), reference, rtol=1e-6, atol=1e-6)
    for layer in find_moe_layers(model):
        c = layer.experts.moeslim_counters
        assert c["tokens"] == ids.numel() and c["expert_calls"] == ids.numel() * layer.top_k
    uninstall_skipping(model)
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_forward_equals_manual_masked_combination(family: str) -> None:
    model = tiny_model(family)
    layer = find_moe_layers(model)[0]
    x = torch.randn(40, layer.hidden_size, generator=torch.Generator().manual_seed(0))
    weights, ids = layer.route(layer.router_logits(x))
    keep = keep_mask(weights, 0.6, "top2")
    assert 0 < int((~keep).sum()) < 40
    manual = layer.combine(layer.expert_outputs(x), rescale_kept(weights, keep), ids)
    install_skipping(model, {layer.layer_idx: 0.6})
    with torch.no_grad():
        got = layer.experts(x, ids, weights)
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-6)
    assert layer.experts.moeslim_counters["expert_calls"] == int(keep.sum())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_median_beta_skips_about_half(family: str, tmp_path) -> None:
    model = tiny_model(family)
    reference = _logits(model)
    plan = plan_skip(model, IDS, SkipConfig(rule="top2", quantile=0.5), model_name=family)
    assert plan.kind == "skip" and all(set(v) == {"beta"} for v in plan.layers.values())
    loaded = Plan.load(plan.save(tmp_path / "skip.json"))
    section = apply_skip(model, loaded)["skip"]
    assert section["rule"] == "top2" and set(section["betas"]) == {str(i) for i in plan.layers}
    reset_counters(model)
    skipped = _logits(model)
    tokens = IDS.numel()
    for idx, c in counters(model).items():
        skipped_calls = tokens * 2 - c["expert_calls"]
        assert abs(skipped_calls / tokens - 0.5) < 0.03, (idx, skipped_calls)
        assert abs(plan.summary["layers"][str(idx)]["token_skip_rate"] - 0.5) < 0.03
    assert calls_per_token_per_layer(model) < 1.55
    assert not torch.allclose(skipped, reference)
    # re-installing from the config section gives the same model
    fresh = tiny_model(family)
    install_skip_section(fresh, section)
    torch.testing.assert_close(_logits(fresh), skipped, rtol=0, atol=0)


def test_skip_composes_with_pruning() -> None:
    model = tiny_model("mixtral")
    apply_prune(model, plan_prune(model, IDS, PruneConfig(keep=6)))
    plan = plan_skip(model, IDS)
    apply_skip(model, plan)
    reset_counters(model)
    _logits(model)
    assert calls_per_token_per_layer(model) < 1.6
    assert all(layer.num_experts == 6 for layer in find_moe_layers(model))


def test_skip_config_validation() -> None:
    with pytest.raises(ConfigError, match="rule"):
        SkipConfig(rule="median")
    with pytest.raises(ConfigError, match="quantile"):
        SkipConfig(quantile=1.5)
    with pytest.raises(ValueError, match="not MoE layers"):
        install_skipping(copy.deepcopy(tiny_model("qwen3_moe")), {0: 0.5})  # layer 0 of qwen3 tiny is dense


def test_unsupported_experts_module_gets_a_clear_error() -> None:
    from types import SimpleNamespace

    from torch import nn

    from moeslim.runtime.skipping import SkippingUnsupportedError, _check_supported

    class PlainExperts(nn.Module):  # not dispatched through transformers' ExpertsInterface
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states

    fake = SimpleNamespace(experts=PlainExperts(), family=SimpleNamespace(name="custom", skip_blocker=""), layer_idx=0)
    with pytest.raises(SkippingUnsupportedError, match="Supported: mixtral"):
        _check_supported([fake])
