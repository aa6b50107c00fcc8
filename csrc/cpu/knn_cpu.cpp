// CPU kNN: BLAS score tiles + per-row threshold buffer, exact re-rank, sparse backward.
//
// Forward, per call:
//   1. Centre on the reference mean (distances are translation invariant; it shrinks the
//      cancellation in |r|^2 - 2 x.r), a chunk of ~4 MiB of reference rows at a time, so a
//      bank of any size is streamed once. Per chunk, at::parallel_for over blocks of 128
//      query rows: each thread computes one 128 x 1024 block of scores at a time (float on
//      AVX2+FMA: the packed-panel kernel of score_tile.h, filtering each 6 x 16 tile from L1;
//      otherwise one single-threaded BLAS GEMM into 512 KiB kept in its own L2) and filters
//      it at once into a per-row buffer: the first
//      block's histogram gives a threshold with >= m = k + margin scores under it, later
//      blocks are skipped 16 scores per vector compare unless one passes, and a full buffer
//      keeps its m smallest (nth_element) and lowers the threshold. Memory: one score block
//      per thread plus O(B * m); never B x N.
//   2. Per row, exact distances by direct differences (float for float/half/bf16 input,
//      double for double; rerank.h for float: FMA chains, and candidates ordered by bucket
//      select/sort on (value, index) keys; float rows 4 candidates per call, sharing the
//      query's loads, bit-equal to one at a time) of the k best-scored candidates, then of any other candidate the
//      certificate's test cannot prove farther than the largest of those; lexicographic
//      (distance, index) order, keep k. Rows where an unseen reference row could still tie
//      or beat the k-th neighbour within matmul rounding (the certificate, knn.h, with the
//      row's final threshold as the bound) are redone exhaustively: exact distances to
//      every reference row, streamed through a 2k-entry buffer per thread, so a collapsed
//      batch (every row redone) costs no B x N memory.
// Self-kNN of float rows (the reference is the queries' own tensor) may instead take every
// pair's exact distance once (self_pairs.h) and select from them: the first call at each
// shape times both paths and keeps the faster (knn_cpu_impl). Every float distance, on every
// path and ISA, follows self_pairs.h's definition, so the paths and kernels agree bit for bit.
// Backward: grad_x by rows; grad_ref by column blocks, so threads never write the same
// element and the sum order is fixed (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../knn.h"
#include "rerank.h"
#include "score_choice.h"
#include "score_tile.h"
#include "self_pairs.h"

namespace ldreg {
namespace {


template <typename acc_t>
struct Cand {
  acc_t d;
  int32_t i;  // ref has < 2^31 - 1 rows (check_knn_args): 8-byte float candidates
  bool operator<(const Cand& o) const { return d < o.d || (d == o.d && i < o.i); }
};

// ||a - b||^2 with eight independent accumulators (vectorisable without -ffast-math).
template <typename scalar_t, typename acc_t>
inline acc_t sqdist(const scalar_t* a, const scalar_t* b, int64_t d) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    for (int u = 0; u < 8; ++u) {
      const acc_t t = static_cast<acc_t>(a[j + u]) - static_cast<acc_t>(b[j + u]);
      s[u] += t * t;
    }
  }
  for (; j < d; ++j) {
    const acc_t t = static_cast<acc_t>(a[j]) - static_cast<acc_t>(b[j]);
    s[0] += t * t;
  }
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));

// Smallest and largest of s[0..n), a vector of 32 bytes at a time (no -ffast-math here, so
// the compiler would not vectorise a std::min loop).
template <typename acc_t>
__attribute__((always_inline)) inline void min_max(const acc_t* s, int64_t n, acc_t& lo, acc_t& hi) {
  using vec = std::conditional_t<std::is_same_v<acc_t, float>, v8f, v4d>;
  constexpr int kLanes = 32 / sizeof(acc_t);
  lo = std::numeric_limits<acc_t>::infinity();
  hi = -lo;
  int64_t j = 0;
  if (n >= kLanes) {
    vec vlo, vhi;
    std::memcpy(&vlo, s, sizeof(vec));
    vhi = vlo;
    for (; j + kLanes <= n; j += kLanes) {
      vec v;
      std::memcpy(&v, s + j, sizeof(vec));
      vlo = v < vlo ? v : vlo;
      vhi = v > vhi ? v : vhi;
    }
    for (int l = 0; l < kLanes; ++l) {
      lo = std::min(lo, vlo[l]);
      hi = std::max(hi, vhi[l]);
    }
  }
  for (; j < n; ++j) {
    lo = std::min(lo, s[j]);
    hi = std::max(hi, s[j]);
  }
}

// A score t with at least m of s[0..n) (skipping s[skip]) <= t. A 64-bucket histogram of
// a strided sample (at most ~512 scores; branch-free, unlike nth_element) proposes bucket
// edges; an exact vectorisable count over all n accepts the first edge that reaches m.
template <typename acc_t>
__attribute__((always_inline)) inline acc_t histogram_threshold(const acc_t* s, int64_t n, int64_t skip, int64_t m) {
  constexpr int kBuckets = 64;
  acc_t lo, hi;
  min_max(s, n, lo, hi);
  if (!(hi > lo)) return hi;
  const acc_t width = (hi - lo) / kBuckets;
  const acc_t scale = 1 / width;
  const int64_t stride = std::max<int64_t>(1, n / 512);
  int32_t cnt[kBuckets] = {};
  for (int64_t j = 0; j < n; j += stride) {
    ++cnt[std::min<int64_t>(static_cast<int64_t>((s[j] - lo) * scale), kBuckets - 1)];
  }
  // Aim the sample at a little over m: the exact count below rarely needs a second edge.
  const int64_t want = (m + 1) * 5 / (4 * stride) + 1;
  int64_t cum = 0;
  int bk = 0;
  for (; bk < kBuckets - 1; ++bk) {
    cum += cnt[bk];
    if (cum >= want) break;
  }
  for (; bk < kBuckets - 1; ++bk) {
    const acc_t t = lo + static_cast<acc_t>(bk + 1) * width;
    int32_t le = 0;  // n < 2^31 (one block of columns)
    for (int64_t j = 0; j < n; ++j) le += s[j] <= t;
    if (skip >= 0 && skip < n && s[skip] <= t) --le;
    if (le >= m) return t;
  }
  return hi;
}

