"""The 4-bit GEMM path of long inputs (prefill): dequantizing torch's int4pack layout gives the canonical
dequantization (to float rounding), and the routed matmul agrees with dequantize-then-matmul."""

from __future__ import annotations

import pytest
import torch

from moeslim.methods.quant.fused import quantize_fused
from moeslim.runtime import packed as packed_module
from moeslim.runtime.int4_native import native_int4_tile
from moeslim.runtime.packed import PackedExperts, int4pack_dequant_matmul


def _storage(symmetric: bool, seed: int) -> tuple[PackedExperts, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(2, 192, 200, generator=gen)  # 200 inputs: padded to whole groups of 32
    packed = quantize_fused(w, [4, 4], 32, None, "rtn", symmetric=symmetric)
    return PackedExperts(packed), packed.dequantize()


def test_dequantization_is_the_canonical_one() -> None:
    # Identity rows read the dequantized weights back: (q - 8) * scale + zero with the int4pack kernel's pairs,
    # which is s * (q - z) up to float32 rounding.
    storage, weights = _storage(False, 0)
    group = storage.groups[0]
    assert group.fmt == "int4pack"
    eye = torch.eye(group.k_pad)
    for row in range(2):
        wt = int4pack_dequant_matmul(eye, group.w4[row], group.sz[row].view(torch.float32), 32)  # (k_pad, N)
        torch.testing.assert_close(wt[:200].T, weights[row], rtol=1e-6, atol=1e-6)


def test_long_inputs_match_dequantize_then_matmul() -> None:
    for symmetric in (False, True):
        storage, weights = _storage(symmetric, 1)
        gen = torch.Generator().manual_seed(2)
        for rows in (packed_module.INT4_NATIVE_GEMM_MIN_ROWS - 1, packed_module.INT4_NATIVE_GEMM_MIN_ROWS + 1,
                     packed_module.INT4_GEMM_MIN_ROWS - 1, packed_module.INT4_GEMM_MIN_ROWS + 5):
            x = torch.randn(rows, 200, generator=gen)
            for e in range(2):
                ref = x @ weights[e].T
                assert torch.allclose(storage.matmul(e, x), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
            xb = x.bfloat16()
            ref = (xb @ weights[1].bfloat16().T).float()
            got = storage.matmul(1, xb).float()
            assert torch.allclose(got, ref, rtol=0, atol=2e-2 * ref.abs().max().item())


def test_compiled_dequantization_equals_the_eager_one() -> None:
    # The compiled dequantization (one pass, float32 maths, one rounding) gives the eager passes' weights: exactly
    # in float32, to one bf16 rounding in bf16 (the eager path rounds the offset zero - 8 * scale first); 200
    # inputs pad to whole groups of 32, rows just above the GEMM threshold.
    storage, weights = _storage(False, 3)
    compiled = packed_module._Compiled()
    group = storage.groups[0]
    x = torch.randn(packed_module.INT4_GEMM_MIN_ROWS + 3, group.k_pad, generator=torch.Generator().manual_seed(4))
    x[:, 200:] = 0  # padded inputs are zeros (the padded codes' weights are not)
    for dtype in (torch.float32, torch.bfloat16):
        sz = packed_module.int4_scales_and_zeros(group._scales(1), group._zplanes(1), dtype)
        xd = x.to(dtype)
        eager = int4pack_dequant_matmul(xd, group.w4[1], sz, 32)
        fast = int4pack_dequant_matmul(xd, group.w4[1], sz, 32, packed_module.Workspace(), compiled)
        if compiled.failed:
            pytest.skip("torch.compile is not available on this machine (the eager path was checked)")
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(fast.float(), eager.float(), rtol=0, atol=tol * eager.abs().max().item())
        ref = xd.float()[:, :200] @ weights[1].T
        torch.testing.assert_close(fast.float(), ref, rtol=0, atol=tol * 2 * ref.abs().max().item())
    assert "int4pack_dequant_kernel" in compiled.kernels()
    x2 = torch.randn(packed_module.INT4_GEMM_MIN_ROWS + 1, 200)  # through PackedExperts: the compiled path
    storage.compiled = compiled
    ref = x2 @ weights[0].T
    torch.testing.assert_close(storage.matmul(0, x2), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("columns", [64, 128])
def test_tiles_cover_every_output_column(monkeypatch: pytest.MonkeyPatch, columns: int) -> None:
    # The compiled GEMM path dequantizes a tile of output columns at a time: 192 outputs in tiles of 64 (three
    # full tiles) or of 128 (a full tile and a narrower last one) give the one-tile path's (and the eager
    # passes') outputs in every column, and each tile width compiles once per dtype, not once per tile or call.
    storage, weights = _storage(False, 5)
    group = storage.groups[0]
    monkeypatch.setattr(packed_module, "native_int4_tile", lambda: None)  # the compiled tiles (native: below)
    monkeypatch.setattr(packed_module, "INT4_TILE_WEIGHTS", columns * group.k_pad)
    assert packed_module.int4_tile_columns(group.k_pad) == columns
    compiled = packed_module._Compiled()
    x = torch.randn(packed_module.INT4_GEMM_MIN_ROWS + 2, group.k_pad, generator=torch.Generator().manual_seed(6))
    x[:, 200:] = 0
    for dtype in (torch.float32, torch.bfloat16):
        sz = packed_module.int4_scales_and_zeros(group._scales(0), group._zplanes(0), dtype)
        xd = x.to(dtype)
        eager = int4pack_dequant_matmul(xd, group.w4[0], sz, 32)
        workspace = packed_module.Workspace()
        for _ in range(2):  # the second call reuses the compiled tiles and the workspace
            fast = int4pack_dequant_matmul(xd, group.w4[0], sz, 32, workspace, compiled)
            if compiled.failed:
                pytest.skip("torch.compile is not available on this machine (the eager path was checked)")
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(fast.float(), eager.float(), rtol=0, atol=tol * eager.abs().max().item())
            ref = xd.float()[:, :200] @ weights[0].T
            torch.testing.assert_close(fast.float(), ref, rtol=0, atol=tol * 2 * ref.abs().max().item())
    widths = {columns, 192 % columns} - {0}
    assert len(compiled.fns) == 2 * len(widths)


def test_native_tiles_equal_the_compiled_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    # The AVX512-BF16 tile kernel computes the compiled kernel's maths (q * scale + offset in float32, one
    # rounding to bf16): its tiles and the GEMM outputs through it agree to one bf16 rounding, with a full and a
    # narrower last tile (192 outputs in tiles of 128), on slices of the whole matrix's scale and offset.
    native = native_int4_tile()
    if native is None:
        pytest.skip("this CPU has no AVX512-BF16 (or no C++ toolchain): the compiled tiles run instead")
    storage, _ = _storage(True, 7)
    group = storage.groups[0]
    k = group.k_pad
    sz = group.sz[1].view(torch.bfloat16).float()
    scale, offset = sz[..., 0].contiguous(), torch.add(sz[..., 1], sz[..., 0], alpha=-8)
    blocks = group.w4[1].view(-1, k, 32)
    for n0, n1 in ((0, 128), (128, 192)):
        args = (blocks[n0 // 64:n1 // 64], scale[:, n0:n1], offset[:, n0:n1])
        got = torch.empty(k, n1 - n0, dtype=torch.bfloat16)
        native(*args, got)
        exact = packed_module.int4pack_dequant_kernel(*args, torch.empty(k, n1 - n0))  # float32, eager
        torch.testing.assert_close(got.float(), exact, rtol=2**-8, atol=0)
    x = torch.randn(packed_module.INT4_GEMM_MIN_ROWS + 4, k, generator=torch.Generator().manual_seed(8))
    x[:, 200:] = 0
    xb = x.bfloat16()
    sz16 = group.sz[1].view(torch.bfloat16)
    monkeypatch.setattr(packed_module, "INT4_TILE_WEIGHTS", 128 * k)
    fast = int4pack_dequant_matmul(xb, group.w4[1], sz16, 32, packed_module.Workspace(), packed_module._Compiled())
    monkeypatch.setattr(packed_module, "native_int4_tile", lambda: None)
    compiled = packed_module._Compiled()
    ref = int4pack_dequant_matmul(xb, group.w4[1], sz16, 32, packed_module.Workspace(), compiled)
    if compiled.failed:
        pytest.skip("torch.compile is not available on this machine")
    torch.testing.assert_close(fast.float(), ref.float(), rtol=0, atol=1e-2 * ref.abs().max().item())


def test_decode_rows_never_build_the_native_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # Which path a row count takes: the int4pack kernel below the native threshold without asking for the native
    # kernel (a decode-only process never builds it), the GEMM path from INT4_GEMM_MIN_ROWS whatever the CPU, and
    # in between only where the native tiles run (bf16 on AVX512-BF16).
    def build() -> None:
        raise AssertionError("the native kernel was consulted for decode rows")

    monkeypatch.setattr(packed_module, "native_int4_tile", build)
    assert not packed_module.int4_gemm(packed_module.INT4_NATIVE_GEMM_MIN_ROWS - 1, torch.bfloat16)
    assert packed_module.int4_gemm(packed_module.INT4_GEMM_MIN_ROWS, torch.bfloat16)
    monkeypatch.setattr(packed_module, "native_int4_tile", lambda: None)
    assert not packed_module.int4_gemm(packed_module.INT4_GEMM_MIN_ROWS - 1, torch.bfloat16)
    monkeypatch.setattr(packed_module, "native_int4_tile", lambda: print)
    assert packed_module.int4_gemm(packed_module.INT4_NATIVE_GEMM_MIN_ROWS, torch.bfloat16)
    monkeypatch.setattr(packed_module, "native_int4_tile", build)
    for dtype in (torch.float32, torch.float16):  # torch's int4pack kernel is fast only in bf16: never asked there
        assert packed_module.int4_gemm(1, dtype)
