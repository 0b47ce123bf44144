"""The joint planner with low-rank options (``--ranks``) against the same planner without them, on a demo model.

For each budget (share of the original's held bytes) the layers' options are measured once with rank shares
(``JointConfig.ranks``) and serve both plans: widths only (ranks=()) and widths + ranks. Each plan is applied
(prune -> low-rank -> GPTQ on the calibration windows) and measured as ``benchmarks/joint.py`` measures: held bytes,
held-out perplexity on both test domains (geometric mean), KL divergence to the original and top-1 agreement.
Prints one table row per plan, what the planner chose (low-rank layers, rank shares) and its estimated error.

    python benchmarks/joint_lowrank.py --model demo --budgets 0.25,0.4 --ranks 0.125,0.25,0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from joint import MIB, Bench, add_bench_arguments, nonexpert_widths  # noqa: E402 (the sibling benchmark script)

from moeslim.config import ConfigError  # noqa: E402
from moeslim.methods.joint import JointConfig, measure_options, plan_joint  # noqa: E402
from moeslim.plans import Plan  # noqa: E402


def _chosen(plan: Plan) -> str:
    """Per layer: kept count and widths, or 'lr' with the rank shares' (up, down) ranks and dense experts."""
    parts = []
    for idx in sorted(plan.layers):
        entry = plan.layers[idx]
        if entry.get("ranks") is None:
            parts.append(f"{len(entry['kept'])}@{'/'.join(map(str, sorted(set(entry['bits']))))}")
            continue
        counts = Counter("dense" if r is None else f"r{r[0]}/{r[1]}" for r in entry["ranks"])
        parts.append(f"{len(entry['kept'])}@lr(" + ",".join(f"{n}x{k}" for k, n in sorted(counts.items())) + ")")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--budgets", default="0.25,0.4")
    parser.add_argument("--ranks", default="0.125,0.25,0.5")
    parser.add_argument("--forced", default="", help="rank shares at which every layer is made low-rank, "
                        "against the widths-only plan at the same bytes (e.g. 0.5)")
    parser.add_argument("--size-step", type=int, default=1, help="kept-set sizes in steps of this (demo-fine: 8)")
    add_bench_arguments(parser)
    args = parser.parse_args()
    start = time.perf_counter()
    bench = Bench(args.model, args)
    ranks = tuple(float(f) for f in args.ranks.split(","))
    base = JointConfig(target_ratio=0.99, max_tokens=args.max_tokens, ranks=ranks, size_step=args.size_step)
    t0 = time.perf_counter()
    options = measure_options(bench.model, bench.calib.input_ids, base, base.check_model(bench.model))
    print(f"{args.model}: options with ranks {list(ranks)} measured in {time.perf_counter() - t0:.0f} s", flush=True)
    targets = base.check_model(bench.model)
    base_bytes = targets.base
    print("\nper layer, every expert kept: estimated squared error (summed over experts) and MiB per layer", flush=True)
    for idx, opts in sorted(options.items()):
        full, lb = opts[-1], targets.sizes[idx]
        n = len(full.kept)
        cells = [f"{b} bits {full.quant_err[:, j].sum():.4g} ({n * lb.width[b] / MIB:.2f})"
                 for j, b in enumerate(base.widths) if b != 16]
        cells += [f"rank share {f:g} {full.rank_err[:, j].sum():.4g} ({n * lb.rank[f] / MIB:.2f})"  # type: ignore[index]
                  for j, f in enumerate(ranks)]
        print(f"  layer {idx}: " + ", ".join(cells), flush=True)
    original = bench.measure("original", "original", lambda: [])
    rows = [("original", "-", original, None)]
    for share in (float(s) for s in args.budgets.split(",")):
        for label, shares in (("widths", ()), ("widths+ranks", ranks)):
            config = JointConfig(target_ratio=share, max_tokens=args.max_tokens, ranks=shares, size_step=args.size_step,
                                 **nonexpert_widths(args))
            try:
                plan = plan_joint(bench.model, bench.calib, config, args.model, options=options)
            except ConfigError as err:
                print(f"  {share:.0%} {label}: {err}", flush=True)
                continue
            m = bench.measure(f"{label}-{share:g}", label, lambda plan=plan: [plan])
            rows.append((f"{share:.0%} {label}", _chosen(plan), m, plan.summary["estimated_error"]))
    for share in (float(s) for s in args.forced.split(",") if s):
        # every layer low-rank at one share (no pruning): does the estimate price low-rank as apply delivers it?
        template = plan_joint(bench.model, bench.calib, JointConfig(target_ratio=0.99, max_tokens=args.max_tokens,
                                                                    ranks=ranks), args.model, options=options)
        j = ranks.index(share)
        layers = {idx: {"kept": list(opts[-1].kept), "bits": [16] * len(opts[-1].kept),
                        "ranks": [list(targets.sizes[idx].rank_ranks[share])] * len(opts[-1].kept)}
                  for idx, opts in options.items()}
        estimate = sum(float(opts[-1].rank_err[:, j].sum()) for opts in options.values())  # type: ignore[index]
        forced = dataclasses.replace(template, layers=layers)
        m = bench.measure(f"lowrank-{share:g}", "forced low-rank", lambda plan=forced: [plan])
        rows.append((f"every layer low-rank at share {share:g} (forced)", _chosen(forced), m, estimate))
        config = JointConfig(target_mib=m.held / MIB, max_tokens=args.max_tokens, size_step=args.size_step,
                             **nonexpert_widths(args))
        plan = plan_joint(bench.model, bench.calib, config, args.model, options=options)
        w = bench.measure(f"widths-at-lowrank-{share:g}", "widths", lambda plan=plan: [plan])
        rows.append((f"widths at the same bytes ({m.held / base_bytes:.1%})", _chosen(plan), w,
                     plan.summary["estimated_error"]))
    print("\n| plan | chosen (kept@widths, lr = low-rank layer) | MiB held | ppl (geo) | vs original | KL | top-1 "
          "| est. error |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for name, chosen, m, est in rows:
        print(f"| {name} | {chosen} | {m.held / MIB:.2f} | {m.ppl_geo:.2f} | {m.ppl_geo / original.ppl_geo - 1:+.1%} "
              f"| {m.kl:.4f} | {m.top1:.1%} | {'' if est is None else f'{est:.4g}'} |")
    print(f"\n{args.model}: {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
