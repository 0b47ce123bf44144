"""Which defaults give the best result: layerwise vs progressive mode, random vs evenly spaced calibration windows.

For each demo model, keep level, method (pruning: enumerate where it is exhaustive, search, frequency, REAP;
merging: HC-SMoE), mode (layerwise / progressive), window spacing (random / even) and calibration seed, the plan is
made on code + prose calibration windows, applied to a fresh copy of the model and scored on held-out test text of
both domains. Reported per (model, keep, method, mode, spacing): perplexity mean ± standard deviation over seeds and
its range, and how much the kept sets move with the windows (mean pairwise Jaccard similarity of the kept sets of
every two seeds, averaged over layers; for merging, of the groups' representatives). Every run is also written as
one JSON line (``--jsonl``), so a killed run keeps what it measured. The last lines give the defaults the
measurement picks: per method the mode, and the spacing, compared on paired runs (equal in everything else);
progressive (even) replaces layerwise (random) only when it lowers the geometric-mean perplexity on average and in
most pairs.

Usage::

    python benchmarks/prune_modes.py --out docs/results-pruning.md    # replaces its own section of that page
    python benchmarks/prune_modes.py --models demo --keep-demo 4 --seeds 1 --out /tmp/m.md   # a quick look
    python benchmarks/prune_modes.py --jsonl runs.jsonl ...     # rerun after a kill: recorded runs are not redone
    python benchmarks/prune_modes.py --from-jsonl a.jsonl b.jsonl --out docs/results-pruning.md  # tables only
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim.appliers.merge import apply_merge
from moeslim.appliers.prune import apply_prune
from moeslim.config import CalibrationConfig
from moeslim.data import load_source, token_windows
from moeslim.data.calibration_set import CalibrationSet, build_calibration_set
from moeslim.evaluate.perplexity import perplexity
from moeslim.methods.merge import MergeConfig, plan_merge
from moeslim.methods.prune import PruneConfig, plan_prune
from moeslim.models import find_moe_layers, load_model
from moeslim.plans import Plan

MODES = ("layerwise", "progressive")
SECTION_START = "<!-- prune_modes.py: start -->"
SECTION_END = "<!-- prune_modes.py: end -->"
SPACINGS = ("random", "even")


@dataclass(frozen=True)
class Run:
    """One measured cell: what was planned and what it scored."""

    model: str
    keep: int
    method: str
    mode: str
    spacing: str
    seed: int
    ppl: dict[str, float]
    kept: dict[str, list[int]]  # per layer: kept experts (merging: the groups' representatives)
    seconds: float


def kept_sets(plan: Plan) -> dict[str, list[int]]:
    """Per MoE layer the experts the plan keeps (a merge plan: the representative of each group)."""
    if plan.kind == "merge":
        return {str(i): sorted(int(r) for r in e["representatives"]) for i, e in sorted(plan.layers.items())}
    return {str(i): sorted(int(e) for e in kept) for i, kept in sorted(plan.layers.items())}


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    """|A ∩ B| / |A ∪ B| of two kept sets (1 = the same experts)."""
    union = set(a) | set(b)
    return len(set(a) & set(b)) / len(union) if union else 1.0


def mean_pairwise_jaccard(runs: Sequence[Run]) -> float:
    """Mean over layers and over every two runs (seeds) of the Jaccard similarity of their kept sets."""
    pairs = list(itertools.combinations(runs, 2))
    if not pairs:
        return float("nan")
    return statistics.mean(jaccard(a.kept[layer], b.kept[layer]) for a, b in pairs for layer in a.kept)


def geo_ppl(ppl: dict[str, float]) -> float:
    """Geometric mean of the per-domain perplexities."""
    return math.exp(statistics.mean(math.log(v) for v in ppl.values()))


class Bench:
    """One model, its held-out windows and calibration sets drawn on demand (per spacing and seed)."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.model, self.tokenizer = load_model(name)
        self.experts = find_moe_layers(self.model)[0].num_experts
        self.eval = {d: token_windows(load_source(f"demo:{d}:test"), self.tokenizer, args.seq_len, args.eval_windows)
                     for d in ("code", "prose")}
        self._calibration: dict[tuple[str, int], CalibrationSet] = {}

    def calibration(self, spacing: str, seed: int) -> CalibrationSet:
        key = (spacing, seed)
        if key not in self._calibration:
            config = CalibrationConfig(data=("demo:code", "demo:prose"), samples=self.args.samples,
                                       seq_len=self.args.seq_len, seed=seed, spacing=spacing)  # type: ignore[arg-type]
            self._calibration[key] = build_calibration_set(config, self.tokenizer)
        return self._calibration[key]

    def score(self, model: nn.Module) -> dict[str, float]:
        return {d: float(perplexity(model, w, batch_size=self.args.batch_size, progress=False)["ppl"])
                for d, w in self.eval.items()}

    def run(self, keep: int, method: str, mode: str, spacing: str, seed: int) -> Run:
        calib = self.calibration(spacing, seed)
        start = time.perf_counter()
        model = copy.deepcopy(self.model)
        if method == "hc-smoe":
            # The settings docs/results-pruning.md measured (the fitted router, cosine distance, aligned neurons).
            config = MergeConfig(keep=keep, method="hc-smoe", mode=mode,  # type: ignore[arg-type]
                                 router="fit", metric="cosine", align=True)
            plan = plan_merge(self.model, calib, config, model_name=self.name, batch_size=self.args.batch_size)
            apply_merge(model, plan, calibration=calib)
        else:
            prune = PruneConfig(method=method, keep=keep, mode=mode, max_tokens=self.args.max_tokens,  # type: ignore[arg-type]
                                budget=self.args.budget)
            plan = plan_prune(self.model, calib, prune, model_name=self.name, batch_size=self.args.batch_size)
            apply_prune(model, plan)
        seconds = time.perf_counter() - start
        return Run(self.name, keep, method, mode, spacing, seed, self.score(model), kept_sets(plan), seconds)