// Float candidates per exact-distance call (rerank::sqdist_multi): 4 where AVX2 runs, or
// LDREG_CPU_RERANK_GROUP=1|2|4 (tests force each: the bits are the same, only the speed moves).
// 0: no AVX2, one candidate at a time through the definition's scalar loop.
inline int rerank_group() {
  const int widest = cpu_has_avx2_fma() ? 4 : 0;
  const char* env = std::getenv("LDREG_CPU_RERANK_GROUP");
  if (env == nullptr || env[0] == '\0') return widest;
  const std::string v(env);
  TORCH_CHECK_VALUE(v == "1" || v == "2" || v == "4", "LDREG_CPU_RERANK_GROUP must be 1, 2 or 4, got '", v, "'");
  const int g = std::stoi(v);
  if (g == 1) return widest == 0 ? 0 : 1;  // one at a time runs everywhere
  TORCH_CHECK_VALUE(g <= widest, "LDREG_CPU_RERANK_GROUP=", g, ": this CPU lacks AVX2/FMA; use 1");
  return g;
}

template <typename scalar_t, typename acc_t>
inline acc_t exact_sqdist(const scalar_t* a, const scalar_t* b, int64_t d) {
  if constexpr (std::is_same_v<scalar_t, float>) {
#ifdef LDREG_X86_AVX2
    if (cpu_has_avx2_fma()) return rerank::sqdist_avx2(a, b, d);
#endif
    return self_pairs::sqdist_scalar(a, b, d);
  } else {
    return sqdist<scalar_t, acc_t>(a, b, d);
  }
}

// Exact kNN of one query against every reference row but `own`, in (distance, index)
// order, through `tmp` (2k entries): candidates are appended until it fills, then an
// nth_element keeps the k smallest. Reference rows arrive in index order, so once k are
// kept a later row enters only if strictly closer than the k-th (it loses a tie).
template <typename scalar_t, typename acc_t>
void exhaustive_row(const scalar_t* xr, const scalar_t* rp, int64_t n, int64_t dim, int64_t k,
                    int64_t own, Cand<acc_t>* tmp, acc_t* dout, int64_t* iout) {
  int64_t cnt = 0;
  bool kept = false;
  acc_t thr = std::numeric_limits<acc_t>::infinity();
  constexpr int64_t kAtOnce = 4;  // float: four rows per exact-distance call (rerank::sqdist_multi)
  acc_t sq[kAtOnce];
  for (int64_t j = 0; j < n; ++j) {
    const int64_t q = j % kAtOnce;
    if (q == 0) {
      const int64_t jn = std::min(kAtOnce, n - j);
      bool done = false;
#ifdef LDREG_X86_AVX2
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (cpu_has_avx2_fma()) {
          const float* rows[kAtOnce];
          for (int64_t c = 0; c < jn; ++c) rows[c] = rp + (j + c) * dim;
          rerank::sqdist_multi(xr, rows, jn, dim, sq, 4);
          done = true;
        }
      }
#endif
      if (!done) {
        for (int64_t c = 0; c < jn; ++c) sq[c] = exact_sqdist<scalar_t, acc_t>(xr, rp + (j + c) * dim, dim);
      }
    }
    if (j == own) continue;
    const acc_t d = std::sqrt(sq[q]);
    if (kept ? !(d < thr) : !(d <= thr)) continue;
    tmp[cnt++] = {d, static_cast<int32_t>(j)};
    if (cnt == 2 * k) {
      std::nth_element(tmp, tmp + (k - 1), tmp + cnt);
      cnt = k;
      kept = true;
      thr = tmp[k - 1].d;
    }
  }
  std::partial_sort(tmp, tmp + k, tmp + cnt);
  for (int64_t c = 0; c < k; ++c) {
    dout[c] = tmp[c].d;
    iout[c] = tmp[c].i;
  }
}

// Score block geometry. Each thread owns a block of kRowsMax query rows and walks the
// reference chunk kCols columns at a time: one single-threaded GEMM writes a kRowsMax x kCols
// block of dot products (512 KiB of fp32: about one core's L2 on the 2-core EPYC; 128 x 1024
// beat 32 x 2048, 64 x 1024 and 128 x 512 there, 1 thread, at D=128/256/512), which the same
// thread filters at once. The reference is centred a chunk at a time (about kChunkBytes), once per
// call, so every query block reads it from L3 and a big bank is streamed from memory once.
using score_choice::kCols;
using score_choice::kRowsMax;
constexpr int64_t kChunkBytes = int64_t{4} << 20;
constexpr int64_t kAnyBlock = 16;
// The most candidates one insert_passing call adds: the widest tile panel (Avx512Tiles).
constexpr int64_t kMaxPanel = 32;

// Whether any of the kAnyBlock values at p is <= t: one vector compare (GCC vector
// extensions; plain SSE2 in the default clone, AVX2 in the avx2 one).

template <typename acc_t>
inline bool any_le(const acc_t* p, acc_t t) {
  using vec = std::conditional_t<std::is_same_v<acc_t, float>, v8f, v4d>;
  using ivec = std::conditional_t<std::is_same_v<acc_t, float>, v8i, v4l>;
  constexpr int kLanes = 32 / sizeof(acc_t);
  static_assert(kAnyBlock % kLanes == 0);
  ivec acc = {};
  for (int u = 0; u < kAnyBlock; u += kLanes) {
    vec v;
    std::memcpy(&v, p + u, sizeof(v));
    acc |= (v <= t);
  }
  decltype(acc[0] + 0) lanes[kLanes];
  std::memcpy(lanes, &acc, sizeof(acc));
  decltype(acc[0] + 0) r = 0;
  for (int l = 0; l < kLanes; ++l) r |= lanes[l];
  return r != 0;
}

// A full candidate buffer keeps its m smallest scores, and the row's threshold t drops to
// the m-th of them (every dropped score is >= it).
template <typename acc_t>
inline void shrink_to_m(Cand<acc_t>* c, int64_t& cnt, int64_t m, acc_t& t) {
  const auto by_score = [](const Cand<acc_t>& a, const Cand<acc_t>& b) { return a.d < b.d; };
  std::nth_element(c, c + (m - 1), c + cnt, by_score);
  cnt = m;
  t = c[m - 1].d;
}

