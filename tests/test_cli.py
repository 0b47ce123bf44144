"""The ``moeslim`` command end to end on a tiny checkpoint: inspect, plan, apply, eval, run, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeslim
from moeslim.cli import main
from moeslim.config import ConfigError
from moeslim.runtime.skipping import install_skipping
from moeslim.workflows.recipe import load_recipe

CALIB = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]


def test_inspect_writes_summary_and_heatmap(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "inspect"
    assert main(["inspect", str(tiny_model_dir), *CALIB, "--out", str(out)]) == 0
    report = json.loads((out / "inspect.json").read_text())
    assert report["summary"]["experts"] == 8 and report["summary"]["top_k"] == 2
    assert len(report["loads"]) == 2
    assert all(abs(sum(entry["load"]) - 1) < 1e-6 for entry in report["loads"])
    assert (out / "expert_load.png").stat().st_size > 0


def test_plan_apply_eval(tiny_model_dir: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    assert main(["plan", "prune", str(tiny_model_dir), "--method", "enumerate", "--keep", "4", *CALIB,
                 "--out", str(plan)]) == 0
    data = json.loads(plan.read_text())
    assert data["kind"] == "prune" and all(len(v) == 4 for v in data["layers"].values())
    assert data["provenance"]["data"] == "demo:code:calibration" and data["provenance"]["data_hash"]
    ckpt = tmp_path / "pruned"
    assert main(["apply", str(tiny_model_dir), str(plan), "--out", str(ckpt)]) == 0
    assert AutoModelForCausalLM.from_pretrained(ckpt).config.num_local_experts == 4
    assert not list(tmp_path.glob(".pruned.*"))  # no temp folder left behind
    result = tmp_path / "eval.json"
    assert main(["eval", str(ckpt), "--max-windows", "2", "--seq-len", "32", "--tasks", "none",
                 "--out", str(result)]) == 0
    ppl = json.loads(result.read_text())["perplexity"]
    assert set(ppl) == {"code", "prose"} and all(math.isfinite(v) for v in ppl.values())


def test_plan_refuses_keep_below_top_k(tiny_model_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "prune", str(tiny_model_dir), "--keep", "1", *CALIB, "--out", str(tmp_path / "p.json")])
    assert code == 2
    assert "keep at least 2" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_apply_refuses_existing_output(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "exists").mkdir()
    plan = tmp_path / "plan.json"
    assert main(["plan", "skip", str(tiny_model_dir), *CALIB, "--out", str(plan)]) == 0
    assert main(["apply", str(tiny_model_dir), str(plan), "--out", str(tmp_path / "exists")]) == 2


def _write_recipe(path: Path, model_dir: Path, stages: str) -> Path:
    path.write_text(f"""
name: tiny-run
model: {model_dir}
calibration: {{data: [demo:code, demo:prose], samples: 4, seq_len: 32, batch_size: 2}}
stages:
{stages}
eval: {{data: [demo:code:test], seq_len: 32, max_windows: 2, tasks: [moeslim_code_nextline], task_limit: 4,
        speed: true, speed_repeats: 1}}
""")
    return path


def test_recipe_runs_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = _write_recipe(tmp_path / "r.yaml", tiny_model_dir, """
  - prune: {method: enumerate, keep: 6}
  - skip: {quantile: 0.5}
""")
    assert main(["run", str(recipe), "--out", str(tmp_path / "runs")]) == 0
    run = tmp_path / "runs" / "tiny-run"
    results = json.loads((run / "results.json").read_text())
    assert [r["name"] for r in results] == ["original", "tiny-run"]
    original, compressed = results
    assert compressed["expert_calls_per_token"] < original["expert_calls_per_token"]
    assert json.loads((run / "report.json").read_text())["variants"]
    assert "tiny-run" in (run / "report.md").read_text()
    assert {p.name for p in (run / "plans" / "tiny-run").iterdir()} == {"00-prune.json", "01-skip.json"}
    model, _ = moeslim.load(run / "model")
    assert model.config.num_local_experts == 6 and model.config.moeslim["skip"]["betas"]
    stock = AutoModelForCausalLM.from_pretrained(run / "model")  # plain transformers still loads it
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        skipping = model(ids).logits
        assert not torch.allclose(skipping, stock(ids).logits)  # moeslim.load re-installed skipping
        install_skipping(model, {int(k): 0.0 for k in model.config.moeslim["skip"]["betas"]})
        # with every threshold at 0 nothing is skipped: the stock reload computes the same pruned model
        torch.testing.assert_close(model(ids).logits, stock(ids).logits, rtol=1e-5, atol=1e-5)


def test_recipe_errors_name_the_field(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = _write_recipe(tmp_path / "bad.yaml", tiny_model_dir, "  - prune: {method: enumerate, kep: 6}\n")
    with pytest.raises(ConfigError, match="kep"):
        load_recipe(bad)
    bad = _write_recipe(tmp_path / "bad2.yaml", tiny_model_dir, "  - squash: {}\n")
    with pytest.raises(ConfigError, match="unknown stage 'squash'"):
        load_recipe(bad)


def test_example_recipes_parse() -> None:
    examples = Path(__file__).resolve().parents[1] / "examples"
    recipes = sorted(examples.glob("*.yaml"))
    assert recipes
    for path in recipes:
        assert load_recipe(path).stages


def test_quantize_plan_then_apply_runs_gptq_once(tiny_model_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import moeslim.appliers.quantize as applier
    from moeslim.config import CalibrationConfig
    from moeslim.data.calibration_set import build_calibration_set
    from moeslim.runtime.lowbit_io import lowbit_tensors
    from moeslim.workflows.stages import parse_stage, run_stage

    calls: list[int] = []
    real = applier.gptq_experts
    monkeypatch.setattr(applier, "gptq_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    plan = tmp_path / "q.json"
    assert main(["plan", "quantize", str(tiny_model_dir), "--method", "pmq", "--bits", "2.5", *CALIB,
                 "--out", str(plan)]) == 0
    assert calls == []  # planning decides widths only
    recorded = json.loads(plan.read_text())["summary"]["calibration"]
    assert recorded["samples"] == 4 and recorded["data"] == ["demo:code"] and recorded["windows_hash"]
    ckpt = tmp_path / "quantized"
    assert main(["apply", str(tiny_model_dir), str(plan), "--out", str(ckpt)]) == 0
    assert calls == [1]  # GPTQ ran once on the CLI path: in apply
    loaded, tokenizer = moeslim.load(ckpt)
    assert loaded.config.moeslim["quantize"]["quantizer"] == "gptq"
    # Same as planning and applying in one process: GPTQ saw the same windows, so the same codes.
    model, _ = moeslim.load(tiny_model_dir)
    config = CalibrationConfig(data=("demo:code",), samples=4, seq_len=32, batch_size=2)
    stage = parse_stage({"quantize": {"method": "pmq", "bits": 2.5}}, "test")
    run_stage(model, stage, build_calibration_set(config, tokenizer), str(tiny_model_dir))
    assert calls == [1, 1]
    ours, theirs = lowbit_tensors(model), lowbit_tensors(loaded)
    assert sorted(ours) == sorted(theirs) and ours
    for name, packed in ours.items():
        assert all(torch.equal(a, b) for a, b in zip(packed.codes, theirs[name].codes, strict=True)), name
    ids = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_python_dash_m_runs_the_cli() -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "moeslim", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "plan" in result.stdout and "export" in result.stdout
