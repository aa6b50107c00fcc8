// Which float score kernel the CPU kNN runs: an own register-tile kernel (score_tile.h: AVX2 or
// AVX-512) or BLAS. No ISA rule picks it: the AVX2 tile beat MKL and OpenBLAS on a Zen 2 and
// lost to MKL's AVX-512 code on a Sapphire Rapids. So the first float call at each dimension
// times every kernel this CPU runs on one score block of the real geometry (each thread its own
// 128 x 1024 block against one shared packed reference, as the kNN does), keeps the fastest for
// the process, and says why (cpu_score_kernel). Every kernel gives the same answer (the exact
// re-rank), so the choice changes speed only.
//
// LDREG_CPU_SCORES=auto|blas|avx2|avx512 forces one (tests force each; a user can rule the
// calibration out); LDREG_CPU_BLAS_SCORES=1, the older switch, means blas.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "score_tile.h"

namespace ldreg {
namespace score_choice {

enum class Kernel : int { kBlas = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kKernels = 3;

inline const char* name(Kernel k) {
  switch (k) {
    case Kernel::kAvx2: return "avx2";
    case Kernel::kAvx512: return "avx512";
    default: return "blas";
  }
}

inline bool runs_here(Kernel k) {
  switch (k) {
    case Kernel::kAvx2: return cpu_has_avx2_fma();
    case Kernel::kAvx512: return cpu_has_avx512f();
    default: return true;
  }
}

// Score block geometry shared with knn_cpu.cpp: each thread owns kRowsMax query rows and walks a
// reference chunk kCols columns at a time (512 KiB of fp32 scores: about one core's L2).
constexpr int64_t kRowsMax = 128;
constexpr int64_t kCols = 1024;

// rn x jn dot products of rows x[0..rn) (stride dim) with the packed panels bp (panel-aligned
// columns) into out (leading dimension ldc), by K's register tiles. A ragged last group repeats
// its last row (the extra tile rows are written to rows the caller never reads: out has room
// for a whole group past rn).
template <typename K>
inline void tile_block(const float* x, int64_t rn, int64_t dim, const float* bp, int64_t jn, float* out, int64_t ldc) {
  const int64_t ng = (rn + K::kGroup - 1) / K::kGroup;
  for (int64_t p = 0; p < (jn + K::kPanel - 1) / K::kPanel; ++p) {
    const float* panel = bp + p * dim * K::kPanel;
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t gr = std::min(K::kGroup, rn - g * K::kGroup);
      const float* a[K::kGroup];
      for (int64_t i = 0; i < K::kGroup; ++i) a[i] = x + (g * K::kGroup + std::min(i, gr - 1)) * dim;
      K::tile(a, panel, dim, out + g * K::kGroup * ldc + p * K::kPanel, ldc);
    }
  }
}

struct Choice {
  Kernel kernel;
  std::string why;
};

// The kernel LDREG_CPU_SCORES (or LDREG_CPU_BLAS_SCORES) forces, or -1 for auto.
inline int forced() {
  const char* old = std::getenv("LDREG_CPU_BLAS_SCORES");
  const char* env = std::getenv("LDREG_CPU_SCORES");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) {
    return old != nullptr && old[0] != '\0' && std::strcmp(old, "0") != 0 ? static_cast<int>(Kernel::kBlas) : -1;
  }
  for (int k = 0; k < kKernels; ++k) {
    if (std::strcmp(env, name(static_cast<Kernel>(k))) != 0) continue;
    TORCH_CHECK_VALUE(runs_here(static_cast<Kernel>(k)), "LDREG_CPU_SCORES=", env, ": this CPU lacks ",
                      k == 1 ? "AVX2+FMA" : "AVX-512F", "; use auto, blas", cpu_has_avx2_fma() ? " or avx2" : "");
    return k;
  }
  TORCH_CHECK_VALUE(false, "LDREG_CPU_SCORES must be auto, blas, avx2 or avx512, got '", env, "'");
  return -1;
}

#ifdef LDREG_X86_AVX2
// Seconds for every thread to compute its own kRowsMax x kCols block of kernel k at dim, best
// of `reps` (after one untimed run: page faults, cold caches).
inline std::vector<double> time_kernels(const std::vector<Kernel>& ks, int64_t dim, int reps) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Values from a private LCG in [-1, 1): the caller's torch random stream stays untouched.
  uint32_t state = 12345;
  const auto fill = [&](int64_t n) {
    at::Tensor t = at::empty({n, dim}, at::kFloat);
    float* p = t.data_ptr<float>();
    for (int64_t i = 0; i < n * dim; ++i) {
      state = state * 1664525u + 1013904223u;
      p[i] = static_cast<float>(state >> 8) * (2.0f / 16777216.0f) - 1.0f;
    }
    return t;
  };
  const at::Tensor r = fill(kCols), x = fill(threads * kRowsMax);
  std::map<int64_t, std::unique_ptr<float[]>> packed;  // by panel width
  for (const Kernel k : ks) {
    const int64_t p = k == Kernel::kAvx512 ? score_tile::Avx512Tiles::kPanel : score_tile::Avx2Tiles::kPanel;
    if (k == Kernel::kBlas || packed.count(p)) continue;
    packed[p].reset(new float[static_cast<size_t>(kCols * dim)]);
    if (p == 32) {
      score_tile::pack_panels<32>(r.data_ptr<float>(), kCols, dim, 0, kCols / 32, packed[p].get());
    } else {
      score_tile::pack_panels<16>(r.data_ptr<float>(), kCols, dim, 0, kCols / 16, packed[p].get());
    }
  }
  std::vector<double> best(ks.size(), 1e300);
  for (int rep = 0; rep <= reps; ++rep) {
    for (size_t c = 0; c < ks.size(); ++c) {  // interleaved: a burst of other load hits every kernel
      const auto t0 = std::chrono::steady_clock::now();
      at::parallel_for(0, threads, 1, [&](int64_t t0_, int64_t t1_) {
        std::vector<float> out(static_cast<size_t>((kRowsMax + 8) * kCols));
        for (int64_t t = t0_; t < t1_; ++t) {
          const float* xb = x.data_ptr<float>() + t * kRowsMax * dim;
          if (ks[c] == Kernel::kAvx512) {
            tile_block<score_tile::Avx512Tiles>(xb, kRowsMax, dim, packed[32].get(), kCols, out.data(), kCols);
          } else if (ks[c] == Kernel::kAvx2) {
            tile_block<score_tile::Avx2Tiles>(xb, kRowsMax, dim, packed[16].get(), kCols, out.data(), kCols);
          } else {
            at::Tensor o = at::from_blob(out.data(), {kRowsMax, kCols}, at::kFloat);
            at::mm_out(o, at::from_blob(const_cast<float*>(xb), {kRowsMax, dim}, at::kFloat), r.t());
          }
        }
      });
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (rep > 0) best[c] = std::min(best[c], s);
    }
  }
  return best;
}
#endif

