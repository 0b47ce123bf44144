"""What the commands print: per-layer progress on stderr, a plan summary, what apply changed, no third-party noise,
inspect writing only where asked."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import sample_ids, tiny_model

from moeslim.cli import main
from moeslim.plans import Plan, Provenance
from moeslim.progress import note, steps
from moeslim.workflows.plan_summary import layer_runs, summarize

CALIB = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]


# ---------------------------------------------------------------- progress helper


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_steps_print_one_line_per_finished_step_off_a_terminal() -> None:
    out = io.StringIO()
    assert list(steps(range(3), "GPTQ", 3, stream=out)) == [0, 1, 2]
    lines = out.getvalue().splitlines()
    assert [re.sub(r" \(.*\)$", "", line) for line in lines] == [
        "GPTQ: 1 of 3 layers done", "GPTQ: 2 of 3 layers done", "GPTQ: 3 of 3 layers done"]
    assert "\r" not in out.getvalue()  # no bar redrawn into a log file


def test_steps_count_from_a_resumed_layer_and_stay_silent_when_disabled() -> None:
    out = io.StringIO()
    list(steps(range(2, 4), "calibrate", 4, first=2, stream=out))
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == [
        "calibrate: 3 of 4 layers done", "calibrate: 4 of 4 layers done"]
    quiet = io.StringIO()
    assert list(steps(range(3), "x", 3, enabled=False, stream=quiet)) == [0, 1, 2]
    note("hello", enabled=False, stream=quiet)
    assert quiet.getvalue() == ""


def test_steps_draw_a_bar_on_a_terminal() -> None:
    out = _Terminal()
    list(steps(range(4), "merge", 4, stream=out))
    note("resumed", stream=out)
    text = out.getvalue()
    assert "\r" in text and "merge" in text and "4/4" in text  # tqdm's bar, redrawn in place
    assert "layers done" not in text and "resumed\n" in text


# ---------------------------------------------------------------- plan summary (pure)


def _plan(kind: str, layers: dict[int, Any], summary: dict[str, Any], method: str = "m") -> Plan:
    return Plan(kind=kind, layers=layers, provenance=Provenance(model="x", model_config_hash="h", method=method),
                summary=summary)


def test_layer_runs_fold_consecutive_equal_layers_only() -> None:
    assert layer_runs({0: 6, 1: 6, 2: 4, 3: 6}) == [([0, 1], 6), ([2], 4), ([3], 6)]
    assert layer_runs({0: 6, 2: 6}) == [([0], 6), ([2], 6)]  # not consecutive: two lines


def test_prune_summary_has_counts_removed_experts_and_losses() -> None:
    plan = _plan("prune", {0: [0, 1, 2, 3, 4, 5], 1: [2, 3, 4, 5, 6, 7], 2: [0, 1, 2, 3]},
                 {"num_experts": 8, "mode": "layerwise", "layers": {"0": {"loss": 1.5}, "1": {"loss": 2.0},
                                                                    "2": {"loss": 4.0}}}, "enumerate")
    lines = summarize(plan)
    assert lines[0].startswith("plan prune (enumerate, layerwise): 3 MoE layers")
    assert "layers 0-1: keep 6 of 8, removed 6,7 | 0,1" in lines
    assert "layer 2: keep 4 of 8, removed 4,5,6,7" in lines
    assert "loss per layer: 1.5, 2, 4 (sum 7.5)" in lines


def test_quantize_summary_is_a_bits_histogram() -> None:
    plan = _plan("quantize", {0: {"bits": [2, 3, 3, 2]}, 1: {"bits": [3, 2, 2, 3]}, 2: {"bits": [4, 4, 1, 1]}},
                 {"target_bits": 2.5, "avg_bits": 2.5, "avg_bits_with_overhead": 2.65}, "pmq")
    lines = summarize(plan)
    assert "layers 0-1: 2 experts at 2 bits, 2 experts at 3 bits" in lines
    assert "layer 2: 2 experts at 1 bits, 2 experts at 4 bits" in lines
    assert "bits histogram: 1 bits x2, 2 bits x4, 3 bits x4, 4 bits x2" in lines
    assert "average 2.5 bits per expert weight (2.65 with group scales)" in lines


def test_skip_merge_and_lowrank_summaries() -> None:
    skip = summarize(_plan("skip", {0: {"beta": 0.5}, 1: {"beta": 0.25}},
                           {"rule": "top2", "quantile": 0.5, "layers": {"0": {"call_skip_rate": 0.25},
                                                                        "1": {"call_skip_rate": 0.1}}}))
    assert "beta per layer: 0.500, 0.250" in skip
    assert "expert calls skipped on the calibration text, per layer: 25.0 %, 10.0 %" in skip
    merge = summarize(_plan("merge", {0: {"groups": [[0, 1], [2], [3]]}, 1: {"groups": [[0], [1, 2, 3]]}},
                            {"num_experts": 4}))
    assert "layer 0: 4 -> 3 experts, groups 0+1 2 3" in merge and "layer 1: 4 -> 2 experts, groups 0 1+2+3" in merge
    lowrank = summarize(_plan("lowrank", {0: {"up_ranks": [4, 8, 2], "down_ranks": [1, 1, 3]}},
                              {"param_ratio": 0.5}))
    assert lowrank[0] == "plan lowrank (m, 50.0% of the expert weights): 1 MoE layers"
    assert "layer 0: up ranks 2-8 (median 4), down ranks 1-3 (median 1)" in lowrank


# ---------------------------------------------------------------- the commands


def test_plan_prints_progress_per_layer_and_a_summary(tiny_model_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "p.json"
    assert main(["plan", "prune", str(tiny_model_dir), "--method", "enumerate", "--keep", "6", *CALIB,
                 "--out", str(plan)]) == 0
    out, err = capsys.readouterr()
    assert "calibrate: 1 of 2 layers done" in err and "calibrate: 2 of 2 layers done" in err
    assert "calibrate:" not in out  # progress on stderr, results on stdout
    assert re.search(r"^layers 0-1: keep 6 of 8, removed \d,\d \| \d,\d$", out, re.M), out
    assert "loss per layer:" in out and f"wrote {plan}" in out
    assert not re.search(r"^\s*\d+,?\s*$", out, re.M), out  # not the plan, one integer per line
    assert len(out.splitlines()) <= 5


def test_apply_says_what_it_changed(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "p.json"
    assert main(["plan", "prune", str(tiny_model_dir), "--method", "frequency", "--keep", "6", *CALIB,
                 "--out", str(plan)]) == 0
    capsys.readouterr()
    assert main(["apply", str(tiny_model_dir), str(plan), "--out", str(tmp_path / "pruned")]) == 0
    out = capsys.readouterr().out
    assert "applied prune (frequency)" in out
    assert "experts per layer: 8 -> 6 (layers 0-1)" in out
    mib = re.search(r"weights in memory: ([\d.]+) MiB -> ([\d.]+) MiB \(-\d+%\)", out)
    assert mib is not None, out
    assert float(mib[2]) < float(mib[1])


def test_apply_of_a_gptq_plan_shows_progress_per_layer(tiny_model_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "q.json"
    assert main(["plan", "quantize", str(tiny_model_dir), "--method", "uniform", "--bits", "4", *CALIB,
                 "--out", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "layers 0-1: 8 experts at 4 bits" in out and "bits histogram: 4 bits x16" in out
    assert main(["apply", str(tiny_model_dir), str(plan), "--out", str(tmp_path / "q")]) == 0
    out, err = capsys.readouterr()
    assert "GPTQ: 1 of 2 layers done" in err and "GPTQ: 2 of 2 layers done" in err
    assert "experts per layer: 8, unchanged (layers 0-1)" in out
    mib = re.search(r"weights in memory: ([\d.]+) MiB -> ([\d.]+) MiB", out)
    assert mib is not None and float(mib[2]) < float(mib[1]), out


def test_a_resumed_plan_says_where_it_resumed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moeslim.calibrate.resume import LayerCheckpoint
    from moeslim.methods.skip import SkipConfig, plan_skip

    class Killed(Exception):
        pass

    class KilledAfterLayer0(LayerCheckpoint):
        def save_layer(self, layer: int, results: dict[int, Any], outputs: list[torch.Tensor]) -> None:
            super().save_layer(layer, results, outputs)
            if layer == 0:
                raise Killed

    model, ids, state = tiny_model("mixtral"), sample_ids(batch=4, seq=16), tmp_path / "state"
    with pytest.raises(Killed):
        plan_skip(model, ids, SkipConfig(), batch_size=2, progress=True, checkpoint=KilledAfterLayer0(state, "k"))
    err = capsys.readouterr().err
    assert f"calibrate: nothing to resume in {state}; starting at layer 0 of 2" in err
    plan_skip(model, ids, SkipConfig(), batch_size=2, progress=True, checkpoint=LayerCheckpoint(state, "k"))
    err = capsys.readouterr().err
    assert f"calibrate: resumed at layer 1 of 2 (layers 0-0 restored from {state})" in err
    assert "calibrate: 2 of 2 layers done" in err and "1 of 2 layers done" not in err


def test_eval_prints_no_third_party_noise(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(tmp_path)  # not a git checkout: lm-eval's `git describe` would print "fatal: ..."
    result = tmp_path / "r.json"
    assert main(["eval", str(tiny_model_dir), "--max-windows", "2", "--seq-len", "32", "--task-limit", "4",
                 "--out", str(result)]) == 0
    out, err = capfd.readouterr()
    scored = json.loads(result.read_text())["tasks"]
    assert set(scored) == {"moeslim_code_nextline", "moeslim_prose_continuation"}  # the harness did run
    for noise in ("fatal: not a git repository", "pretrained", "already-initialized", "loglikelihood",
                  "Tokenizing inputs", "Generating test split", "examples/s"):
        assert noise not in err and noise not in out, noise
    assert "perplexity code: 1 of 1 batches done" in err  # our own progress stays
    assert "tasks: 1 of 2 tasks done" in err and "tasks: 2 of 2 tasks done" in err
    assert "code_nextline" in out and f"wrote {result}" in out
    assert logging.getLogger("lm_eval").propagate  # the loggers are restored after the harness ran


def test_third_party_output_goes_to_the_log(capfd: pytest.CaptureFixture[str]) -> None:
    import sys

    from moeslim.evaluate.quiet import third_party_output

    log = io.StringIO()
    before = logging.getLogger("lm_eval").handlers[:]
    with third_party_output(log):
        logging.getLogger("lm_eval.models.huggingface").warning("`pretrained` model kwarg is not of type `str`")
        print("a bar", file=sys.stderr)
    print("ours", file=sys.stderr)
    err = capfd.readouterr().err
    assert "pretrained" in log.getvalue() and "a bar" in log.getvalue()
    assert "pretrained" not in err and "a bar" not in err and "ours" in err
    assert logging.getLogger("lm_eval").handlers == before


def test_inspect_without_out_only_prints(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", str(tiny_model_dir), *CALIB]) == 0
    out = capsys.readouterr().out
    assert "architecture" in out and "expert load" in out and "wrote" not in out
    assert list(tmp_path.iterdir()) == []


def test_variants_print_one_line_each_and_send_lm_eval_to_the_log(tiny_model_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    """The demo's loop: per variant what it is and its headline numbers; lm-eval's output in the log file."""
    pytest.importorskip("lm_eval")
    import moeslim
    from moeslim.config import CalibrationConfig, EvalConfig
    from moeslim.workflows.stages import parse_stage
    from moeslim.workflows.variants import Variant, evaluate_variants

    monkeypatch.chdir(tmp_path)
    model, tokenizer = moeslim.load(tiny_model_dir)
    variant = Variant("freq-6", (parse_stage({"prune": {"method": "frequency", "keep": 6}}, "test"),))
    evaluation = EvalConfig(seq_len=32, max_windows=2, tasks=("moeslim_code_nextline",), task_limit=4, speed=False)
    capfd.readouterr()
    with (tmp_path / "third-party.log").open("w") as log:
        results, _ = evaluate_variants(str(tiny_model_dir), model, tokenizer, [variant],
                                       CalibrationConfig(data=("demo:code",), samples=4, seq_len=32), evaluation,
                                       tmp_path / "run", log=log)
    out, err = capfd.readouterr()
    assert [r.name for r in results] == ["original", "freq-6"]
    lines = out.splitlines()
    assert lines[0] == "1/2 original: evaluating" and lines[2].startswith("2/2 freq-6: prune(keep=6, method=frequency")
    assert re.match(r"  ppl code [\d.]+, ppl prose [\d.]+, KL [\d.]+, code_nextline \d+ %, weights [\d.]+ MiB$",
                    lines[3]), lines
    assert len(lines) == 4
    for noise in ("pretrained", "loglikelihood", "fatal:", "perplexity"):
        assert noise not in err and noise not in out, noise
    assert "pretrained" in (tmp_path / "third-party.log").read_text()  # kept, in the run folder
