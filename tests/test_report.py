"""report.md / report.json / PNG plots from variant results."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from moeslim.evaluate.report import RESULT_FILE, load_results, write_report
from moeslim.evaluate.results import VariantResult
from moeslim.evaluate.table import print_table, side_by_side_table


def _variants() -> list[VariantResult]:
    base = VariantResult(
        name="original", description="demo model", perplexity={"code": 6.1, "prose": 14.2},
        tasks={"moeslim_code_nextline": 0.61}, param_bytes=120_000_000, disk_bytes=121_000_000,
        activated_params=9_000_000, expert_calls_per_token=16.0, decode_tps=50.0, prefill_tps=900.0,
        speed_ratio=1.0,
        extra={"task_status": {"moeslim_code_nextline": {"status": "ran", "backend": "lm-eval 0.4.13"},
                               "hellaswag": {"status": "skipped: offline"}},
               "generations": {"def f(x):": "\n    return x"}},
    )  # fmt: skip
    pruned = VariantResult(
        name="prune-6", description="keep 6 of 8 experts", perplexity={"code": 6.6, "prose": 15.0},
        tasks={"moeslim_code_nextline": 0.58}, param_bytes=92_000_000, activated_params=9_000_000,
        expert_calls_per_token=16.0, decode_tps=55.0, speed_ratio=1.1,
        plan={"kind": "prune", "num_experts": 8,
              "layers": {str(i): sorted({(i + j) % 8 for j in range(6)}) for i in range(8)}},
    )  # fmt: skip
    skipped = VariantResult(
        name="skip-naee", perplexity={"code": 6.3, "prose": 14.6}, param_bytes=120_000_000,
        expert_calls_per_token=11.5, decode_tps=61.0, speed_ratio=1.22,
        plan={"kind": "skip", "layers": {str(i): {"beta": 0.4} for i in range(8)},
              "skip_rate": {str(i): 0.1 + 0.05 * i for i in range(8)}},
    )  # fmt: skip
    quantized = VariantResult(
        name="pmq-2.5", perplexity={"code": 6.4, "prose": 14.9}, param_bytes=40_000_000,
        plan={"kind": "quantize", "layers": {str(i): {"bits": [3, 2, 2, 3, 1, 3, 2, 4]} for i in range(8)}},
    )  # fmt: skip
    return [base, pruned, skipped, quantized]


def test_write_report_files_parse(tmp_path: Path) -> None:
    md = write_report(_variants(), tmp_path)
    text = md.read_text()
    for name in ("original", "prune-6", "skip-naee", "pmq-2.5"):
        assert sum(line.startswith(f"| **{name}**") for line in text.splitlines()) == 1
    assert "hellaswag: skipped: offline" in text and "lm-eval 0.4.13" in text
    data = json.loads((tmp_path / "report.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["original", "prune-6", "skip-naee", "pmq-2.5"]
    assert set(data["plots"]) == {
        "quality_vs_cost.png",
        "kept_experts_prune-6.png",
        "skip_rate_skip-naee.png",
        "expert_bits_pmq-2.5.png",
    }
    for plot in data["plots"]:
        image = mpimg.imread(tmp_path / plot)
        assert image.ndim == 3 and image.shape[0] > 100
        assert f"]({plot})" in text
    assert [r.name for r in load_results([tmp_path])] == ["original", "prune-6", "skip-naee", "pmq-2.5"]


def test_run_folders_and_round_trip(tmp_path: Path) -> None:
    variants = _variants()
    runs = []
    for v in variants:
        run = tmp_path / v.name
        run.mkdir()
        plan, v.plan = v.plan, None
        (run / RESULT_FILE).write_text(json.dumps(v.to_dict()))
        if plan is not None:
            (run / "plan.json").write_text(json.dumps(plan))
        runs.append(run)
    loaded = load_results(runs)
    assert loaded[1].plan["kind"] == "prune" and loaded[0].plan is None
    write_report(runs, tmp_path / "report")
    assert (tmp_path / "report" / "kept_experts_prune-6.png").exists()
    d = variants[0].to_dict() | {"future_field": 3}
    assert VariantResult.from_dict(d).extra["future_field"] == 3
    with pytest.raises(ValueError):
        write_report([], tmp_path / "empty")


def test_one_table_builder_for_console_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = _variants()
    text = write_report(results, tmp_path).read_text()
    detail = side_by_side_table(results, detail=True)
    for row in detail.rows:  # report.md draws exactly the builder's cells
        assert "| " + " | ".join((f"**{row[0]}**", *row[1:])) + " |" in text
    console = side_by_side_table(results)
    for crow, drow in zip(console.rows, detail.rows, strict=True):  # the console shows a subset of the same cells
        assert all(drow[detail.header.index(name)] == cell for name, cell in zip(console.header, crow, strict=True))
    weights = console.header.index("weights MiB")
    assert [row[weights] for row in console.rows] == ["114.4", "87.7", "114.4", "38.1"]  # bytes / 2**20
    assert console.rows[1][console.header.index("ppl code")] == "6.60 (+8%)"  # vs the first result
    print_table(results, "side by side")
    shown = capsys.readouterr().out
    assert "87.7" in shown and "6.60 (+8%)" in shown and "code_nextline" in shown