// The float score kernel for this dimension (forced, or measured once per process, dimension
// and thread count).
inline Choice choose(int64_t dim) {
  const int f = forced();
  if (f >= 0) return {static_cast<Kernel>(f), std::string("forced by LDREG_CPU_SCORES")};
  std::vector<Kernel> ks;
  for (const Kernel k : {Kernel::kAvx512, Kernel::kAvx2, Kernel::kBlas})
    if (runs_here(k)) ks.push_back(k);
  if (ks.size() == 1) return {Kernel::kBlas, std::string("the only kernel this CPU runs")};
  // By thread count too: the kernels share a core's caches differently (set_num_threads).
  const std::pair<int64_t, int> key{dim, at::get_num_threads()};
  static std::mutex mu;
  static std::map<std::pair<int64_t, int>, Choice> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto hit = cache.find(key);
  if (hit != cache.end()) return hit->second;
  Choice ch{Kernel::kBlas, ""};
#ifdef LDREG_X86_AVX2
  const std::vector<double> s = time_kernels(ks, dim, 3);
  // Ties (within 3%) go to the tile kernels: they also filter each tile from L1, which the
  // block timing does not see.
  size_t pick = 0;
  for (size_t c = 1; c < ks.size(); ++c)
    if (s[c] < 0.97 * s[pick]) pick = c;
  ch.kernel = ks[pick];
  ch.why = "measured at D=" + std::to_string(dim) + ", " + std::to_string(at::get_num_threads()) + " threads:";
  for (size_t c = 0; c < ks.size(); ++c) {
    ch.why += std::string(" ") + name(ks[c]) + " " + std::to_string(s[c] * 1e3).substr(0, 6) + " ms";
  }
  ch.why += " per 128 x 1024 block";
#endif
  cache[key] = ch;
  return ch;
}

}  // namespace score_choice
}  // namespace ldreg
