"""The one side-by-side table of variants, shared by the console (``moeslim run/demo/eval``) and report.md.

One builder decides the columns, their order, units (sizes in MiB = 2**20 bytes everywhere) and number
formats; ``print_table`` and ``markdown_table`` only draw it. The first result is the reference the
perplexity changes are relative to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moeslim.evaluate.results import VariantResult

MIB = 2**20
MISSING = "-"


@dataclass(frozen=True)
class SideBySide:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]  # rows[i][0]: the variant name
    numeric: tuple[bool, ...]  # per column: right-aligned


def side_by_side_table(results: Sequence[VariantResult], detail: bool = False) -> SideBySide:
    """Perplexity per domain (change vs the first result), task accuracy, weights MiB, expert calls per token,
    decode speed ratio; ``detail`` (report.md) adds disk MiB, activated parameters and the absolute speeds."""
    domains = list(dict.fromkeys(d for r in results for d in r.perplexity))
    tasks = list(dict.fromkeys(t for r in results for t in r.tasks))
    kl = any(r.kl_divergence for r in results)
    base = results[0] if results else None
    columns: list[str] = ["variant", *[f"ppl {d}" for d in domains]]
    if kl:  # mean over the scored domains: what llama.cpp's --kl-divergence reports per model
        columns += ["KL", "top-1"]
    columns += [*[t.removeprefix("moeslim_") for t in tasks], "weights MiB"]
    if detail:
        columns += ["disk MiB", "activated params"]
    columns += ["expert calls/tok", "decode x"]
    if detail:
        columns += ["decode tok/s", "prefill tok/s"]
    rows = []
    for r in results:
        cells = [r.name]
        cells += [_ppl_cell(r.perplexity.get(d), base.perplexity.get(d) if base else None) for d in domains]
        if kl:
            cells += [_mean_cell(r.kl_divergence, ".4f"), _mean_cell(r.top1_agreement, ".1%")]
        cells += [f"{100 * r.tasks[t]:.1f}%" if t in r.tasks else MISSING for t in tasks]
        cells.append(_mib(r.param_bytes))
        if detail:
            cells += [_mib(r.disk_bytes), _fmt(r.activated_params, ",")]
        cells += [_fmt(r.expert_calls_per_token, ".2f"), _fmt(r.speed_ratio, ".2f")]
        if detail:
            cells += [_fmt(r.decode_tps, ".1f"), _fmt(r.prefill_tps, ".1f")]
        rows.append(tuple(cells))
    return SideBySide(tuple(columns), tuple(rows), tuple(i > 0 for i in range(len(columns))))


def markdown_table(table: SideBySide) -> list[str]:
    """GitHub markdown lines, variant names in bold."""
    align = ["---:" if numeric else "---" for numeric in table.numeric]
    lines = ["| " + " | ".join(table.header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join((f"**{row[0]}**", *row[1:])) + " |" for row in table.rows]
    return lines


def print_table(results: Sequence[VariantResult], title: str) -> None:
    """The side-by-side table on the console."""
    from rich.console import Console
    from rich.table import Table

    table = side_by_side_table(results)
    shown = Table(title=title)
    for name, numeric in zip(table.header, table.numeric, strict=True):
        shown.add_column(name, justify="right" if numeric else "left")
    for row in table.rows:
        shown.add_row(*row)
    # Not a terminal (CI logs, pipes): rich would wrap at 80 columns and cut the headers.
    console = Console() if Console().is_terminal else Console(width=200)
    console.print(shown)


def _mib(n: int | None) -> str:
    return MISSING if not n else f"{n / MIB:.1f}"


def _fmt(value: float | int | None, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def _mean_cell(values: dict[str, float], spec: str) -> str:
    return MISSING if not values else format(sum(values.values()) / len(values), spec)


def _ppl_cell(value: float | None, base: float | None) -> str:
    if value is None:
        return MISSING
    if base is None or value == base:
        return f"{value:.2f}"
    return f"{value:.2f} ({100 * (value / base - 1):+.0f}%)"
