"""GPTQ of a layer's experts: one batched column loop (``gptq_quantize_many``) against one call per expert.

The joint planner GPTQs every expert of a layer at every candidate width and fold (``curves.quant_distances``),
so fine-grained layers (64-256 small experts) spend their time in GPTQ's per-column Python steps. This script
times both ways on the same matrices and Hessians in one run, checks that the results are bit for bit equal,
and ends with one line per shape:

    gptq batched vs per expert: Xx faster (E experts of out x in, B bits)

    python benchmarks/gptq_batch.py                       # demo-fine's shapes and a Qwen3-30B-A3B-sized layer
    python benchmarks/gptq_batch.py --shapes 64x160x256 --repeat 3

Weights are random; the Hessians come from correlated random inputs (the timing does not depend on the values).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from moeslim.methods.quant.gptq import BATCH_BYTES, QuantizedWeight, gptq_quantize, gptq_quantize_many

# (experts, out, in): demo-fine's gate_up and down projections, and a 128-expert layer's shapes at a few
# experts (Qwen3-30B-A3B: hidden 2048, expert intermediate 768), which is compute-bound rather than step-bound
DEFAULT_SHAPES = "64x160x256,64x256x80,8x1536x2048"


def _inputs(experts: int, n_out: int, n_in: int, tokens: int, seed: int) -> tuple[list[torch.Tensor],
                                                                                   list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    weights, hessians = [], []
    for _ in range(experts):
        latent = torch.randn(tokens, 32, generator=gen)
        x = (latent @ torch.randn(32, n_in, generator=gen) + 0.3 * torch.randn(tokens, n_in, generator=gen))
        x = x * torch.exp(torch.randn(n_in, generator=gen))  # (tokens, in): uneven feature scales
        weights.append(torch.randn(n_out, n_in, generator=gen) / n_in**0.5)
        hessians.append(x.T @ x)
    return weights, hessians


def _best_of(repeat: int, run: Callable[[], list[QuantizedWeight]]) -> tuple[float, list[QuantizedWeight]]:
    best: float = float("inf")
    out: list[QuantizedWeight] = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="experts x out x in, comma-separated")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=512, help="calibration tokens behind each Hessian")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per way; the fastest counts")
    parser.add_argument("--batch-bytes", type=int, default=BATCH_BYTES)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, act-order on, {args.bits} bits, "
          f"group {args.group_size}, batches within {args.batch_bytes / 2**20:.0f} MiB")
    lines = []
    for spec in args.shapes.split(","):
        experts, n_out, n_in = (int(v) for v in spec.split("x"))
        weights, hessians = _inputs(experts, n_out, n_in, args.tokens, seed=experts + n_out + n_in)
        alone_s, alone = _best_of(args.repeat, lambda w=weights, h=hessians: [
            gptq_quantize(wi, hi, args.bits, args.group_size, act_order=True, scale_dtype=torch.float16)
            for wi, hi in zip(w, h, strict=True)])
        batch_s, batched = _best_of(args.repeat, lambda w=weights, h=hessians: gptq_quantize_many(
            w, h, args.bits, args.group_size, batch_bytes=args.batch_bytes, act_order=True,
            scale_dtype=torch.float16))
        equal = all(torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight)
                    for a, b in zip(alone, batched, strict=True))
        print(f"{experts} x {n_out} x {n_in}: per expert {alone_s:.2f} s ({alone_s / experts * 1e3:.1f} ms each), "
              f"batched {batch_s:.2f} s; results bit for bit equal: {equal}", flush=True)
        lines.append(f"gptq batched vs per expert: {alone_s / batch_s:.2f}x faster ({experts} experts of "
                     f"{n_out} x {n_in}, {args.bits} bits)")
        if not equal:
            raise SystemExit("the batched results differ from the per-expert ones")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
