// The one place that decides whether the x86 SIMD kernels (score_tile.h, rerank.h) exist in
// this build (x86-64 GCC/Clang: compiled per function with target attributes, so the rest of
// the library stays baseline x86-64) and whether this CPU may run them.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LDREG_X86_AVX2 1
#include <immintrin.h>
#endif

namespace ldreg {

inline bool cpu_has_avx2_fma() {
#ifdef LDREG_X86_AVX2
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

inline bool cpu_has_avx512f() {
#ifdef LDREG_X86_AVX2
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
#else
  return false;
#endif
}

}  // namespace ldreg
