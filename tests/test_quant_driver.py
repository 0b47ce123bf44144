"""PMQ driver: factors, Hessian observer, allocation budgets, fallbacks, config validation, plan JSON."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from tiny_models import FAMILIES, sample_ids, tiny_model

from moeslim.appliers import apply
from moeslim.calibrate.hessians import ExpertHessians
from moeslim.config import ConfigError
from moeslim.methods.quant.driver import QuantizeConfig, plan_bits, plan_quantize
from moeslim.methods.quant.factors import layer_factors, routed_frequency, routing_weight_sum
from moeslim.models import find_moe_layers
from moeslim.models.expert_math import expert_forward, expert_intermediate, expert_weight_views
from moeslim.plans import Plan, PlanError

CALIB = sample_ids(0, 4, 24)


FAST = {"group_size": 16, "quantizer": "rtn"}  # allocation tests need no GPTQ pass


@pytest.mark.parametrize("family", [*FAMILIES, "ergo"])  # ergo: a norm row per expert after down_proj
def test_expert_forward_matches_experts_module(family: str) -> None:
    layer = find_moe_layers(tiny_model(family))[0]
    x = torch.randn(6, layer.hidden_size, generator=torch.Generator().manual_seed(0))
    ref = layer.expert_outputs(x)  # (T, E, H)
    for e in range(layer.num_experts):
        torch.testing.assert_close(expert_forward(layer, x, e), ref[:, e], rtol=0, atol=1e-6)
    views = expert_weight_views(layer)
    inter = expert_intermediate(layer, x, 0)
    n_in_down = views.down.shape[1] if views.transposed else views.down.shape[2]
    assert inter.shape == (6, n_in_down)


def test_factors_hand_checked() -> None:
    # 4 tokens, 3 experts, top-2, H = 2. Expert 2 is never routed.
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1], [0.7, 0.3]])  # renormalised top-2
    # raw softmax over the 3 experts (before renormalisation); expert 2 takes the rest of the mass
    probs = torch.tensor([[0.48, 0.32, 0.2], [0.4, 0.4, 0.2], [0.08, 0.72, 0.2], [0.56, 0.24, 0.2]])
    outputs = torch.zeros(4, 3, 2)
    outputs[:, 0] = 1.0
    outputs[:, 1] = 2.0
    phi, counts = routed_frequency(ids, 3)
    assert counts.tolist() == [4, 4, 0]
    assert phi.tolist() == [0.5, 0.5, 0.0]
    sums = routing_weight_sum(probs, ids)
    assert sums.tolist() == pytest.approx([0.48 + 0.4 + 0.08 + 0.56, 0.32 + 0.4 + 0.72 + 0.24, 0.0])

    # "quantized" expert output = original - delta(bits): error halves with every extra bit
    def quantized_output(e: int, bits: int, rows: torch.Tensor) -> torch.Tensor:
        return outputs[rows, e] - 2.0 ** (-bits)

    f = layer_factors(outputs, weights, ids, probs, quantized_output, (1, 2, 16))
    assert f.weight_sum.tolist() == pytest.approx(sums.tolist())
    assert f.weight.tolist() == pytest.approx([1.52 / 4, 1.68 / 4, 0.0])  # the paper's mean w_i
    assert f.to_dict()["weight_sum"] == pytest.approx(sums.tolist())
    gate0 = torch.tensor([0.6, 0.5, 0.1, 0.7])
    for j, bits in enumerate((1, 2)):
        expected = 2.0 ** (-bits) * math.sqrt(2 * float((gate0**2).sum()))
        assert float(f.err[0, j]) == pytest.approx(expected)
    assert f.err[:, 2].tolist() == [0.0, 0.0, 0.0]  # 16 bits: unchanged
    assert f.err[2].tolist() == [0.0, 0.0, 0.0]  # never routed: F does not change


def test_rtn_errors_grow_as_bits_shrink() -> None:
    model = tiny_model("mixtral")
    config = QuantizeConfig(method="pmq", bits=2.0, candidates=(1, 2, 3, 4), **FAST)
    plan = plan_quantize(model, CALIB, config, "tiny")
    for entry in plan.summary["layers"].values():
        err = torch.tensor(entry["factors"]["err"])  # (E, J), widths ascending
        routed = torch.tensor(entry["factors"]["counts"]) > 0
        assert bool((err[routed, :-1] > err[routed, 1:]).all())
        assert entry["objective"] > 0


def test_hessian_observer_matches_manual() -> None:
    layer = find_moe_layers(tiny_model("qwen3_moe"))[0]
    x = torch.randn(20, layer.hidden_size, generator=torch.Generator().manual_seed(1))
    obs = ExpertHessians(layer.num_experts)
    obs.observe(layer, x[:7])
    obs.observe(layer, x[7:])
    result = obs.result()
    weights, ids = layer.route(layer.router_logits(x))
    for e in range(layer.num_experts):
        rows = (ids == e).any(dim=1)
        assert int(result.counts[e]) == int(rows.sum())
        if not rows.any():
            assert result.up[e] is None
            continue
        torch.testing.assert_close(result.up[e], x[rows].T @ x[rows], rtol=1e-5, atol=1e-5)
        inter = expert_intermediate(layer, x[rows], e)
        torch.testing.assert_close(result.down[e], inter.T @ inter, rtol=1e-5, atol=1e-5)
    weighted = ExpertHessians(layer.num_experts, "gate2")
    weighted.observe(layer, x)
    e = int(ids[0, 0])
    rows = (ids == e).any(dim=1)
    g = (weights * (ids == e)).sum(1)[rows]
    torch.testing.assert_close(weighted.result().up[e], (x[rows] * (g**2)[:, None]).T @ x[rows],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        ExpertHessians(4, "bogus")  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("bits", [2.0, 2.5, 1.75])
def test_pmq_plan_meets_budget_exactly(family: str, bits: float) -> None:
    model = tiny_model(family)
    plan = plan_quantize(model, CALIB, QuantizeConfig(method="pmq", bits=bits, **FAST), "tiny")
    for entry in plan.layers.values():
        assert sum(entry["bits"]) == len(entry["bits"]) * bits
        assert set(entry["bits"]) <= {1, 2, 3}
    assert plan.summary["avg_bits"] == pytest.approx(bits)
    assert plan.summary["avg_bits_with_overhead"] > bits


def test_global_authors_and_random_budgets() -> None:
    model = tiny_model("mixtral")
    for config in (
        QuantizeConfig(method="pmq", bits=2.25, scope="global", **FAST),
        QuantizeConfig(method="pmq", bits=2.5, cost="authors", **FAST),
        QuantizeConfig(method="random", bits=2.5, seed=3, **FAST),
    ):
        bits, _ = plan_bits(model, CALIB, config)
        total = sum(len(w) for w in bits.values())
        assert sum(sum(w) for w in bits.values()) == total * config.bits
        if config.cost == "authors":
            assert all(3 in w and 2 in w for w in bits.values())
    uniform, _ = plan_bits(model, None, QuantizeConfig(method="uniform", bits=3, **FAST))
    assert all(w == [3] * 8 for w in uniform.values())


def test_bits_16_is_identity() -> None:
    model = tiny_model("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(CALIB).logits
    plan = plan_quantize(model, CALIB, QuantizeConfig(method="uniform", bits=16), "tiny")
    apply(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(CALIB).logits, ref)
    assert model.config.moeslim["quantize"]["avg_bits"] == 16.0
    assert model.config.moeslim["quantize"]["quantizer"] == "none"


def test_unrouted_expert_falls_back_to_rtn_and_is_listed() -> None:
    model = tiny_model("deepseek_v3")
    layer = find_moe_layers(model)[0]
    layer.router.e_score_correction_bias[5] = -100.0  # expert 5 is never selected
    config = QuantizeConfig(method="uniform", bits=3, group_size=16, min_tokens=1, starved="rtn")
    plan = plan_quantize(model, CALIB, config, "tiny")
    assert "rtn_fallback" not in plan.summary  # known only once GPTQ ran, in apply
    assert plan.summary["starved_rule"] == "experts with fewer than 1 routed calibration tokens: round-to-nearest"
    section = apply(model, plan, calibration=CALIB).config.moeslim["quantize"]
    assert section["quantizer"] == "gptq"
    assert section["rtn_fallback"] == {str(layer.layer_idx): [5]} and section["all_token_fallback"] == {}
    assert section["min_tokens"] == 1 and section["tokens"][str(layer.layer_idx)][5] == 0
    # The fallback expert holds exactly its round-to-nearest codes; a routed one does not.
    from moeslim.methods.quant.transform import rtn_experts
    from moeslim.runtime.lowbit_io import lowbit_tensors

    fresh = find_moe_layers(tiny_model("deepseek_v3"))[0]
    rtn = rtn_experts(fresh, [3] * 8, 16)
    packed = lowbit_tensors(model)[f"model.layers.{layer.layer_idx}.mlp.experts.gate_up_proj"]
    assert torch.equal(packed.codes[5], rtn.up.codes[5])
    assert not torch.equal(packed.codes[0], rtn.up.codes[0])
    # min_tokens above any count: every expert falls back, and the applied section says so
    everyone = tiny_model("mixtral")
    plan = plan_quantize(everyone, CALIB, QuantizeConfig(method="uniform", bits=3, group_size=16, min_tokens=10**6,
                                                         starved="rtn"), "tiny")
    section = apply(everyone, plan, calibration=CALIB).config.moeslim["quantize"]
    assert section["rtn_fallback"] and all(v == list(range(8)) for v in section["rtn_fallback"].values())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "awq"}, "method"),
        ({"method": "uniform", "bits": 2.5}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"bits": -1}, "bits"),
        ({"candidates": (1, 2, 2)}, "candidates"),
        ({"candidates": (0, 2)}, "candidates"),
        ({"cost": "gurobi"}, "cost"),
        ({"scope": "model"}, "scope"),
        ({"quantizer": "awq"}, "quantizer"),
        ({"group_size": 0}, "group_size"),
        ({"damp": 0.0}, "damp"),
        ({"alpha": -1.0}, "alpha"),
        ({"quantize_attention": 12}, "quantize_attention"),
        ({"propagate": "both"}, "propagate"),
        ({"token_fraction": 0.0}, "token_fraction"),
        ({"min_tokens": -1}, "min_tokens"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}="):
        QuantizeConfig(**kwargs)


def test_config_lists_and_stage_parsing() -> None:
    from moeslim.workflows.stages import parse_stage

    stage = parse_stage({"quantize": {"method": "pmq", "bits": 2.5, "candidates": [1, 2, 3]}}, "recipe[0]")
    assert stage.config.candidates == (1, 2, 3)
    with pytest.raises(ConfigError, match="authors' top-two"):
        QuantizeConfig(method="pmq", bits=1.0, cost="authors").check_model(tiny_model("mixtral"))


def _packed(model: torch.nn.Module) -> dict:
    from moeslim.runtime.lowbit_io import lowbit_tensors

    return lowbit_tensors(model)


def test_gptq_plan_json_round_trip_gives_the_same_packed_experts(tmp_path) -> None:
    model = tiny_model("mixtral")
    plan = plan_quantize(model, CALIB, QuantizeConfig(method="pmq", bits=2.5, group_size=16), "tiny")
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.to_dict() == plan.to_dict()
    assert "factors" in plan.summary["layers"]["0"] and plan.summary["calibration"]["windows"] == CALIB.shape[0]
    # In process (the plan object) and from JSON on a fresh model: the same GPTQ codes, scales and zeros.
    apply(model, plan, calibration=CALIB)
    fresh = tiny_model("mixtral")
    section = apply(fresh, loaded, calibration=CALIB).config.moeslim["quantize"]
    assert section["quantizer"] == "gptq"
    assert section["bits"] == {str(k): v["bits"] for k, v in plan.layers.items()}
    ours, theirs = _packed(model), _packed(fresh)
    assert sorted(ours) == sorted(theirs) and ours
    for name, packed in ours.items():
        other = theirs[name]
        assert packed.bits == other.bits
        for e in range(len(packed.bits)):
            assert torch.equal(packed.codes[e], other.codes[e]), (name, e)
            assert torch.equal(packed.scales[e], other.scales[e]) and torch.equal(packed.zeros[e], other.zeros[e])
    # GPTQ, not RTN: at least one expert's codes differ from round-to-nearest at the same widths.
    from moeslim.methods.quant.transform import rtn_experts

    layer = find_moe_layers(tiny_model("mixtral"))[0]
    rtn = rtn_experts(layer, plan.layers[layer.layer_idx]["bits"], 16)
    gptq = ours[f"model.layers.{layer.layer_idx}.mlp.experts.gate_up_proj"]
    assert any(not torch.equal(gptq.codes[e], rtn.up.codes[e]) for e in range(8))


def test_gptq_plan_without_calibration_refuses_never_rounds() -> None:
    model = tiny_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_quantize(model, CALIB, QuantizeConfig(method="uniform", bits=3, group_size=16), "tiny")
    with pytest.raises(PlanError, match=r"uses GPTQ.*calibration=") as err:
        apply(model, plan)
    assert "quantizer='rtn'" in str(err.value)
    # Other windows (or another order) than the plan's: refused, with what differs.
    with pytest.raises(ValueError, match="hash"):
        apply(model, plan, calibration=sample_ids(5, 4, 24))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-applied
    assert "moeslim" not in model.config.to_dict() or not model.config.to_dict()["moeslim"]
    # planning a GPTQ plan with no data to record is refused as well
    with pytest.raises(ValueError, match="quantizer='gptq' needs calibration"):
        plan_quantize(model, None, QuantizeConfig(method="uniform", bits=3), "tiny")
    # an RTN plan needs no data and says what it did
    rtn = plan_quantize(model, None, QuantizeConfig(method="uniform", bits=3, group_size=16, quantizer="rtn"), "tiny")
    assert apply(model, rtn).config.moeslim["quantize"]["quantizer"] == "rtn"


def test_raw_softmax_routing_factor() -> None:
    from moeslim.methods.quant.driver import pmq_factors

    model = tiny_model("mixtral")  # softmax -> top-2 -> renormalise
    factors = pmq_factors(model, CALIB, QuantizeConfig(method="pmq", bits=2.5, **FAST))
    layer = find_moe_layers(model)[0]
    # the first layer's block inputs: embeddings -> input norm -> attention -> post-attention norm
    captured: list[torch.Tensor] = []
    handle = layer.block.register_forward_hook(lambda _m, args, _o: captured.append(args[0].reshape(-1, 32)))
    with torch.no_grad():
        model(CALIB)
    handle.remove()
    logits = layer.router_logits(captured[0])
    probs = torch.softmax(logits.double(), dim=-1)  # (T, E)
    weights, ids = layer.route(logits)
    expected = torch.zeros(8, dtype=torch.float64)
    renormalised = torch.zeros(8, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for slot in range(2):
            expected[ids[t, slot]] += probs[t, ids[t, slot]]
            renormalised[ids[t, slot]] += weights[t, slot]
    f = factors[layer.layer_idx]
    torch.testing.assert_close(f.weight_sum, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(f.weight_sum, renormalised, atol=1e-3)  # not the renormalised top-k weights


def test_pipeline_stage_quantizes_with_gptq_once(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moeslim.appliers.quantize as applier
    from moeslim.data.calibration_set import CalibrationSet
    from moeslim.workflows.stages import parse_stage, run_stage

    calls: list[int] = []
    real = applier.gptq_experts
    monkeypatch.setattr(applier, "gptq_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model("deepseek_v3")
    stage = parse_stage({"quantize": {"method": "pmq", "bits": 2.5, "group_size": 16}}, "recipe[0]")
    plan = run_stage(model, stage, CalibrationSet(CALIB, "ids", "h"), "tiny", tmp_path / "plan.json")
    assert calls == [1]  # plan (no GPTQ) then apply (GPTQ once)
    section = model.config.moeslim
    assert section["quantize"]["quantizer"] == "gptq"
    assert section["applied"][-1]["kind"] == "quantize"
    assert Plan.load(tmp_path / "plan.json").layers == plan.layers


def test_sequential_down_hessians() -> None:
    from moeslim.calibrate.hessians import down_hessians
    from moeslim.methods.quant.transform import quantize_layer_experts

    layer = find_moe_layers(tiny_model("mixtral"))[0]
    x = torch.randn(30, layer.hidden_size, generator=torch.Generator().manual_seed(2))
    obs = ExpertHessians(layer.num_experts, keep_inputs=True)
    obs.observe(layer, x)
    summary = obs.result()
    assert torch.equal(summary.inputs, x)
    same = down_hessians(layer, x, layer.experts.gate_up_proj.detach())
    for a, b in zip(same, summary.down, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5)
    config = QuantizeConfig(method="uniform", bits=2, group_size=16, min_tokens=1, starved="rtn")
    seq, _ = quantize_layer_experts(layer, [2] * 8, summary, config)
    plain, _ = quantize_layer_experts(layer, [2] * 8, replace(summary, inputs=None), config)
    assert torch.equal(seq.up.dequantize(), plain.up.dequantize())  # gate_up: same Hessian
    assert not torch.equal(seq.down.dequantize(), plain.down.dequantize())  # down: quantized inputs


def test_precomputed_factors_give_the_same_plan() -> None:
    from moeslim.methods.quant.driver import pmq_factors

    model = tiny_model("mixtral")
    config = QuantizeConfig(method="pmq", bits=2.5, **FAST)
    factors = pmq_factors(model, CALIB, config)
    assert plan_bits(model, None, config, factors=factors)[0] == plan_bits(model, CALIB, config)[0]
    with pytest.raises(ValueError, match="candidates"):
        plan_bits(model, None, QuantizeConfig(method="pmq", bits=2.5, candidates=(2, 3), **FAST), factors=factors)


def test_negligible_costs_still_fill_the_budget() -> None:
    from moeslim.methods.quant.driver import _allocate_pmq
    from moeslim.methods.quant.factors import LayerFactors

    # Experts 0-5 barely routed (cost ~0 at every width): a solver with a tolerance may leave bits unused; the
    # exact allocator uses them (equal costs -> more bits).
    err = torch.tensor([[1e-9, 0.0, 0.0]] * 6 + [[1e3, 4e2, 1e2], [2e3, 5e2, 2e2]], dtype=torch.float64)
    counts = torch.tensor([1, 0, 0, 0, 0, 0, 500, 500])
    freq = counts.double() / counts.sum()
    f = LayerFactors(freq, 0.5 * counts.double(), err, (1, 2, 3), counts)
    for cost in ("paper", "authors"):
        bits = _allocate_pmq({0: f}, {0: 8}, QuantizeConfig(method="pmq", bits=2.5, cost=cost, **FAST))[0]
        assert sum(bits) == 20 and bits[6] == bits[7] == 3


def test_gptq_plan_applies_with_its_recorded_act_order() -> None:
    """act-order is on by default and recorded; a plan recording it off, or made before it was recorded, applies
    with GPTQ's plain column order (as it was made)."""
    model = tiny_model("mixtral")
    plan = plan_quantize(model, CALIB, QuantizeConfig(method="uniform", bits=3, group_size=16), "tiny")
    assert plan.provenance.config["act_order"] is True

    def codes(config: dict) -> list[torch.Tensor]:
        fresh = tiny_model("mixtral")
        apply(fresh, replace(plan, provenance=replace(plan.provenance, config=config)), calibration=CALIB)
        return [c for packed in _packed(fresh).values() for c in packed.codes]

    on, off = codes(plan.provenance.config), codes({**plan.provenance.config, "act_order": False})
    older = codes({k: v for k, v in plan.provenance.config.items() if k != "act_order"})
    assert any(not torch.equal(a, b) for a, b in zip(on, off, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(off, older, strict=True))
