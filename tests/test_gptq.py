"""GPTQ and RTN on a plain linear layer with correlated calibration inputs."""

from __future__ import annotations

import pytest
import torch

from moeslim.calibrate.hessians import accumulate_hessian
from moeslim.methods.quant.gptq import (
    dequantize,
    gptq_quantize,
    n_groups,
    rtn_quantize,
)


def _layer(n_out: int = 64, n_in: int = 256, n_tokens: int = 512, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # Correlated features: a low-rank mix plus noise, with uneven feature scales (like LLM activations).
    latent = torch.randn(n_tokens, 32, generator=gen)
    mix = torch.randn(32, n_in, generator=gen)
    scale = torch.exp(torch.randn(n_in, generator=gen))
    X = (latent @ mix + 0.3 * torch.randn(n_tokens, n_in, generator=gen)) * scale
    W = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
    return W, X


def _out_err(X: torch.Tensor, W: torch.Tensor, Q: torch.Tensor) -> float:
    return float(torch.linalg.norm(X @ W.T - X @ Q.T))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(bits: int, act_order: bool) -> None:
    W, X = _layer()
    H = accumulate_hessian(None, X)
    g = gptq_quantize(W, H, bits, 128, act_order=act_order)
    r = rtn_quantize(W, bits, 128)
    assert _out_err(X, W, g.weight) < 0.9 * _out_err(X, W, r.weight)


def test_eight_bits_is_close_to_exact() -> None:
    W, X = _layer()
    g = gptq_quantize(W, accumulate_hessian(None, X), 8)
    rel = _out_err(X, W, g.weight) / float(torch.linalg.norm(X @ W.T))
    assert rel < 5e-3


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_in_range_and_dequantize_matches(bits: int) -> None:
    W, X = _layer(n_in=200)  # 200 = 64 + 64 + 64 + 8: a partial last group
    H = accumulate_hessian(None, X)
    for act_order in (False, True):
        g = gptq_quantize(W, H, bits, 64, act_order=act_order)
        assert g.codes.dtype == torch.uint8 and g.codes.shape == W.shape
        assert int(g.codes.max()) <= 2**bits - 1
        assert g.scales.shape == g.zeros.shape == (64, n_groups(200, 64)) == (64, 4)
        assert int(g.zeros.max()) <= 2**bits - 1
        assert torch.equal(dequantize(g.codes, g.scales, g.zeros, 64), g.weight)
    r = rtn_quantize(W, bits, 64)
    assert torch.equal(dequantize(r.codes, r.scales, r.zeros, 64), r.weight)


def test_small_input_uses_one_group_and_blocks_spanning_groups() -> None:
    W, X = _layer(n_in=96)
    H = accumulate_hessian(None, X)
    g = gptq_quantize(W, H, 3, 128)
    assert g.scales.shape == (64, 1) and g.group_size == 96
    # Groups larger than blocks (group 64, block 32) and groups not dividing blocks (48 vs 128).
    for gs, bs in ((64, 32), (48, 128), (None, 32)):
        q = gptq_quantize(W, H, 3, gs, blocksize=bs)
        assert torch.equal(dequantize(q.codes, q.scales, q.zeros, gs), q.weight)
        assert _out_err(X, W, q.weight) < _out_err(X, W, rtn_quantize(W, 3, gs).weight)


def test_block_size_does_not_change_the_result_much() -> None:
    # Lazy batching is an exact reorganisation of the updates: only float rounding differs.
    W, X = _layer()
    H = accumulate_hessian(None, X)
    a = gptq_quantize(W, H, 4, 128, blocksize=128)
    b = gptq_quantize(W, H, 4, 128, blocksize=256)
    assert (a.codes != b.codes).float().mean() < 1e-3


def test_dead_columns() -> None:
    W, X = _layer()
    dead = torch.tensor([3, 100, 200])
    X[:, dead] = 0.0
    H = accumulate_hessian(None, X)
    g = gptq_quantize(W, H, 3, 128)
    assert torch.isfinite(g.weight).all()
    assert torch.all(g.weight[:, dead] == 0)
    assert _out_err(X, W, g.weight) < _out_err(X, W, rtn_quantize(W, 3, 128).weight)


def test_deterministic() -> None:
    W, X = _layer()
    H = accumulate_hessian(None, X)
    a, b = gptq_quantize(W, H, 3, act_order=True), gptq_quantize(W, H, 3, act_order=True)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight)


def test_accumulate_hessian() -> None:
    _, X = _layer(n_in=32, n_tokens=100)
    H = accumulate_hessian(None, X[:60])
    H = accumulate_hessian(H, X[60:])
    torch.testing.assert_close(H, X.T @ X, rtol=1e-5, atol=1e-4)
    w = torch.rand(100)
    Hw = accumulate_hessian(torch.zeros(32, 32, dtype=torch.float64), X, w)
    assert Hw.dtype == torch.float64
    torch.testing.assert_close(Hw, (X.double() * w.double()[:, None]).T @ X.double())
    with pytest.raises(ValueError, match="weights"):
        accumulate_hessian(None, X, torch.rand(5))


def test_invalid_inputs() -> None:
    W, X = _layer(n_in=32)
    H = accumulate_hessian(None, X)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(W, H, 9)
    with pytest.raises(ValueError, match="in, in"):
        gptq_quantize(W, H[:8, :8], 4)
    with pytest.raises(ValueError, match="bits"):
        rtn_quantize(W, 0)
