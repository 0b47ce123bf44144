"""The AVX512-BF16 gathered decode kernel over bit planes (``runtime.planes_native``): with bfloat16 inputs it
computes ``planes_rows_kernel``'s sums (every product exact in float32, only the summation order differs), for
group 128 and for groups of other multiples of 8 (demo-fine's down projections: 80 inputs, one group of 80), and
routed through ``PackedExperts`` it equals dequantize-then-matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeslim.methods.quant.fused import quantize_fused
from moeslim.runtime import packed as packed_module
from moeslim.runtime.packed import PackedExperts, pack_planes, plane_split, planes_rows_kernel
from moeslim.runtime.planes_native import (
    native_index,
    native_planes_rows,
    native_planes_rows_x,
    native_planes_rows_xf,
    planes_native_inputs,
)

pytestmark = pytest.mark.skipif(
    native_planes_rows() is None,
    reason="this CPU lacks AVX512F/BW/VL with AVX512-BF16 (or no C++ toolchain): the compiled kernel runs instead")


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal to ``rtol`` of the largest output: float32 sums of exact products, in another order."""
    torch.testing.assert_close(got, ref, rtol=0, atol=rtol * ref.abs().max().item())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("gs", "n_groups"), [(128, 3), (80, 1), (40, 3)])
def test_native_equals_the_planes_rows_kernel(bits: int, symmetric: bool, gs: int, n_groups: int) -> None:
    # 3 experts of 40 outputs x groups of gs (N * G a multiple of 8: whole zero-point bytes; gs 80 and 40: a
    # slot block of 10 / 5 bytes per bit of width, read with masked loads), 1, 2, 5 and 8 rows routed to random
    # experts (repeats included): the kernel's maths on the same planes.
    gen = torch.Generator().manual_seed(bits * 2 + symmetric + gs)
    n, n_out = 3, 40
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
               [o for _, o in split], gs, out)
        _close(out, ref)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("n_out", "n_in", "k_pad"), [(72, 300, 384), (256, 80, 80)])