// One row of a score block: s_j = |r_j|^2 - 2 x.r_j for the n columns starting at global
// column j0 (written back into dot), then every s_j <= t (but own) enters the candidate
// buffer c (cnt entries, capacity cap). A full buffer keeps its m smallest and t drops to
// the m-th. Blocks of kAnyBlock scores are tested with one vector compare first: after the
// first block of columns almost none pass, so the scalar path is rare.
template <typename acc_t>
__attribute__((always_inline)) inline void filter_row_impl(acc_t* s, const acc_t* sqr, int64_t n, int64_t j0, int64_t own,
                                                          int64_t m, int64_t cap, acc_t& t_io, Cand<acc_t>* c,
                                                          int64_t& cnt_io) {
  acc_t t = t_io;
  int64_t cnt = cnt_io;
  for (int64_t j = 0; j < n; ++j) s[j] = sqr[j] - 2 * s[j];
  if (cnt == 0 && n - (own >= j0 && own < j0 + n ? 1 : 0) >= m) {
    // First block of this row: the m-th smallest score of any subset bounds the global
    // m-th from above, so it is a valid (and already tight) threshold.
    t = histogram_threshold(s, n, own - j0, m);
  }
  int64_t jb = 0;
  for (; jb + kAnyBlock <= n; jb += kAnyBlock) {
    if (!any_le(s + jb, t)) continue;
    // Branch-free compaction: every score is written, only passing ones are kept (pass
    // rates of 5-20% make a branch here mispredict constantly). cap leaves a block of slack.
    for (int64_t j = jb; j < jb + kAnyBlock; ++j) {
      c[cnt] = {s[j], static_cast<int32_t>(j0 + j)};
      cnt += static_cast<int64_t>((s[j] <= t) & (j0 + j != own));
    }
    if (cnt >= cap - kAnyBlock) shrink_to_m(c, cnt, m, t);
  }
  for (; jb < n; ++jb) {
    c[cnt] = {s[jb], static_cast<int32_t>(j0 + jb)};
    cnt += static_cast<int64_t>((s[jb] <= t) & (j0 + jb != own));
    if (cnt >= cap - kAnyBlock) shrink_to_m(c, cnt, m, t);
  }
  t_io = t;
  cnt_io = cnt;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void filter_row_f32(float* s, const float* sqr, int64_t n, int64_t j0, int64_t own, int64_t m, int64_t cap,
                    float& t, Cand<float>* c, int64_t& cnt) {
  filter_row_impl<float>(s, sqr, n, j0, own, m, cap, t, c, cnt);
}

template <typename acc_t>
inline void filter_row(acc_t* s, const acc_t* sqr, int64_t n, int64_t j0, int64_t own, int64_t m, int64_t cap,
                       acc_t& t, Cand<acc_t>* c, int64_t& cnt) {
  if constexpr (std::is_same_v<acc_t, float>) {
    filter_row_f32(s, sqr, n, j0, own, m, cap, t, c, cnt);
  } else {
    filter_row_impl<acc_t>(s, sqr, n, j0, own, m, cap, t, c, cnt);
  }
}

// Exact distance keys, in place, of keys[lo..hi) (score keys: the index is kept): float rows go
// `group` candidates per call (sharing the query's loads), in chunks of kExactChunk.
template <typename scalar_t>
inline void exact_keys(uint64_t* keys, int64_t lo, int64_t hi, const scalar_t* xr, const scalar_t* rp, int64_t dim,
                       int group) {
  const auto key_of = [](float sq, int32_t i) { return rerank::key(std::sqrt(sq), i); };
#ifdef LDREG_X86_AVX2
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (group > 0) {
      constexpr int64_t kExactChunk = 64;
      const float* rows[kExactChunk];
      float sq[kExactChunk];
      for (int64_t c0 = lo; c0 < hi; c0 += kExactChunk) {
        const int64_t cn = std::min(kExactChunk, hi - c0);
        for (int64_t c = 0; c < cn; ++c) rows[c] = rp + static_cast<int64_t>(rerank::key_index(keys[c0 + c])) * dim;
        rerank::sqdist_multi(xr, rows, cn, dim, sq, group);
        for (int64_t c = 0; c < cn; ++c) keys[c0 + c] = key_of(sq[c], rerank::key_index(keys[c0 + c]));
      }
      return;
    }
  }
#endif
  for (int64_t c = lo; c < hi; ++c) {
    const int32_t i = rerank::key_index(keys[c]);
    keys[c] = key_of(exact_sqdist<scalar_t, float>(xr, rp + static_cast<int64_t>(i) * dim, dim), i);
  }
}

// The float re-rank of one row (the double one, inline below, does the same with
// nth_element and sort over candidates): the k best-scored candidates by (score, index) key
// (select_smallest); exact distances of those, whose largest w0 bounds the k-th exact
// distance; exact distances of any other candidate the certificate cannot prove farther
// than w0; the k smallest (distance, index) keys, sorted, are the answer.
template <typename scalar_t>
void rerank_by_keys(const Cand<float>* h, int64_t cnt, int64_t k, const scalar_t* xr, const scalar_t* rp, int64_t dim,
                    float sqx, float a, float coef, int group, rerank::Scratch& s, float* dout, int64_t* iout) {
  uint64_t* keys = s.keys.data();
  for (int64_t c = 0; c < cnt; ++c) keys[c] = rerank::key(h[c].d, h[c].i);
  rerank::select_smallest(keys, cnt, k, s);
  // In place: keys[0..k) become distance keys; keys[k..e) the candidates that need one.
  exact_keys(keys, 0, k, xr, rp, dim, group);
  const float w0 = rerank::key_value(*std::max_element(keys, keys + k));
  int64_t e = k;
  for (int64_t c = k; c < cnt; ++c) {
    if (!certified<float>(w0, rerank::key_value(keys[c]) + sqx, a, coef)) keys[e++] = keys[c];
  }
  exact_keys(keys, k, e, xr, rp, dim, group);
  const uint64_t* sorted = rerank::sort_keys(keys, e, s);
  for (int64_t c = 0; c < k; ++c) {
    dout[c] = rerank::key_value(sorted[c]);
    iout[c] = rerank::key_index(sorted[c]);
  }
}

#ifdef LDREG_X86_AVX2
// Candidate buffer insertion for one row of a tile panel (up to kMaxPanel columns) whose passing columns are the
// bits of `mask` (scores already in s): the same rule as filter_row_impl's compaction.
inline void insert_passing(uint32_t mask, const float* s, int64_t col0, int64_t own, int64_t m, int64_t cap,
                           float& t, Cand<float>* c, int64_t& cnt) {
  while (mask != 0) {
    const int l = __builtin_ctz(mask);
    mask &= mask - 1;
    const int64_t j = col0 + l;
    if (j != own) c[cnt++] = {s[l], static_cast<int32_t>(j)};
  }
  if (cnt >= cap - kMaxPanel) shrink_to_m(c, cnt, m, t);
}

