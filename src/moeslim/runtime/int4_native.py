"""A hand-vectorised dequantization of int4pack tiles for CPUs with AVX512-BF16 (the 4-bit prefill GEMM path).

``runtime.packed.int4pack_dequant_matmul`` dequantizes one tile of output columns at a time and matmuls it while
it is in cache. The tile's dequantization through ``torch.compile`` (``int4pack_dequant_kernel``) runs at about
one cycle a weight: a quarter of a bf16 matmul at 128 rows. This kernel computes the same arithmetic (w = q * scale
+ offset in float32, one rounding to bf16) with AVX512 intrinsics, about 4x faster, so the tile costs a tenth of
its matmul. It is built once per machine with torch's C++ extension loader (cached by torch in its extensions
directory), only where the CPU reports AVX512F/BW/VL and AVX512-BF16 (``torch.cpu.get_capabilities``); anywhere
else, or when the build fails, ``native_int4_tile`` returns None and the compiled kernel runs instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor

from moeslim.runtime.native_build import build_avx512_bf16

__all__ = ["native_int4_tile"]

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// Codes of 64 output columns at input k (32 bytes: low nibbles columns 0-31, high nibbles 32-63), scale and
// offset of those columns -> 64 bf16 weights q * scale + offset (float32 FMA, one rounding).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void dequant_rows(const uint8_t* q, const float* s, const float* z, int64_t s_stride, int64_t group_size,
                         int64_t n_blocks, int64_t k_rows, int64_t k_begin, int64_t k_end, uint16_t* out) {
  const __m256i mask = _mm256_set1_epi8(15);
  const int64_t n = n_blocks * 64;
  for (int64_t k = k_begin; k < k_end; ++k) {
    const float* sr = s + (k / group_size) * s_stride;
    const float* zr = z + (k / group_size) * s_stride;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (b * k_rows + k) * 32));
      const __m256i lo = _mm256_and_si256(bytes, mask);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
      const float* sb = sr + b * 64;
      const float* zb = zr + b * 64;
      __m512 w[4];
      const __m128i parts[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                                _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
      for (int j = 0; j < 4; ++j) {
        const __m512 codes = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(parts[j]));
        w[j] = _mm512_fmadd_ps(codes, _mm512_loadu_ps(sb + 16 * j), _mm512_loadu_ps(zb + 16 * j));
      }
      uint16_t* dst = out + k * n + b * 64;
      _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0]));
      _mm512_storeu_si512(dst + 32, (__m512i)_mm512_cvtne2ps_pbh(w[3], w[2]));
    }
  }
}

// q (n / 64, K, 32) uint8, scale and offset (G, n) float32 (unit column stride), out (K, n) bf16 contiguous.
void dequant_tile(torch::Tensor q, torch::Tensor scale, torch::Tensor offset, torch::Tensor out) {
  TORCH_CHECK(q.dtype() == torch::kUInt8 && q.dim() == 3 && q.size(2) == 32 && q.is_contiguous(), "q layout");
  TORCH_CHECK(scale.dtype() == torch::kFloat && offset.dtype() == torch::kFloat, "scale/offset dtype");
  TORCH_CHECK(scale.stride(1) == 1 && offset.stride(1) == 1 && scale.stride(0) == offset.stride(0), "strides");
  TORCH_CHECK(out.dtype() == torch::kBFloat16 && out.is_contiguous(), "out layout");
  const int64_t n_blocks = q.size(0), k_rows = q.size(1), groups = scale.size(0);
  TORCH_CHECK(scale.size(1) == n_blocks * 64 && offset.sizes() == scale.sizes(), "scale shape");
  TORCH_CHECK(out.size(0) == k_rows && out.size(1) == n_blocks * 64 && k_rows % groups == 0, "out shape");
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = offset.data_ptr<float>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t s_stride = scale.stride(0);
  // rows of inputs split over torch's intra-op threads (one thread: one call, inline)
  at::parallel_for(0, k_rows, 256, [&](int64_t k_begin, int64_t k_end) {
    dequant_rows(qp, sp, zp, s_stride, k_rows / groups, n_blocks, k_rows, k_begin, k_end, op);
  });
}
"""


@functools.cache
def native_int4_tile() -> Callable[[Tensor, Tensor, Tensor, Tensor], None] | None:
    """``dequant_tile(q, scale, offset, out)``: ``int4pack_dequant_kernel``'s maths into a bf16 ``out``, built on
    first use (None: this CPU lacks AVX512-BF16, or no C++ toolchain here)."""
    return build_avx512_bf16("moeslim_int4_tile", _SOURCE, "dequant_tile", "int4 tile")
