// Float score tiles on x86-64: the reference packed into panels of kPanel rows, a register-tile
// dot-product kernel of kGroup query rows x kPanel columns, and the fused filter that tests a
// tile against each row's threshold while it is still in L1. Two instances of one shape:
//   Avx2Tiles:   6 x 16 in 8-lane ymm registers (12 accumulators; AVX2+FMA).
//   Avx512Tiles: 6 x 32 in 16-lane zmm registers (12 accumulators; AVX-512F), twice the FMA
//                width on CPUs with 512-bit units (Zen 5, Sapphire Rapids).
// Which one runs, or BLAS, is decided per dimension by score_choice.h (measured, not assumed:
// the AVX2 tile beat MKL/OpenBLAS on a Zen 2 and lost to it on a Sapphire Rapids).
//
// Scores are the same numbers on both kernels (each lane is one sequential FMA chain over D)
// and differ from BLAS's only in accumulation order, which the certificate's accumulation
// bound (knn.h) covers; the exact re-rank then gives every path the same answer.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "x86_simd.h"

namespace ldreg {
namespace score_tile {

// Panel p of `out` holds rows [P p, P p + P) of r (n x dim, row-major) as [dim][P]: one
// contiguous read per dimension in the kernel. Rows past n are zero.
template <int64_t P>
inline void pack_panels(const float* r, int64_t n, int64_t dim, int64_t p0, int64_t p1, float* out) {
  for (int64_t p = p0; p < p1; ++p) {
    float* o = out + p * dim * P;
    const int64_t rows = std::min<int64_t>(P, n - p * P);
    if (rows < P) std::memset(o, 0, sizeof(float) * dim * P);
    for (int64_t l = 0; l < rows; ++l) {
      const float* src = r + (p * P + l) * dim;
      for (int64_t d = 0; d < dim; ++d) o[d * P + l] = src[d];
    }
  }
}

#ifdef LDREG_X86_AVX2
// Written out row by row: the loop form (__m256 acc[6][2]) keeps its accumulators in
// registers only under a compiler-specific unroll pragma; without one GCC runs it at half speed.
struct Avx2Tiles {
  static constexpr int64_t kPanel = 16;  // two 8-float vectors
  static constexpr int64_t kGroup = 6;

  // c[i * ldc + l] = a[i] . panel row l, for the 6 query rows a[0..5] (any may alias).
  __attribute__((target("avx2,fma"))) static void tile(const float* const* a, const float* bp, int64_t dim, float* c,
                                                       int64_t ldc) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
    for (int64_t d = 0; d < dim; ++d) {
      const __m256 b0 = _mm256_loadu_ps(bp + kPanel * d), b1 = _mm256_loadu_ps(bp + kPanel * d + 8);
      __m256 t = _mm256_broadcast_ss(a0 + d);
      c00 = _mm256_fmadd_ps(t, b0, c00);
      c01 = _mm256_fmadd_ps(t, b1, c01);
      t = _mm256_broadcast_ss(a1 + d);
      c10 = _mm256_fmadd_ps(t, b0, c10);
      c11 = _mm256_fmadd_ps(t, b1, c11);
      t = _mm256_broadcast_ss(a2 + d);
      c20 = _mm256_fmadd_ps(t, b0, c20);
      c21 = _mm256_fmadd_ps(t, b1, c21);
      t = _mm256_broadcast_ss(a3 + d);
      c30 = _mm256_fmadd_ps(t, b0, c30);
      c31 = _mm256_fmadd_ps(t, b1, c31);
      t = _mm256_broadcast_ss(a4 + d);
      c40 = _mm256_fmadd_ps(t, b0, c40);
      c41 = _mm256_fmadd_ps(t, b1, c41);
      t = _mm256_broadcast_ss(a5 + d);
      c50 = _mm256_fmadd_ps(t, b0, c50);
      c51 = _mm256_fmadd_ps(t, b1, c51);
    }
    _mm256_storeu_ps(c, c00);
    _mm256_storeu_ps(c + 8, c01);
    _mm256_storeu_ps(c + ldc, c10);
    _mm256_storeu_ps(c + ldc + 8, c11);
    _mm256_storeu_ps(c + 2 * ldc, c20);
    _mm256_storeu_ps(c + 2 * ldc + 8, c21);
    _mm256_storeu_ps(c + 3 * ldc, c30);
    _mm256_storeu_ps(c + 3 * ldc + 8, c31);
    _mm256_storeu_ps(c + 4 * ldc, c40);
    _mm256_storeu_ps(c + 4 * ldc + 8, c41);
    _mm256_storeu_ps(c + 5 * ldc, c50);
    _mm256_storeu_ps(c + 5 * ldc + 8, c51);
  }

