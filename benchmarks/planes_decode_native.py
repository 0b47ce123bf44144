"""Per-matrix batch-1 decode of bit-plane experts: ``planes_native`` (AVX512-BF16) against the compiled
``planes_rows_kernel`` and bf16 ``F.linear``, interleaved in one process (medians).

    OMP_NUM_THREADS=1 python benchmarks/planes_decode_native.py [--repeats 30]

Shapes of the speed model (benchmarks/lowbit_speed.py): gate_up 11264 x 2048 and down 2048 x 5632, group 128,
2 and 3 bits, 1 and 2 routed rows (each row its own expert, as top-2 decode routes them).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moeslim.runtime.packed import pack_planes, plane_split, planes_rows_kernel
from moeslim.runtime.planes_native import native_planes_rows, planes_native_inputs


def _time(native: Callable[..., None], compiled: Callable[..., torch.Tensor], n_out: int, n_in: int, bits: int,
          n_rows: int, repeats: int, gen: torch.Generator) -> None:
    """Median times of one shape, the three paths interleaved; prints one line."""
    gs, n_exp, n_groups = 128, 2, n_in // 128
    split = plane_split(bits)
    widths, offsets = [w for w, _ in split], [o for _, o in split]
    codes = torch.randint(0, 2**bits, (n_exp, n_out, n_groups, gs), dtype=torch.uint8, generator=gen)
    planes = tuple(pack_planes(codes, bits))
    zeros = torch.randint(0, 2**bits, (n_exp, n_out * n_groups), dtype=torch.uint8, generator=gen)
    zplanes = tuple(pack_planes(zeros, bits))
    scales = (torch.rand(n_exp, n_out, n_groups, generator=gen) * 0.01).half()
    dense = torch.randn(n_out, n_in, generator=gen).bfloat16()
    x = torch.randn(n_rows, n_in, generator=gen).bfloat16()
    rows = torch.arange(n_rows)  # each row its own expert, as top-2 decode routes them

    def run_native() -> torch.Tensor:
        xv, xs = planes_native_inputs(x, tuple(widths), gs)
        out = torch.empty(n_rows, n_out)
        native(xv, xs, rows, list(planes), list(zplanes), 0, scales.view(torch.int16), widths, offsets, gs, out)
        return out.bfloat16()

    def run_compiled() -> torch.Tensor:
        return compiled(x.float(), rows, planes, zplanes, scales, bits, gs).bfloat16()

    def run_bf16() -> torch.Tensor:
        return F.linear(x, dense)

    fns: dict[str, Callable[[], torch.Tensor]] = {"native": run_native, "compiled": run_compiled, "bf16": run_bf16}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{n_out}x{n_in} {bits}-bit rows {n_rows}: native {med['native']:.3f} ms, compiled "
          f"{med['compiled']:.3f} ms, bf16 {med['bf16']:.3f} ms; compiled/native "
          f"{med['compiled'] / med['native']:.2f}, bf16/native {med['bf16'] / med['native']:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    native = native_planes_rows()
    if native is None:
        raise SystemExit("this CPU lacks AVX512-BF16 (or no C++ toolchain): nothing to compare")
    compiled = torch.compile(planes_rows_kernel, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    for n_out, n_in in ((11264, 2048), (2048, 5632)):
        for bits in (3, 2):
            for n_rows in (1, 2):
                _time(native, compiled, n_out, n_in, bits, n_rows, args.repeats, gen)


if __name__ == "__main__":
    main()
