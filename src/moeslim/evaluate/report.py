"""Side-by-side report of variants: report.md (table), report.json, PNG plots."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from moeslim.evaluate.frontier import Frontier, frontier_lines, plot_frontier
from moeslim.evaluate.plots import mean_ppl, plot_expert_bits, plot_kept_experts, plot_quality_vs_cost, plot_skip_rate
from moeslim.evaluate.results import VariantResult
from moeslim.evaluate.table import markdown_table, side_by_side_table
from moeslim.outputs import write_text_atomic

RESULT_FILE = "result.json"  # a run folder holds its VariantResult here (and its plan in plan.json)
PLAN_FILE = "plan.json"
REPORT_VERSION = 1

ResultLike = VariantResult | dict[str, Any] | str | Path


def _from_path(path: Path) -> list[VariantResult]:
    """A result.json / report.json file, or a run folder holding one (plus plan.json)."""
    if path.is_dir():
        plan_file = path / PLAN_FILE
        for name in (RESULT_FILE, "report.json"):
            if (path / name).exists():
                results = _from_path(path / name)
                if plan_file.exists() and len(results) == 1 and results[0].plan is None:
                    results[0].plan = json.loads(plan_file.read_text())
                return results
        raise FileNotFoundError(f"{path} has no {RESULT_FILE} or report.json")
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "variants" in data:
        return [VariantResult.from_dict(v) for v in data["variants"]]
    return [VariantResult.from_dict(data)]


def load_results(items: Iterable[ResultLike]) -> list[VariantResult]:
    out: list[VariantResult] = []
    for item in items:
        if isinstance(item, VariantResult):
            out.append(item)
        elif isinstance(item, dict):
            out.append(VariantResult.from_dict(item))
        else:
            out.extend(_from_path(Path(item)))
    return out


def _task_lines(results: Sequence[VariantResult]) -> list[str]:
    """Which tasks ran and which were skipped, per variant (from extra["task_status"])."""
    lines = []
    for r in results:
        status = r.extra.get("task_status") or {}
        ran = sorted(t for t, s in status.items() if s.get("status") == "ran") or sorted(r.tasks)
        other = {t: s.get("status") for t, s in status.items() if s.get("status") != "ran"}
        backend = {s.get("backend") for s in status.values() if s.get("backend")}
        if ran or other:
            note = f" (scored by {', '.join(sorted(backend))})" if backend else ""
            lines.append(
                f"- **{r.name}**: ran {', '.join(ran) or 'none'}{note}"
                + "".join(f"; {t}: {s}" for t, s in sorted(other.items()))
            )
    return lines


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "variant"


def _plan_plots(results: Sequence[VariantResult], out_dir: Path) -> list[Path]:
    plots = []
    for r in results:
        if r.plan is None:
            continue
        kind = r.plan.get("kind")
        if kind == "prune" and r.plan.get("layers"):
            plots.append(plot_kept_experts(r.plan, out_dir / f"kept_experts_{_slug(r.name)}.png", r.name))
        elif kind == "skip" and r.plan.get("skip_rate"):
            plots.append(plot_skip_rate(r.plan, out_dir / f"skip_rate_{_slug(r.name)}.png", r.name))
        elif kind == "quantize" and r.plan.get("layers"):
            plots.append(plot_expert_bits(r.plan, out_dir / f"expert_bits_{_slug(r.name)}.png", r.name))
    return plots


def _generation_lines(results: Sequence[VariantResult]) -> list[str]:
    """Greedy continuations stored as extra["generations"] = {prompt: text}, shown per prompt."""
    prompts = [p for r in results for p in (r.extra.get("generations") or {})]
    lines = []
    for prompt in dict.fromkeys(prompts):
        lines += ["", f"Prompt: `{prompt!r}`", ""]
        for r in results:
            text = (r.extra.get("generations") or {}).get(prompt)
            if text is not None:
                lines.append(f"- **{r.name}**: `{text!r}`")
    return lines


FRONTIER_PLOT = "frontier.png"


def write_report(items: Iterable[ResultLike], out_dir: str | Path, title: str = "moeslim report",
                 frontier: Frontier | None = None) -> Path:
    """Write report.md, report.json and PNG plots for variants (results, dicts, result files or run
    folders; the first is the reference for ratios). ``frontier``: a frontier section (table, plot
    ``frontier.png``, the estimate's rank correlation with KL). Returns the path of report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = load_results(items)
    if not results:
        raise ValueError("nothing to report: no variant results")
    quality = plot_quality_vs_cost(results, out_dir / "quality_vs_cost.png")
    plan_plots = _plan_plots(results, out_dir)
    frontier_plot = plot_frontier(frontier, out_dir / FRONTIER_PLOT) if frontier is not None else None
    payload: dict[str, Any] = {
        "version": REPORT_VERSION,
        "variants": [r.to_dict() for r in results],
        "plots": [p.name for p in [quality, *plan_plots, *([frontier_plot] if frontier_plot else [])]],
    }
    if frontier is not None:
        payload["frontier"] = frontier.to_dict()
    write_text_atomic(out_dir / "report.json", json.dumps(payload, indent=2, default=str) + "\n")
    md = [f"# {title}", "", *markdown_table(side_by_side_table(results, detail=True)), ""]
    md += [f"- **{r.name}**: {r.description}" for r in results if r.description]
    md += [
        "",
        "Perplexity: lower is better. Expert calls/token: routed expert calls summed over MoE layers.",
        "decode x: decode tokens/s relative to the first variant, timed interleaved in one process.",
        "",
    ]
    if frontier is not None:
        md += [*frontier_lines(frontier, FRONTIER_PLOT), ""]
    if task_lines := _task_lines(results):
        md += ["## Tasks", "", *task_lines, ""]
    md += ["## Plots", "", f"![quality vs cost]({quality.name})", ""]
    md += [line for p in plan_plots for line in (f"![{p.stem}]({p.name})", "")]
    if gen := _generation_lines(results):
        md += ["", "## Greedy continuations", *gen]
    scored = [(ppl, r.name) for r in results if (ppl := mean_ppl(r)) is not None]
    if scored:
        md += ["", f"Lowest perplexity: **{min(scored, key=lambda pair: pair[0])[1]}**."]
    path = out_dir / "report.md"
    write_text_atomic(path, "\n".join(md) + "\n")
    return path
