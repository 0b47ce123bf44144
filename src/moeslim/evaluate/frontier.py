"""The size-quality frontier: the joint plan at several byte budgets against the best single method.

A budget is a share of the original's held bytes. At each budget the joint plan is applied and measured (held
bytes J, as ``evaluate.cost.param_bytes`` measures them). Each single-method family (PMQ, uniform GPTQ, one
pruning criterion, low-rank, merging) is represented by its measured setting of the fewest bytes that is still
>= J (its setting nearest the budget from above: comparing against a much larger setting of a family says little),
and the best single method is the family representative of lowest perplexity. The joint plan meets its goal
at a budget when its perplexity is <= the best single method's (ratio <= 1). Where both were scored window by
window on the same test windows, the ratio's 95 % interval paired over those windows (``paired.py``) says whether
the difference is more than the windows resolve.

Perplexity is the geometric mean over the evaluated domains (every domain weighs the same); KL divergence and
top-1 agreement are means over the domains. The planner's estimated error is checked against measured KL over
the joint plans by Spearman's rank correlation (scipy).

Pure: measured numbers in, tables, a plot and JSON out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeslim.evaluate.paired import PairedRatio, paired_ratio
from moeslim.evaluate.plots import mean_ppl
from moeslim.evaluate.results import VariantResult
from moeslim.outputs import atomic_file

MIB = 2**20
JOINT = "joint"

__all__ = ["BudgetRow", "Frontier", "FrontierPoint", "best_single", "frontier_lines", "frontier_summary_table",
           "nearest_at_least", "plot_frontier", "point_of", "rank_correlation"]


@dataclass(frozen=True)
class FrontierPoint:
    """One measured model: ``family`` "joint" or a single method's family ("quantize pmq", "prune reap", ...);
    ``ppl`` geometric mean over domains; ``kl``/``top1`` means over domains (None: not measured); ``estimate``
    the joint planner's estimated error."""

    name: str
    family: str
    held_bytes: int
    ppl: float
    kl: float | None = None
    top1: float | None = None
    estimate: float | None = None
    # per domain: each test window's summed NLL, and the domain's predicted tokens (None: not recorded), for the
    # ratio paired over the same windows
    window_nll: dict[str, list[float]] | None = None
    tokens: dict[str, int] | None = None


@dataclass(frozen=True)
class BudgetRow:
    """One budget: ``share`` of the original's held bytes, its ``target_bytes``, the measured joint plan (None
    when no plan fits: ``note`` says why)."""

    share: float
    target_bytes: int
    joint: FrontierPoint | None
    note: str = ""


@dataclass
class Frontier:
    """A model's frontier: the original, one row per budget, every single-method point measured (the demo's
    variants and the runs made for the budgets), and how long its parts took."""

    model: str
    original: FrontierPoint
    budgets: list[BudgetRow]
    singles: list[FrontierPoint]
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Frontier:
        def point(d: dict[str, Any] | None) -> FrontierPoint | None:
            return None if d is None else FrontierPoint(**d)

        original = point(data["original"])
        if original is None:
            raise ValueError("a frontier needs the original's point")
        budgets = [BudgetRow(share=b["share"], target_bytes=b["target_bytes"], joint=point(b["joint"]),
                             note=b.get("note", "")) for b in data["budgets"]]
        return cls(model=data["model"], original=original, budgets=budgets,
                   singles=[FrontierPoint(**s) for s in data["singles"]], seconds=dict(data.get("seconds", {})),
                   notes=list(data.get("notes", [])))


def _mean(values: dict[str, float]) -> float | None:
    return sum(values.values()) / len(values) if values else None


def point_of(result: VariantResult, family: str, estimate: float | None = None) -> FrontierPoint:
    """A measured variant as a frontier point (it needs held bytes and perplexity)."""
    ppl = mean_ppl(result)
    if ppl is None or not result.param_bytes:
        raise ValueError(f"{result.name}: a frontier point needs its perplexity and held bytes")
    detail = result.extra.get("perplexity_detail", {})
    windows = {d: detail.get(d, {}) for d in result.perplexity}
    recorded = bool(windows) and all("window_nll" in w and "tokens" in w for w in windows.values())
    return FrontierPoint(name=result.name, family=family, held_bytes=int(result.param_bytes), ppl=ppl,
                         kl=_mean(result.kl_divergence), top1=_mean(result.top1_agreement), estimate=estimate,
                         window_nll={d: list(w["window_nll"]) for d, w in windows.items()} if recorded else None,
                         tokens={d: int(w["tokens"]) for d, w in windows.items()} if recorded else None)


