"""PNG plots of a report (matplotlib Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot loads
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from moeslim.evaluate.results import VariantResult  # noqa: E402
from moeslim.outputs import atomic_file  # noqa: E402


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG and close it."""
    fig.tight_layout()
    with atomic_file(path) as tmp:  # a killed run leaves no half-written picture
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def mean_ppl(result: VariantResult) -> float | None:
    """Geometric mean over domains: every domain weighs the same whatever its ppl scale."""
    vals = [v for v in result.perplexity.values() if v and math.isfinite(v) and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def _label_points(ax: Axes, xs: list[float], ys: list[float], labels: list[str]) -> None:
    """A label beside each point; where points crowd, the upper one's label goes above it and the
    lower one's below, so a label never sits nearer to a neighbour than to its own point."""
    x_span = (max(xs) - min(xs)) or 1.0
    y_span = (max(ys) - min(ys)) or 1.0
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        near = [j for j in range(len(xs))
                if j != i and abs(xs[j] - x) < 0.08 * x_span and abs(ys[j] - y) < 0.08 * y_span]
        upper = all(ys[j] < y or (ys[j] == y and j > i) for j in near)
        dy = -3 if not near else (8 if upper else -14)
        ax.annotate(
            labels[i],
            (x, y),
            textcoords="offset points",
            xytext=(7, dy),
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
        )


def _scatter_panel(ax: Axes, points: list[tuple[str, float, float]], xlabel: str, log_x: bool) -> None:
    if not points:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        return
    names, xs, ys = zip(*points, strict=True)
    colors = plt.get_cmap("tab20")(range(len(points)))
    for name, x, y, color in zip(names, xs, ys, colors, strict=True):
        ax.scatter([x], [y], color=color, s=50, zorder=3, label=name)
    _label_points(ax, list(xs), list(ys), list(names))
    if min(ys) > 0 and max(ys) / min(ys) > 3:
        ax.set_yscale("log")  # perplexities of pruned variants span orders of magnitude
    if log_x and min(xs) > 0 and max(xs) / min(xs) > 4:
        ax.set_xscale("log")
    ax.margins(x=0.2, y=0.2)
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)


def plot_quality_vs_cost(results: Sequence[VariantResult], path: Path) -> Path:
    """Left: perplexity vs resident weight size (MiB). Right: perplexity vs routed expert calls per token."""
    domains = sorted({d for r in results for d in r.perplexity})
    ylabel = f"perplexity (geo-mean of {', '.join(domains)}) ↓" if len(domains) > 1 else "perplexity ↓"
    size_pts, call_pts = [], []
    for r in results:
        ppl = mean_ppl(r)
        if ppl is None:
            continue
        if r.param_bytes:
            size_pts.append((r.name, r.param_bytes / 2**20, ppl))
        if r.expert_calls_per_token is not None:
            call_pts.append((r.name, r.expert_calls_per_token, ppl))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    _scatter_panel(left, size_pts, "weights in memory (MiB, measured)", log_x=True)
    left.set_ylabel(ylabel)
    left.set_title("quality vs size")
    _scatter_panel(right, call_pts, "routed expert calls per token (all MoE layers)", log_x=False)
    right.set_title("quality vs expert compute")
    fig.suptitle("variants: lower-left is better")
    if size_pts or call_pts:
        # Crowded points can hide a text label; the legend names every colour.
        (right if call_pts else left).legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    return save_figure(fig, path)


def plot_kept_experts(plan: dict[str, Any], path: Path, title: str = "") -> Path:
    """Heatmap: decoder layer (rows) x original expert id (columns), filled = kept."""
    layers = sorted(plan["layers"], key=int)
    n_experts = int(plan.get("num_experts") or 1 + max(e for ids in plan["layers"].values() for e in ids))
    grid = [[1 if e in set(plan["layers"][layer]) else 0 for e in range(n_experts)] for layer in layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * n_experts + 2), max(2.5, 0.3 * len(layers) + 1.5)))
    cmap = ListedColormap(["#e6e6e6", "#2a6fb0"])  # pruned light grey, kept blue: readable in print
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_experts))
    ax.set_yticks(range(len(layers)), labels=layers)
    ax.set_xticks([x - 0.5 for x in range(1, n_experts)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(layers))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("original expert id")
    ax.set_ylabel("decoder layer")
    kept = sum(map(sum, grid))
    ax.set_title(f"{title + ': ' if title else ''}kept experts (blue), {kept}/{n_experts * len(layers)}")
    return save_figure(fig, path)


def plot_skip_rate(plan: dict[str, Any], path: Path, title: str = "") -> Path:
    """Bar per decoder layer: fraction of routed (token, expert) pairs skipped."""
    rates = plan.get("skip_rate") or {}
    layers = sorted(rates, key=int)
    values = [float(rates[layer]) for layer in layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.4 * len(layers) + 2), 3.5))
    ax.bar(range(len(layers)), values, color="tab:orange")
    ax.set_xticks(range(len(layers)), labels=layers)
    ax.set_ylim(0, max([1.0, *values]))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("skipped expert calls (fraction)")
    mean = sum(values) / len(values) if values else 0.0
    ax.axhline(mean, color="gray", linestyle="--", linewidth=1, label=f"mean {mean:.2f}")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{title + ': ' if title else ''}skip rate per layer")
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_expert_bits(plan: dict[str, Any], path: Path, title: str = "") -> Path:
    """Heatmap: decoder layer (rows) x expert id (columns), colour and number = bit-width of the expert."""
    layers = sorted(plan["layers"], key=int)
    grid = [list(plan["layers"][layer]["bits"]) for layer in layers]
    widths = sorted({b for row in grid for b in row})
    n_experts = max(len(row) for row in grid)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * n_experts + 2), max(2.5, 0.35 * len(layers) + 1.5)))
    cmap = plt.get_cmap("viridis", len(widths))
    rank = [[widths.index(b) for b in row] for row in grid]
    image = ax.imshow(rank, cmap=cmap, vmin=-0.5, vmax=len(widths) - 0.5, aspect="auto", interpolation="nearest")
    if n_experts <= 32:
        for r, row in enumerate(grid):
            for c, b in enumerate(row):
                ax.text(c, r, str(b), ha="center", va="center", fontsize=8,
                        color="white" if widths.index(b) < len(widths) / 2 else "black")
    bar = fig.colorbar(image, ax=ax, ticks=range(len(widths)))
    bar.ax.set_yticklabels([str(b) for b in widths])
    bar.set_label("bits")
    ax.set_xticks(range(n_experts))
    ax.set_yticks(range(len(layers)), labels=layers)
    ax.set_xlabel("expert id")
    ax.set_ylabel("decoder layer")
    mean = sum(map(sum, grid)) / sum(map(len, grid))
    ax.set_title(f"{title + ': ' if title else ''}bits per expert (mean {mean:.2f})")
    return save_figure(fig, path)
