"""``JointConfig.hold_dtypes``: the planner chooses the hold dtype, a cast priced by its own KL against the original."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import sample_ids, tiny_model

import moeslim.methods.joint.driver as driver
from moeslim.appliers import apply
from moeslim.cli import main
from moeslim.config import ConfigError
from moeslim.evaluate.cost import param_bytes
from moeslim.methods.joint import JointConfig, measure_held, plan_joint
from moeslim.methods.joint.cast_price import cast_error
from moeslim.methods.joint.config import MIB, resolve_targets
from moeslim.methods.joint.hold import as_held
from moeslim.methods.joint.probe import _kl
from moeslim.methods.joint.solve import min_held_bytes
from moeslim.plans import Plan
from moeslim.workflows.plan_summary import summarize

CALIB = sample_ids(0, 4, 16)
BOTH = ("auto", "bfloat16")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_model("mixtral")


def _config(**kw: object) -> JointConfig:
    return JointConfig(quantizer="rtn", **kw)  # type: ignore[arg-type]


def _smallest(model: torch.nn.Module, dtype: str) -> int:
    targets = resolve_targets(model, _config(target_ratio=0.9, hold_dtype=dtype))
    return min_held_bytes(targets.base, targets.sizes, dict.fromkeys(targets.sizes, min(targets.kept_sizes)),
                          (2, 3, 4, 8, 16))


@pytest.mark.parametrize("scale", ["squared", "kl"])
def test_the_cast_price_is_the_cast_models_kl_in_the_estimates_unit(model: torch.nn.Module, scale: str) -> None:
    measured = measure_held(model, CALIB, _config(target_ratio=0.9, hold_dtypes=BOTH, error_scale=scale))
    assert measured["auto"].cast_error == 0.0
    assert measured["bfloat16"].cast_error > 0
    held = as_held(model, "bfloat16")
    with torch.no_grad():
        kl = float(_kl(model(CALIB).logits, held(CALIB).logits).mean())
    price = cast_error(model, held, CALIB, measured["bfloat16"].options, 128, False, "kl", 8, 8)
    assert price == pytest.approx(kl, rel=1e-9) and kl > 0
    if scale == "kl":
        assert measured["bfloat16"].cast_error == pytest.approx(kl, rel=1e-9)
    assert cast_error(model, model, CALIB, measured["auto"].options, 128, False, "squared", 8, 8) == 0.0


def _single_and_joint(model: torch.nn.Module, **target: float) -> tuple[dict[str, float], object, dict]:
    config = _config(hold_dtypes=BOTH, **target)
    measured = measure_held(model, CALIB, _config(target_ratio=0.9, hold_dtypes=BOTH))
    plan = plan_joint(model, CALIB, config, "tiny", measured=measured)
    singles = {}
    for dtype, held in measured.items():
        try:
            singles[dtype] = plan_joint(model, CALIB, config.held_as(dtype), "tiny", options=held.options,
                                        nonexpert=held.nonexpert)
        except ConfigError:
            continue  # this dtype does not fit the target
    totals = {d: p.summary["estimated_error"] + measured[d].cast_error for d, p in singles.items()}
    best = min(totals, key=lambda d: totals[d])
    assert plan.layers == singles[best].layers
    assert plan.summary["estimated_error"] == pytest.approx(totals[best])
    assert plan.summary["hold_dtype"] == (None if best == "auto" else best)
    for d, total in totals.items():
        assert plan.summary["hold_candidates"][d]["estimated_error"] == pytest.approx(total)
    return totals, plan, singles


def test_float32_wins_when_the_target_leaves_room(model: torch.nn.Module) -> None:
    totals, plan, _ = _single_and_joint(model, target_ratio=0.8)
    assert plan.summary["hold_dtype"] is None and totals["auto"] < totals["bfloat16"]
    assert plan.summary["cast_error"] == 0.0


def test_bfloat16_wins_when_float32_does_not_fit(model: torch.nn.Module) -> None:
    low, high = _smallest(model, "bfloat16"), _smallest(model, "auto")
    assert low < high
    target = (low + high) // 2
    totals, plan, _ = _single_and_joint(model, target_mib=target / MIB)
    assert set(totals) == {"bfloat16"} and plan.summary["hold_candidates"]["auto"] == {"fits": False}
    assert plan.summary["hold_dtype"] == "bfloat16" and plan.summary["cast_error"] > 0
    applied = tiny_model("mixtral")
    applied.load_state_dict(model.state_dict())
    apply(applied, plan, calibration=CALIB)
    assert param_bytes(applied)["total"] == plan.summary["held_bytes"] <= target
    assert applied.get_input_embeddings().weight.dtype == torch.bfloat16


def test_bad_hold_dtypes_fail_early(model: torch.nn.Module) -> None:
    with pytest.raises(ConfigError, match="'int8' is not a hold dtype"):
        _config(target_ratio=0.5, hold_dtypes=("auto", "int8"))
    with pytest.raises(ConfigError, match="each dtype once"):
        _config(target_ratio=0.5, hold_dtypes=("bfloat16", "bfloat16"))
    with pytest.raises(ConfigError, match="give one hold_dtype, or the candidates"):
        _config(target_ratio=0.5, hold_dtype="float16", hold_dtypes=BOTH)
    tiny = _smallest(model, "bfloat16") - 1
    with pytest.raises(ConfigError, match="no hold dtype fits: held as auto: .*held as bfloat16: .*below the smallest"):
        _config(target_mib=tiny / MIB, hold_dtypes=BOTH).check_model(model)
    measured = measure_held(model, CALIB, _config(target_ratio=0.9, hold_dtype="bfloat16"))
    with pytest.raises(ValueError, match="with hold_dtypes pass measure_held"):
        plan_joint(model, CALIB, _config(target_ratio=0.5, hold_dtypes=BOTH), options=measured["bfloat16"].options)
    with pytest.raises(ValueError, match="hold dtype auto fits the target but has no measurements"):
        plan_joint(model, CALIB, _config(target_ratio=0.5, hold_dtypes=BOTH), measured=measured)


def test_cli_hold_dtypes_flag(tiny_model_dir: Path, tmp_path: Path) -> None:
    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    plan_file = tmp_path / "joint.json"
    assert main(["plan", "joint", str(tiny_model_dir), "--target-ratio", "0.45", "--hold-dtypes", "auto,bfloat16",
                 "--quantizer", "rtn", *calib, "--out", str(plan_file)]) == 0
    summary = json.loads(plan_file.read_text())["summary"]
    candidates = summary["hold_candidates"]
    assert set(candidates) == set(BOTH) and summary["held_bytes"] <= summary["target_bytes"]
    chosen = summary["hold_dtype"] or "auto"
    assert all(candidates[chosen]["estimated_error"] <= c["estimated_error"] for c in candidates.values() if c["fits"])
    shown = "\n".join(summarize(Plan.load(plan_file)))
    assert "hold dtype estimates: auto " in shown and ", bfloat16 " in shown
    assert main(["plan", "joint", str(tiny_model_dir), "--target-ratio", "0.45", "--hold-dtypes", "auto,int8",
                 *calib, "--out", str(tmp_path / "bad.json")]) != 0


def test_a_cast_that_overflows_is_refused_before_its_options_are_measured(
        model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """float16 holds at most 65504: a model whose embeddings exceed it gives NaN logits when cast, which must not
    become a NaN price the planner compares (the float32 model itself is fine: its norms rescale). One of several
    candidates is left out, as one that does not fit, and the plan says why; asked for alone, it is an error."""
    big = copy.deepcopy(model)
    with torch.no_grad():
        big.get_input_embeddings().weight.mul_(1e6)
        assert torch.isfinite(big(CALIB).logits).all()
    measured_dtypes = []
    real = driver.measure_options

    def recording(held: torch.nn.Module, *args: object, **kw: object) -> object:
        measured_dtypes.append(next(held.parameters()).dtype)
        return real(held, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(driver, "measure_options", recording)
    config = _config(target_ratio=0.9, hold_dtypes=("auto", "float16"))
    measured = measure_held(big, CALIB, config)
    assert "non-finite" in measured["float16"].refused and not measured["float16"].options
    assert measured_dtypes == [torch.float32]  # the float16 copy's options were never measured
    plan = plan_joint(big, CALIB, config, measured=measured)
    assert plan.summary["hold_dtype"] is None  # auto
    assert plan.summary["hold_candidates"]["float16"]["refused"] == measured["float16"].refused
    assert "float16 refused (the model held in float16 gives non-finite" in "\n".join(summarize(plan))
    with pytest.raises(ConfigError, match="float16 gives non-finite .* leave float16 out of hold_dtypes"):
        measure_held(big, CALIB, _config(target_ratio=0.9, hold_dtype="float16"))
    assert measured_dtypes == [torch.float32]
