"""The AVX512-BF16 GEMV over fused float experts (``runtime.dense_native``) and the decode paths that use it:
bfloat16 rows equal float32 sums rounded once (torch's bfloat16 ``F.linear`` up to summation order), skipping's
one-token path equals the per-expert reference bit for bit, and low-bit bfloat16 decode through the native
bit-plane kernel equals the compiled decode graphs (float32 sums in another order)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from moeslim.methods.quant.fused import quantize_fused
from moeslim.models import find_moe_layers
from moeslim.models.expert_math import expert_weight_views
from moeslim.models.loading import load_model
from moeslim.runtime import lowbit_forward, skipping
from moeslim.runtime.dense_native import DENSE_NATIVE_MAX_ROWS, dense_rows, native_dense_rows
from moeslim.runtime.lowbit_forward import packed_storage
from moeslim.runtime.lowbit_io import install_lowbit
from moeslim.runtime.planes_native import native_planes_rows_x
from moeslim.runtime.routed_experts import routed_forward

pytestmark = pytest.mark.skipif(
    native_dense_rows() is None or native_planes_rows_x() is None,
    reason="this CPU lacks AVX512F/BW/VL with AVX512-BF16 (or no C++ toolchain): torch's matmuls run instead")


def _one_rounding(got: torch.Tensor, exact: torch.Tensor) -> None:
    """got (bfloat16) is exact (float32) rounded once, up to one bfloat16 step (float32 sums in another order)."""
    step = exact.abs().clamp_min(torch.finfo(torch.float32).tiny) * 2.0**-7
    assert bool(((got.float() - exact).abs() <= step).all())


@pytest.mark.parametrize(("n_out", "n_in"), [(96, 256), (45, 200), (7, 31), (130, 448)])
def test_rows_through_their_experts_equal_float32_sums_rounded(n_out: int, n_in: int) -> None:
    # outputs not a multiple of 4 and inputs not a multiple of 32 (masked tail) included; each row its own expert
    gen = torch.Generator().manual_seed(n_out + n_in)
    w = torch.randn(3, n_out, n_in, generator=gen).bfloat16()
    kernel = native_dense_rows()
    assert kernel is not None
    for n_rows in (1, 2, DENSE_NATIVE_MAX_ROWS, 5, 8):  # the kernel itself takes any number of rows
        x = torch.randn(n_rows, n_in, generator=gen).bfloat16()
        rows = torch.randint(0, 3, (n_rows,), generator=gen).tolist()
        got = dense_rows(x, w, rows) if n_rows <= DENSE_NATIVE_MAX_ROWS else kernel(x, w, rows)
        assert got is not None and got.dtype == torch.bfloat16 and got.shape == (n_rows, n_out)
        exact = torch.stack([x[i].float() @ w[e].float().T for i, e in enumerate(rows)])
        _one_rounding(got, exact)
        assert torch.equal(got[0], dense_rows(x[:1], w, rows[:1])[0])  # type: ignore[index]
    # one row repeated without a copy (stride 0) reads that row for each expert
    x = torch.randn(1, n_in, generator=gen).bfloat16()
    both = dense_rows(x.expand(2, -1), w, [2, 0])
    assert both is not None
    assert torch.equal(both[0], dense_rows(x, w, [2])[0]) and torch.equal(both[1], dense_rows(x, w, [0])[0])  # type: ignore[index]
    torch.testing.assert_close(both[1].float(), F.linear(x, w[0])[0].float(), rtol=2**-7, atol=1e-6)


def test_declines_what_it_does_not_compute() -> None:
    w = torch.randn(2, 64, 64)
    assert dense_rows(torch.randn(1, 64), w, [0]) is None  # float32
    assert dense_rows(torch.randn(1, 64).bfloat16(), w, [0]) is None  # float32 weights
    wb = w.bfloat16()
    over = DENSE_NATIVE_MAX_ROWS + 1  # longer inputs: torch's GEMM
    assert dense_rows(torch.randn(over, 64).bfloat16(), wb, [0] * over) is None
    assert dense_rows(torch.randn(64, 2).bfloat16().T, wb, [0, 1]) is None  # rows not unit-stride
    with pytest.raises(RuntimeError, match="expert out of range"):
        dense_rows(torch.randn(1, 64).bfloat16(), wb, [2])


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_one_token_two_pairs_equals_the_per_expert_reference_bf16(family: str, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    """bfloat16, one token at a time, skipping installed: tokens keeping both experts take the two-row native
    path and equal ``routed_forward`` (one expert at a time, same kernel) exactly; tokens that skip equal it on
    the placeholder routing with ``rescale_kept`` weights, as before."""
    from moeslim.methods.skip import keep_mask, rescale_kept

    beta = 0.6
    model = tiny_model(family).to(torch.bfloat16)
    layer = find_moe_layers(model)[0]
    x = torch.randn(48, layer.hidden_size, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.no_grad():
        weights, ids = layer.route(layer.router_logits(x))
    skipping.install_skipping(model, {layer.layer_idx: beta})
    taken: list[int] = []
    original = skipping._two_pairs_native

    def counting(*args: object) -> torch.Tensor | None:
        out = original(*args)  # type: ignore[arg-type]
        taken.append(out is not None)
        return out

    monkeypatch.setattr(skipping, "_two_pairs_native", counting)
    both = 0
    with torch.no_grad():
        for t in range(x.shape[0]):
            keep = keep_mask(weights[t:t + 1], beta, "top2")
            routed = ids[t:t + 1].masked_fill(~keep, layer.num_experts)
            got = layer.experts(x[t:t + 1], ids[t:t + 1], weights[t:t + 1])
            w = weights[t:t + 1] if keep.all() else rescale_kept(weights[t:t + 1], keep)
            assert torch.equal(got, routed_forward(layer.experts, x[t:t + 1], routed, w, {})), t
            both += int(keep.all())
    assert 0 < both < x.shape[0] and sum(taken) == both


class _Eager:
    """Stands in for ``PackedExperts.compiled``: the traceable decode graphs run eagerly (the same maths)."""

    failed = False

    def __call__(self, kernel: Any, *args: object, key: object = None, serial: bool = False) -> Any:
        return kernel(*args)


def test_lowbit_bf16_decode_native_equals_the_decode_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo model's shapes in bfloat16 (hidden 256, down_proj's 448 inputs padded to whole groups), experts
    at 2 and 3 bits: decode through ``planes_rows_x`` equals the per-layer decode graphs (``sorted_experts``: 1
    token, ``masked_up`` / ``masked_down``: 2-4 tokens; run eagerly here, the same maths compiled) up to one
    bfloat16 step or two (intermediate roundings carried on), for every routing pattern, skipped pairs included."""
    model, _ = load_model("demo", dtype=torch.bfloat16)
    layer = find_moe_layers(model)[0]
    views = expert_weight_views(layer)
    n = layer.num_experts
    bits = [3 if e % 2 else 2 for e in range(n)]
    for name, w in ((views.up_name, views.up), (views.down_name, views.down)):
        install_lowbit(layer.experts, name, quantize_fused(w.detach(), bits, 128, None, "rtn"))
    store = packed_storage(layer.experts)
    up, down = store[views.up_name], store["down_proj"]
    assert up.native_decode_args() is not None and down.native_decode_args() is not None
    gen = torch.Generator().manual_seed(4)
    calls: list[bool] = []
    original = lowbit_forward._native_decode

    def counting(*args: Any) -> torch.Tensor | None:
        out = original(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(lowbit_forward, "_native_decode", counting)
    with torch.no_grad():
        for tokens in (1, 2, 4):
            x = torch.randn(tokens, layer.hidden_size, generator=gen).bfloat16()
            for trial in range(8):
                ids = torch.stack([torch.randperm(n, generator=gen)[:2] for _ in range(tokens)])
                if trial % 4 == 3:
                    ids[0, 1] = n  # a skipped pair (the placeholder expert)
                w = torch.rand(tokens, 2, generator=gen)
                got = layer.experts(x, ids, w)
                up.compiled = _Eager()  # type: ignore[assignment]
                decode = lowbit_forward._sorted_decode if ids.numel() <= 2 else lowbit_forward._masked_decode
                ref = decode(layer.experts, x, ids, w, up, down)
                assert ref is not None and got.dtype == torch.bfloat16
                # each projection's sums in another order, rounded to bfloat16 and carried through the activation:
                # a bfloat16 step or two of the largest output
                torch.testing.assert_close(got.float(), ref.float(), rtol=2**-6, atol=2**-7 * ref.abs().max().item())
    assert len(calls) == 24 and all(calls)