// One reference chunk (cn centred rows rc, norms sqr, first global row c0) against every
// query block, with the register-tile kernel K (score_tile.h) instead of BLAS. Each thread's
// first block of columns is written out and filtered as in the BLAS path (its histogram
// sets the row's threshold); every later tile is filtered straight from L1, so the score
// block never round-trips through memory. own_offset < 0: no self exclusion.
template <typename K>
void scores_by_tiles(const float* xsp, int64_t b, int64_t dim, int64_t qrows, int64_t nqb, const float* rc,
                     const float* sqr, int64_t c0, int64_t cn, int64_t own_offset, int64_t m, int64_t cap,
                     float* thr, int64_t* count, Cand<float>* buf) {
  constexpr int64_t kGroup = K::kGroup, kPanel = K::kPanel;
  static_assert(kPanel <= kMaxPanel, "insert_passing's buffer headroom is kMaxPanel candidates");
  const int64_t np = (cn + kPanel - 1) / kPanel;
  std::unique_ptr<float[]> packed(new float[static_cast<size_t>(np * kPanel * dim)]);
  at::parallel_for(0, np, 16, [&](int64_t p0, int64_t p1) {
    score_tile::pack_panels<kPanel>(rc, cn, dim, p0, p1, packed.get());
  });
  // Norms padded to whole panels with +inf: a padded column never passes a finite threshold
  // (and the valid-column mask covers an infinite one).
  std::vector<float> sqr_pad(static_cast<size_t>(np * kPanel), std::numeric_limits<float>::infinity());
  std::memcpy(sqr_pad.data(), sqr, sizeof(float) * cn);

  at::parallel_for(0, nqb, 1, [&](int64_t qb0, int64_t qb1) {
    std::vector<float> tile(static_cast<size_t>((qrows + kGroup) * kCols));
    alignas(64) float small[kGroup * kPanel];
    for (int64_t qb = qb0; qb < qb1; ++qb) {
      const int64_t r0 = qb * qrows, rn = std::min(qrows, b - r0);
      const int64_t ng = (rn + kGroup - 1) / kGroup;
      for (int64_t j0 = 0; j0 < cn; j0 += kCols) {
        const int64_t jn = std::min(kCols, cn - j0);
        if (c0 == 0 && j0 == 0) {
          score_choice::tile_block<K>(xsp + r0 * dim, rn, dim, packed.get() + (j0 / kPanel) * dim * kPanel, jn,
                                      tile.data(), kCols);
          for (int64_t r = 0; r < rn; ++r) {
            const int64_t row = r0 + r;
            filter_row<float>(tile.data() + r * kCols, sqr + j0, jn, c0 + j0, own_offset >= 0 ? row + own_offset : -1,
                              m, cap, thr[row], buf + row * cap, count[row]);
          }
          continue;
        }
        for (int64_t p = 0; p < (jn + kPanel - 1) / kPanel; ++p) {
          const int64_t col = j0 + p * kPanel;  // within the chunk
          const float* bp = packed.get() + (col / kPanel) * dim * kPanel;
          const uint32_t valid = cn - col >= kPanel ? ~0u >> (32 - kPanel) : (1u << (cn - col)) - 1;
          for (int64_t g = 0; g < ng; ++g) {
            const int64_t gr = std::min(kGroup, rn - g * kGroup);
            const float* a[kGroup];
            for (int64_t i = 0; i < kGroup; ++i) a[i] = xsp + (r0 + g * kGroup + std::min(i, gr - 1)) * dim;
            K::tile(a, bp, dim, small, kPanel);
            for (int64_t i = 0; i < gr; ++i) {
              const int64_t row = r0 + g * kGroup + i;
              float* s = small + i * kPanel;
              const uint32_t mask = K::scores_le(s, sqr_pad.data() + col, thr[row]) & valid;
              if (mask != 0) {
                insert_passing(mask, s, c0 + col, own_offset >= 0 ? row + own_offset : -1, m, cap, thr[row],
                               buf + row * cap, count[row]);
              }
            }
          }
        }
      }
    }
  });
}
#endif

// Self-kNN of float rows by exact pair distances (self_pairs.h) instead of scores + re-rank.
// LDREG_CPU_PAIRS=auto (default: the widest kernel this CPU runs, where the distance matrix
// fits kPairsBytes) | off | avx512 | avx2 | scalar (forced: every float self-kNN whose matrix
// fits kPairsMaxBytes). Every kernel gives the same bits (tests force each).
enum class Pairs : int { kOff = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };
// B x B floats: 16 MiB is B = 2048, the largest SSL batch against itself this path is for;
// above it the matrix leaves L2/L3 and the score path's O(B * m) memory is the better deal.
constexpr int64_t kPairsBytes = int64_t{16} << 20;
constexpr int64_t kPairsMaxBytes = int64_t{1} << 30;

struct PairsChoice {
  Pairs kernel = Pairs::kOff;
  bool calibrate = false;  // auto: the faster of the two paths, timed at this shape's first call
};

inline PairsChoice pairs_kernel(int64_t b) {
  const int64_t bytes = b * b * static_cast<int64_t>(sizeof(float));
  const Pairs widest = cpu_has_avx512f() ? Pairs::kAvx512 : cpu_has_avx2_fma() ? Pairs::kAvx2 : Pairs::kScalar;
  const char* env = std::getenv("LDREG_CPU_PAIRS");
  const std::string v = env == nullptr ? "" : env;
  if (v.empty() || v == "auto") {
    if (bytes > kPairsBytes || widest == Pairs::kScalar) return {};
    return {widest, true};
  }
  if (v == "off") return {};
  TORCH_CHECK_VALUE(v == "avx512" || v == "avx2" || v == "scalar",
                    "LDREG_CPU_PAIRS must be auto, off, avx512, avx2 or scalar, got '", v, "'");
  const Pairs want = v == "avx512" ? Pairs::kAvx512 : v == "avx2" ? Pairs::kAvx2 : Pairs::kScalar;
  TORCH_CHECK_VALUE(want <= widest, "LDREG_CPU_PAIRS=", v, ": this CPU lacks ",
                    want == Pairs::kAvx512 ? "AVX-512F" : "AVX2/FMA");
  if (bytes > kPairsMaxBytes) return {};
  return {want, false};
}

