"""The frontier's comparison logic, table, plot and JSON round trip, on synthetic measured points."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moeslim.evaluate.frontier import (
    BudgetRow,
    Frontier,
    FrontierPoint,
    best_single,
    frontier_lines,
    frontier_summary_table,
    nearest_at_least,
    paired,
    plot_frontier,
    point_of,
    rank_correlation,
)
from moeslim.evaluate.paired import paired_ratio
from moeslim.evaluate.report import write_report
from moeslim.evaluate.results import VariantResult
from moeslim.workflows.frontier import FrontierConfig, single_family
from moeslim.workflows.stages import parse_stage

MIB = 2**20


def _p(name: str, family: str, mib: float, ppl: float, kl: float | None = None, estimate: float | None = None
       ) -> FrontierPoint:
    return FrontierPoint(name=name, family=family, held_bytes=int(mib * MIB), ppl=ppl, kl=kl, top1=0.9,
                         estimate=estimate)


SINGLES = [
    _p("pmq-2.0", "quantize pmq", 14.0, 75.0, 0.02),
    _p("pmq-2.5", "quantize pmq", 15.0, 72.5, 0.008),
    _p("pmq-8", "quantize pmq", 22.0, 71.0, 0.0001),
    _p("uniform-3", "quantize uniform", 15.4, 72.0, 0.003),
    _p("enum-4", "prune enumerate", 32.0, 160.0, 0.77),
    _p("enum-6", "prune enumerate", 42.5, 107.0, 0.39),
    _p("lowrank-0.5", "lowrank svd-llm", 32.0, 73.0, 0.014),
]


def test_each_family_at_its_fewest_bytes_not_below_the_joint_plans() -> None:
    got = nearest_at_least(SINGLES, int(14.5 * MIB))
    # pmq-2.0 holds fewer bytes than the joint plan: not a candidate; pmq-2.5 (not pmq-8) represents PMQ
    assert [p.name for p in got] == ["uniform-3", "pmq-2.5", "lowrank-0.5", "enum-4"]  # sorted by perplexity
    assert best_single(SINGLES, int(14.5 * MIB)).name == "uniform-3"  # type: ignore[union-attr]
    # equal bytes count as "equal or larger"; above 15 MiB PMQ is represented by pmq-8
    assert [p.name for p in nearest_at_least(SINGLES, int(15.4 * MIB))] == ["pmq-8", "uniform-3", "lowrank-0.5",
                                                                              "enum-4"]
    assert [p.name for p in nearest_at_least(SINGLES, int(32.0 * MIB))] == ["lowrank-0.5", "enum-4"]
    assert best_single(SINGLES, int(43 * MIB)) is None


def test_ties_in_bytes_go_to_the_lower_perplexity() -> None:
    pts = [_p("a", "prune x", 10.0, 90.0), _p("b", "prune x", 10.0, 80.0), _p("c", "prune x", 12.0, 50.0)]
    assert [p.name for p in nearest_at_least(pts, 9 * MIB)] == ["b"]


def _frontier() -> Frontier:
    original = _p("original", "original", 53.0, 71.0)
    rows = [
        BudgetRow(0.15, int(7.95 * MIB), None, "the smallest joint plan holds 11.7 MiB"),
        BudgetRow(0.25, int(13.25 * MIB), _p("joint-25", "joint", 13.2, 79.0, 0.078, 5e4)),
        BudgetRow(0.4, int(21.2 * MIB), _p("joint-40", "joint", 21.1, 71.6, 0.0001, 15.0)),
        BudgetRow(0.6, int(31.8 * MIB), _p("joint-60", "joint", 31.5, 71.0, 0.00002, 0.46)),
    ]
    return Frontier(model="demo", original=original, budgets=rows, singles=list(SINGLES), seconds={"total": 1.0},
                    notes=["15%: no joint plan fits"])


def test_summary_table_ratio_against_the_best_single() -> None:
    lines = frontier_summary_table(_frontier())
    assert len(lines) == 2 + 4
    assert "no joint plan fits" in lines[2]
    row25 = lines[3]
    assert "uniform-3 (quantize uniform)" in row25 and f"**{79.0 / 72.0:.3f}**" in row25
    row40 = lines[4]  # at 21.1 MiB: pmq-8 (22 MiB) and the pruned/low-rank ones at 32 MiB; lowest ppl pmq-8
    assert "pmq-8" in row40 and f"**{71.6 / 71.0:.3f}**" in row40
    row60 = lines[5]  # at 31.5 MiB only lowrank-0.5 and enum-4 hold as much
    assert "lowrank-0.5" in row60 and f"**{71.0 / 73.0:.3f}**" in row60


def test_rank_correlation_of_estimate_and_kl() -> None:
    rho, n = rank_correlation(_frontier())
    assert n == 3 and rho == pytest.approx(1.0)
    f = _frontier()
    f.budgets[3] = BudgetRow(0.6, 0, _p("joint-60", "joint", 31.5, 71.0, 0.5, 0.46))  # KL order broken
    rho, n = rank_correlation(f)
    assert n == 3 and rho == pytest.approx(-0.5)  # ranks (3, 2, 1) vs (2, 1, 3)
    f.budgets = f.budgets[:3]
    rho, n = rank_correlation(f)
    assert n == 2 and math.isnan(rho)


def test_json_round_trip_and_report_section(tmp_path) -> None:
    f = _frontier()
    back = Frontier.from_dict(json.loads(json.dumps(f.to_dict())))
    assert back == f
    text = "\n".join(frontier_lines(f, "frontier.png"))
    assert "spearman(estimated error, KL) over 3 joint plans: 1.000" in text and "![frontier](frontier.png)" in text
    assert "pmq-2.5 (best single)" not in text and "uniform-3 (best single)" in text
    png = plot_frontier(f, tmp_path / "frontier.png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    original = VariantResult(name="original", perplexity={"code": 60.0, "prose": 84.0}, param_bytes=53 * MIB)
    report = write_report([original], tmp_path / "r", frontier=f)
    md = report.read_text()
    assert "## Frontier" in md and "![frontier](frontier.png)" in md and (tmp_path / "r" / "frontier.png").exists()
    assert json.loads((tmp_path / "r" / "report.json").read_text())["frontier"]["model"] == "demo"


def test_point_of_a_result_needs_bytes_and_perplexity() -> None:
    r = VariantResult(name="x", perplexity={"code": 4.0, "prose": 9.0}, kl_divergence={"code": 0.1, "prose": 0.3},
                      top1_agreement={"code": 0.8, "prose": 0.6}, param_bytes=5 * MIB)
    p = point_of(r, "quantize pmq")
    assert p.ppl == pytest.approx(6.0) and p.kl == pytest.approx(0.2) and p.top1 == pytest.approx(0.7)
    with pytest.raises(ValueError, match="held bytes"):
        point_of(VariantResult(name="y", perplexity={"code": 4.0}), "prune reap")


def test_single_family_of_stages() -> None:
    prune = parse_stage({"prune": {"method": "reap", "keep": 4}}, "t")
    quant = parse_stage({"quantize": {"method": "pmq", "bits": 2.5}}, "t")
    skip = parse_stage({"skip": {}}, "t")
    assert single_family((prune,)) == "prune reap"
    assert single_family((quant,)) == "quantize pmq"
    assert single_family((skip,)) is None and single_family((prune, skip)) is None and single_family(()) is None


def test_frontier_config_rejects_bad_budgets() -> None:
    from moeslim.config import ConfigError

    with pytest.raises(ConfigError, match="in \\(0, 1\\)"):
        FrontierConfig(budgets=(0.25, 1.0))
    with pytest.raises(ConfigError, match="each budget once"):
        FrontierConfig(budgets=(0.25, 0.25))


@pytest.mark.parametrize("hold", [("auto",), ("auto", "bfloat16")])
def test_run_frontier_on_a_tiny_model(tmp_path, hold) -> None:
    """Joint plans within their budgets (shares of the original as given, also when the joint plans may hold
    bfloat16), PMQ at no fewer bytes than each, an unreachable budget named, plans saved, the original untouched;
    with two hold dtypes each plan's choice and the candidates' estimates are noted."""
    from tiny_models import tiny_model
    from tiny_tokenizers import byte_level_bpe

    from moeslim.config import CalibrationConfig, EvalConfig
    from moeslim.data.calibration_set import build_calibration_set
    from moeslim.evaluate import evaluate_model
    from moeslim.evaluate.driver import build_reference
    from moeslim.models.held_bytes import held_bytes
    from moeslim.workflows.frontier import PMQ_FAMILY, run_frontier

    tok = byte_level_bpe()
    model = tiny_model("mixtral", vocab=len(tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = build_calibration_set(CalibrationConfig(data=("demo:code",), samples=4, seq_len=32, batch_size=2), tok)
    evaluation = EvalConfig(data=("demo:code",), seq_len=32, max_windows=2, tasks=(), speed=False)
    reference = build_reference(model, tok, evaluation, "tiny")
    original = evaluate_model(model, tok, evaluation, name="original", reference=reference, progress=False)
    config = FrontierConfig(budgets=(0.01, 0.6), max_tokens=256, hold_dtypes=hold)
    f = run_frontier(model, tok, "tiny", "tiny", calib, evaluation, reference, original, [], config,
                     plan_dir=tmp_path / "plans")
    low, high = f.budgets
    assert next(p.dtype for p in model.parameters()) == torch.float32
    assert high.target_bytes == int(0.6 * held_bytes(model))
    assert any("bfloat16" in note for note in f.notes) == ("bfloat16" in hold)
    assert any(note.startswith("60%: joint plan held in") and "estimates: auto" in note
               for note in f.notes) == (len(hold) > 1)
    assert low.joint is None and "below the smallest size" in low.note and f.notes
    assert high.joint is not None and high.joint.held_bytes <= high.target_bytes
    assert high.joint.estimate is not None and high.joint.kl is not None and high.joint.kl >= 0
    (pmq,) = [p for p in f.singles if p.family == PMQ_FAMILY]
    assert pmq.held_bytes >= high.joint.held_bytes
    assert best_single(f.singles, high.joint.held_bytes) == pmq
    assert (tmp_path / "plans" / "joint-60" / "00-joint.json").exists()
    assert (tmp_path / "plans" / pmq.name / "00-quantize.json").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_demo_frontier_step_reuses_the_demos_single_methods(tmp_path, capsys) -> None:
    """The demo's frontier step: its single-method variants (not skipping, not task-specific calibrations, not
    chains) join the PMQ runs; frontier.json, the report section and the console table are written."""
    from tiny_models import tiny_model
    from tiny_tokenizers import byte_level_bpe

    from moeslim.config import CalibrationConfig, EvalConfig
    from moeslim.data.calibration_set import build_calibration_set
    from moeslim.evaluate.driver import build_reference
    from moeslim.workflows import demo
    from moeslim.workflows.variants import Variant

    tok = byte_level_bpe()
    model = tiny_model("mixtral", vocab=len(tok))
    calib = build_calibration_set(CalibrationConfig(data=("demo:code",), samples=4, seq_len=32, batch_size=2), tok)
    evaluation = EvalConfig(data=("demo:code",), seq_len=32, max_windows=2, tasks=(), speed=False)
    reference = build_reference(model, tok, evaluation, "tiny")
    stage = {"prune": parse_stage({"prune": {"method": "frequency", "keep": 3}}, "t"),
             "skip": parse_stage({"skip": {}}, "t")}
    variants = [Variant("freq-3", (stage["prune"],)), Variant("skip", (stage["skip"],)),
                Variant("freq-3-code", (stage["prune"],), calibration=CalibrationConfig(data=("demo:code",))),
                Variant("freq-3+skip", (stage["prune"], stage["skip"]))]
    base = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    def result(name: str, held: int, ppl: float) -> VariantResult:
        return VariantResult(name=name, perplexity={"code": ppl}, kl_divergence={"code": 0.1}, param_bytes=held)

    results = [result("original", base, 100.0), result("freq-3", int(0.8 * base), 150.0),
               result("skip", base, 101.0), result("freq-3-code", int(0.8 * base), 140.0),
               result("freq-3+skip", int(0.8 * base), 160.0)]
    config = demo.DemoConfig(quick=True, out=str(tmp_path), frontier=True)
    demo_model = demo.DemoModel("tiny", "tiny", tmp_path, None)
    from rich.console import Console

    f = demo._frontier(config, demo_model, model, tok, 4, variants, results, calib, evaluation, reference,
                       Console(soft_wrap=True))
    assert f is not None and [b.share for b in f.budgets] == list(demo.QUICK_BUDGETS)
    assert {p.name for p in f.singles if p.family == "prune frequency"} == {"freq-3"}
    assert all(p.family in ("prune frequency", "quantize pmq") for p in f.singles)
    assert Frontier.from_dict(json.loads((tmp_path / demo.FRONTIER_FILE).read_text())) == f
    demo._print_frontier(f, Console(soft_wrap=True))
    out = capsys.readouterr().out
    assert "| budget | joint MiB |" in out and "spearman(estimated error, KL)" in out
    assert demo.frontier_config(demo.DemoConfig(frontier=False), 8) is None
    fine = demo.frontier_config(demo.DemoConfig(frontier=True), 64)
    assert fine is not None and fine.size_step > 1 and fine.budgets == demo.FRONTIER_BUDGETS


def _scored(name: str, nll: dict[str, list[float]], tokens: dict[str, int]) -> VariantResult:
    detail = {d: {"window_nll": rows, "tokens": tokens[d]} for d, rows in nll.items()}
    ppl = {d: math.exp(sum(rows) / tokens[d]) for d, rows in nll.items()}
    return VariantResult(name=name, perplexity=ppl, param_bytes=5 * MIB, extra={"perplexity_detail": detail})


def test_the_table_gives_the_ratio_paired_over_the_test_windows() -> None:
    tokens = {"code": 40, "prose": 40}
    joint = point_of(_scored("joint-25", {"code": [50.0, 61.0, 40.0], "prose": [70.0, 80.0, 75.0]}, tokens), "joint")
    single = point_of(_scored("uniform-3", {"code": [50.5, 60.0, 41.0], "prose": [70.5, 79.0, 76.0]}, tokens),
                      "quantize uniform")
    assert joint.window_nll == {"code": [50.0, 61.0, 40.0], "prose": [70.0, 80.0, 75.0]} and joint.tokens == tokens
    f = Frontier(model="demo", original=_p("original", "original", 53.0, 71.0),
                 budgets=[BudgetRow(0.25, 5 * MIB, joint)], singles=[single])
    row = frontier_summary_table(f)[2]
    pair = paired_ratio(joint.window_nll, single.window_nll, tokens)
    assert pair.ratio == pytest.approx(joint.ppl / single.ppl)
    assert row.endswith(f"| {pair.low:.4f}-{pair.high:.4f} |") and pair.low < 1 < pair.high
    assert Frontier.from_dict(json.loads(json.dumps(f.to_dict()))) == f
    # points scored on other windows (or without them) get no interval
    other = point_of(_scored("pmq", {"code": [50.0, 60.0], "prose": [70.0, 79.0]}, {"code": 27, "prose": 27}),
                     "quantize pmq")
    assert paired(joint, other) is None and paired(joint, _p("x", "prune x", 6.0, 70.0)) is None
    assert frontier_summary_table(_frontier())[3].endswith("| - |")