  // s = sqr - 2 * dot for the panel's columns, in place (bit-equal to the scalar
  // sqr[j] - 2 * s[j]: 2 * dot is exact, so the fused form rounds once as the plain one
  // does); returns the bit mask of the columns with s <= t.
  __attribute__((target("avx2,fma"))) static uint32_t scores_le(float* s, const float* sqr, float t) {
    const __m256 two = _mm256_set1_ps(2.0f), tv = _mm256_set1_ps(t);
    const __m256 s0 = _mm256_fnmadd_ps(two, _mm256_loadu_ps(s), _mm256_loadu_ps(sqr));
    const __m256 s1 = _mm256_fnmadd_ps(two, _mm256_loadu_ps(s + 8), _mm256_loadu_ps(sqr + 8));
    _mm256_storeu_ps(s, s0);
    _mm256_storeu_ps(s + 8, s1);
    const uint32_t lo = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(s0, tv, _CMP_LE_OQ)));
    const uint32_t hi = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(s1, tv, _CMP_LE_OQ)));
    return lo | (hi << 8);
  }
};

struct Avx512Tiles {
  static constexpr int64_t kPanel = 32;  // two 16-float vectors
  static constexpr int64_t kGroup = 6;

  __attribute__((target("avx512f"))) static void tile(const float* const* a, const float* bp, int64_t dim, float* c,
                                                      int64_t ldc) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
    for (int64_t d = 0; d < dim; ++d) {
      const __m512 b0 = _mm512_loadu_ps(bp + kPanel * d), b1 = _mm512_loadu_ps(bp + kPanel * d + 16);
      __m512 t = _mm512_set1_ps(a0[d]);
      c00 = _mm512_fmadd_ps(t, b0, c00);
      c01 = _mm512_fmadd_ps(t, b1, c01);
      t = _mm512_set1_ps(a1[d]);
      c10 = _mm512_fmadd_ps(t, b0, c10);
      c11 = _mm512_fmadd_ps(t, b1, c11);
      t = _mm512_set1_ps(a2[d]);
      c20 = _mm512_fmadd_ps(t, b0, c20);
      c21 = _mm512_fmadd_ps(t, b1, c21);
      t = _mm512_set1_ps(a3[d]);
      c30 = _mm512_fmadd_ps(t, b0, c30);
      c31 = _mm512_fmadd_ps(t, b1, c31);
      t = _mm512_set1_ps(a4[d]);
      c40 = _mm512_fmadd_ps(t, b0, c40);
      c41 = _mm512_fmadd_ps(t, b1, c41);
      t = _mm512_set1_ps(a5[d]);
      c50 = _mm512_fmadd_ps(t, b0, c50);
      c51 = _mm512_fmadd_ps(t, b1, c51);
    }
    _mm512_storeu_ps(c, c00);
    _mm512_storeu_ps(c + 16, c01);
    _mm512_storeu_ps(c + ldc, c10);
    _mm512_storeu_ps(c + ldc + 16, c11);
    _mm512_storeu_ps(c + 2 * ldc, c20);
    _mm512_storeu_ps(c + 2 * ldc + 16, c21);
    _mm512_storeu_ps(c + 3 * ldc, c30);
    _mm512_storeu_ps(c + 3 * ldc + 16, c31);
    _mm512_storeu_ps(c + 4 * ldc, c40);
    _mm512_storeu_ps(c + 4 * ldc + 16, c41);
    _mm512_storeu_ps(c + 5 * ldc, c50);
    _mm512_storeu_ps(c + 5 * ldc + 16, c51);
  }

  __attribute__((target("avx512f"))) static uint32_t scores_le(float* s, const float* sqr, float t) {
    const __m512 two = _mm512_set1_ps(2.0f), tv = _mm512_set1_ps(t);
    const __m512 s0 = _mm512_fnmadd_ps(two, _mm512_loadu_ps(s), _mm512_loadu_ps(sqr));
    const __m512 s1 = _mm512_fnmadd_ps(two, _mm512_loadu_ps(s + 16), _mm512_loadu_ps(sqr + 16));
    _mm512_storeu_ps(s, s0);
    _mm512_storeu_ps(s + 16, s1);
    const uint32_t lo = _mm512_cmp_ps_mask(s0, tv, _CMP_LE_OQ);
    const uint32_t hi = _mm512_cmp_ps_mask(s1, tv, _CMP_LE_OQ);
    return lo | (hi << 16);
  }
};
#endif

}  // namespace score_tile
}  // namespace ldreg
