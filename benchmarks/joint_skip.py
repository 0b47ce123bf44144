"""Skip thresholds in the joint plan: the same held and read-bytes targets, with and without skip options.

On a demo model, for each cap on the routed-expert bytes read per token (a share of what the model as held reads
at 16 bits, top-k experts per layer), ``moeslim plan joint`` is run twice under the same held-bytes target: with
no skip options, and with ``--skip-betas``. Both plans are applied and measured on held-out windows (perplexity,
KL to the original, top-1 agreement), and the skipping runtime's counters give the expert calls per token
actually run. Prints one line per plan and ``joint skip ppl ratio at read share S: X`` (with / without skipping).

    python benchmarks/joint_skip.py --model demo --target-ratio 0.25 --hold-dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moeslim.appliers import apply
from moeslim.config import ConfigError
from moeslim.methods.joint import JointConfig, measure_options, plan_joint
from moeslim.methods.joint.config import MIB
from moeslim.models import find_moe_layers
from moeslim.runtime.skipping import counters, has_counters, reset_counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from joint import Bench, add_bench_arguments, nonexpert_widths  # noqa: E402  (the joint benchmark's windows and measurement)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--target-ratio", type=float, default=0.25)
    parser.add_argument("--hold-dtype", default="bfloat16", choices=("auto", "bfloat16", "float16", "float32"))
    parser.add_argument("--read-shares", default="0.5,0.35,0.25",
                        help="caps on the expert bytes read per token, as shares of the held model's top-k at 16 bits")
    parser.add_argument("--skip-betas", default="0.2,0.4,0.6,0.8,1.0")
    add_bench_arguments(parser)
    args = parser.parse_args()
    start = time.perf_counter()
    bench = Bench(args.model, args)
    betas = tuple(float(b) for b in args.skip_betas.split(","))
    common = {"target_ratio": args.target_ratio, "max_tokens": args.max_tokens, "hold_dtype": args.hold_dtype,
              **nonexpert_widths(args)}
    probe = JointConfig(skip_betas=betas, **common)  # type: ignore[arg-type]
    targets = probe.check_model(bench.model)
    top_k = find_moe_layers(bench.model)[0].top_k
    full = sum(top_k * lb.dense for lb in targets.sizes.values())
    options = {"no skip": measure_options(bench.model, bench.calib.input_ids, JointConfig(**common), targets),
               "skip": measure_options(bench.model, bench.calib.input_ids, probe, targets)}
    original = bench.measure("original", "original", lambda: [])
    print(f"{args.model}: held target {args.target_ratio:.0%} of {bench.base / MIB:.2f} MiB, every float weight "
          f"in {args.hold_dtype}; reads at 16 bits {full / MIB:.3f} MiB per token; original ppl "
          f"{original.ppl_geo:.2f}", flush=True)
    lines = []
    for share in (float(s) for s in args.read_shares.split(",")):
        ppl = {}
        for name, opts in options.items():
            config = JointConfig(target_active_mib=share * full / MIB, skip_betas=betas if name == "skip" else (),
                                 **common)  # type: ignore[arg-type]
            try:
                plan = plan_joint(bench.model, bench.calib, config, args.model, options=opts)
            except (ConfigError, ValueError) as err:
                lines.append(f"  read share {share:g}, {name}: no plan fits ({str(err)[:120]})")
                continue
            m = bench.measure(f"joint-read{share:g}-{name}", name, lambda plan=plan: [plan])
            model = copy.deepcopy(bench.model)
            apply(model, plan, calibration=bench.calib)
            per_token = float(top_k)
            if has_counters(model):  # expert calls actually run on the first evaluation windows
                reset_counters(model)
                with torch.no_grad():
                    model(bench.windows["code"][: args.batch_size])
                calls = counters(model)
                per_token = float(np.mean([c["expert_calls"] / c["tokens"] for c in calls.values() if c["tokens"]]))
            beta = {idx: e.get("skip_beta", 0.0) for idx, e in sorted(plan.layers.items())}
            ppl[name] = m.ppl_geo
            lines.append(f"  read share {share:g}, {name}: planned read {plan.summary['active_bytes'] / MIB:.3f} MiB, "
                         f"held {m.held / MIB:.2f} MiB, ppl {m.ppl_geo:.2f} ({m.ppl_geo / original.ppl_geo - 1:+.1%}), "
                         f"KL {m.kl:.4f}, top-1 {m.top1:.1%}, layers {_describe(plan.layers)}, skip betas {beta}, "
                         f"expert calls per token per layer {per_token:.3f} (on {args.batch_size} code windows)")
            del model
        if len(ppl) == 2:
            lines.append(f"joint skip ppl ratio at read share {share:g}: {ppl['skip'] / ppl['no skip']:.3f}")
    print("\n".join(lines))
    print(f"total {(time.perf_counter() - start) / 60:.1f} min")


def _describe(layers: dict[int, dict[str, object]]) -> str:
    return " ".join(f"{len(e['kept'])}@{'/'.join(map(str, sorted(set(e['bits']))))}"  # type: ignore[arg-type]
                    for _, e in sorted(layers.items()))


if __name__ == "__main__":
    main()