// Which path won at (b, dim, k, threads), once timed: both give the same bits (one float
// distance definition, the score path's certificate), so the choice moves only the speed.
struct PairsCalibration {
  std::mutex mu;
  std::map<std::tuple<int64_t, int64_t, int64_t, int>, bool> pairs_faster;
};
inline PairsCalibration& pairs_calibration() {
  static PairsCalibration c;
  return c;
}

// dmat[i][j] = dmat[j][i] = |x_i - x_j| for i < j, dmat[i][i] = 0, by R x C tiles of `tile`
// over the upper triangle. Row tile t and its mirror nt - 1 - t go to one task, so every task
// has the same number of pairs. Each element is written by exactly one tile.
template <int R, int C, typename Tile>
void pair_distances(const float* xp, int64_t b, int64_t dim, Tile tile, float* dmat) {
  const int64_t nt = (b + R - 1) / R;
  at::parallel_for(0, (nt + 1) / 2, 1, [&](int64_t u0, int64_t u1) {
    float out[R * C];
    const float* a[R];
    const float* bc[C];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t tiles[2] = {u, nt - 1 - u};
      for (int q = 0; q < (tiles[0] == tiles[1] ? 1 : 2); ++q) {  // the middle tile of an odd count: once
        const int64_t i0 = tiles[q] * R;
        for (int r = 0; r < R; ++r) a[r] = xp + std::min(i0 + r, b - 1) * dim;
        for (int64_t j0 = i0; j0 < b; j0 += C) {
          for (int c = 0; c < C; ++c) bc[c] = xp + std::min(j0 + c, b - 1) * dim;
          tile(a, bc, dim, out);
          for (int r = 0; r < R; ++r) {
            const int64_t i = i0 + r;
            for (int c = 0; c < C; ++c) {
              const int64_t j = j0 + c;
              if (j > i && j < b) dmat[i * b + j] = dmat[j * b + i] = std::sqrt(out[r * C + c]);
            }
          }
        }
      }
    }
  });
  for (int64_t i = 0; i < b; ++i) dmat[i * b + i] = 0.0f;
}

// The k nearest of every row of dmat (b x b exact distances), own row excluded by index if
// exclude_self, in (distance, index) order: a threshold with >= k distances under it
// (histogram_threshold), the rows under it as keys, the k smallest keys, sorted.
void select_from_pairs(const float* dmat, int64_t b, int64_t k, bool exclude_self, float* dp, int64_t* ip) {
  at::parallel_for(0, b, 16, [&](int64_t r0, int64_t r1) {
    rerank::Scratch s(b);
    uint64_t* keys = s.keys.data();
    for (int64_t row = r0; row < r1; ++row) {
      const float* d = dmat + row * b;
      const int64_t own = exclude_self ? row : -1;
      const float t = histogram_threshold(d, b, own, k);
      int64_t cnt = 0;
      const auto take = [&](int64_t j0, int64_t j1) {  // branch-free compaction, as filter_row's
        for (int64_t j = j0; j < j1; ++j) {
          keys[cnt] = rerank::key(d[j], static_cast<int32_t>(j));
          cnt += static_cast<int64_t>((d[j] <= t) & (j != own));
        }
      };
      int64_t jb = 0;
      for (; jb + kAnyBlock <= b; jb += kAnyBlock) {
        if (any_le(d + jb, t)) take(jb, jb + kAnyBlock);
      }
      take(jb, b);
      rerank::select_smallest(keys, cnt, k, s);
      const uint64_t* sorted = rerank::sort_keys(keys, k, s);
      for (int64_t c = 0; c < k; ++c) {
        dp[row * k + c] = rerank::key_value(sorted[c]);
        ip[row * k + c] = rerank::key_index(sorted[c]);
      }
    }
  });
}

void knn_by_pairs(const float* xp, int64_t b, int64_t dim, int64_t k, bool exclude_self, Pairs kernel, float* dp,
                  int64_t* ip) {
  // Kept per calling thread (at most kPairsBytes under auto): a fresh B x B buffer would
  // fault in its pages on every call.
  thread_local std::vector<float> buf;
  if (buf.size() < static_cast<size_t>(b * b)) buf.resize(static_cast<size_t>(b * b));
  float* dmat = buf.data();
  switch (kernel) {
#ifdef LDREG_X86_AVX2
    case Pairs::kAvx512:
      pair_distances<4, 4>(xp, b, dim, self_pairs::tile_avx512, dmat);
      break;
    case Pairs::kAvx2:
      pair_distances<2, 2>(xp, b, dim, self_pairs::tile_avx2, dmat);
      break;
#endif
    default:
      pair_distances<2, 2>(xp, b, dim, self_pairs::tile_scalar<2, 2>, dmat);
  }
  select_from_pairs(dmat, b, k, exclude_self, dp, ip);
}

