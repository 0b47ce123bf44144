"""The joint planner (``moeslim plan joint``): exact choice, bytes held within the target on every family, refusals."""

from __future__ import annotations

import dataclasses
import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import error_line
from tiny_models import FAMILIES, all_families, sample_ids, tiny_model

import moeslim
from moeslim.appliers import apply
from moeslim.cli import main
from moeslim.config import ConfigError
from moeslim.evaluate.cost import param_bytes
from moeslim.methods.joint import JointConfig, plan_joint
from moeslim.methods.joint.config import MIB, resolve_targets
from moeslim.methods.joint.sizes import LayerBytes
from moeslim.methods.joint.solve import SizeOption, min_held_bytes, solve_joint
from moeslim.models import UnsupportedModelError, family_of, find_moe_layers
from moeslim.plans import Plan

CALIB = sample_ids(0, 4, 16)
PROBE = sample_ids(7, 2, 12)


# -- the knapsack: exact on cases small enough to enumerate -----------------------------------------------------

def _random_options(rng: np.random.Generator, num_experts: int, widths: tuple[int, ...]) -> list[SizeOption]:
    out = []
    for k in range(1, num_experts + 1):
        kept = tuple(sorted(rng.choice(num_experts, size=k, replace=False).tolist()))
        quant = rng.exponential(1.0, size=(k, len(widths)))
        quant[:, widths.index(16)] = 0.0
        out.append(SizeOption(kept, 0.0 if k == num_experts else float(rng.exponential(3.0 / k)), quant,
                              rng.dirichlet(np.ones(k)) * min(2, k)))
    return out


def _brute_force(options: dict[int, list[SizeOption]], widths: tuple[int, ...], sizes: dict[int, LayerBytes],
                 base: int, target: int, active: float | None) -> float:
    """Least error over every combination of every layer's (size, widths) decisions."""
    per_layer = []
    for idx, opts in options.items():
        lb = sizes[idx]
        choices = []
        for opt in opts:
            for bits in itertools.product(range(len(widths)), repeat=len(opt.kept)):
                err = opt.prune_err + sum(opt.quant_err[e, j] for e, j in enumerate(bits))
                read = sum(opt.freq[e] * lb.width[widths[j]] for e, j in enumerate(bits))
                choices.append((lb.saving([widths[j] for j in bits]), err, read))
        per_layer.append(choices)
    best = np.inf
    for combo in itertools.product(*per_layer):
        saved, err, read = (sum(c[i] for c in combo) for i in range(3))
        if base - saved <= target and (active is None or read <= active):
            best = min(best, err)
    return float(best)


