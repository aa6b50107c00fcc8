// Exact self-kNN distances by symmetric pair tiles (float): every distance of a batch against
// itself by direct differences, each pair once.
//
// Why: in self-kNN (ldreg_loss(x), the reference being x itself) at SSL sizes the score path
// costs a B x N x D matmul plus an exact re-rank of k + margin candidates per row, which at
// N = 256..2048 is a large fraction of N (and reads each candidate's row from L3). The exact
// distances of all pairs cost B * N * D / 2 subtractions and FMAs instead (d(i, j) = d(j, i)):
// about one matmul's FMA-port work, with no scores, no certificate and no re-rank.
//
// The bits of a pair's distance are fixed by this definition, whichever kernel computes it
// (AVX-512 4 x 4 tiles, AVX2 2 x 2 tiles, the scalar loop): 16 partial sums, lane l holding
// the FMA chain of (a_d - b_d)^2 over d = l (mod 16) in d order; then s8[l] = s[l] + s[l+8],
// s4[l] = s8[l] + s8[l+4], s2[l] = s4[l] + s4[l+2], sum = s2[0] + s2[1]. (a - b)^2 equals
// (b - a)^2 bit for bit, so d(i, j) == d(j, i).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "x86_simd.h"

namespace ldreg {
namespace self_pairs {

constexpr int kLanes = 16;

// The definition, one pair at a time (any CPU).
inline float sqdist_scalar(const float* a, const float* b, int64_t d) {
  float s[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float t = a[j + l] - b[j + l];
      s[l] = std::fma(t, t, s[l]);
    }
  }
  for (int l = 0; j + l < d; ++l) {
    const float t = a[j + l] - b[j + l];
    s[l] = std::fma(t, t, s[l]);
  }
  for (int l = 0; l < 8; ++l) s[l] = s[l] + s[l + 8];
  for (int l = 0; l < 4; ++l) s[l] = s[l] + s[l + 4];
  for (int l = 0; l < 2; ++l) s[l] = s[l] + s[l + 2];
  return s[0] + s[1];
}

// out[r * C + c] = sqdist(a[r], b[c]) for an R x C tile, one pair at a time.
template <int R, int C>
inline void tile_scalar(const float* const* a, const float* const* b, int64_t d, float* out) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * C + c] = sqdist_scalar(a[r], b[c], d);
}

#ifdef LDREG_X86_AVX2
// Masks for the last rem (1..15) features as two 8-lane halves: masked loads give t = 0 on
// the lanes past d, and fma(0, 0, s) = s, so a tail changes only its own lanes.
__attribute__((target("avx2,fma"), always_inline)) inline void tail_masks(int64_t rem, __m256i& m0, __m256i& m1) {
  alignas(32) static const int32_t lanes[24] = {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                -1, -1, -1, -1, 0,  0,  0,  0,  0,  0,  0,  0};
  m0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes + 16 - std::min<int64_t>(rem, 8)));
  m1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes + 16 - std::max<int64_t>(rem - 8, 0)));
}