def paired(a: FrontierPoint, b: FrontierPoint) -> PairedRatio | None:
    """ppl(a) / ppl(b) paired over their test windows with its 95 % interval (None: windows not recorded for
    both, or not the same windows)."""
    if a.window_nll is None or b.window_nll is None or a.tokens is None or a.tokens != b.tokens:
        return None
    try:
        return paired_ratio(a.window_nll, b.window_nll, a.tokens)
    except ValueError:
        return None


def nearest_at_least(singles: Sequence[FrontierPoint], held_bytes: int) -> list[FrontierPoint]:
    """Per family, its point of the fewest bytes among those holding >= ``held_bytes`` (ties: lower perplexity);
    sorted by perplexity. Families with no such point are absent."""
    chosen: dict[str, FrontierPoint] = {}
    for p in singles:
        if p.held_bytes < held_bytes:
            continue
        have = chosen.get(p.family)
        if have is None or (p.held_bytes, p.ppl) < (have.held_bytes, have.ppl):
            chosen[p.family] = p
    return sorted(chosen.values(), key=lambda p: p.ppl)


def best_single(singles: Sequence[FrontierPoint], held_bytes: int) -> FrontierPoint | None:
    """The best single method at equal or larger bytes: the lowest-perplexity family representative of
    ``nearest_at_least`` (None: no single method holds that many bytes)."""
    candidates = nearest_at_least(singles, held_bytes)
    return candidates[0] if candidates else None


def rank_correlation(frontier: Frontier) -> tuple[float, int]:
    """Spearman's rho between the planner's estimated error and measured KL over the joint plans, and how many
    plans it is over (nan below 3 plans, or when either side is constant)."""
    from scipy.stats import spearmanr

    pairs = [(row.joint.estimate, row.joint.kl) for row in frontier.budgets
             if row.joint is not None and row.joint.estimate is not None and row.joint.kl is not None]
    if len(pairs) < 3 or len({e for e, _ in pairs}) < 2 or len({k for _, k in pairs}) < 2:
        return float("nan"), len(pairs)
    return float(spearmanr([e for e, _ in pairs], [k for _, k in pairs]).statistic), len(pairs)


def _mib(n: int) -> str:
    return f"{n / MIB:.2f}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _budget_label(row: BudgetRow) -> str:
    return f"{row.share:.0%} ({row.target_bytes / MIB:.2f} MiB)"


