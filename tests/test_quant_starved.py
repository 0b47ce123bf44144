"""MoE calibration for GPTQ: all-token Hessians (``calibrate_all_experts``) and the starved-expert rule.

A starved expert (fewer routed calibration tokens than the group size, or ``min_tokens``) never gets a Hessian from
those few tokens: it is GPTQ'd with all-token Hessians (default) or rounded to nearest, and the applied section says
which, with every expert's routed token count. The checks rebuild the Hessians by hand (x^T x over all tokens) and
compare packed bytes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_scale_quant import _on_threads
from tiny_models import sample_ids, tiny_model

from moeslim.appliers import apply
from moeslim.calibrate.hessians import ExpertHessians, down_hessian
from moeslim.config import ConfigError
from moeslim.methods.quant.config import QuantizeConfig
from moeslim.methods.quant.driver import plan_quantize
from moeslim.methods.quant.fused import LowBitTensor, quantize_fused
from moeslim.methods.quant.transform import quantize_layer_experts
from moeslim.models import find_moe_layers
from moeslim.models.expert_math import expert_intermediate, expert_weight_views

CALIB = sample_ids(0, 4, 24)


def _same(a: LowBitTensor, b: LowBitTensor) -> bool:
    sa, sb = a.to_state_dict("w"), b.to_state_dict("w")
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _same_expert(t: LowBitTensor, e: int, one: LowBitTensor) -> bool:
    """Expert e of ``t`` holds the same codes, scales and zero points as the one-expert tensor ``one``."""
    return all(torch.equal(getattr(t, kind)[e], getattr(one, kind)[0]) for kind in ("codes", "scales", "zeros"))


def _by_hand(layer: Any, e: int, h_up: torch.Tensor, h_down: torch.Tensor, config: QuantizeConfig
             ) -> tuple[LowBitTensor, LowBitTensor]:
    views = expert_weight_views(layer)
    opts = {"transposed": views.transposed, "percdamp": config.damp, "symmetric": config.symmetric,
            "act_order": config.act_order}
    up = quantize_fused(views.up[e: e + 1].detach(), [3], config.group_size, [h_up], "gptq", **opts)
    down = quantize_fused(views.down[e: e + 1].detach(), [3], config.group_size, [h_down], "gptq", **opts)
    return up, down


def _observed(layer: Any, x: torch.Tensor, **kwargs: Any) -> Any:
    obs = ExpertHessians(layer.num_experts, **kwargs)
    obs.observe(layer, x)
    return obs.result()


def test_starved_expert_gets_all_token_hessians_others_their_routed_ones() -> None:
    layer = find_moe_layers(tiny_model("mixtral"))[0]
    x = torch.randn(40, layer.hidden_size, generator=torch.Generator().manual_seed(3))
    config = QuantizeConfig(method="uniform", bits=3, group_size=16, sequential=False)  # starved below 16 tokens
    summary = _observed(layer, x, keep_inputs=True, pooled=True)
    counts = [int(c) for c in summary.counts]
    starved = [e for e, c in enumerate(counts) if c < 16]
    fed = [e for e, c in enumerate(counts) if c >= 16]
    assert starved and fed and summary.tokens == 40
    torch.testing.assert_close(summary.pooled_up, x.T @ x, rtol=1e-5, atol=1e-5)
    packed, fallback = quantize_layer_experts(layer, [3] * 8, summary, config)
    assert fallback.all_tokens == starved and fallback.rtn == []
    views = expert_weight_views(layer)
    for e in starved:  # all-token Hessians: the pooled one, and down on every token's intermediate
        inter = expert_intermediate(layer, x, e).float()
        h_down = down_hessian(layer, x, e, views.up[e].detach(), all_tokens=True).float()
        torch.testing.assert_close(h_down, inter.T @ inter, rtol=1e-5, atol=1e-4)
        up, down = _by_hand(layer, e, summary.pooled_up, h_down, config)
        assert _same_expert(packed.up, e, up) and _same_expert(packed.down, e, down)
    for e in fed:  # routed Hessians, untouched
        up, down = _by_hand(layer, e, summary.up[e], summary.down[e], config)
        assert _same_expert(packed.up, e, up) and _same_expert(packed.down, e, down)
    rtn_config = QuantizeConfig(method="uniform", bits=3, group_size=16, sequential=False, starved="rtn")
    packed_rtn, fallback_rtn = quantize_layer_experts(layer, [3] * 8, summary, rtn_config)
    assert fallback_rtn.rtn == starved and fallback_rtn.all_tokens == []
    rtn = quantize_fused(expert_weight_views(layer).up.detach(), [3] * 8, 16, None, "rtn")
    assert all(torch.equal(packed_rtn.up.codes[e], rtn.codes[e]) for e in starved)


def test_calibrate_all_experts_uses_every_token_for_every_expert() -> None:
    layer = find_moe_layers(tiny_model("qwen3_moe"))[0]
    x = torch.randn(40, layer.hidden_size, generator=torch.Generator().manual_seed(4))
    routed = _observed(layer, x)
    summary = _observed(layer, x, all_tokens=True)
    assert torch.equal(summary.counts, routed.counts)  # counts stay the routed ones (the report)
    assert all(h is summary.pooled_up for h in summary.up)  # one shared (H, H), not E copies
    config = QuantizeConfig(method="uniform", bits=3, group_size=16, sequential=False, calibrate_all_experts=True)
    packed, fallback = quantize_layer_experts(layer, [3] * 8, summary, config)
    assert fallback.all_tokens == list(range(8)) and fallback.rtn == []
    for e in range(8):
        inter = expert_intermediate(layer, x, e).float()
        torch.testing.assert_close(summary.down[e], inter.T @ inter, rtol=1e-5, atol=1e-4)
        up, down = _by_hand(layer, e, summary.pooled_up, summary.down[e], config)
        assert _same_expert(packed.up, e, up) and _same_expert(packed.down, e, down)
    with pytest.raises(ValueError, match="unweighted"):
        ExpertHessians(8, "gate2", all_tokens=True)


def test_apply_states_the_rule_and_counts_and_outputs_stay_routed() -> None:
    model = tiny_model("deepseek_v3")
    layer = find_moe_layers(model)[0]
    layer.router.e_score_correction_bias[5] = -100.0  # expert 5 is never selected
    plan = plan_quantize(model, CALIB, QuantizeConfig(method="uniform", bits=3, group_size=16), "tiny")
    assert plan.summary["min_tokens"] == 16
    assert plan.summary["starved_rule"] == ("experts with fewer than 16 routed calibration tokens: GPTQ with "
                                            "all-token Hessians (round-to-nearest if the layer saw fewer tokens)")
    section = apply(model, plan, calibration=CALIB).config.moeslim["quantize"]
    assert section["starved_rule"] == plan.summary["starved_rule"] and section["rtn_fallback"] == {}
    for idx, counts in section["tokens"].items():
        starved = [e for e, c in enumerate(counts) if c < 16]
        assert section["all_token_fallback"].get(idx, []) == starved
    assert 5 in section["all_token_fallback"][str(layer.layer_idx)]
    assert section["tokens"][str(layer.layer_idx)][5] == 0

    # calibrate_all_experts changes the Hessians only: the calibration forward stays the model's own routing, so
    # with every expert kept (16 bits) the model is untouched and identical to the original.
    kept = tiny_model("qwen3_moe")
    ref = kept(CALIB).logits
    widths = {layer.layer_idx: [16] * layer.num_experts for layer in find_moe_layers(kept)}
    from moeslim.methods.quant.transform import gptq_experts

    results = gptq_experts(kept, widths, CALIB, QuantizeConfig(method="uniform", bits=3, calibrate_all_experts=True))
    assert torch.equal(kept(CALIB).logits, ref)
    routed = gptq_experts(kept, widths, CALIB, QuantizeConfig(method="uniform", bits=3))
    assert results.counts == routed.counts and len(results.counts) == len(widths)  # every layer routed alike
    assert all(t == CALIB.numel() for t in results.tokens.values())


def test_all_token_hessians_split_over_processes_equal_one_process() -> None:
    layer = find_moe_layers(tiny_model("mixtral"))[0]
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(10, layer.hidden_size, generator=gen) for _ in range(4)]
    bits = [3, 16, 2, 3, 4, 3, 16, 2]
    for config, kwargs in ((QuantizeConfig(method="uniform", bits=3, group_size=16, sequential=False),
                            {"keep_inputs": True, "pooled": True}),
                           (QuantizeConfig(method="uniform", bits=3, group_size=16, calibrate_all_experts=True),
                            {"keep_inputs": True, "all_tokens": True, "down": False})):
        one = ExpertHessians(layer.num_experts, **kwargs)
        for x in batches:
            one.observe(layer, x)
        want, want_fallback = quantize_layer_experts(layer, bits, one.result(), config)
        assert want_fallback.all_tokens

        def rank_work(comm: Any, kwargs: dict = kwargs, config: QuantizeConfig = config) -> Any:
            observer = ExpertHessians(layer.num_experts, **kwargs)
            for x in batches[comm.rank::comm.size]:
                observer.observe(layer, x)
            observer.sync(comm)
            return quantize_layer_experts(layer, bits, observer.result(), config, comm)

        for packed, fallback in _on_threads(3, rank_work):
            assert fallback == want_fallback
            assert _same(packed.up, want.up) and _same(packed.down, want.down)


def test_config_refusals() -> None:
    with pytest.raises(ConfigError, match="^min_tokens="):
        QuantizeConfig(min_tokens=0)
    with pytest.raises(ConfigError, match="calibrate_all_experts"):
        QuantizeConfig(calibrate_all_experts=True, weighted_hessian=True)
    with pytest.raises(ConfigError, match="^starved="):
        QuantizeConfig(starved="drop")  # type: ignore[arg-type]
    assert QuantizeConfig(group_size=64).starved_below == 64 and QuantizeConfig(min_tokens=5).starved_below == 5
