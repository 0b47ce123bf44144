"""Where the 4-bit GEMM path pays: torch's int4pack kernel vs tiled dequantization + float matmul
(``runtime.packed.int4pack_dequant_matmul``, compiled as the model runs it) on the speed model's expert shapes,
by rows of one expert, with bf16 ``F.linear`` on the same shape for reference.

Prints, per row count, the median time of each path over interleaved repeats (bf16 inputs, group 128) and the
smallest row count from which the GEMM path is faster on both shapes: the measurement behind
``runtime.packed.INT4_NATIVE_GEMM_MIN_ROWS`` (bf16 tiles dequantized by ``runtime.int4_native`` on CPUs with
AVX512-BF16; otherwise the compiled tiles run and ``INT4_GEMM_MIN_ROWS`` applies).

Run: OMP_NUM_THREADS=1 python benchmarks/int4_gemm_threshold.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moeslim.runtime.packed import Workspace, _Compiled, int4_scales_and_zeros, int4pack_dequant_matmul

SHAPES = ((11264, 2048), (2048, 5632))  # (out, in): gate_up and down of hidden 2048 / intermediate 5632
ROWS = (16, 32, 48, 64, 96, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    group = 128
    wins: dict[int, bool] = dict.fromkeys(ROWS, True)
    print(f"threads {torch.get_num_threads()}")
    for n_out, n_in in SHAPES:
        codes = torch.randint(0, 16, (n_out, n_in), generator=gen, dtype=torch.int32)
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scales = (torch.rand(n_out, n_in // group, generator=gen) * 0.01 + 1e-3).half()
        sz = int4_scales_and_zeros(scales, 8, torch.bfloat16)  # the zero points do not change the timing
        dense = torch.randn(n_out, n_in, generator=gen).bfloat16()
        workspace = Workspace()  # reused over calls, as within one layer forward
        compiled = _Compiled()
        times: dict[tuple[str, int], list[float]] = {}
        paths = {
            "int4pack": lambda x, w4=w4, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, group, sz),
            "gemm": lambda x, w4=w4, sz=sz, ws=workspace, c=compiled: int4pack_dequant_matmul(x, w4, sz, group, ws, c),
            "bf16": lambda x, w=dense: F.linear(x, w),
        }
        for rnd in range(args.repeats + 1):
            for rows in ROWS:
                x = torch.randn(rows, n_in, generator=gen).bfloat16()
                for name, fn in paths.items():
                    start = time.perf_counter()
                    fn(x)
                    if rnd:
                        times.setdefault((name, rows), []).append(time.perf_counter() - start)
        for rows in ROWS:
            a, b, c = (statistics.median(times[(n, rows)]) * 1e3 for n in paths)
            wins[rows] &= b < a
            print(f"{n_out} x {n_in} rows {rows:4d}: int4pack {a:8.1f} ms  gemm {b:8.1f} ms  ratio {a / b:5.2f}  "
                  f"bf16 F.linear {c:8.1f} ms  gemm / bf16 speed {c / b:5.2f}")
    first = next((r for r in ROWS if all(wins[q] for q in ROWS if q >= r)), None)
    print(f"int4 gemm threshold: {first} rows" if first else "int4 gemm threshold: the GEMM path never wins here")


if __name__ == "__main__":
    main()
