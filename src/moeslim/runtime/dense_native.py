"""A hand-vectorised bfloat16 GEMV for a few rows through one expert's slice of fused float weights (AVX512-BF16).

At batch-1 decode a routed expert of a small model is two matrix-vector products of a few hundred thousand weights;
torch's bfloat16 ``F.linear`` at one row pays a fixed cost of about 40 us per call on this kind of CPU (oneDNN's
set-up), several times the arithmetic. Skipping's direct decode (``runtime/skipping.py``) computes each kept
expert as such products on its slice of the fused weights, so that cost decided its speed on small shapes.

This kernel computes y_s = x_s @ W[e_s]^T for x (S, K) bfloat16 and W (E, N, K) bfloat16 (the fused,
non-transposed layout; each row through its own expert) with one ``vdpbf16ps`` per 32 weights, four outputs at a
time, float32 sums, each output rounded once to bfloat16 (as ``F.linear`` in bfloat16 does: the same products,
summed in another order). Built once per machine with torch's C++ extension loader; where the CPU lacks
AVX512-BF16 or the build fails ``dense_rows`` returns None
and the caller's torch matmul runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from moeslim.runtime.native_build import build_avx512_bf16

__all__ = ["DENSE_NATIVE_MAX_ROWS", "dense_rows", "native_dense_rows"]

# Rows one call computes: decode sizes. Each block of 4 weight rows is read once for all rows, but from 4 rows on a
# large matrix (11264 x 2048) torch's GEMM is as fast (CPU time, 1 thread: 4.9 / 4.7 ms at 4 rows, 4.1 / 4.2 at 2,
# 3.7 / 5.6 at 1; 896 x 256: 24 / 46 us at 4 rows, 12 / 39 at 1).
DENSE_NATIVE_MAX_ROWS = 4

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// Outputs of blocks b_begin:b_end (4 outputs a block) of every row; the last block may be short. Rows inside
// blocks: rows through the same expert read each block of weights from memory once (then from L1).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void gemv_block(const uint16_t* x, int64_t sx, const uint16_t* w, const int64_t* rows, at::BFloat16* out,
                       int64_t S, int64_t N, int64_t K, int64_t b_begin, int64_t b_end) {
  const int64_t full = K / 32 * 32;
  const __mmask32 tail = K > full ? (__mmask32)((1u << (K - full)) - 1u) : 0;
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t o = 4 * b, n = N - o < 4 ? N - o : 4;
    for (int64_t s = 0; s < S; ++s) {
      const uint16_t* xs = x + s * sx;
      const uint16_t* we = w + rows[s] * N * K;
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t k = 0; k < full; k += 32) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xs + k);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          if (j < n) acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(we + (o + j) * K + k), xv);
        }
      }
      if (tail) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, xs + full);
        for (int j = 0; j < n; ++j) {
          acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_maskz_loadu_epi16(tail, we + (o + j) * K + full), xv);
        }
      }
      for (int j = 0; j < n; ++j) out[s * N + o + j] = at::BFloat16(_mm512_reduce_add_ps(acc[j]));
    }
  }
}

// x (S, K) bf16 (row stride free: an expanded row reads one row), w (E, N, K) bf16, rows (S,) experts
// -> (S, N) bf16, row s = x[s] @ w[rows[s]]^T.
torch::Tensor dense_rows(torch::Tensor x, torch::Tensor w, std::vector<int64_t> rows) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.dim() == 2 && x.stride(1) == 1, "x layout");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.dim() == 3, "w layout");
  const int64_t S = x.size(0), K = x.size(1), N = w.size(1);
  TORCH_CHECK(w.size(2) == K && (int64_t)rows.size() == S, "w shape / rows");
  for (int64_t e : rows) TORCH_CHECK(e >= 0 && e < w.size(0), "expert out of range");
  auto out = torch::empty({S, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t sx = x.stride(0);
  // blocks of 4 outputs split over torch's intra-op threads; a chunk of at least ~2^18 weights (small matrices:
  // one call, inline)
  const int64_t blocks = (N + 3) / 4, grain = std::max<int64_t>(1, (int64_t(1) << 18) / (4 * K));
  at::parallel_for(0, blocks, grain, [&](int64_t b, int64_t b_end) {
    gemv_block(xp, sx, wp, rows.data(), op, S, N, K, b, b_end);
  });
  return out;
}
"""


@functools.cache
def native_dense_rows() -> Callable[[Tensor, Tensor, list[int]], Tensor] | None:
    """``dense_rows(x, w, rows)`` -> row s = x[s] @ w[rows[s]]^T in bfloat16, built on first use (None: this CPU
    lacks AVX512-BF16, or no C++ toolchain here)."""
    return build_avx512_bf16("moeslim_dense_rows", _SOURCE, "dense_rows", "dense decode")


def dense_rows(x: Tensor, w: Tensor, rows: list[int]) -> Tensor | None:
    """x (S, K), w (E, N, K), rows (S,) expert of each row -> (S, N), row s = x[s] @ w[rows[s]]^T, through the
    native kernel, or None where it does not apply (not bfloat16 on both sides, not CPU, more than
    ``DENSE_NATIVE_MAX_ROWS`` rows, x's rows not unit-stride, w not contiguous, no kernel here): the caller then
    runs its torch matmul."""
    if (x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or x.device.type != "cpu" or w.device.type != "cpu"
            or x.dim() != 2 or x.shape[0] > DENSE_NATIVE_MAX_ROWS or x.stride(1) != 1 or not w.is_contiguous()):
        return None
    kernel = native_dense_rows()
    return None if kernel is None else kernel(x, w, rows)
