"""Online dynamic pruning (MC-MoE) vs plain dynamic skipping at the same share of skipped expert calls.

On the demo model, optionally after PMQ quantization (the paper measures ODP on a 2-bit-ish Mixtral):
1. plain skipping with the median rule (quantile 0.5) -> share s of routed expert calls skipped, ppl;
2. ODP (protect the top 2 % of tokens by attention-column importance) with its quantile raised until it
   skips the same share s of calls on the calibration windows (bisection), then held-out ppl.
The same expert-call budget, so the comparison isolates what protecting important tokens buys.

    python benchmarks/odp_quality.py [--pmq-bits 2.5] [--protect 0.02]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from moeslim.appliers import apply
from moeslim.config import CalibrationConfig
from moeslim.data import load_source, token_windows
from moeslim.data.calibration_set import CalibrationSet, build_calibration_set
from moeslim.evaluate.perplexity import perplexity
from moeslim.methods.quant.driver import QuantizeConfig, plan_quantize
from moeslim.methods.skip import SkipConfig, plan_skip
from moeslim.models import load_model
from moeslim.runtime.skipping import counters, reset_counters


def call_skip_share(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Share of routed expert calls skipped on ``windows`` (N, L), from the runtime's counters."""
    reset_counters(model)
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            model(windows[start:start + batch_size])
    per_layer = counters(model).values()
    top_k = model.config.num_experts_per_tok
    calls = sum(c["expert_calls"] for c in per_layer)
    possible = sum(c["tokens"] * top_k for c in per_layer)
    return 1 - calls / possible


def skipping_variant(base: nn.Module, calib: CalibrationSet, quantile: float, protect: float) -> nn.Module:
    model = copy.deepcopy(base)
    apply(model, plan_skip(model, calib, SkipConfig(quantile=quantile, protect=protect), "bench"))
    return model


def matched_odp(base: nn.Module, calib: CalibrationSet, target: float, protect: float, probe: torch.Tensor,
                batch_size: int, steps: int) -> tuple[nn.Module, float, float]:
    """Bisection on ODP's quantile until its skipped-call share on ``probe`` matches ``target``."""
    low, high = 0.0, 1.0
    best: tuple[float, nn.Module, float] | None = None
    for _ in range(steps):
        mid = (low + high) / 2
        model = skipping_variant(base, calib, mid, protect)
        share = call_skip_share(model, probe, batch_size)
        if best is None or abs(share - target) < abs(best[2] - target):
            best = (mid, model, share)
        low, high = (mid, high) if share < target else (low, mid)
    assert best is not None
    return best[1], best[0], best[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=32, help="held-out windows per domain")
    parser.add_argument("--pmq-bits", type=float, default=2.5, help="0 = no quantization first")
    parser.add_argument("--protect", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=8, help="bisection steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, tokenizer = load_model(args.model)
    calib = build_calibration_set(CalibrationConfig(samples=args.samples, seq_len=args.seq_len), tokenizer)
    if args.pmq_bits:
        apply(base, plan_quantize(base, calib, QuantizeConfig(method="pmq", bits=args.pmq_bits), "bench"),
              calibration=calib)
    base.set_attn_implementation("eager")  # the same attention kernel for every row (ODP needs eager)
    windows = {d: token_windows(load_source(f"demo:{d}:test"), tokenizer, args.seq_len, args.windows)
               for d in ("code", "prose")}
    probe = calib.input_ids

    def ppl(model: nn.Module) -> dict[str, float]:
        return {d: perplexity(model, w, args.batch_size, progress=False)["ppl"] for d, w in windows.items()}

    start = time.perf_counter()
    rows = [("no skipping", 0.0, None, ppl(base))]
    plain = skipping_variant(base, calib, 0.5, 0.0)
    share = call_skip_share(plain, probe, args.batch_size)
    rows.append(("skip (median beta)", share, 0.5, ppl(plain)))
    odp, quantile, odp_share = matched_odp(base, calib, share, args.protect, probe, args.batch_size, args.steps)
    rows.append((f"ODP (protect {args.protect:.0%}), matched", odp_share, quantile, ppl(odp)))
    odp_same_beta = skipping_variant(base, calib, 0.5, args.protect)
    rows.append((f"ODP (protect {args.protect:.0%}), median beta", call_skip_share(odp_same_beta, probe,
                 args.batch_size), 0.5, ppl(odp_same_beta)))

    base_name = f"PMQ {args.pmq_bits} bits" if args.pmq_bits else "full precision"
    print(f"\n{args.model} ({base_name}); skipped share measured on the {probe.shape[0]} calibration windows; "
          f"ppl on {args.windows} held-out windows of {args.seq_len} tokens per domain\n")
    print("| variant | quantile | skipped expert calls | ppl code | ppl prose |")
    print("|---|---|---|---|---|")
    for name, skipped, q, p in rows:
        q_text = "-" if q is None else f"{q:.3f}"
        print(f"| {name} | {q_text} | {skipped:.1%} | {p['code']:.2f} | {p['prose']:.2f} |")
    plain_ppl, odp_ppl = rows[1][3], rows[2][3]
    better = all(odp_ppl[d] < plain_ppl[d] for d in odp_ppl)
    print(f"\nODP at the matched share {'beats' if better else 'does NOT beat'} plain skipping on every domain "
          f"({', '.join(f'{d}: {odp_ppl[d]:.2f} vs {plain_ppl[d]:.2f}' for d in odp_ppl)}); "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