template <typename scalar_t, typename acc_t>
void knn_by_scores(const at::Tensor& x, const at::Tensor& ref, int64_t k, int64_t self_offset, bool exclude_self,
                   bool same, at::Tensor& dist, at::Tensor& idx) {
  const int64_t b = x.size(0), n = ref.size(0), dim = x.size(1);
  const int64_t n_valid = n - (exclude_self ? 1 : 0);
  const int64_t m = std::min(k + default_margin(k), n_valid);
  const auto ct = dist.scalar_type();

  const at::Tensor mu = at::mean(ref, {0}, /*keepdim=*/false, ct);
  const at::Tensor xs = (x.to(ct) - mu).contiguous();
  const at::Tensor sqx = (xs * xs).sum(1);
  const acc_t* xsp = xs.data_ptr<acc_t>();

  // Query blocks: at most kRowsMax rows, and at least one block per thread.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t qrows = std::max<int64_t>(1, std::min<int64_t>(kRowsMax, (b + threads - 1) / threads));
  const int64_t nqb = (b + qrows - 1) / qrows;
  const int64_t chunk = std::min<int64_t>(
      n, std::max<int64_t>(kCols, kChunkBytes / (dim * static_cast<int64_t>(sizeof(acc_t))) / kCols * kCols));

  // Per row: a buffer of up to 2m candidates below the row's threshold (plus a block of
  // slack for the compaction's writes); when it fills, an nth_element keeps the m smallest
  // and the threshold drops to the m-th score.
  const int64_t cap = 4 * m + std::max(kAnyBlock, kMaxPanel);
  std::unique_ptr<Cand<acc_t>[]> buf(new Cand<acc_t>[static_cast<size_t>(b * cap)]);  // no zero fill
  std::vector<int64_t> count(static_cast<size_t>(b), 0);
  std::vector<acc_t> thr(static_cast<size_t>(b), std::numeric_limits<acc_t>::infinity());
  acc_t max_sqr = 0;

  score_choice::Kernel kernel = score_choice::Kernel::kBlas;
  if constexpr (std::is_same_v<acc_t, float>) kernel = score_choice::choose(dim).kernel;

  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int64_t cn = std::min(chunk, n - c0);
    // Self-kNN (ref is x, as ldreg_loss(x) passes it): the centred rows and their norms are
    // already there, bit for bit the same (the same ops on the same rows).
    const at::Tensor rc = same ? xs.narrow(0, c0, cn) : (ref.narrow(0, c0, cn).to(ct) - mu).contiguous();
    const at::Tensor sqr_t = same ? sqx.narrow(0, c0, cn) : (rc * rc).sum(1);
    max_sqr = std::max(max_sqr, sqr_t.max().template item<acc_t>());
    const acc_t* sqr = sqr_t.data_ptr<acc_t>();
#ifdef LDREG_X86_AVX2
    if constexpr (std::is_same_v<acc_t, float>) {
      if (kernel != score_choice::Kernel::kBlas) {
        const auto run = kernel == score_choice::Kernel::kAvx512 ? &scores_by_tiles<score_tile::Avx512Tiles>
                                                                  : &scores_by_tiles<score_tile::Avx2Tiles>;
        run(xsp, b, dim, qrows, nqb, rc.data_ptr<float>(), sqr, c0, cn, exclude_self ? self_offset : -1, m, cap,
            thr.data(), count.data(), buf.get());
        continue;
      }
    }
#endif
    at::parallel_for(0, nqb, 1, [&](int64_t qb0, int64_t qb1) {
      std::vector<acc_t> tile(static_cast<size_t>(qrows * kCols));
      const auto topt = at::TensorOptions().dtype(ct);
      for (int64_t qb = qb0; qb < qb1; ++qb) {
        const int64_t r0 = qb * qrows, rn = std::min(qrows, b - r0);
        const at::Tensor xq = at::from_blob(const_cast<acc_t*>(xsp + r0 * dim), {rn, dim}, topt);
        for (int64_t j0 = 0; j0 < cn; j0 += kCols) {
          const int64_t jn = std::min(kCols, cn - j0);
          at::Tensor out = at::from_blob(tile.data(), {rn, jn}, topt);
          at::mm_out(out, xq, rc.narrow(0, j0, jn).t());
          for (int64_t r = 0; r < rn; ++r) {
            const int64_t row = r0 + r;
            filter_row<acc_t>(tile.data() + r * jn, sqr + j0, jn, c0 + j0, exclude_self ? row + self_offset : -1, m,
                              cap, thr[row], buf.get() + row * cap, count[row]);
          }
        }
      }
    });
  }

  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* rp = ref.data_ptr<scalar_t>();
  const acc_t* sqxp = sqx.data_ptr<acc_t>();
  acc_t* dp = dist.data_ptr<acc_t>();
  int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<uint8_t> redo(static_cast<size_t>(b), 0);
  // Selection reads the inputs as they are (no TF32 on CPU): only accumulation rounding.
  const acc_t coef = static_cast<acc_t>(certificate_coef(dim, std::numeric_limits<acc_t>::epsilon(), 0.0));
  const int group = rerank_group();

  at::parallel_for(0, b, 8, [&](int64_t r0, int64_t r1) {
    const auto by_score = [](const Cand<acc_t>& a, const Cand<acc_t>& b) { return a.d < b.d; };
    rerank::Scratch scratch(std::is_same_v<acc_t, float> ? cap : 0);  // float: rerank_by_keys' buffers
    for (int64_t row = r0; row < r1; ++row) {
      Cand<acc_t>* h = buf.get() + row * cap;
      const int64_t cnt = count[row];  // >= m; every score <= the row's final threshold
      // The row's final threshold: no dropped reference row scored below it (each was
      // rejected above, or shrunk away at or above, a threshold that only decreases), and
      // every kept score is <= it. +inf when nothing was ever dropped.
      const acc_t bound = thr[row] + sqxp[row];
      const acc_t a = sqxp[row] + max_sqr;
      const scalar_t* xr = xp + row * dim;
      // Exact distances of the k best-scored candidates first: their largest, w0, bounds the
      // k-th exact distance from above. Any other candidate whose score proves it farther
      // than w0 (the certificate's own test, with its score as the bound) cannot be among
      // the k nearest and gets no exact distance; the rest are moved up behind the k.
      if constexpr (std::is_same_v<acc_t, float>) {
        rerank_by_keys<scalar_t>(h, cnt, k, xr, rp, dim, sqxp[row], a, coef, group, scratch, dp + row * k,
                                 ip + row * k);
      } else {
        if (cnt > k) std::nth_element(h, h + (k - 1), h + cnt, by_score);
        acc_t w0 = 0;
        for (int64_t c = 0; c < k; ++c) {
          h[c].d = std::sqrt(exact_sqdist<scalar_t, acc_t>(xr, rp + static_cast<int64_t>(h[c].i) * dim, dim));
          w0 = std::max(w0, h[c].d);
        }
        int64_t e = k;
        for (int64_t c = k; c < cnt; ++c) {
          if (certified<acc_t>(w0, h[c].d + sqxp[row], a, coef)) continue;
          h[e].i = h[c].i;
          h[e].d = std::sqrt(exact_sqdist<scalar_t, acc_t>(xr, rp + static_cast<int64_t>(h[c].i) * dim, dim));
          ++e;
        }
        if (e > k) std::nth_element(h, h + (k - 1), h + e);
        std::sort(h, h + k);
        for (int64_t c = 0; c < k; ++c) {
          dp[row * k + c] = h[c].d;
          ip[row * k + c] = h[c].i;
        }
      }
      const acc_t w = dp[row * k + k - 1];
      redo[row] = (cnt < n_valid) && !certified<acc_t>(w, bound, a, coef);
    }
  });

  std::vector<int64_t> rows;
  for (int64_t row = 0; row < b; ++row)
    if (redo[row]) rows.push_back(row);
  at::parallel_for(0, static_cast<int64_t>(rows.size()), 1, [&](int64_t r0, int64_t r1) {
    std::vector<Cand<acc_t>> tmp(static_cast<size_t>(2 * k));
    for (int64_t t = r0; t < r1; ++t) {
      const int64_t row = rows[t];
      exhaustive_row<scalar_t, acc_t>(xp + row * dim, rp, n, dim, k, exclude_self ? row + self_offset : -1,
                                      tmp.data(), dp + row * k, ip + row * k);
    }
  });
}