def methods_for(experts: int) -> list[str]:
    """Enumerate only where it is exhaustive at a reasonable cost (8 experts), search where it is not."""
    return (["enumerate"] if experts <= 16 else []) + ["search", "frequency", "reap", "hc-smoe"]


def _fmt(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def table(runs: Sequence[Run]) -> list[str]:
    """Markdown rows: one per (model, keep, method, mode, spacing), perplexity and kept-set stability over seeds."""
    header = ["model", "keep", "method", "mode", "windows", "ppl code (test)", "ppl prose (test)",
              "geo. mean ppl", "kept-set Jaccard over seeds", "s / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple[str, int, str, str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.model, r.keep, r.method, r.mode, r.spacing), []).append(r)
    models = list(dict.fromkeys(r.model for r in runs))
    methods = ["enumerate", "search", "frequency", "reap", "hc-smoe"]

    def order(key: tuple[str, int, str, str, str]) -> tuple[Any, ...]:
        model, keep, method, mode, spacing = key
        rank = methods.index(method) if method in methods else len(methods)
        return models.index(model), -keep, rank, method, MODES.index(mode), SPACINGS.index(spacing)

    for (model, keep, method, mode, spacing), rs in sorted(groups.items(), key=lambda kv: order(kv[0])):
        cells = [model, str(keep), method, mode, spacing, _fmt([r.ppl["code"] for r in rs]),
                 _fmt([r.ppl["prose"] for r in rs]), _fmt([geo_ppl(r.ppl) for r in rs]),
                 f"{mean_pairwise_jaccard(rs):.2f}", f"{statistics.mean(r.seconds for r in rs):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def paired_change(runs: Sequence[Run], field: str, base: str, other: str) -> tuple[float, int, int]:
    """Mean change of log geometric-mean perplexity from ``field`` = base to other over paired runs.

    Runs pair when they differ in ``field`` only (same model, keep, method, mode / spacing and seed). Returns
    (mean of log ppl(other) - log ppl(base): below 0 means ``other`` is better, pairs where other is better, pairs).
    """
    def key(r: Run) -> tuple[Any, ...]:
        return tuple(getattr(r, k) for k in ("model", "keep", "method", "mode", "spacing", "seed") if k != field)

    others = {key(r): r for r in runs if getattr(r, field) == other}
    pairs = [(r, others[key(r)]) for r in runs if getattr(r, field) == base and key(r) in others]
    if not pairs:
        return float("nan"), 0, 0
    changes = [math.log(geo_ppl(b.ppl)) - math.log(geo_ppl(a.ppl)) for a, b in pairs]
    return statistics.mean(changes), sum(c < 0 for c in changes), len(changes)


def choices(runs: Sequence[Run]) -> tuple[dict[str, str], str, list[str]]:
    """Per method the mode, and the spacing, by perplexity on paired runs; summary lines saying how much.

    A mode is compared on runs that differ only in the mode (every model, keep, spacing and seed of that method);
    the spacing on runs that differ only in the spacing (every method and mode).
    """
    lines: list[str] = []
    modes: dict[str, str] = {}
    for method in dict.fromkeys(r.method for r in runs):
        change, wins, pairs = paired_change([r for r in runs if r.method == method], "mode", "layerwise",
                                            "progressive")
        if not pairs:
            continue
        # Layerwise is the cheaper pass (the original model's inputs only): progressive must win on average AND in
        # most paired runs to displace it, so noise-level differences keep the cheaper mode.
        modes[method] = "progressive" if change < 0 and 2 * wins > pairs else "layerwise"
        lines.append(f"{method}: default mode {modes[method]} (progressive vs layerwise: geometric-mean perplexity "
                     f"{math.exp(change) - 1:+.1%} on average, lower in {wins} of {pairs} paired runs)")
    change, wins, pairs = paired_change(runs, "spacing", "random", "even")
    spacing = "even" if pairs and change < 0 and 2 * wins > pairs else "random"  # the same rule, random kept
    if pairs:
        lines.append(f"windows: default {spacing} (even vs random: geometric-mean perplexity "
                     f"{math.exp(change) - 1:+.1%} on average, lower in {wins} of {pairs} paired runs)")
    for s in SPACINGS:
        groups: dict[tuple[str, int, str, str], list[Run]] = {}
        for r in runs:
            if r.spacing == s:
                groups.setdefault((r.model, r.keep, r.method, r.mode), []).append(r)
        several = [g for g in groups.values() if len(g) > 1]
        if several:
            spreads = [statistics.stdev([geo_ppl(r.ppl) for r in g]) / statistics.mean([geo_ppl(r.ppl) for r in g])
                       for g in several]
            lines.append(f"windows {s}: geometric-mean perplexity moves {statistics.mean(spreads):.1%} over seeds "
                         f"(standard deviation / mean, averaged over {len(several)} settings), kept-set Jaccard over "
                         f"seeds {statistics.mean(mean_pairwise_jaccard(g) for g in several):.2f}")
    return modes, spacing, lines


def read_runs(file: Path) -> list[Run]:
    """The runs recorded as JSON lines in ``file`` (none when it does not exist)."""
    if not file.is_file():
        return []
    return [Run(**json.loads(line)) for line in file.read_text(encoding="utf-8").splitlines() if line]


def with_section(page: str, section: str) -> str:
    """``page`` with its prune_modes section replaced by ``section`` (appended when it has none)."""
    if SECTION_START in page and SECTION_END in page:
        head, rest = page.split(SECTION_START, 1)
        return head + section + rest.split(SECTION_END, 1)[1]
    return page.rstrip("\n") + ("\n\n" if page else "") + section + "\n"


def _shown_args(argv: list[str]) -> list[str]:
    """The command line without ``--note TEXT`` (the note is printed as it is)."""
    shown = list(argv)
    while "--note" in shown:
        i = shown.index("--note")
        del shown[i:i + 2]
    return shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo", "demo-fine"])
    parser.add_argument("--keep-demo", type=int, nargs="+", default=[6, 4], help="keep levels of 8-expert models")
    parser.add_argument("--keep-fine", type=int, nargs="+", default=[32], help="keep levels of the other models")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method that fits the model")
    parser.add_argument("--seeds", type=int, default=3, help="calibration seeds (0 .. seeds-1)")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (code + prose)")
    parser.add_argument("--fine-samples", type=int, default=16, help="calibration windows of models with > 16 experts")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows per domain")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None, help="PruneConfig.max_tokens (default: its own)")
    parser.add_argument("--budget", type=int, default=None, help="PruneConfig.budget of search (default: its own)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--jsonl", default=None, help="also append every run as a JSON line here")
    parser.add_argument("--from-jsonl", nargs="+", default=None,
                        help="measure nothing: write the tables and choices from the runs in these JSON lines files")
    parser.add_argument("--note", default=None, help="text that says how the runs were made (with --from-jsonl)")
    parser.add_argument("--out", default="docs/results-pruning.md",
                        help="markdown page whose section between the prune_modes markers is replaced (or appended)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = PruneConfig(keep=1)
    args.max_tokens = defaults.max_tokens if args.max_tokens is None else args.max_tokens
    args.budget = defaults.budget if args.budget is None else args.budget
    start = time.perf_counter()
    runs: list[Run] = []
    for file in args.from_jsonl or []:
        runs += read_runs(Path(file))
    done = {(r.model, r.keep, r.method, r.mode, r.spacing, r.seed) for r in read_runs(Path(args.jsonl or ""))}
    for name in [] if args.from_jsonl else args.models:
        bench_args = argparse.Namespace(**vars(args))
        bench = Bench(name, bench_args)
        if bench.experts > 16:
            bench.args.samples = args.fine_samples
        keeps = args.keep_demo if bench.experts == 8 else args.keep_fine
        for keep, method in itertools.product(keeps, args.methods or methods_for(bench.experts)):
            for mode, spacing, seed in itertools.product(MODES, SPACINGS, range(args.seeds)):
                if (name, keep, method, mode, spacing, seed) in done:  # measured by an earlier, killed run
                    runs += [r for r in read_runs(Path(args.jsonl)) if (r.model, r.keep, r.method, r.mode,
                                                                         r.spacing, r.seed) ==
                             (name, keep, method, mode, spacing, seed)][:1]
                    continue
                run = bench.run(keep, method, mode, spacing, seed)
                runs.append(run)
                print(f"{name} keep {keep} {method} {mode} {spacing} seed {seed}: code {run.ppl['code']:.1f} "
                      f"prose {run.ppl['prose']:.1f} ({run.seconds:.0f} s) kept {run.kept}", flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(run.__dict__) + "\n")
    modes, spacing, summary = choices(runs)
    elapsed = time.perf_counter() - start
    took = "" if args.from_jsonl else f" in {elapsed / 60:.0f} min"
    settings = args.note or (
        f"Calibration: code + prose calibration splits, {args.samples} windows x {args.seq_len} tokens on the 8-expert "
        f"model, {args.fine_samples} on the 64-expert one, seeds 0..{args.seeds - 1}; scored on {args.eval_windows} "
        "held-out test windows per domain.")
    lines = [
        SECTION_START,
        "## Defaults: layerwise vs progressive, random vs evenly spaced windows, spread over calibration seeds",
        "",
        f"Produced by `python benchmarks/prune_modes.py {' '.join(_shown_args(sys.argv[1:]))}`{took}. {settings} "
        "Cells: mean ± standard deviation over seeds (range); kept-set Jaccard: mean over layers and seed pairs "
        "(1.00: every seed keeps the same experts).",
        "",
        *table(runs),
        "",
        *[f"- {line}" for line in summary],
        SECTION_END,
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(with_section(out.read_text(encoding="utf-8") if out.is_file() else "", "\n".join(lines)),
                   encoding="utf-8")
    print("\n".join(summary))
    print(f"chosen: modes {modes}, windows {spacing}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