@pytest.mark.parametrize(("n_layers", "num_experts", "seed"), [(2, 3, 0), (2, 3, 1), (3, 2, 2), (3, 2, 3)])
def test_knapsack_optimum_equals_brute_force(n_layers: int, num_experts: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    widths = (2, 4, 16)
    sizes = {i: LayerBytes(num_experts=num_experts, row=7 + i, width={2: 30 + i, 4: 52, 16: 200})
             for i in range(n_layers)}
    options = {i: _random_options(rng, num_experts, widths) for i in range(n_layers)}
    base = 5000
    low = min_held_bytes(base, sizes, dict.fromkeys(sizes, 1), widths)
    for target in np.linspace(low, base - 1, 7).astype(int).tolist():
        for active in (None, 150.0):
            expected = _brute_force(options, widths, sizes, base, target, active)
            if not np.isfinite(expected):
                with pytest.raises(ValueError, match="no joint decision fits"):
                    solve_joint(options, widths, sizes, base, target, active)
                continue
            got = solve_joint(options, widths, sizes, base, target, active)
            assert got.error == pytest.approx(expected, rel=1e-9, abs=1e-12)
            assert got.held_bytes <= target
            assert active is None or got.active_bytes <= active + 1e-9


# -- applied models: held bytes as planned and within the target, on every family -------------------------------

def _target_between(model: torch.nn.Module, share: float, min_keep: int | None = None) -> int:
    """Bytes ``share`` of the way from the smallest joint plan of ``model`` to the original."""
    targets = resolve_targets(model, JointConfig(target_ratio=0.999, min_keep=min_keep))
    low = min_held_bytes(targets.base, targets.sizes, dict.fromkeys(targets.sizes, min(targets.kept_sizes)),
                         JointConfig.widths)
    return int(low + share * (targets.base - low))


@pytest.mark.parametrize("family", all_families())
def test_applied_model_holds_at_most_the_target(family: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(family)
    layer = find_moe_layers(model)[0]
    min_keep = max(layer.top_k, layer.num_experts - 2)  # few kept sets to score: keeps the test fast
    target = _target_between(model, 0.3, min_keep)
    # GPTQ on the hand-configured families, round-to-nearest on the rest (the byte accounting is the same).
    config = JointConfig(target_mib=target / MIB, min_keep=min_keep,
                         quantizer="gptq" if family in FAMILIES else "rtn")
    if family_of(model).layerwise_blocker:
        with pytest.raises(UnsupportedModelError, match="layer-wise calibration"):
            plan_joint(model, CALIB, config, "tiny")
        return
    plan = plan_joint(model, CALIB, config, "tiny")
    assert plan.summary["held_bytes"] <= target
    apply(model, plan, calibration=CALIB)
    held = param_bytes(model)["total"]
    assert held == plan.summary["held_bytes"]  # the accounting is exact: scales, zeros, router rows
    assert held <= target


def test_symmetric_widths_bytes_are_exact() -> None:
    model = tiny_model("qwen3_moe")
    target = _target_between(model, 0.2)
    plan = plan_joint(model, CALIB, JointConfig(target_mib=target / MIB, symmetric=True, group_size=16), "tiny")
    apply(model, plan, calibration=CALIB)
    assert param_bytes(model)["total"] == plan.summary["held_bytes"] <= target


def test_nonuniform_quantized_plan_saves_and_loads(tmp_path: Path) -> None:
    model = tiny_model("olmoe")
    target = _target_between(model, 0.02)
    plan = plan_joint(model, CALIB, JointConfig(target_mib=target / MIB), "tiny")
    counts = {len(entry["kept"]) for entry in plan.layers.values()}
    assert len(counts) > 1, plan.layers  # unequal counts: the compact layout, quantized
    assert any(b < 16 for entry in plan.layers.values() for b in entry["bits"])
    apply(model, plan, calibration=CALIB)
    with torch.no_grad():
        expected = model(PROBE).logits
    moeslim.save(model, tmp_path / "j")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, _ = moeslim.load(tmp_path / "j")
    assert param_bytes(loaded)["total"] == plan.summary["held_bytes"] <= target
    loaded.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROBE).logits, expected, rtol=0, atol=1e-5)


def test_plan_is_pure_json_and_round_trips(tmp_path: Path) -> None:
    model = tiny_model("mixtral")
    plan = plan_joint(model, CALIB, JointConfig(target_ratio=0.5, quantizer="rtn"), "tiny")
    again = Plan.load(plan.save(tmp_path / "p.json"))
    assert again.kind == "joint" and again.layers == plan.layers
    for entry in plan.layers.values():
        assert len(entry["bits"]) == len(entry["kept"]) and entry["kept"] == sorted(entry["kept"])


def test_active_target_is_met_on_the_calibration_routing() -> None:
    model = tiny_model("mixtral")
    targets = resolve_targets(model, JointConfig(target_active_mib=1.0))
    full = sum(2 * lb.dense for lb in targets.sizes.values())  # top-2 experts per token at 16 bits
    plan = plan_joint(model, CALIB, JointConfig(target_active_mib=0.4 * full / MIB, quantizer="rtn"), "tiny")
    assert plan.summary["active_bytes"] <= 0.4 * full
    assert any(b < 16 for entry in plan.layers.values() for b in entry["bits"])


# -- refusals before any work ----------------------------------------------------------------------------------