template <typename scalar_t, typename acc_t>
void knn_cpu_impl(const at::Tensor& x, const at::Tensor& ref, int64_t k, int64_t self_offset,
                  bool exclude_self, at::Tensor& dist, at::Tensor& idx) {
  // The same rows in memory (ldreg_loss(x) passes x.detach(): another tensor, one storage).
  const bool same = x.data_ptr() == ref.data_ptr() && x.sizes() == ref.sizes() && x.strides() == ref.strides();
  if constexpr (std::is_same_v<scalar_t, float>) {
    const PairsChoice pairs = same ? pairs_kernel(x.size(0)) : PairsChoice{};
    if (pairs.kernel != Pairs::kOff) {
      const int64_t b = x.size(0), dim = x.size(1);
      const auto by_pairs = [&] {
        knn_by_pairs(x.data_ptr<float>(), b, dim, k, exclude_self, pairs.kernel, dist.data_ptr<float>(),
                     idx.data_ptr<int64_t>());
      };
      if (!pairs.calibrate) return by_pairs();
      const auto key = std::make_tuple(b, dim, k, at::get_num_threads());
      PairsCalibration& cal = pairs_calibration();
      {
        std::lock_guard<std::mutex> lock(cal.mu);
        const auto it = cal.pairs_faster.find(key);
        if (it != cal.pairs_faster.end()) {
          if (it->second) return by_pairs();
          return knn_by_scores<scalar_t, acc_t>(x, ref, k, self_offset, exclude_self, same, dist, idx);
        }
      }
      // First call at this shape: the score path once to warm up (threads, pages), then each
      // timed once; either leaves the same answer in dist and idx.
      using clock = std::chrono::steady_clock;
      knn_by_scores<scalar_t, acc_t>(x, ref, k, self_offset, exclude_self, same, dist, idx);
      auto t0 = clock::now();
      by_pairs();
      const auto t_pairs = clock::now() - t0;
      t0 = clock::now();
      knn_by_scores<scalar_t, acc_t>(x, ref, k, self_offset, exclude_self, same, dist, idx);
      const auto t_scores = clock::now() - t0;
      std::lock_guard<std::mutex> lock(cal.mu);
      cal.pairs_faster[key] = t_pairs < t_scores;
      return;
    }
  }
  knn_by_scores<scalar_t, acc_t>(x, ref, k, self_offset, exclude_self, same, dist, idx);
}

// grad_x of one query row: g = (sum_c coef_c (x - r_idx_c)) * inv, neighbour by neighbour.
// coef is scaled by the row's s and inv = 1 / s (grad_row_scale in knn.h): an exact power
// of two, so the product is the division by s, done once per feature.
// dim features from each row; rows of ref are `stride` apart (the AVX2 path's tail passes a
// column slice). kFused: each step one rounding, std::fma (float: the AVX2 path's FMA, so both
// paths give the same bits whatever the compiler contracts); otherwise as written.
template <typename scalar_t, typename acc_t, bool kFused = false>
inline void grad_row(const scalar_t* xi, const scalar_t* rp, const int64_t* ip, const acc_t* coef, acc_t inv,
                     int64_t k, int64_t dim, acc_t* g, int64_t stride) {
  for (int64_t c = 0; c < k; ++c) {
    const acc_t cf = coef[c];
    if (cf == 0) continue;
    const scalar_t* rj = rp + ip[c] * stride;
    for (int64_t d = 0; d < dim; ++d) {
      const acc_t t = static_cast<acc_t>(xi[d]) - static_cast<acc_t>(rj[d]);
      if constexpr (kFused) {
        g[d] = std::fma(cf, t, g[d]);
      } else {
        g[d] += cf * t;
      }
    }
  }
  for (int64_t d = 0; d < dim; ++d) g[d] *= inv;
}

#ifdef LDREG_X86_AVX2
// grad_row for float on AVX2, 32 features at a time: the sums stay in registers over the k
// neighbours (grad_row loads and stores g once per neighbour), each neighbour's row is read
// once. Per feature the same operations in the same order as grad_row<.., kFused> (g = 0,
// then g = fma(cf, x - r, g) for c = 0 .. k-1, then g *= inv), so the bits are the same on
// either path.
__attribute__((target("avx2,fma"))) void grad_row_avx2(const float* xi, const float* rp, const int64_t* ip,
                                                       const float* coef, float inv, int64_t k, int64_t dim,
                                                       float* g) {
  const __m256 vinv = _mm256_set1_ps(inv);
  int64_t j = 0;
  for (; j + 32 <= dim; j += 32) {
    const __m256 x0 = _mm256_loadu_ps(xi + j), x1 = _mm256_loadu_ps(xi + j + 8);
    const __m256 x2 = _mm256_loadu_ps(xi + j + 16), x3 = _mm256_loadu_ps(xi + j + 24);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t c = 0; c < k; ++c) {
      if (coef[c] == 0) continue;
      const __m256 cf = _mm256_set1_ps(coef[c]);
      const float* r = rp + ip[c] * dim + j;
      a0 = _mm256_fmadd_ps(cf, _mm256_sub_ps(x0, _mm256_loadu_ps(r)), a0);
      a1 = _mm256_fmadd_ps(cf, _mm256_sub_ps(x1, _mm256_loadu_ps(r + 8)), a1);
      a2 = _mm256_fmadd_ps(cf, _mm256_sub_ps(x2, _mm256_loadu_ps(r + 16)), a2);
      a3 = _mm256_fmadd_ps(cf, _mm256_sub_ps(x3, _mm256_loadu_ps(r + 24)), a3);
    }
    _mm256_storeu_ps(g + j, _mm256_mul_ps(a0, vinv));
    _mm256_storeu_ps(g + j + 8, _mm256_mul_ps(a1, vinv));
    _mm256_storeu_ps(g + j + 16, _mm256_mul_ps(a2, vinv));
    _mm256_storeu_ps(g + j + 24, _mm256_mul_ps(a3, vinv));
  }
  if (j < dim) grad_row<float, float, true>(xi + j, rp + j, ip, coef, inv, k, dim - j, g + j, dim);
}
#endif

