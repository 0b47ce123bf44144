"""The AVX512-BF16 gathered decode kernel over bit planes (``runtime.planes_native``): with bfloat16 inputs it
computes ``planes_rows_kernel``'s sums (every product exact in float32, only the summation order differs), and
routed through ``PackedExperts`` it equals dequantize-then-matmul."""

from __future__ import annotations

import pytest
import torch

from moeslim.methods.quant.fused import quantize_fused
from moeslim.runtime import packed as packed_module
from moeslim.runtime.packed import PackedExperts, pack_planes, plane_split, planes_rows_kernel
from moeslim.runtime.planes_native import native_planes_rows, planes_native_inputs

pytestmark = pytest.mark.skipif(
    native_planes_rows() is None,
    reason="this CPU lacks AVX512F/BW/VL with AVX512-BF16 (or no C++ toolchain): the compiled kernel runs instead")


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal to ``rtol`` of the largest output: float32 sums of exact products, in another order."""
    torch.testing.assert_close(got, ref, rtol=0, atol=rtol * ref.abs().max().item())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_native_equals_the_planes_rows_kernel(bits: int, symmetric: bool) -> None:
    # 3 experts of 40 outputs x 3 groups of 128 (N * G = 120: whole zero-point bytes), 1, 2, 5 and 8 rows
    # routed to random experts (repeats included): the kernel's maths on the same planes.
    gen = torch.Generator().manual_seed(bits * 2 + symmetric)
    n, n_out, n_groups, gs = 3, 40, 3, 128
    codes = torch.randint(0, 2**bits, (n, n_out, n_groups, gs), dtype=torch.uint8, generator=gen)
    planes = tuple(pack_planes(codes, bits))
    zeros = torch.randint(0, 2**bits, (n, n_out * n_groups), dtype=torch.uint8, generator=gen)
    zplanes: tuple[torch.Tensor, ...] | int = 1 << (bits - 1) if symmetric else tuple(pack_planes(zeros, bits))
    scales = (torch.rand(n, n_out, n_groups, generator=gen) * 0.01 + 1e-3).half()
    split = plane_split(bits)
    kernel = native_planes_rows()
    assert kernel is not None
    for n_rows in (1, 2, 5, 8):
        x = torch.randn(n_rows, n_groups * gs, generator=gen).bfloat16()
        rows = torch.randint(0, n, (n_rows,), generator=gen)
        ref = planes_rows_kernel(x.float(), rows, planes, zplanes, scales, bits, gs)
        xv, xs = planes_native_inputs(x, tuple(w for w, _ in split), gs)
        out = torch.empty(n_rows, n_out)
        kernel(xv, xs, rows, list(planes), [] if isinstance(zplanes, int) else list(zplanes),
               zplanes if isinstance(zplanes, int) else 0, scales.view(torch.int16), [w for w, _ in split],
               [o for _, o in split], out)
        _close(out, ref)


@pytest.mark.parametrize("symmetric", [False, True])
def test_routed_decode_equals_dequantize_then_matmul(symmetric: bool) -> None:
    # Bit-plane experts of 1 (not symmetric), 2, 3 and 5 bits, 72 outputs x 300 inputs (padded to 3 groups of
    # 128), large enough for the gathered kernel: bfloat16 rows through PackedExperts.group_matmul run the
    # native kernel (the compiled one is never asked) and equal x @ W^T of the dequantized experts (float32
    # sums, one rounding).
    widths = [2, 3, 5, 3, 2] if symmetric else [1, 2, 3, 5, 3, 2]  # a symmetric grid needs 2 bits or more
    gen = torch.Generator().manual_seed(7 + symmetric)
    w = torch.randn(len(widths), 72, 300, generator=gen)
    assert packed_module.COMPILE_MIN_WEIGHTS <= 72 * 300
    packed = quantize_fused(w, widths, 128, None, "rtn", symmetric=symmetric)
    storage = PackedExperts(packed)

    class _NoCompile(packed_module._Compiled):
        def __call__(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
            raise AssertionError("the compiled kernel ran for bfloat16 decode rows")

    storage.compiled = _NoCompile()
    weights = packed.dequantize()
    assert set(storage.formats().values()) == {"planes"}
    for gi, group in enumerate(storage.groups):
        assert group.k_pad == 384
        for n_rows in (1, 2, 3, 8):
            rows = torch.randint(0, len(group.experts), (n_rows,), generator=gen)
            x = torch.randn(n_rows, 300, generator=gen).bfloat16()
            ref = torch.stack([x[i].float() @ weights[group.experts[int(r)]].T for i, r in enumerate(rows)])
            got = storage.group_matmul(gi, rows, x)
            assert got.dtype == torch.bfloat16
            _close(got.float(), ref, rtol=1e-2)  # one bf16 rounding of the output
            _close(group._native_rows(rows, x).float(), got.float(), rtol=0)  # the path taken is the native one
    e = storage.groups[0].experts[0]
    x = torch.randn(1, 300, generator=gen).bfloat16()
    _close(storage.matmul(e, x).float(), x.float() @ weights[e].T, rtol=1e-2)


def test_float32_inputs_are_not_taken() -> None:
    # float32 inputs are not exact in bfloat16: the native kernel declines and the compiled (or eager) path runs.
    packed = quantize_fused(torch.randn(2, 72, 256), [3, 3], 128, None, "rtn")
    group = PackedExperts(packed).groups[0]
    assert group._native_rows(torch.tensor([0]), torch.randn(1, 256)) is None
    assert group._native_rows(torch.tensor([0]), torch.randn(1, 256).bfloat16()) is not None
