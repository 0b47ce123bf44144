"""Skip thresholds in the joint plan: options per kept set and threshold, the exact choice, the runtime installed."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_joint import _brute_force, _random_options
from tiny_models import FAMILIES, sample_ids, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

import moeslim
from moeslim.appliers import apply
from moeslim.config import ConfigError
from moeslim.evaluate.cost import param_bytes
from moeslim.methods.joint import JointConfig, plan_joint
from moeslim.methods.joint.config import MIB, resolve_targets
from moeslim.methods.joint.curves import skip_error
from moeslim.methods.joint.sizes import LayerBytes
from moeslim.methods.joint.solve import SizeOption, min_held_bytes, solve_joint
from moeslim.methods.skip import keep_mask, rescale_kept
from moeslim.plans import Plan, PlanError
from moeslim.runtime.skipping import counters, install_skipping

CALIB = sample_ids(0, 4, 16)
PROBE = sample_ids(7, 2, 12)


def _with_skips(rng: np.random.Generator, options: list[SizeOption], betas: tuple[float, ...]) -> list[SizeOption]:
    """Each option, then the same kept set skipping: more error, fewer reads (as measured options behave)."""
    out = []
    for opt in options:
        out.append(opt)
        for beta in betas:
            out.append(dataclasses.replace(opt, prune_err=opt.prune_err + float(rng.exponential(1.0)),
                                           quant_err=opt.quant_err * rng.uniform(0.5, 1.0),
                                           freq=opt.freq * rng.uniform(0.4, 0.9), skip_beta=beta))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knapsack_with_skip_options_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    widths = (2, 16)
    sizes = {i: LayerBytes(num_experts=3, row=5, width={2: 30 + i, 16: 200}) for i in range(2)}
    options = {i: _with_skips(rng, _random_options(rng, 3, widths), (0.3, 0.7)) for i in range(2)}
    base = 3000
    low = min_held_bytes(base, sizes, dict.fromkeys(sizes, 1), widths)
    chose_skip = False
    for target in np.linspace(low, base - 1, 4).astype(int).tolist():
        for active in (None, 120.0, 60.0):
            expected = _brute_force(options, widths, sizes, base, target, active)
            if not np.isfinite(expected):
                with pytest.raises(ValueError, match="no joint decision fits"):
                    solve_joint(options, widths, sizes, base, target, active)
                continue
            got = solve_joint(options, widths, sizes, base, target, active)
            assert got.error == pytest.approx(expected, rel=1e-9, abs=1e-12)
            assert got.held_bytes <= target and (active is None or got.active_bytes <= active + 1e-9)
            for idx, choice in got.layers.items():  # the reported threshold is the chosen option's
                match = [o for o in options[idx] if o.kept == choice.kept and o.skip_beta == choice.skip_beta]
                assert match
            chose_skip |= any(c.skip_beta > 0 for c in got.layers.values())
    assert chose_skip  # the read-bytes targets make some decision skip


def test_skip_error_is_the_change_of_the_routed_output() -> None:
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64)  # (T, E, H)
    weights = torch.rand(5, 2, generator=gen, dtype=torch.float64)
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2]])
    keep = keep_mask(weights, 0.8, "top2")
    skipped = rescale_kept(weights, keep)
    full = sum(weights[:, j, None] * outputs[torch.arange(5), ids[:, j]] for j in range(2))
    part = sum(skipped[:, j, None] * outputs[torch.arange(5), ids[:, j]] for j in range(2))
    assert skip_error(weights, skipped, ids, outputs) == pytest.approx(float((part - full).pow(2).sum()))
    assert skip_error(weights, weights, ids, outputs) == 0.0


def _skipping_plan(model: torch.nn.Module, share: float = 0.7) -> Plan:
    """A joint plan on ``model`` whose read-bytes target (``share`` of 16-bit top-2 reads) only skipping meets."""
    targets = resolve_targets(model, JointConfig(target_active_mib=1.0))
    full = sum(2 * lb.dense for lb in targets.sizes.values())  # top-2 experts per token at 16 bits
    config = JointConfig(target_active_mib=share * full / MIB, widths=(16,), skip_betas=(0.5, 1.0), quantizer="rtn")
    return plan_joint(model, CALIB, config, "tiny")


def test_planned_thresholds_reach_the_installed_runtime(tmp_path: Path) -> None:
    model = tiny_model("mixtral")
    plan = _skipping_plan(model)
    betas = {idx: entry["skip_beta"] for idx, entry in plan.layers.items()}
    assert any(b > 0 for b in betas.values()), plan.layers
    assert plan.summary["active_bytes"] <= plan.summary["target_active_bytes"]
    by_hand = copy.deepcopy(model)
    apply(model, Plan.load(plan.save(tmp_path / "p.json")), calibration=CALIB)
    assert model.config.moeslim["skip"]["betas"] == {str(i): b for i, b in sorted(betas.items())}
    # the same plan without thresholds, then skipping installed by hand
    bare = dataclasses.replace(plan, layers={i: {k: v for k, v in e.items() if k != "skip_beta"}
                                             for i, e in plan.layers.items()})
    apply(by_hand, bare, calibration=CALIB)
    install_skipping(by_hand, betas, "top2")
    with torch.no_grad():
        got, expected = model(PROBE).logits, by_hand(PROBE).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    calls = counters(model)
    skipping = [idx for idx, b in betas.items() if b > 0]
    assert all(calls[idx]["expert_calls"] < 2 * calls[idx]["tokens"] for idx in skipping)  # pairs skipped
    moeslim.save(model, tmp_path / "j")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, _ = moeslim.load(tmp_path / "j")
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROBE).logits, got, rtol=0, atol=1e-5)
    assert any(c["expert_calls"] < 2 * c["tokens"] for c in counters(loaded).values())


def test_without_skip_betas_the_plan_is_unchanged() -> None:
    model = tiny_model("mixtral")
    plan = plan_joint(model, CALIB, JointConfig(target_ratio=0.6, quantizer="rtn"), "tiny")
    assert all(set(entry) == {"kept", "bits"} for entry in plan.layers.values())
    assert plan.summary["skip_rule"] is None


@pytest.mark.parametrize(("values", "message"), [
    ({"skip_betas": (0.5, 0.5)}, "distinct positive"),
    ({"skip_betas": (-0.1,)}, "distinct positive"),
    ({"skip_betas": (1.5,)}, "thresholds in"),
    ({"skip_rule": "top3"}, "skip_rule"),
])
def test_config_refuses_bad_thresholds(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JointConfig(target_ratio=0.5, **values)


def test_top2_rule_on_top3_routing_is_refused_before_work() -> None:
    config = tiny_config("mixtral")
    config.num_experts_per_tok = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with pytest.raises(ConfigError, match="use skip_rule='topk'"):
        JointConfig(target_ratio=0.5, skip_betas=(0.5,)).check_model(model)
    JointConfig(target_ratio=0.5, skip_betas=(0.2,), skip_rule="topk", min_keep=6).check_model(model)


def test_bad_threshold_in_a_plan_is_refused() -> None:
    model = tiny_model("mixtral")
    plan = _skipping_plan(model)
    raw = plan.to_dict()
    first = next(iter(raw["layers"]))
    raw["layers"][first]["skip_beta"] = -1.0
    with pytest.raises(PlanError, match="skip_beta"):
        Plan.from_dict(raw)


def test_cli_skip_betas(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moeslim.cli import main

    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    model, _ = moeslim.load(tiny_model_dir)
    sizes = resolve_targets(model, JointConfig(target_active_mib=1.0)).sizes
    full = sum(2 * lb.dense for lb in sizes.values())
    plan_file = tmp_path / "joint.json"
    assert main(["plan", "joint", str(tiny_model_dir), "--target-active-mib", str(0.7 * full / MIB), "--widths", "16",
                 "--skip-betas", "0.5,1.0", "--quantizer", "rtn", *calib, "--out", str(plan_file)]) == 0
    assert "skip by top2 at beta" in capsys.readouterr().out
    plan = Plan.load(plan_file)
    assert any(entry["skip_beta"] > 0 for entry in plan.layers.values())
    out = tmp_path / "applied"
    assert main(["apply", str(tiny_model_dir), str(plan_file), "--out", str(out)]) == 0
    loaded, _ = moeslim.load(out)
    assert loaded.config.moeslim["skip"]["betas"] == {str(i): e["skip_beta"] for i, e in sorted(plan.layers.items())}


def test_pruned_quantized_skipping_cast_plan_round_trips(tmp_path: Path) -> None:
    model = tiny_model("olmoe")
    probe = JointConfig(target_ratio=0.9, hold_dtype="bfloat16", skip_betas=(0.5, 1.0))
    targets = resolve_targets(model, probe)
    low = min_held_bytes(targets.base, targets.sizes, dict.fromkeys(targets.sizes, min(targets.kept_sizes)),
                         probe.widths)
    full = sum(2 * lb.dense for lb in targets.sizes.values())
    config = JointConfig(target_mib=(low + 0.05 * (targets.base - low)) / MIB, target_active_mib=0.09 * full / MIB,
                         hold_dtype="bfloat16", skip_betas=(0.5, 1.0), quantizer="rtn")
    plan = plan_joint(model, CALIB, config, "tiny")
    assert any(len(e["kept"]) < 8 for e in plan.layers.values()), plan.layers  # pruned
    assert any(b < 16 for e in plan.layers.values() for b in e["bits"])
    assert any(e["skip_beta"] > 0 for e in plan.layers.values())
    apply(model, plan, calibration=CALIB)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(PROBE).logits
    moeslim.save(model, tmp_path / "j")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, _ = moeslim.load(tmp_path / "j")
    assert param_bytes(loaded)["total"] == plan.summary["held_bytes"] <= int(config.target_mib * MIB)  # type: ignore

    assert loaded.config.moeslim["skip"]["betas"] == {str(i): e["skip_beta"] for i, e in sorted(plan.layers.items())}
    loaded.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROBE).logits, expected, rtol=0, atol=1e-5)
    assert any(c["expert_calls"] < 2 * c["tokens"] for c in counters(loaded).values())


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_joint_plan_applies_on_every_family(family: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(family)
    if family == "phimoe":  # sparsemixer routing weighs both experts ~1 in eval: w2 < beta * w1 never holds
        with pytest.raises(ValueError, match="no joint decision fits"):
            _skipping_plan(model, 0.9)
        return
    plan = _skipping_plan(model, 0.9)
    apply(model, plan, calibration=CALIB)
    with torch.no_grad():
        model(PROBE)
    skipping = [idx for idx, e in plan.layers.items() if e["skip_beta"] > 0]
    assert skipping, plan.layers
    calls = counters(model)
    assert all(calls[idx]["expert_calls"] < 2 * calls[idx]["tokens"] for idx in skipping)


def test_families_skipping_cannot_run_are_refused_before_calibration() -> None:
    """Ergo normalises each route around the experts dispatch (``FamilySpec.skip_blocker``): a skip plan and a joint
    plan with skip thresholds are refused with that reason before any calibration; without thresholds it plans."""
    from moeslim.methods.skip import SkipConfig, plan_skip

    model = tiny_model("ergo")
    with pytest.raises(ConfigError, match="ergo: dynamic expert skipping cannot run this family: its experts"):
        plan_skip(model, CALIB, SkipConfig(), "tiny")
    with pytest.raises(ConfigError, match="skip_betas: ergo: dynamic expert skipping cannot run"):
        plan_joint(model, CALIB, JointConfig(target_ratio=0.8, quantizer="rtn", skip_betas=(0.5,)), "tiny")
    plan = plan_joint(model, CALIB, JointConfig(target_ratio=0.8, quantizer="rtn"), "tiny")
    assert plan.summary["skip_rule"] is None