def test_target_below_the_minimum_names_the_minimum() -> None:
    model = tiny_model("mixtral")
    with pytest.raises(ConfigError, match=r"below the smallest size a joint plan reaches on this model: [0-9.]+ MiB"):
        JointConfig(target_ratio=0.05).check_model(model)
    with pytest.raises(ConfigError, match="nothing to compress"):
        JointConfig(target_mib=10.0).check_model(model)
    with pytest.raises(ConfigError, match="below the least a token reads"):
        JointConfig(target_active_mib=1e-6).check_model(model)
    with torch.device("meta"):
        skeleton = tiny_model("mixtral")
    with pytest.raises(ConfigError, match="drop --stream"):
        JointConfig(target_ratio=0.5).check_model(skeleton)


@pytest.mark.parametrize(("values", "message"), [
    ({}, "give a target"),
    ({"target_mib": 1.0, "target_ratio": 0.5}, "give one"),
    ({"target_ratio": 1.5}, "below 1"),
    ({"target_mib": -1.0}, "positive"),
    ({"target_mib": 1.0, "widths": (2, 9)}, "widths"),
    ({"target_mib": 1.0, "widths": (1, 2), "symmetric": True}, "symmetric"),
    ({"target_mib": 1.0, "gptq_folds": 0}, "gptq_folds=0: use 1 or more"),
])
def test_config_refuses(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JointConfig(**values)


def test_cli_plan_joint_then_apply(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    plan_file = tmp_path / "joint.json"
    assert main(["plan", "joint", str(tiny_model_dir), "--target-ratio", "0.93", *calib, "--out", str(plan_file)]) == 0
    data = json.loads(plan_file.read_text())
    assert data["kind"] == "joint" and data["summary"]["held_bytes"] <= data["summary"]["target_bytes"]
    out = tmp_path / "applied"
    assert main(["apply", str(tiny_model_dir), str(plan_file), "--out", str(out)]) == 0
    loaded, _ = moeslim.load(out)
    assert param_bytes(loaded)["total"] == data["summary"]["held_bytes"]
    capsys.readouterr()
    assert main(["plan", "joint", str(tiny_model_dir), "--target-ratio", "0.01", *calib,
                 "--out", str(tmp_path / "no.json")]) == 2
    assert "MiB" in error_line(capsys) and not (tmp_path / "no.json").exists()


def test_recipe_stage_joint_is_validated_before_work() -> None:
    from moeslim.workflows.stages import parse_stage

    stage = parse_stage({"joint": {"target_ratio": 0.3, "widths": [2, 4, 16]}}, "r.yaml.stages[0]")
    assert stage.kind == "joint" and stage.config.widths == (2, 4, 16)
    with pytest.raises(ConfigError, match="give a target"):
        parse_stage({"joint": {}}, "r.yaml.stages[0]")


def test_apply_quantizes_with_the_plans_act_order() -> None:
    """GPTQ's act-order (on by default, as the planner measured its errors) is what the plan records: a plan
    with it off quantizes differently, and a plan made before the setting existed applies as it was made (off)."""
    model = tiny_model("mixtral")
    plan = plan_joint(model, CALIB, JointConfig(target_ratio=0.3, min_keep=model.config.num_local_experts - 1,
                                                group_size=16), "tiny")  # most experts see 16+ tokens: GPTQ
    assert plan.provenance.config["act_order"] is True
    assert any(b < 16 for entry in plan.layers.values() for b in entry["bits"])

    def applied(config: dict) -> torch.Tensor:
        copy = tiny_model("mixtral")
        apply(copy, dataclasses.replace(plan, provenance=dataclasses.replace(plan.provenance, config=config)),
              calibration=CALIB)
        with torch.no_grad():
            return copy(PROBE).logits

    on, off = applied(plan.provenance.config), applied({**plan.provenance.config, "act_order": False})
    older = applied({k: v for k, v in plan.provenance.config.items() if k != "act_order"})
    assert not torch.equal(on, off)
    torch.testing.assert_close(older, off, rtol=0, atol=0)
