"""A hand-vectorised gathered-rows GEMV over bit-plane experts for CPUs with AVX512-BF16 (the planes decode path).

``runtime.packed.planes_rows_kernel`` (through ``torch.compile``) runs each routed (row, expert) pair of a width
group at batch 1: y_i = sum_g s_g * (x_g . q_g - z_g * sum(x_g)) with the codes q read from their bit planes.
Compiled, it widens, masks, converts and multiplies every plane value on its own. This kernel instead turns 32
plane values at a time into bfloat16 numbers with one table permute (``vpermw``: the low 5 bits of a byte, shifted
to the slot, index a table of 2^offset * (value & mask)) and multiplies them by 32 inputs with one bf16 dot
product (``vdpbf16ps``). The products are exact (a bfloat16 input times an integer of at most 8 bits fits float32),
so with bfloat16 inputs it computes the compiled kernel's sums, in another order: each group's dot product and
zero term meet per lane, scaled by the group's scale, and the lanes are added at the end.

Any group size that is a multiple of 8 up to 128 (``native_group``) runs on the stored planes as they are: a
group's plane is gs / 8 * w bytes, read with masked loads below 128 (the values past them read as code 0 and meet
zero inputs), so a group of 80 (a projection of 80 inputs, as demo-fine's down projections) costs what one of 128
does and no byte is added to what the model holds.

Built once per machine with torch's C++ extension loader (cached by torch in its extensions directory), only where
the CPU reports AVX512F/BW/VL and AVX512-BF16 (``torch.cpu.get_capabilities``); anywhere else, or when the build
fails, ``native_planes_rows`` returns None and the compiled kernel runs instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moeslim.runtime.native_build import build_avx512_bf16_functions

__all__ = ["NATIVE_MAX_GROUP", "native_group", "native_index", "native_planes_rows", "native_planes_rows_x",
           "native_planes_rows_xf", "planes_native_inputs"]

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <vector>
#include <cstring>

// One plane of one group: 4 vectors of 32 plane values (see planes_native_inputs for the inputs' order), each
// into its own accumulator (one chain of dependent dot products would wait on each one's latency), for R input
// rows of the same expert (R = 3: a float32 row's bfloat16 parts, xstride apart) from one decode of the plane.
// The group's plane holds gs / 8 * W bytes (gs <= 128: at most 16 * W); Full (gs = 128): whole loads, else
// masked loads (``masks``: the bytes of each load that are the group's; the rest read as code 0, against inputs 0).
// W >= 2: bytes 32p .. 32p + 31 (slot blocks of gs / 8 bytes each, back to back), shifted by W * j per vector;
// W = 1: the plane's bytes and the same bytes shifted by 1 side by side (16 words each), shifted by 2 * j.
template <int W, int R, bool Full>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline))
static inline void plane_dot(__m512 (&acc)[R][4], const uint8_t* bytes, __m512i table, const uint16_t* xv,
                             int64_t xstride, const uint32_t* masks) {
  if constexpr (W == 1) {
    const __m128i raw = Full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))
                             : _mm_maskz_loadu_epi8((__mmask16)masks[0], bytes);
    const __m256i b = _mm256_cvtepu8_epi16(raw);
    const __m512i words = _mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 1), 1);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512i c = _mm512_permutexvar_epi16(_mm512_srli_epi16(words, 2 * j), table);
#pragma GCC unroll 3
      for (int r = 0; r < R; ++r)
        acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)c, (__m512bh)_mm512_loadu_si512(xv + r * xstride + 32 * j));
    }
  } else {
#pragma GCC unroll 2
    for (int p = 0; p < W / 2; ++p) {
      const __m256i raw = Full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + 32 * p))
                               : _mm256_maskz_loadu_epi8((__mmask32)masks[p], bytes + 32 * p);
      const __m512i words = _mm512_cvtepu8_epi16(raw);
#pragma GCC unroll 4
      for (int j = 0; j < 8 / W; ++j) {
        const int v = p * (8 / W) + j;
        const __m512i c = _mm512_permutexvar_epi16(_mm512_srli_epi16(words, W * j), table);
#pragma GCC unroll 3
        for (int r = 0; r < R; ++r)
          acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)c,
                                       (__m512bh)_mm512_loadu_si512(xv + r * xstride + 32 * v));
      }
    }
  }
}


struct Args {
  const uint16_t* x; const float* xs; const int64_t* rows; const uint8_t* const* planes; const uint8_t* zeros;
  const uint16_t* tables; const uint16_t* scales; const int64_t* widths; const int64_t* offsets;
  const uint32_t* masks; float* out;
  int64_t S, G, N, n_planes, zconst, per; bool symmetric;  // per: gs / 8, a slot block's bytes
};

// Outputs o_begin:o_end of every row; rows R at a time, all R of one expert, their outputs summed per lane
// (R = 1: each row its own output; R = 3: the parts of one float32 row, one output, smallest parts first).
template <int R, bool Full>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c")))
static void rows_block(const Args& A, int64_t o_begin, int64_t o_end) {
  __m512i tables[8];
  for (int64_t i = 0; i < A.n_planes; ++i) tables[i] = _mm512_loadu_si512(A.tables + 32 * i);
  const int64_t G = A.G, N = A.N, P = A.n_planes, xstride = G * 4 * P * 32, per = Full ? 16 : A.per;
  for (int64_t s = 0; s < A.S; s += R) {
    const int64_t e = A.rows[s];
    const uint8_t* zrow = A.zeros + s * N * G;
    const uint16_t* xrow = A.x + s * xstride;
    const float* xsrow = A.xs + s * G * 16;
    for (int64_t o = o_begin; o < o_end; ++o) {
      __m512 y[R];
      for (int r = 0; r < R; ++r) y[r] = _mm512_setzero_ps();
      const uint16_t* srow = A.scales + (e * N + o) * G;
      for (int64_t g = 0; g < G; ++g) {
        __m512 acc[R][4];
        for (int r = 0; r < R; ++r)
          for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
        const uint16_t* xg = xrow + g * 4 * P * 32;
        for (int64_t i = 0; i < P; ++i) {
          const int64_t w = A.widths[i];
          const uint8_t* bytes = A.planes[i] + ((e * N + o) * G + g) * per * w;
          const uint32_t* m = A.masks + 2 * i;
          if (w == 1) plane_dot<1, R, Full>(acc, bytes, tables[i], xg + i * 128, xstride, m);
          else if (w == 2) plane_dot<2, R, Full>(acc, bytes, tables[i], xg + i * 128, xstride, m);
          else plane_dot<4, R, Full>(acc, bytes, tables[i], xg + i * 128, xstride, m);
        }
        const float z = A.symmetric ? (float)A.zconst : (float)zrow[o * G + g];
        const __m512 sc = _mm512_set1_ps(_cvtsh_ss(srow[g]));
        for (int r = 0; r < R; ++r) {
          const __m512 a = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
          const __m512 d = _mm512_fnmadd_ps(_mm512_set1_ps(z), _mm512_loadu_ps(xsrow + r * G * 16 + g * 16), a);
          y[r] = _mm512_fmadd_ps(sc, d, y[r]);
        }
      }
      __m512 sum = y[R - 1];
      for (int r = R - 2; r >= 0; --r) sum = _mm512_add_ps(y[r], sum);
      A.out[(s / R) * N + o] = _mm512_reduce_add_ps(sum);
    }
  }
}

// xv (S, G, 4 * P, 32) bf16, xs (S, G, 16) float32 per-lane sums of x, rows (S,) int64,
// planes: per plane (n, N, G, gs / 8 * w) uint8 (gs a multiple of 8, at most 128); zplanes: per plane
// (n, N * G * w / 8) uint8 (empty: symmetric, zconst); scales (n, N, G) float16 as int16; widths/offsets per
// plane -> out (S, N) float32.
// parts = 3: rows 3s, 3s + 1, 3s + 2 are the bfloat16 parts of one float32 row (same expert), out (S / 3, N)
// their summed outputs (planes_rows_xf).
static void rows_parts(torch::Tensor xv, torch::Tensor xs, torch::Tensor rows, std::vector<torch::Tensor> planes,
                       std::vector<torch::Tensor> zplanes, int64_t zconst, torch::Tensor scales,
                       std::vector<int64_t> widths, std::vector<int64_t> offsets, int64_t gs, torch::Tensor out,
                       int64_t parts) {
  const int64_t n_planes = planes.size();
  TORCH_CHECK(n_planes > 0 && n_planes <= 8 && (int64_t)widths.size() == n_planes
              && (int64_t)offsets.size() == n_planes, "planes");
  TORCH_CHECK(xv.scalar_type() == torch::kBFloat16 && xv.is_contiguous() && xv.dim() == 4, "xv layout");
  const int64_t S = xv.size(0), G = xv.size(1);
  TORCH_CHECK(xv.size(2) == 4 * n_planes && xv.size(3) == 32, "xv shape");
  TORCH_CHECK(xs.scalar_type() == torch::kFloat && xs.is_contiguous() && xs.dim() == 3 && xs.size(0) == S
              && xs.size(1) == G && xs.size(2) == 16, "xs layout");
  TORCH_CHECK(rows.scalar_type() == torch::kLong && rows.is_contiguous() && rows.numel() == S, "rows");
  TORCH_CHECK(scales.scalar_type() == torch::kShort && scales.is_contiguous() && scales.dim() == 3, "scales");
  const int64_t n_exp = scales.size(0), N = scales.size(1);
  TORCH_CHECK(scales.size(2) == G, "scales shape");
  TORCH_CHECK((parts == 1 || parts == 3) && S % parts == 0, "parts");
  TORCH_CHECK(gs % 8 == 0 && gs >= 8 && gs <= 128, "group size: a multiple of 8, at most 128");
  const int64_t per = gs / 8;
  TORCH_CHECK(out.scalar_type() == torch::kFloat && out.is_contiguous() && out.size(0) == S / parts
              && out.size(1) == N,
              "out");
  std::vector<const uint8_t*> pp(n_planes), zp;
  std::vector<uint16_t> tables(32 * n_planes);
  std::vector<uint32_t> masks(2 * n_planes, 0);
  for (int64_t i = 0; i < n_planes; ++i) {
    const int64_t w = widths[i];
    TORCH_CHECK(w == 1 || w == 2 || w == 4, "plane width");
    TORCH_CHECK(planes[i].scalar_type() == torch::kByte && planes[i].is_contiguous() && planes[i].size(0) == n_exp
                && planes[i].numel() == n_exp * N * G * per * w, "plane layout");
    pp[i] = planes[i].data_ptr<uint8_t>();
    for (int64_t p = 0; p < 2; ++p) {  // the group's bytes of load p (W = 1: one load of per bytes)
      const int64_t n = w == 1 ? (p ? 0 : per) : std::min<int64_t>(std::max<int64_t>(per * w - 32 * p, 0), 32);
      masks[2 * i + p] = n == 32 ? 0xffffffffu : (uint32_t)((1ull << n) - 1);
    }
    for (int k = 0; k < 32; ++k) {
      const float v = (float)((k & ((1 << w) - 1)) << offsets[i]);
      uint32_t u;
      std::memcpy(&u, &v, 4);
      tables[32 * i + k] = (uint16_t)(u >> 16);  // exact: a small integer
    }
  }
  const bool symmetric = zplanes.empty();
  if (!symmetric) {
    TORCH_CHECK((int64_t)zplanes.size() == n_planes && (N * G) % 8 == 0, "zero planes");
    for (int64_t i = 0; i < n_planes; ++i) {
      TORCH_CHECK(zplanes[i].scalar_type() == torch::kByte && zplanes[i].is_contiguous()
                  && zplanes[i].numel() == n_exp * N * G * widths[i] / 8, "zero plane layout");
      zp.push_back(zplanes[i].data_ptr<uint8_t>());
    }
  }
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(rp[s] >= 0 && rp[s] < n_exp, "row out of range");
  // Each row's zero points (N, G) unpacked once: code k = a * zper + r sits at byte (a % w) * zper + r, bits
  // w * (a / w), so each (slot, block) is one contiguous run of bytes.
  std::vector<uint8_t> zc(symmetric ? 0 : S * N * G, 0);
  const int64_t zper = N * G / 8;
  for (int64_t s = 0; s < S && !symmetric; s += parts) {  // rows_block reads the first row of each part set
    for (int64_t i = 0; i < n_planes; ++i) {
      const int w = (int)widths[i], off = (int)offsets[i];
      const uint8_t* zb = zp[i] + rp[s] * zper * w;
      for (int a = 0; a < 8; ++a) {
        const uint8_t* src = zb + (a % w) * zper;
        uint8_t* dst = zc.data() + s * N * G + a * zper;
        const int shift = w * (a / w), mask = (1 << w) - 1;
        for (int64_t r = 0; r < zper; ++r) dst[r] |= (uint8_t)(((src[r] >> shift) & mask) << off);
      }
    }
  }
  const Args A{reinterpret_cast<const uint16_t*>(xv.data_ptr<at::BFloat16>()), xs.data_ptr<float>(), rp, pp.data(),
               zc.data(), tables.data(), reinterpret_cast<const uint16_t*>(scales.data_ptr<int16_t>()),
               widths.data(), offsets.data(), masks.data(), out.data_ptr<float>(), S, G, N, n_planes, zconst, per,
               symmetric};
  // outputs split over torch's intra-op threads (one thread: one call, inline)
  at::parallel_for(0, N, 64, [&](int64_t o_begin, int64_t o_end) {
    if (parts == 3) {
      if (per == 16) rows_block<3, true>(A, o_begin, o_end);
      else rows_block<3, false>(A, o_begin, o_end);
    } else {
      if (per == 16) rows_block<1, true>(A, o_begin, o_end);
      else rows_block<1, false>(A, o_begin, o_end);
    }
  });
}

void planes_rows(torch::Tensor xv, torch::Tensor xs, torch::Tensor rows, std::vector<torch::Tensor> planes,
                 std::vector<torch::Tensor> zplanes, int64_t zconst, torch::Tensor scales,
                 std::vector<int64_t> widths, std::vector<int64_t> offsets, int64_t gs, torch::Tensor out) {
  rows_parts(xv, xs, rows, planes, zplanes, zconst, scales, widths, offsets, gs, out, 1);
}

// The index of native_index (int64, 4 * P * 32 input positions within a group, -1 for none: a zero input).
static const int64_t* check_index(const torch::Tensor& index, int64_t P, int64_t gs) {
  TORCH_CHECK(index.scalar_type() == torch::kLong && index.is_contiguous() && index.numel() == 4 * P * 32,
              "index layout");
  const int64_t* ip = index.data_ptr<int64_t>();
  for (int64_t t = 0; t < 4 * P * 32; ++t) TORCH_CHECK(ip[t] >= -1 && ip[t] < gs, "index entry");
  return ip;
}

// planes_rows on raw inputs, for decode: x (S, K) bfloat16 (row stride free, unit column stride), K <= G * gs
// (zero-padded here) -> (S, N) bfloat16. The inputs are put in the kernel's order here (``index``: the input
// within the group of each of the group's 4 * P * 32 vector values, -1 for a zero; planes_native_inputs' order)
// with their per-lane sums, instead of in torch ops.
torch::Tensor planes_rows_x(torch::Tensor x, torch::Tensor rows, std::vector<torch::Tensor> planes,
                            std::vector<torch::Tensor> zplanes, int64_t zconst, torch::Tensor scales,
                            std::vector<int64_t> widths, std::vector<int64_t> offsets, int64_t gs,
                            torch::Tensor index) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.dim() == 2 && x.stride(1) == 1, "x layout");
  const int64_t P = planes.size(), S = x.size(0), K = x.size(1), G = scales.size(2), sx = x.stride(0);
  const int64_t* ip = check_index(index, P, gs);
  TORCH_CHECK(K <= G * gs, "input width");
  auto xv = torch::empty({S, G, 4 * P, 32}, x.options());
  auto xs = torch::empty({S, G, 16}, x.options().dtype(torch::kFloat));
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  at::BFloat16* vp = xv.data_ptr<at::BFloat16>();
  float* sp = xs.data_ptr<float>();
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t g = 0; g < G; ++g) {
      at::BFloat16* vg = vp + (s * G + g) * 4 * P * 32;
      for (int64_t t = 0; t < 4 * P * 32; ++t) {
        const int64_t k = g * gs + ip[t];
        vg[t] = ip[t] >= 0 && k < K ? xp[s * sx + k] : at::BFloat16(0.f);
      }
      for (int64_t l = 0; l < 16; ++l) {  // lane l meets values 2l, 2l + 1 of each of the first plane's vectors
        float acc = 0.f;
        for (int64_t j = 0; j < 4; ++j) acc += (float)vg[j * 32 + 2 * l] + (float)vg[j * 32 + 2 * l + 1];
        sp[(s * G + g) * 16 + l] = acc;
      }
    }
  }
  auto out = torch::empty({S, scales.size(1)}, x.options().dtype(torch::kFloat));
  planes_rows(xv, xs, rows, planes, zplanes, zconst, scales, widths, offsets, gs, out);
  return out.to(torch::kBFloat16);
}

// planes_rows_x for float32 inputs x (S, K) (row stride free, unit column stride) -> (S, N) float32, exactly:
// each input splits into three bfloat16 parts hi = bf16(x), mid = bf16(x - hi), lo = bf16(x - hi - mid) (each
// difference exact in float32; together they hold x's 24-bit significand), the kernel is linear in x and exact
// per product, so y(x) = y(hi) + y(mid) + y(lo): the three parts run as rows 3s, 3s + 1, 3s + 2 of one kernel
// call that decodes each plane vector once for all three, and are summed per lane, smallest first.
torch::Tensor planes_rows_xf(torch::Tensor x, torch::Tensor rows, std::vector<torch::Tensor> planes,
                             std::vector<torch::Tensor> zplanes, int64_t zconst, torch::Tensor scales,
                             std::vector<int64_t> widths, std::vector<int64_t> offsets, int64_t gs,
                             torch::Tensor index) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.stride(1) == 1, "x layout");
  TORCH_CHECK(rows.scalar_type() == torch::kLong && rows.numel() == x.size(0), "rows");
  const int64_t P = planes.size(), S = x.size(0), K = x.size(1), G = scales.size(2), sx = x.stride(0);
  const int64_t* ip = check_index(index, P, gs);
  TORCH_CHECK(K <= G * gs, "input width");
  auto bf = x.options().dtype(torch::kBFloat16);
  auto xv = torch::empty({3 * S, G, 4 * P, 32}, bf);
  auto xs = torch::empty({3 * S, G, 16}, x.options());
  auto rows3 = torch::empty({3 * S}, rows.options());
  const auto rc = rows.contiguous();
  const int64_t* rp = rc.data_ptr<int64_t>();
  int64_t* r3 = rows3.data_ptr<int64_t>();
  const float* xp = x.data_ptr<float>();
  at::BFloat16* vp = xv.data_ptr<at::BFloat16>();
  float* sp = xs.data_ptr<float>();
  const int64_t row_len = G * 4 * P * 32;
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t part = 0; part < 3; ++part) r3[3 * s + part] = rp[s];
    for (int64_t g = 0; g < G; ++g) {
      at::BFloat16* v0 = vp + (3 * s) * row_len + g * 4 * P * 32;
      for (int64_t t = 0; t < 4 * P * 32; ++t) {
        const int64_t k = g * gs + ip[t];
        const float a = ip[t] >= 0 && k < K ? xp[s * sx + k] : 0.f;
        const at::BFloat16 hi(a);
        const float rest = a - (float)hi;  // exact: a and hi agree in their leading bits
        const at::BFloat16 mid(rest);
        const at::BFloat16 lo(rest - (float)mid);  // exact, and exactly a bfloat16 (at most 8 bits left)
        v0[t] = hi;
        v0[row_len + t] = mid;
        v0[2 * row_len + t] = lo;
      }
      for (int64_t part = 0; part < 3; ++part) {
        const at::BFloat16* vg = v0 + part * row_len;
        for (int64_t l = 0; l < 16; ++l) {
          float acc = 0.f;
          for (int64_t j = 0; j < 4; ++j) acc += (float)vg[j * 32 + 2 * l] + (float)vg[j * 32 + 2 * l + 1];
          sp[((3 * s + part) * G + g) * 16 + l] = acc;
        }
      }
    }
  }
  auto out = torch::empty({S, scales.size(1)}, x.options());
  rows_parts(xv, xs, rows3, planes, zplanes, zconst, scales, widths, offsets, gs, out, 3);
  return out;
}
"""