// The float backward's row kernel: AVX2 where the CPU runs it, or LDREG_CPU_GRAD_SIMD=0 for
// the scalar grad_row (tests force both: the bits are the same, only the speed moves).
inline bool grad_simd() {
  const char* env = std::getenv("LDREG_CPU_GRAD_SIMD");
  if (env != nullptr && env[0] != '\0') {
    const std::string v(env);
    TORCH_CHECK_VALUE(v == "0" || v == "1", "LDREG_CPU_GRAD_SIMD must be 0 or 1, got '", v, "'");
    if (v == "0") return false;
  }
  return cpu_has_avx2_fma();
}

void grad_row_f32(const float* xi, const float* rp, const int64_t* ip, const float* coef, float inv, int64_t k,
                  int64_t dim, float* g, bool simd) {
#ifdef LDREG_X86_AVX2
  if (simd) return grad_row_avx2(xi, rp, ip, coef, inv, k, dim, g);
#endif
  (void)simd;
  grad_row<float, float, true>(xi, rp, ip, coef, inv, k, dim, g, dim);
}

template <typename scalar_t, typename acc_t>
void backward_cpu_impl(const at::Tensor& grad_dist, const at::Tensor& x, const at::Tensor& ref,
                       const at::Tensor& idx, const at::Tensor& dist, at::Tensor& gx,
                       at::Tensor* gref) {
  const int64_t b = x.size(0), k = idx.size(1), dim = x.size(1);
  // Scaled coefficients (g s) / r and 1 / s per row (backward_row_coef in knn.h).
  const at::Tensor g_t = grad_dist.to(dist.scalar_type()).contiguous();
  at::Tensor coef_t = at::empty({b, k}, dist.options());
  at::Tensor inv_t = at::empty({b}, dist.options());
  const acc_t* gp = g_t.const_data_ptr<acc_t>();
  const acc_t* dp = dist.const_data_ptr<acc_t>();
  acc_t* coef = coef_t.data_ptr<acc_t>();
  acc_t* inv = inv_t.data_ptr<acc_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* rp = ref.data_ptr<scalar_t>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  acc_t* gxp = gx.data_ptr<acc_t>();
  const bool simd = grad_simd();

  at::parallel_for(0, b, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      inv[i] = backward_row_coef<acc_t>(gp + i * k, dp + i * k, k, coef + i * k);
      if constexpr (std::is_same_v<scalar_t, float>) {
        grad_row_f32(xp + i * dim, rp, ip + i * k, coef + i * k, inv[i], k, dim, gxp + i * dim, simd);
      } else {
        grad_row<scalar_t, acc_t>(xp + i * dim, rp, ip + i * k, coef + i * k, inv[i], k, dim, gxp + i * dim, dim);
      }
    }
  });
  if (gref == nullptr) return;
  acc_t* grp = gref->data_ptr<acc_t>();
  // Each thread owns a block of feature columns of grad_ref: no races, fixed sum order.
  // Each contribution is (coef (x_i - ref_j)) / s_i, as (...) * inv_i (exact, see grad_row).
  at::parallel_for(0, dim, 16, [&](int64_t d0, int64_t d1) {
    for (int64_t i = 0; i < b; ++i) {
      const scalar_t* xi = xp + i * dim;
      const acc_t iv = inv[i];
      for (int64_t c = 0; c < k; ++c) {
        const acc_t cf = coef[i * k + c];
        if (cf == 0) continue;
        const int64_t j = ip[i * k + c];
        const scalar_t* rj = rp + j * dim;
        acc_t* g = grp + j * dim;
        for (int64_t d = d0; d < d1; ++d) g[d] -= (cf * (static_cast<acc_t>(xi[d]) - static_cast<acc_t>(rj[d]))) * iv;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& x_, const at::Tensor& ref_, int64_t k,
                                           int64_t self_offset, bool exclude_self) {
  check_knn_args(x_, ref_, k, self_offset, exclude_self);
  TORCH_CHECK_VALUE(x_.is_cpu(), "knn_cpu needs CPU tensors, got ", x_.device());
  // The range rule (knn_in_range in knn.h): scaled where needed, small distances checked.
  return knn_in_range(x_, ref_, [&](const at::Tensor& x, const at::Tensor& ref) {
    at::Tensor dist, idx;
    std::tie(dist, idx) = empty_knn_outputs(x, k);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ldreg_knn_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      knn_cpu_impl<scalar_t, acc_t>(x, ref, k, self_offset, exclude_self, dist, idx);
    });
    return std::make_tuple(dist, idx);
  });
}

std::tuple<at::Tensor, at::Tensor> knn_backward_cpu(const at::Tensor& grad_dist, const at::Tensor& x_,
                                                    const at::Tensor& ref_, const at::Tensor& idx_,
                                                    const at::Tensor& dist_, bool need_ref_grad) {
  check_backward_args(grad_dist, x_, ref_, idx_, dist_);
  const at::Tensor x = x_.contiguous(), ref = ref_.contiguous(), idx = idx_.contiguous();
  const at::Tensor dist = dist_.contiguous();
  // The kernel reads ref[idx] unchecked; a direct caller's bad index must not read out of
  // bounds (host memory: no sync cost).
  if (idx.numel() > 0) {
    const auto mm = at::aminmax(idx);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK_INDEX(lo >= 0 && hi < ref.size(0), "idx holds ", lo < 0 ? lo : hi,
                      ", outside the reference's rows [0, ", ref.size(0), ")");
  }
  at::Tensor gx, gref;
  std::tie(gx, gref) = zero_grad_buffers(x, ref, dist, need_ref_grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ldreg_knn_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK_TYPE(dist.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                     "dist must be float64 for float64 x, else float32");
    backward_cpu_impl<scalar_t, acc_t>(grad_dist, x, ref, idx, dist, gx, need_ref_grad ? &gref : nullptr);
  });
  return finish_grads(gx, gref, x, ref);
}

}  // namespace ldreg

TORCH_LIBRARY_IMPL(ldreg, CPU, m) {
  m.impl("knn_native", &ldreg::knn_cpu);
  m.impl("knn_backward_native", &ldreg::knn_backward_cpu);
}

// The float score kernel the CPU kNN runs at this dimension, and why ("avx512: measured at
// D=512, ..."): benchmarks record it beside their figures, tests check the forcing.
TORCH_LIBRARY_FRAGMENT(ldreg, m) {
  m.def("cpu_score_kernel(int dim) -> str", [](int64_t dim) {
    TORCH_CHECK_VALUE(dim > 0, "dim must be positive, got ", dim);
    const ldreg::score_choice::Choice c = ldreg::score_choice::choose(dim);
    return std::string(ldreg::score_choice::name(c.kernel)) + ": " + c.why;
  });
}
