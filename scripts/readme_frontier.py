"""Regenerate the README's frontier tables from a demo run, and copy the frontier plots to docs/demo/.

    make demo                                   # writes runs/demo/frontier.json (+ runs/demo/fine/frontier.json)
    python scripts/readme_frontier.py           # rewrites the README between the frontier markers

The section between ``<!-- frontier:begin -->`` and ``<!-- frontier:end -->`` is replaced by one table per demo
model (the joint plan at each budget against the best single method at equal or larger measured bytes, as
report.md draws it) and the Spearman correlation of the planner's estimated error with measured KL; each run
folder's frontier.png is copied to the same place under docs/demo/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from moeslim.evaluate.frontier import Frontier, frontier_summary_table, rank_correlation

BEGIN, END = "<!-- frontier:begin -->", "<!-- frontier:end -->"
RUN_FOLDERS = (".", "fine")  # the two demo models' run folders under --runs (and under --docs)


def section(runs: Path) -> tuple[list[str], list[tuple[Path, Path]]]:
    """The README lines for every run folder with a frontier.json, and the plots to copy (source, docs-relative)."""
    lines: list[str] = []
    plots: list[tuple[Path, Path]] = []
    for sub in RUN_FOLDERS:
        path = runs / sub / "frontier.json"
        if not path.exists():
            continue
        frontier = Frontier.from_dict(json.loads(path.read_text(encoding="utf-8")))
        rho, n = rank_correlation(frontier)
        base = frontier.original
        lines += [f"**{frontier.model}** (original {base.held_bytes / 2**20:.2f} MiB held, ppl {base.ppl:.2f}; "
                  f"spearman(estimated error, KL) over {n} joint plans: {rho:.3f}):", "",
                  *frontier_summary_table(frontier), ""]
        png = runs / sub / "frontier.png"
        if png.exists():
            plots.append((png, Path(sub) / "frontier.png"))
    if not lines:
        raise SystemExit(f"no frontier.json under {runs} (run `make demo` first)")
    return lines, plots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/demo", help="the demo's output folder")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--docs", default="docs/demo", help="where the frontier plots are copied")
    args = parser.parse_args()
    readme = Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        sys.exit(f"{readme}: needs one {BEGIN} ... {END} pair to rewrite")
    lines, plots = section(Path(args.runs))
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    readme.write_text(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail, encoding="utf-8")
    for src, rel in plots:
        dest = Path(args.docs) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        print(f"copied {src} -> {dest}")
    print(f"rewrote the frontier section of {readme}")


if __name__ == "__main__":
    main()
