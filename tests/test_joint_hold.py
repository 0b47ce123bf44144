"""``JointConfig.hold_dtype``: a joint plan holds every float weight in one dtype, counted as held, on every family."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, sample_ids, tiny_model

import moeslim
from moeslim.appliers import apply
from moeslim.cli import main
from moeslim.config import ConfigError
from moeslim.evaluate.cost import param_bytes
from moeslim.methods.joint import JointConfig, plan_joint
from moeslim.methods.joint.config import MIB, resolve_targets
from moeslim.methods.joint.hold import as_held
from moeslim.methods.joint.solve import min_held_bytes
from moeslim.models import find_moe_layers
from moeslim.models.held_bytes import held_bytes
from moeslim.plans import Plan, PlanError

CALIB = sample_ids(0, 4, 16)
PROBE = sample_ids(7, 2, 12)


def _quiet_tiny(family: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_model(family)


def _target_between(model: torch.nn.Module, share: float, config: JointConfig) -> int:
    """Bytes ``share`` of the way from the smallest bfloat16 joint plan of ``model`` to the bfloat16 model."""
    targets = resolve_targets(model, config)
    low = min_held_bytes(targets.base, targets.sizes, dict.fromkeys(targets.sizes, min(targets.kept_sizes)),
                         config.widths)
    return int(low + share * (targets.base - low))


@pytest.mark.parametrize("family", FAMILIES)
def test_held_bytes_in_the_cast_dtype_are_planned_exactly(family: str) -> None:
    model = _quiet_tiny(family)
    assert next(model.parameters()).dtype == torch.float32
    layer = find_moe_layers(model)[0]
    min_keep = max(layer.top_k, layer.num_experts - 2)
    probe = JointConfig(target_ratio=0.9, min_keep=min_keep, hold_dtype="bfloat16", quantizer="rtn")
    targets = resolve_targets(model, probe)
    assert targets.original == held_bytes(model)
    assert targets.base == held_bytes(as_held(model, "bfloat16")) < 0.55 * targets.original
    target = _target_between(model, 0.3, probe)
    config = JointConfig(target_mib=target / MIB, min_keep=min_keep, hold_dtype="bfloat16", quantizer="rtn")
    plan = plan_joint(model, CALIB, config, "tiny")
    assert plan.summary["hold_dtype"] == "bfloat16" and plan.summary["original_bytes"] == targets.original
    assert any(b < 16 for entry in plan.layers.values() for b in entry["bits"])
    apply(model, plan, calibration=CALIB)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert param_bytes(model)["total"] == plan.summary["held_bytes"] <= target


def test_cast_save_load_round_trip_holds_the_planned_bytes(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    model = _quiet_tiny("olmoe")
    probe = JointConfig(target_ratio=0.9, hold_dtype="bfloat16")
    target = _target_between(model, 0.05, probe)
    plan = plan_joint(model, CALIB, JointConfig(target_mib=target / MIB, hold_dtype="bfloat16"), "tiny")  # GPTQ
    again = Plan.load(plan.save(tmp_path / "p.json"))
    assert again.summary["hold_dtype"] == "bfloat16"
    apply(model, again, calibration=CALIB)
    assert model.config.moeslim["joint"]["hold_dtype"] == "bfloat16"
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(PROBE).logits
    moeslim.save(model, tmp_path / "j")
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="moeslim.runtime.serialize"):
        warnings.simplefilter("ignore")
        loaded, _ = moeslim.load(tmp_path / "j", dtype=torch.float32)  # the plan's dtype wins: its bytes
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert "loading in bfloat16 instead of float32" in caplog.text  # said, not silent
    assert param_bytes(loaded)["total"] == plan.summary["held_bytes"] <= target
    loaded.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROBE).logits, expected, rtol=0, atol=1e-5)


def test_options_are_measured_on_the_cast_model() -> None:
    model = _quiet_tiny("mixtral")
    widths = (2, 16)
    plans = {hold: plan_joint(model, CALIB, JointConfig(target_ratio=0.6, widths=widths, hold_dtype=hold,
                                                        quantizer="rtn"), "tiny")
             for hold in ("auto", "bfloat16")}
    curves = {hold: plan.summary["layers"] for hold, plan in plans.items()}
    # the same kept sets priced on other weights: the cast changes the measured errors, not the structure
    assert curves["auto"].keys() == curves["bfloat16"].keys()
    assert curves["auto"] != curves["bfloat16"]
    assert plans["auto"].summary["hold_dtype"] is None
    assert plans["bfloat16"].summary["bytes"] != plans["auto"].summary["bytes"]  # 16-bit experts: half the bytes
    assert next(model.parameters()).dtype == torch.float32  # planning does not modify the model


def test_a_ratio_is_of_the_original_bytes_and_nonsense_dtypes_fail() -> None:
    model = _quiet_tiny("mixtral")
    targets = resolve_targets(model, JointConfig(target_ratio=0.4, hold_dtype="bfloat16"))
    assert targets.target == int(0.4 * held_bytes(model))
    with pytest.raises(ConfigError, match="hold_dtype='int8'.*bfloat16"):
        JointConfig(target_ratio=0.5, hold_dtype="int8")  # type: ignore[arg-type]
    plan = plan_joint(model, CALIB, JointConfig(target_ratio=0.6, quantizer="rtn"), "tiny")
    plan.summary["hold_dtype"] = "int8"
    with pytest.raises(PlanError, match="hold_dtype='int8'"):
        apply(model, plan)


def test_cli_hold_dtype_flag(tiny_model_dir: Path, tmp_path: Path) -> None:
    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    plan_file = tmp_path / "joint.json"
    assert main(["plan", "joint", str(tiny_model_dir), "--target-ratio", "0.45", "--hold-dtype", "bfloat16",
                 "--quantizer", "rtn", *calib, "--out", str(plan_file)]) == 0
    data = json.loads(plan_file.read_text())
    assert data["summary"]["hold_dtype"] == "bfloat16"
    assert data["summary"]["held_bytes"] <= data["summary"]["target_bytes"]
    out = tmp_path / "applied"
    assert main(["apply", str(tiny_model_dir), str(plan_file), "--out", str(out)]) == 0
    loaded, _ = moeslim.load(out)
    assert param_bytes(loaded)["total"] == data["summary"]["held_bytes"]