def frontier_summary_table(frontier: Frontier) -> list[str]:
    """One markdown row per budget: the joint plan, the best single method at equal or larger bytes, the ratio."""
    base = frontier.original
    lines = ["| budget | joint MiB | joint ppl | joint KL | best single (>= joint's bytes) | its MiB | its ppl | "
             "its KL | ppl joint / best | paired 95 % interval |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in frontier.budgets:
        if row.joint is None:
            lines.append(f"| {_budget_label(row)} | - | - | - | no joint plan fits: {row.note} | | | | | |")
            continue
        j = row.joint
        best = best_single(frontier.singles, j.held_bytes)
        joint_cells = (f"{_mib(j.held_bytes)} | {j.ppl:.2f} ({j.ppl / base.ppl - 1:+.1%}) | "
                       f"{_fmt(j.kl, '.4f')}")
        if best is None:
            lines.append(f"| {_budget_label(row)} | {joint_cells} | none holds that many bytes | | | | | |")
            continue
        pair = paired(j, best)
        interval = "-" if pair is None else f"{pair.low:.4f}-{pair.high:.4f}"
        lines.append(f"| {_budget_label(row)} | {joint_cells} | {best.name} ({best.family}) | "
                     f"{_mib(best.held_bytes)} | {best.ppl:.2f} ({best.ppl / base.ppl - 1:+.1%}) | "
                     f"{_fmt(best.kl, '.4f')} | **{j.ppl / best.ppl:.3f}** | {interval} |")
    return lines


def _detail_table(frontier: Frontier) -> list[str]:
    """Every budget's joint plan and each family's representative (the candidates of the best single method)."""
    base = frontier.original
    lines = ["| budget | variant | method | MiB held | % of original | ppl (geo) | vs original | KL | top-1 | "
             "est. error |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in frontier.budgets:
        if row.joint is None:
            continue
        candidates = nearest_at_least(frontier.singles, row.joint.held_bytes)
        for p in [row.joint, *candidates]:
            star = " (best single)" if candidates and p is candidates[0] else ""
            lines.append(f"| {row.share:.0%} | {p.name}{star} | {p.family} | {_mib(p.held_bytes)} | "
                         f"{p.held_bytes / base.held_bytes:.1%} | {p.ppl:.2f} | {p.ppl / base.ppl - 1:+.1%} | "
                         f"{_fmt(p.kl, '.4f')} | {_fmt(p.top1, '.1%')} | {_fmt(p.estimate, '.4g')} |")
    return lines


def frontier_lines(frontier: Frontier, plot: str | None = None) -> list[str]:
    """The report's frontier section (markdown lines): summary table, plot, rank correlation, details."""
    base = frontier.original
    rho, n = rank_correlation(frontier)
    lines = ["## Frontier: joint plan vs the best single method", "",
             f"Budgets are shares of the original's {_mib(base.held_bytes)} MiB held (ppl {base.ppl:.2f}, geometric "
             "mean over the test domains). At each budget the joint plan (`moeslim plan joint --target-ratio`) is "
             "applied and measured; each single method is represented by its measured setting of the fewest bytes "
             "that is still at least the joint plan's, and the best single method is the one of lowest perplexity "
             "among them.", "", *frontier_summary_table(frontier), ""]
    if plot:
        lines += [f"![frontier]({plot})", ""]
    lines += [f"spearman(estimated error, KL) over {n} joint plans: {_fmt(rho, '.3f')}", ""]
    lines += [f"- {note}" for note in frontier.notes]
    if frontier.notes:
        lines.append("")
    lines += ["### Candidates at each budget", "", *_detail_table(frontier)]
    return lines


def plot_frontier(frontier: Frontier, path: Path) -> Path:
    """Perplexity (log) vs MiB held: the joint plans as a line, each single-method family as its own markers,
    the best single method at each budget ringed, the original as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5))
    joints = sorted((row.joint for row in frontier.budgets if row.joint is not None), key=lambda p: p.held_bytes)
    families = sorted({p.family for p in frontier.singles})
    markers = "s^vDx+P*<>ph"
    colors = plt.get_cmap("tab10")
    for i, family in enumerate(families):
        pts = sorted((p for p in frontier.singles if p.family == family), key=lambda p: p.held_bytes)
        ax.plot([p.held_bytes / MIB for p in pts], [p.ppl for p in pts], linestyle=":", linewidth=1,
                marker=markers[i % len(markers)], color=colors((i + 1) % 10), label=family, alpha=0.85)
    if joints:
        ax.plot([p.held_bytes / MIB for p in joints], [p.ppl for p in joints], "o-", color=colors(0), linewidth=2,
                markersize=7, label="joint plan", zorder=4)
    best = [b for j in joints if (b := best_single(frontier.singles, j.held_bytes)) is not None]
    if best:
        ax.scatter([p.held_bytes / MIB for p in best], [p.ppl for p in best], s=160, facecolors="none",
                   edgecolors="black", linewidths=1.2, label="best single at >= joint's bytes", zorder=5)
    ax.axhline(frontier.original.ppl, color="gray", linestyle="--", linewidth=1,
               label=f"original ({frontier.original.held_bytes / MIB:.1f} MiB)")
    for row in frontier.budgets:
        ax.axvline(row.target_bytes / MIB, color="gray", linewidth=0.5, alpha=0.4)
    ax.set_yscale("log")
    ax.set_xlabel("MiB held (measured)")
    ax.set_ylabel("perplexity (geometric mean of the test domains) ↓")
    ax.set_title(f"{frontier.model}: quality vs size (budgets: thin vertical lines)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # off the points
    fig.tight_layout()
    with atomic_file(path) as tmp:  # a killed run leaves no half-written picture
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
