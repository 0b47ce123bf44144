"""Rewrite the two side-by-side tables of README.md from a finished ``make demo`` run.

Reads ``runs/demo/results.json`` (8-expert model) and ``runs/demo/fine/results.json`` (64-expert model) and
replaces the numbers of each README table row by row, keeping the row labels (the rows are in the demo's variant
order). KL and top-1 are the means of the two test domains. Also copies the reports and plots to ``docs/demo/``.

Usage::

    python scripts/readme_demo_tables.py [--runs runs/demo] [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

HEADER = "| variant | ppl code | ppl prose | KL | top-1 | code next-line | prose continuation | weights MiB |"
TASKS = ("moeslim_code_nextline", "moeslim_prose_continuation")


def row(label: str, r: dict[str, Any]) -> str:
    """One README table row for result ``r`` (a results.json entry)."""
    ppl, kl, top1 = r["perplexity"], r["kl_divergence"], r["top1_agreement"]
    cells = [label, f"{ppl['code']:.1f}", f"{ppl['prose']:.1f}", f"{max(0.0, sum(kl.values()) / len(kl)):.3f}",
             f"{100 * sum(top1.values()) / len(top1):.1f} %",
             *(f"{100 * r['tasks'][t]:.0f} %" for t in TASKS),
             f"{r['param_bytes'] / 2**20:.1f}", f"{r['expert_calls_per_token']:.2f}", f"{r['speed_ratio']:.2f}"]
    return "| " + " | ".join(cells) + " |"


def rewrite_tables(readme: str, result_sets: list[list[dict[str, Any]]]) -> str:
    """``readme`` with the k-th table starting with HEADER filled from the k-th result set."""
    lines = readme.split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith(HEADER)]
    if len(starts) != len(result_sets):
        raise SystemExit(f"README has {len(starts)} demo tables, expected {len(result_sets)}")
    for start, results in zip(starts, result_sets, strict=True):
        body = range(start + 2, start + 2 + len(results))
        labels = [lines[i].split("|")[1].strip() for i in body]
        if any(not lines[i].startswith("| ") for i in body) or lines[body.stop].startswith("| "):
            raise SystemExit(f"the README table at line {start + 1} does not have {len(results)} rows")
        for i, label, result in zip(body, labels, results, strict=True):
            lines[i] = row(label, result)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/demo"))
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    p.add_argument("--docs", type=Path, default=Path("docs/demo"))
    args = p.parse_args()
    folders = [args.runs, args.runs / "fine"]
    sets = [json.loads((f / "results.json").read_text()) for f in folders]
    args.readme.write_text(rewrite_tables(args.readme.read_text(), sets))
    for folder, docs in zip(folders, [args.docs, args.docs / "fine"], strict=True):
        docs.mkdir(parents=True, exist_ok=True)
        for f in [*folder.glob("report.*"), *folder.glob("*.png")]:
            shutil.copy2(f, docs / f.name)


if __name__ == "__main__":
    main()
