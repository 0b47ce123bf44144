"""The joint planner's verification (``JointConfig.verify_windows``): candidates judged by measured KL."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from tiny_models import sample_ids, tiny_model

from moeslim.appliers import apply
from moeslim.config import ConfigError
from moeslim.evaluate.cost import param_bytes
from moeslim.methods.joint import JointConfig, measure_held, plan_joint
from moeslim.methods.joint.config import MIB, resolve_targets
from moeslim.methods.joint.solve import min_held_bytes
from moeslim.methods.joint.verify import pmq_choice, split_windows
from moeslim.plans import Plan
from moeslim.workflows.joint_verify import kl_judge

CALIB = sample_ids(0, 6, 16)


def _target(model: torch.nn.Module, share: float) -> int:
    targets = resolve_targets(model, JointConfig(target_ratio=0.999))
    low = min_held_bytes(targets.base, targets.sizes, dict.fromkeys(targets.sizes, min(targets.kept_sizes)),
                         JointConfig.widths)
    return int(low + share * (targets.base - low))


def _config(model: torch.nn.Module, share: float = 0.08, **kw: object) -> JointConfig:
    return JointConfig(target_mib=_target(model, share) / MIB, verify_windows=2, **kw)  # type: ignore[arg-type]


def test_split_holds_out_the_last_windows_and_refuses_all() -> None:
    fit, held = split_windows(CALIB, 2)
    assert torch.equal(fit, CALIB[:4]) and torch.equal(held, CALIB[4:])
    with pytest.raises(ConfigError, match="verify_windows=6 with 6 calibration windows"):
        split_windows(CALIB, 6)


def test_verify_without_a_judge_is_refused() -> None:
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="pass a judge"):
        plan_joint(model, CALIB, _config(model), "tiny")


def test_the_candidate_of_least_measured_kl_is_kept_and_meets_the_target(tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe")
    config = _config(model, attention_widths=(8, 4))
    measured = measure_held(model, CALIB, config)
    real = kl_judge(model, batch_size=2)
    seen: list[list[float]] = []

    def judge(plans: Sequence[Plan], fit: torch.Tensor, held: torch.Tensor) -> list[float]:
        assert torch.equal(fit, CALIB[:4]) and torch.equal(held, CALIB[4:])
        kls = real(plans, fit, held)
        seen.append(kls)
        return kls

    plan = plan_joint(model, CALIB, config, "tiny", measured=measured, judge=judge)
    verified = plan.summary["verification"]
    names = [c["name"] for c in verified["candidates"]]
    assert names[0] == "optimum auto" and "PMQ allocation auto" in names and len(set(names)) == len(names) >= 3
    kls = [c["measured_kl"] for c in verified["candidates"]]
    assert kls == seen[0]
    assert verified["chosen"] == names[kls.index(min(kls))]
    assert verified["windows"] == 2 and verified["fit_windows"] == 4
    target = plan.summary["target_bytes"]
    assert all(c["held_bytes"] <= target for c in verified["candidates"])
    json.dumps(plan.summary, allow_nan=False)  # pure JSON
    again = Plan.load(plan.save(tmp_path / "p.json"))
    assert again.summary["verification"] == verified
    copy = tiny_model("qwen3_moe")
    apply(copy, plan, calibration=CALIB)
    assert param_bytes(copy)["total"] == plan.summary["held_bytes"] <= target


def test_a_judge_that_prefers_another_candidate_changes_the_plan() -> None:
    model = tiny_model("mixtral")
    config = _config(model, quantizer="rtn")
    measured = measure_held(model, CALIB, config)
    picked: list[Plan] = []

    def last_is_best(plans: Sequence[Plan], fit: torch.Tensor, held: torch.Tensor) -> list[float]:
        picked.extend(plans)
        return [float(len(plans) - i) for i in range(len(plans))]

    plan = plan_joint(model, CALIB, config, "tiny", measured=measured, judge=last_is_best)
    assert len(picked) >= 2
    assert plan.layers == picked[-1].layers and plan.summary["verification"]["chosen"] != "optimum auto"
    assert plan.summary["held_bytes"] <= plan.summary["target_bytes"]


def test_pmq_candidate_is_pmqs_allocation_within_the_target() -> None:
    from moeslim.methods.quant.driver import QuantizeConfig, plan_bits

    model = tiny_model("mixtral")
    config = _config(model, 0.5, quantizer="rtn")
    held = measure_held(model, CALIB, config)["auto"]
    targets = resolve_targets(model, config)
    choice = pmq_choice(model, held.pmq, held.options, config.widths, targets.sizes, targets.base,  # type: ignore
                        targets.target)
    assert choice is not None and choice.held_bytes <= targets.target
    assert all(len(c.kept) == 4 or len(c.kept) == len(c.bits) for c in choice.layers.values())
    # one more step of average bits would not fit: the bytes are used
    bits = sum(b for c in choice.layers.values() for b in c.bits) / sum(len(c.bits) for c in choice.layers.values())
    pmq = QuantizeConfig(method="pmq", bits=bits, candidates=tuple(sorted(config.widths)), scope="global")
    alloc, _ = plan_bits(model, None, pmq, factors=held.pmq)
    assert {idx: tuple(b) for idx, b in alloc.items()} == {idx: c.bits for idx, c in choice.layers.items()}


def test_cli_plan_joint_verifies_with_the_projects_judge(tiny_model_dir: Path, tmp_path: Path) -> None:
    from moeslim.cli import main

    plan_file = tmp_path / "joint.json"
    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    assert main(["plan", "joint", str(tiny_model_dir), "--target-ratio", "0.93", "--verify-windows", "1", *calib,
                 "--out", str(plan_file)]) == 0
    summary = json.loads(plan_file.read_text())["summary"]
    verified = summary["verification"]
    assert verified["windows"] == 1 and verified["fit_windows"] == 3
    assert verified["chosen"] in [c["name"] for c in verified["candidates"]]
    assert all(c["measured_kl"] >= 0 for c in verified["candidates"])
    assert summary["held_bytes"] <= summary["target_bytes"]
