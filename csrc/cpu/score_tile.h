// Float score tiles on AVX2+FMA CPUs: the reference packed into panels of 16 rows, a 6 x 16
// register-tile dot-product kernel, and the fused filter that tests a tile against each
// row's threshold while it is still in L1.
//
// Why not BLAS: torch's MKL sgemm runs ~71 GFLOP/s per core on the 128 x 1024 x D blocks
// this kernel needs on the 2-core EPYC (Zen 2), OpenBLAS ~89, this kernel ~103 (12 FMA
// accumulators, two panel loads and six broadcasts per dimension: FMA-bound). Packing the
// reference once per call costs one pass over it; the query rows are read in place.
//
// Scores are the same numbers as the BLAS path's up to accumulation order (a sequential
// FMA chain over D), which the certificate's accumulation bound (knn.h) already covers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "x86_simd.h"

namespace ldreg {
namespace score_tile {

constexpr int64_t kPanel = 16;  // reference rows per packed panel (two 8-float vectors)
constexpr int64_t kGroup = 6;   // query rows per register tile

// Whether this CPU runs the kernel. LDREG_CPU_BLAS_SCORES=1 forces the BLAS path (tests
// compare the two; a user can rule the kernel out without rebuilding).
inline bool usable() {
  const char* off = std::getenv("LDREG_CPU_BLAS_SCORES");
  return cpu_has_avx2_fma() && !(off != nullptr && off[0] != '\0' && std::strcmp(off, "0") != 0);
}

// Panel p of `out` holds rows [16p, 16p + 16) of r (n x dim, row-major) as [dim][16]: one
// 64-byte read per dimension in the kernel. Rows past n are zero.
inline void pack_panels(const float* r, int64_t n, int64_t dim, int64_t p0, int64_t p1, float* out) {
  for (int64_t p = p0; p < p1; ++p) {
    float* o = out + p * dim * kPanel;
    const int64_t rows = std::min<int64_t>(kPanel, n - p * kPanel);
    if (rows < kPanel) std::memset(o, 0, sizeof(float) * dim * kPanel);
    for (int64_t l = 0; l < rows; ++l) {
      const float* src = r + (p * kPanel + l) * dim;
      for (int64_t d = 0; d < dim; ++d) o[d * kPanel + l] = src[d];
    }
  }
}

#ifdef LDREG_X86_AVX2
// c[i * ldc + l] = a[i] . panel row l, for the 6 query rows a[0..5] (any may alias).
// Written out row by row: the loop form (__m256 acc[6][2]) keeps its accumulators in
// registers only under a compiler-specific unroll pragma; without one GCC runs it at half speed.
__attribute__((target("avx2,fma"))) inline void tile6x16(const float* const* a, const float* bp, int64_t dim,
                                                         float* c, int64_t ldc) {
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

// s = sqr - 2 * dot for 16 columns, in place (bit-equal to the scalar sqr[j] - 2 * s[j]:
// 2 * dot is exact, so the fused form rounds once as the plain one does); returns the
// bit mask of the columns with s <= t.
__attribute__((target("avx2,fma"))) inline uint32_t scores_le(float* s, const float* sqr, float t) {
  const __m256 two = _mm256_set1_ps(2.0f), tv = _mm256_set1_ps(t);
  const __m256 s0 = _mm256_fnmadd_ps(two, _mm256_loadu_ps(s), _mm256_loadu_ps(sqr));
  const __m256 s1 = _mm256_fnmadd_ps(two, _mm256_loadu_ps(s + 8), _mm256_loadu_ps(sqr + 8));
  _mm256_storeu_ps(s, s0);
  _mm256_storeu_ps(s + 8, s1);
  const uint32_t lo = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(s0, tv, _CMP_LE_OQ)));
  const uint32_t hi = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(s1, tv, _CMP_LE_OQ)));
  return lo | (hi << 8);
}
#endif

}  // namespace score_tile
}  // namespace ldreg