NATIVE_MAX_GROUP = 128  # a plane's group bytes (gs / 8 * w) fit the kernel's loads up to here


def native_group(group_size: int) -> bool:
    """Whether the kernel reads bit planes of this group size (a multiple of 8, at most ``NATIVE_MAX_GROUP``)."""
    return group_size % 8 == 0 and 8 <= group_size <= NATIVE_MAX_GROUP


def _index(width: int, group_size: int) -> list[int]:
    """The input (within a group) each of a plane's 4 vectors of 32 values meets in ``plane_dot``, -1 for none.

    ``packed.pack_planes``: code a * per + r (per = gs / 8) sits at byte (a % w) * per + r, bits w * (a // w).
    W >= 2: vector p * 8 / w + j, value t is byte 32p + t shifted by w * j; W = 1: value t < 16 is byte t
    shifted by 2j, value 16 + t the same byte shifted by 2j + 1. Bytes past the group's per * w read as code 0."""
    per = group_size // 8
    out = []
    if width == 1:
        for j in range(4):
            out += [2 * j * per + t if t < per else -1 for t in range(16)]
            out += [(2 * j + 1) * per + t if t < per else -1 for t in range(16)]
        return out
    for p in range(width // 2):
        for j in range(8 // width):
            for t in range(32):
                b = 32 * p + t
                out.append((b // per + width * j) * per + b % per if b < per * width else -1)
    return out


def native_index(widths: tuple[int, ...], group_size: int) -> Tensor:
    """The inputs ``planes_rows_x`` reads for planes of ``widths``, in order: (4 * P * 32,) int64, per plane its
    4 x 32 vector values' input within the group, -1 for a zero (``planes_native_inputs``' order)."""
    return torch.tensor([k for w in widths for k in _index(w, group_size)], dtype=torch.int64)


def planes_native_inputs(x: Tensor, widths: tuple[int, ...], group_size: int) -> tuple[Tensor, Tensor]:
    """x (S, K) bfloat16, K a multiple of the group size -> (per group the inputs in the kernel's order
    (S, G, 4 * P, 32) bfloat16 (``native_index``; zeros where it has none), their per-lane sums (S, G, 16)
    float32: lane l of a bf16 dot product meets values 2l and 2l + 1 of each vector; the first plane's vectors
    hold every input of the group once)."""
    n_rows, k = x.shape
    n_groups = k // group_size
    idx = native_index(widths, group_size).to(x.device)
    xg = F.pad(x.reshape(n_rows, n_groups, group_size), (0, 1))  # input gs: the zero that -1 reads
    xv = xg.index_select(2, torch.where(idx < 0, group_size, idx)).reshape(n_rows, n_groups, 4 * len(widths), 32)
    xs = xv[:, :, :4].float().reshape(n_rows, n_groups, 4, 16, 2).sum((2, 4))
    return xv.contiguous(), xs.contiguous()


@functools.cache
def _native_functions() -> tuple[Callable[..., object], ...] | None:
    return build_avx512_bf16_functions("moeslim_planes_rows", _SOURCE,
                                       ("planes_rows", "planes_rows_x", "planes_rows_xf"), "planes decode")


def native_planes_rows() -> Callable[..., None] | None:
    """``planes_rows(xv, xs, rows, planes, zero_planes, zero_const, scales, widths, offsets, group_size, out)``:
    ``planes_rows_kernel``'s maths for bfloat16 inputs into a float32 ``out``, built on first use (None: this CPU
    lacks AVX512-BF16, or no C++ toolchain here)."""
    functions = _native_functions()
    return None if functions is None else functions[0]  # type: ignore[return-value]


def native_planes_rows_x() -> Callable[..., Tensor] | None:
    """``planes_rows_x(x, rows, planes, zero_planes, zero_const, scales, widths, offsets, group_size, index)``
    -> (S, N) bfloat16: ``planes_rows`` on raw bfloat16 inputs x (S, K), put in the kernel's order
    (``native_index``) and zero-padded to whole groups inside (one call per projection at decode, no torch ops
    around it)."""
    functions = _native_functions()
    return None if functions is None else functions[1]  # type: ignore[return-value]


def native_planes_rows_xf() -> Callable[..., Tensor] | None:
    """``planes_rows_xf(x, rows, ...)``: ``planes_rows_x`` (same arguments) for float32 inputs x (S, K) -> (S, N)
    float32, exact as the compiled float32 kernel: x split into three bfloat16 parts (hi, mid, lo; together x's
    24-bit significand) run as three rows each, their float32 outputs summed (the kernel is linear in x)."""
    functions = _native_functions()
    return None if functions is None else functions[2]  # type: ignore[return-value]
