"""GPTQ and RTN on a plain linear layer with correlated calibration inputs."""

from __future__ import annotations

import pytest
import torch

from moeslim.calibrate.hessians import accumulate_hessian
from moeslim.methods.quant.gptq import (
    dequantize,
    gptq_bytes_per_matrix,
    gptq_quantize,
    gptq_quantize_batch,
    gptq_quantize_many,
    minmax_params,
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


def _textbook_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, gs: int) -> torch.Tensor:
    """GPTQ as the paper's Algorithm 1 states it (reference ``fasterquant`` without lazy blocks): one column at a
    time, its error spread at once over every later column; asymmetric min-max groups found when reached."""
    W, H = W.clone(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H = H.double() + 0.01 * torch.mean(torch.diag(H.double())) * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        if j % gs == 0:
            scale, zero = minmax_params(W[:, j : j + gs], bits)
        q = scale * (torch.clamp(torch.round(W[:, j] / scale) + zero, 0, 2**bits - 1) - zero)
        Q[:, j] = q
        W[:, j:] -= ((W[:, j] - q) / Hinv[j, j])[:, None] * Hinv[j, j:][None, :]
    return Q


@pytest.mark.parametrize("bits", [2, 4])
def test_matches_the_textbook_algorithm(bits: int) -> None:
    """The blocked, batched implementation is the paper's algorithm up to float rounding in the lazy updates."""
    W, X = _layer()
    X[:, 7] = 0.0  # a dead column
    H = accumulate_hessian(None, X)
    want = _textbook_gptq(W, H, bits, 64)
    got = gptq_quantize(W, H, bits, 64, blocksize=32).weight
    # float rounding moves entries by ~1e-7; a code of its own would move one by a grid step (> 1e-3 here)
    assert ((got - want).abs() > 1e-5).float().mean() < 1e-3


@pytest.mark.parametrize(("act_order", "symmetric"), [(False, False), (True, False), (True, True)])
def test_batch_equals_each_matrix_alone(act_order: bool, symmetric: bool) -> None:
    """Every matrix of a batch keeps its own Hessian, dead columns, damping and act-order permutation: the
    batch's results are those of one call per matrix, bit for bit."""
    layers = [_layer(n_out=48, n_in=200, seed=s) for s in range(4)]
    layers[1][1][:, [3, 150]] = 0.0  # dead columns in one matrix only
    layers[2] = (layers[2][0], layers[2][1] * 50.0)  # another Hessian scale: another damping
    W = torch.stack([w for w, _ in layers])
    H = torch.stack([accumulate_hessian(None, x) for _, x in layers])
    batch = gptq_quantize_batch(W, H, 3, 64, act_order=act_order, symmetric=symmetric, scale_dtype=torch.float16)
    for b, got in enumerate(batch):
        want = gptq_quantize(W[b], H[b], 3, 64, act_order=act_order, symmetric=symmetric, scale_dtype=torch.float16)
        for field in ("codes", "scales", "zeros", "weight"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (b, field)
    assert torch.all(batch[1].weight[:, [3, 150]] == 0)
    with pytest.raises(ValueError, match="B, in, in"):
        gptq_quantize_batch(W, H[:, :8, :8], 3)


def test_many_splits_into_batches_of_one_shape_within_the_memory_bound() -> None:
    shapes = [(48, 128), (48, 128), (32, 128), (48, 128), (48, 128), (48, 128)]
    layers = [_layer(n_out=o, n_in=i, seed=s) for s, (o, i) in enumerate(shapes)]
    W = [w for w, _ in layers]
    H = [accumulate_hessian(None, x) for _, x in layers]
    want = [gptq_quantize(w, h, 4, 64, act_order=True) for w, h in zip(W, H, strict=True)]
    for per in (1, 2, 8):  # matrices per batch the bound allows
        got = gptq_quantize_many(W, H, 4, 64, act_order=True, batch_bytes=per * gptq_bytes_per_matrix(48, 128))
        assert [tuple(g.codes.shape) for g in got] == shapes
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g.codes, w.codes) and torch.equal(g.weight, w.weight)
    with pytest.raises(ValueError, match="one Hessian per weight"):
        gptq_quantize_many(W, H[:2], 4)