// The last step of the definition on lanes 0..7 already summed with 8..15 (s8).
__attribute__((target("avx2,fma"), always_inline)) inline float reduce8(__m256 s8) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// 2 x 2 pairs, each as two 8-lane halves (lanes 0-7, 8-15): 8 accumulators, the two rows'
// 16 features in 4 registers, one column half at a time.
__attribute__((target("avx2,fma"))) inline void tile_avx2(const float* const* a, const float* const* b, int64_t d,
                                                          float* out) {
  __m256 s[2][2][2];
  for (int r = 0; r < 2; ++r)
    for (int c = 0; c < 2; ++c) s[r][c][0] = s[r][c][1] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    const __m256 a00 = _mm256_loadu_ps(a[0] + j), a01 = _mm256_loadu_ps(a[0] + j + 8);
    const __m256 a10 = _mm256_loadu_ps(a[1] + j), a11 = _mm256_loadu_ps(a[1] + j + 8);
#pragma GCC unroll 2
    for (int c = 0; c < 2; ++c) {
      const __m256 b0 = _mm256_loadu_ps(b[c] + j);
      const __m256 t00 = _mm256_sub_ps(a00, b0), t10 = _mm256_sub_ps(a10, b0);
      s[0][c][0] = _mm256_fmadd_ps(t00, t00, s[0][c][0]);
      s[1][c][0] = _mm256_fmadd_ps(t10, t10, s[1][c][0]);
      const __m256 b1 = _mm256_loadu_ps(b[c] + j + 8);
      const __m256 t01 = _mm256_sub_ps(a01, b1), t11 = _mm256_sub_ps(a11, b1);
      s[0][c][1] = _mm256_fmadd_ps(t01, t01, s[0][c][1]);
      s[1][c][1] = _mm256_fmadd_ps(t11, t11, s[1][c][1]);
    }
  }
  if (j < d) {  // fewer than 16 features
    __m256i m0, m1;
    tail_masks(d - j, m0, m1);
    for (int r = 0; r < 2; ++r) {
      const __m256 x0 = _mm256_maskload_ps(a[r] + j, m0), x1 = _mm256_maskload_ps(a[r] + j + 8, m1);
      for (int c = 0; c < 2; ++c) {
        const __m256 t0 = _mm256_sub_ps(x0, _mm256_maskload_ps(b[c] + j, m0));
        const __m256 t1 = _mm256_sub_ps(x1, _mm256_maskload_ps(b[c] + j + 8, m1));
        s[r][c][0] = _mm256_fmadd_ps(t0, t0, s[r][c][0]);
        s[r][c][1] = _mm256_fmadd_ps(t1, t1, s[r][c][1]);
      }
    }
  }
  for (int r = 0; r < 2; ++r)
    for (int c = 0; c < 2; ++c) out[r * 2 + c] = reduce8(_mm256_add_ps(s[r][c][0], s[r][c][1]));
}

// 4 x 4 pairs, one 16-lane register each: 16 accumulators, the four rows' 16 features in 4
// registers, one column at a time (22 of the 32 registers).
__attribute__((target("avx512f,avx2,fma"))) inline void tile_avx512(const float* const* a, const float* const* b,
                                                                    int64_t d, float* out) {
  __m512 s[4][4];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) s[r][c] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    const __m512 a0 = _mm512_loadu_ps(a[0] + j), a1 = _mm512_loadu_ps(a[1] + j);
    const __m512 a2 = _mm512_loadu_ps(a[2] + j), a3 = _mm512_loadu_ps(a[3] + j);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512 bc = _mm512_loadu_ps(b[c] + j);
      const __m512 t0 = _mm512_sub_ps(a0, bc), t1 = _mm512_sub_ps(a1, bc);
      const __m512 t2 = _mm512_sub_ps(a2, bc), t3 = _mm512_sub_ps(a3, bc);
      s[0][c] = _mm512_fmadd_ps(t0, t0, s[0][c]);
      s[1][c] = _mm512_fmadd_ps(t1, t1, s[1][c]);
      s[2][c] = _mm512_fmadd_ps(t2, t2, s[2][c]);
      s[3][c] = _mm512_fmadd_ps(t3, t3, s[3][c]);
    }
  }
  if (j < d) {
    const __mmask16 m = static_cast<__mmask16>((1u << (d - j)) - 1);
    for (int r = 0; r < 4; ++r) {
      const __m512 x = _mm512_maskz_loadu_ps(m, a[r] + j);
      for (int c = 0; c < 4; ++c) {
        const __m512 t = _mm512_sub_ps(x, _mm512_maskz_loadu_ps(m, b[c] + j));
        s[r][c] = _mm512_fmadd_ps(t, t, s[r][c]);
      }
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) {
      // The halves through memory, once per pair (GCC 12 warns falsely on the extract and
      // shuffle intrinsics' undefined pass-through operand).
      alignas(64) float v[kLanes];
      _mm512_store_ps(v, s[r][c]);
      out[r * 4 + c] = reduce8(_mm256_add_ps(_mm256_load_ps(v), _mm256_load_ps(v + 8)));
    }
}
#endif

}  // namespace self_pairs
}  // namespace ldreg