def test_routed_decode_equals_dequantize_then_matmul(symmetric: bool, n_out: int, n_in: int, k_pad: int) -> None:
    # Bit-plane experts of 1 (not symmetric), 2, 3 and 5 bits, 72 outputs x 300 inputs (padded to 3 groups of
    # 128) or demo-fine's down projection, 256 x 80 (one group of 80), large enough for the gathered kernel:
    # bfloat16 rows through PackedExperts.group_matmul run the native kernel (the compiled one is never asked)
    # and equal x @ W^T of the dequantized experts (float32 sums, one rounding).
    widths = [2, 3, 5, 3, 2] if symmetric else [1, 2, 3, 5, 3, 2]  # a symmetric grid needs 2 bits or more
    gen = torch.Generator().manual_seed(7 + symmetric + n_in)
    w = torch.randn(len(widths), n_out, n_in, generator=gen)
    assert n_out * n_in >= packed_module.COMPILE_MIN_WEIGHTS
    packed = quantize_fused(w, widths, 128, None, "rtn", symmetric=symmetric)
    storage = PackedExperts(packed)

    class _NoCompile(packed_module._Compiled):
        def __call__(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
            raise AssertionError("the compiled kernel ran for bfloat16 decode rows")

    storage.compiled = _NoCompile()
    weights = packed.dequantize()
    assert set(storage.formats().values()) == {"planes"}
    for gi, group in enumerate(storage.groups):
        assert group.k_pad == k_pad and group.group_size == min(128, n_in)
        for n_rows in (1, 2, 3, 8):
            rows = torch.randint(0, len(group.experts), (n_rows,), generator=gen)
            x = torch.randn(n_rows, n_in, generator=gen).bfloat16()
            ref = torch.stack([x[i].float() @ weights[group.experts[int(r)]].T for i, r in enumerate(rows)])
            got = storage.group_matmul(gi, rows, x)
            assert got.dtype == torch.bfloat16
            _close(got.float(), ref, rtol=1e-2)  # one bf16 rounding of the output
            _close(group._native_rows(rows, x).float(), got.float(), rtol=0)  # the path taken is the native one
    e = storage.groups[0].experts[0]
    x = torch.randn(1, n_in, generator=gen).bfloat16()
    _close(storage.matmul(e, x).float(), x.float() @ weights[e].T, rtol=1e-2)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_raw_inputs_equal_the_planes_rows_kernel(bits: int, symmetric: bool, x_dtype: torch.dtype) -> None:
    # Raw inputs through planes_rows_x (bfloat16) / planes_rows_xf (float32: three bfloat16 parts hi, mid, lo
    # run as three rows each): the kernel's sums (exact products, summation order aside; bfloat16: one rounding
    # of the output), at group 128 for input widths a multiple of 128 or not (448 and 80: zero-padded to whole
    # groups inside) and at group 80 (demo-fine's down projections: 80 inputs; 200: padded to 3 groups), rows
    # routed to random experts (repeats included).
    kernel = native_planes_rows_xf() if x_dtype == torch.float32 else native_planes_rows_x()
    assert kernel is not None
    split = plane_split(bits)
    widths = tuple(w for w, _ in split)
    for gs, k in ((128, 384), (128, 448), (128, 80), (80, 80), (80, 200)):
        gen = torch.Generator().manual_seed(bits * 4 + symmetric * 2 + k + gs)
        n, n_out = 3, 40
        n_groups = -(-k // gs)
        codes = torch.randint(0, 2**bits, (n, n_out, n_groups, gs), dtype=torch.uint8, generator=gen)
        planes = tuple(pack_planes(codes, bits))
        zeros = torch.randint(0, 2**bits, (n, n_out * n_groups), dtype=torch.uint8, generator=gen)
        zplanes: tuple[torch.Tensor, ...] | int = 1 << (bits - 1) if symmetric else tuple(pack_planes(zeros, bits))
        scales = (torch.rand(n, n_out, n_groups, generator=gen) * 0.01 + 1e-3).half()
        for n_rows in (1, 2, 5):
            x = (torch.randn(n_rows, k, generator=gen) * torch.logspace(-3, 3, k)).to(x_dtype)  # magnitudes apart
            rows = torch.randint(0, n, (n_rows,), generator=gen)
            ref = planes_rows_kernel(F.pad(x.float(), (0, n_groups * gs - k)), rows, planes, zplanes, scales, bits,
                                     gs)
            got = kernel(x, rows, list(planes), [] if isinstance(zplanes, int) else list(zplanes),
                         zplanes if isinstance(zplanes, int) else 0, scales.view(torch.int16), list(widths),
                         [o for _, o in split], gs, native_index(widths, gs))
            assert got.dtype == x_dtype
            if x_dtype == torch.bfloat16:
                _close(got.float(), ref, rtol=1e-2)  # one bf16 rounding of the output
                continue
            _close(got, ref)
            # far closer than bfloat16 inputs get: the parts below bf16 precision count
            bf = planes_rows_kernel(F.pad(x.bfloat16().float(), (0, n_groups * gs - k)), rows, planes, zplanes,
                                    scales, bits, gs)
            assert (bf - ref).abs().max() > 30 * (got - ref).abs().max()


class _NoCompile(packed_module._Compiled):
    def __call__(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        raise AssertionError("a compiled kernel ran for native decode rows")


class _Experts(torch.nn.Module):
    """The attributes the routed-experts forward reads from a transformers experts module (SiLU, gated or not)."""

    has_bias = False

    def __init__(self, gated: bool) -> None:
        super().__init__()
        self.has_gate = gated
        self.act_fn = torch.nn.SiLU()

    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        g, u = h.chunk(2, dim=-1)
        return self.act_fn(g) * u


@pytest.mark.parametrize("n_in", [300, 448, 80])
def test_float32_rows_are_taken_and_exact(n_in: int) -> None:
    # float32 rows of mixed widths (1..8 bits, all bit planes but 4 and 8: int4pack / int8 layouts) run the
    # native kernel, never a compiled one, and equal the float32 reference kernel on the same planes (80 inputs:
    # one group of 80, as demo-fine's down projections); float16 inputs are declined (the compiled or eager path
    # runs).
    widths = [1, 2, 3, 5, 6, 7, 3, 2]
    gen = torch.Generator().manual_seed(n_in)
    w = torch.randn(len(widths), 256, n_in, generator=gen)  # 256 x 80: large enough for the gathered kernel
    assert packed_module.COMPILE_MIN_WEIGHTS <= 256 * 80
    packed = quantize_fused(w, widths, 128, None, "rtn")
    storage = PackedExperts(packed)
    storage.compiled = _NoCompile()
    assert set(storage.formats().values()) == {"planes"} and storage.n_groups == 6
    weights = packed.dequantize()
    for gi, group in enumerate(storage.groups):
        for n_rows in (1, 2, 3, 8):
            rows = torch.randint(0, len(group.experts), (n_rows,), generator=gen)
            x = torch.randn(n_rows, n_in, generator=gen)
            got = storage.group_matmul(gi, rows, x)
            assert got.dtype == torch.float32
            ref = planes_rows_kernel(group._pad(x), rows, tuple(getattr(group, f"p{j}") for j in
                                     range(group.n_planes)), group._all_zplanes(), group.scales.view(torch.float16),
                                     group.bits, group.group_size)
            _close(got, ref)
            native = group._native_rows(rows, x)
            assert native is not None  # the path taken is the native one
            _close(native, got, rtol=0)
            dq = torch.stack([x[i] @ weights[group.experts[int(r)]].T for i, r in enumerate(rows)])
            _close(got, dq, rtol=1e-4)  # dequantize-then-matmul: float32 sums in another grouping
    group = storage.groups[0]
    assert group._native_rows(torch.tensor([0]), torch.randn(1, n_in).half()) is None


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("n_mid", [448, 80])
def test_float32_native_decode_equals_sorted_experts(gated: bool, n_mid: int) -> None:
    # A layer's float32 decode through planes_rows_xf (no compiled graph) equals ``sorted_experts``' maths run
    # eagerly (float32 projections, activation and weighted sum) for one token (k = 2) and three tokens, with
    # the placeholder expert (adds nothing) and a down projection of 448 inputs (not whole groups of 128) or of
    # 80 (one group of 80, as demo-fine's).
    from moeslim.runtime.lowbit_forward import _native_decode, grouped_forward, sorted_experts

    widths = [3, 2, 5, 3, 1]
    gen = torch.Generator().manual_seed(41 + gated + n_mid)
    up_p = quantize_fused(torch.randn(5, 2 * n_mid if gated else n_mid, 256, generator=gen), widths, 128, None,
                          "rtn")
    down_p = quantize_fused(torch.randn(5, 256, n_mid, generator=gen), widths, 128, None, "rtn")
    up, down = PackedExperts(up_p), PackedExperts(down_p)
    up.compiled = down.compiled = _NoCompile()

    experts = _Experts(gated)
    act = experts._apply_gate if gated else experts.act_fn
    for n_tokens, index in ((1, torch.tensor([[0, 3]])), (1, torch.tensor([[4, 5]])),
                            (3, torch.tensor([[1, 2], [2, 5], [0, 4]]))):
        x = torch.randn(n_tokens, 256, generator=gen)
        weights = torch.rand(n_tokens, 2, generator=gen)
        pairs = sorted((up.slot[e][0], p // 2, up.slot[e][1], p) for p, e in enumerate(index.reshape(-1).tolist())
                       if e in up.slot)
        counts = tuple(sum(1 for g, *_ in pairs if g == gi) for gi in range(up.n_groups))
        idx = torch.tensor([[t for _, t, _, _ in pairs], [r for _, _, r, _ in pairs], [p for *_, p in pairs]])
        ref = sorted_experts(x, idx, weights, counts, up.rows_args(), down.rows_args(), down.in_width, act)
        got = _native_decode(experts, x, index, weights, up, down)
        assert got is not None and got.dtype == torch.float32
        _close(got, ref)
        _close(grouped_forward(experts, x, index, weights, up, down), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_demo_fine_shapes_decode_natively(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    # demo-fine's experts at its uniform-3 row (uniform 3 bits, group 128): gate_up 160 x 256, down 256 x 80 (one
    # group of 80). A top-8 decode step of one token through grouped_forward takes the native path for both
    # projections (``_native_decode`` returns the layer's output; no compiled graph is asked for) and equals
    # the eager ``sorted_experts`` maths.
    from moeslim.runtime import lowbit_forward
    from moeslim.runtime.lowbit_forward import grouped_forward, sorted_experts

    n_exp, n_mid, hidden, k = 16, 80, 256, 8
    gen = torch.Generator().manual_seed(80)
    up = PackedExperts(quantize_fused(torch.randn(n_exp, 2 * n_mid, hidden, generator=gen), [3] * n_exp, 128,
                                      None, "rtn"))
    down = PackedExperts(quantize_fused(torch.randn(n_exp, hidden, n_mid, generator=gen), [3] * n_exp, 128, None,
                                        "rtn"))
    up.compiled = down.compiled = _NoCompile()
    assert [g.group_size for g in down.groups] == [80] and [g.fmt for g in down.groups] == ["planes"]
    assert up.native_decode_args() is not None and down.native_decode_args() is not None
    native: list[bool] = []
    original = lowbit_forward._native_decode

    def counting(*args: object) -> torch.Tensor | None:
        y = original(*args)  # type: ignore[arg-type]
        native.append(y is not None)
        return y

    monkeypatch.setattr(lowbit_forward, "_native_decode", counting)

    experts = _Experts(True)
    x = torch.randn(1, hidden, generator=gen).to(dtype)
    index = torch.randperm(n_exp, generator=gen)[:k].unsqueeze(0)
    weights = torch.rand(1, k, generator=gen).softmax(-1).to(dtype)
    got = grouped_forward(experts, x, index, weights, up, down)
    assert native == [True] and got.dtype == dtype
    pairs = sorted((up.slot[e][0], p // k, up.slot[e][1], p) for p, e in enumerate(index.reshape(-1).tolist()))
    idx = torch.tensor([[t for _, t, _, _ in pairs], [r for _, _, r, _ in pairs], [p for *_, p in pairs]])
    ref = sorted_experts(x, idx, weights, (k,), up.rows_args(), down.rows_args(), down.in_width,
                         experts._apply_gate)
    _close(got.float(), ref.float(), rtol=1e-5 if dtype == torch.float32 else 2e-2)
