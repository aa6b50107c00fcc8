// The re-rank's two hot loops for float: exact squared distances by direct differences, and
// ordering candidates by one 64-bit key (32 order-preserving bits of the value, then the
// row index), so ties fall to the smaller index without a two-field compare.
//
// Why: at large k the re-rank, not the score GEMM, is the cost. One candidate's 16-lane
// definition is two FMA chains, bound by their latency; four candidates at a time give eight,
// which makes it throughput-bound. nth_element + sort over (distance, index)
// pairs mispredict about once per compare; an LSD radix sort is branch-free and linear.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "self_pairs.h"
#include "x86_simd.h"

namespace ldreg {
namespace rerank {

#ifdef LDREG_X86_AVX2
// out[c] = sum_j (a_j - b[c]_j)^2 for c < C, in the bits of the CPU's float distance definition
// (self_pairs.h: 16 lanes, lane l the FMA chain over j = l (mod 16), then a fixed reduction),
// as two 8-lane chains per candidate, so the re-rank, the exhaustive redo and the pair tiles
// agree bit for bit. The C candidates share the query's loads: their rows are gathered from
// L2/L3 and the loads, not the FMAs, bound the loop, so one load of a serves C of them; C = 4
// gives the 8 independent chains that hide the FMA latency (12 of AVX2's 16 registers).
template <int C>
__attribute__((target("avx2,fma"), always_inline)) inline void sqdist_avx2_multi(const float* a, const float* const* b,
                                                                                int64_t d, float* out) {
  __m256 s[C][2];
#pragma GCC unroll 4
  for (int c = 0; c < C; ++c) s[c][0] = s[c][1] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m256 x0 = _mm256_loadu_ps(a + j), x1 = _mm256_loadu_ps(a + j + 8);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const __m256 t0 = _mm256_sub_ps(x0, _mm256_loadu_ps(b[c] + j));
      const __m256 t1 = _mm256_sub_ps(x1, _mm256_loadu_ps(b[c] + j + 8));
      s[c][0] = _mm256_fmadd_ps(t0, t0, s[c][0]);
      s[c][1] = _mm256_fmadd_ps(t1, t1, s[c][1]);
    }
  }
  if (j < d) {  // the last d % 16
    __m256i m0, m1;
    self_pairs::tail_masks(d - j, m0, m1);
    const __m256 x0 = _mm256_maskload_ps(a + j, m0), x1 = _mm256_maskload_ps(a + j + 8, m1);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const __m256 t0 = _mm256_sub_ps(x0, _mm256_maskload_ps(b[c] + j, m0));
      const __m256 t1 = _mm256_sub_ps(x1, _mm256_maskload_ps(b[c] + j + 8, m1));
      s[c][0] = _mm256_fmadd_ps(t0, t0, s[c][0]);
      s[c][1] = _mm256_fmadd_ps(t1, t1, s[c][1]);
    }
  }
#pragma GCC unroll 4
  for (int c = 0; c < C; ++c) out[c] = self_pairs::reduce8(_mm256_add_ps(s[c][0], s[c][1]));
}

// One candidate (the re-rank without grouping, and the exhaustive redo).
__attribute__((target("avx2,fma"))) inline float sqdist_avx2(const float* a, const float* b, int64_t d) {
  float out;
  sqdist_avx2_multi<1>(a, &b, d, &out);
  return out;
}

__attribute__((target("avx2,fma"))) inline void sqdist_avx2_x2(const float* a, const float* const* b, int64_t d,
                                                               float* out) {
  sqdist_avx2_multi<2>(a, b, d, out);
}

__attribute__((target("avx2,fma"))) inline void sqdist_avx2_x4(const float* a, const float* const* b, int64_t d,
                                                               float* out) {
  sqdist_avx2_multi<4>(a, b, d, out);
}

// out[c] = sqdist_avx2(a, b[c], d) for c < n, g (1, 2 or 4) at a time.
inline void sqdist_multi(const float* a, const float* const* b, int64_t n, int64_t d, float* out, int g) {
  int64_t c = 0;
  if (g == 4) {
    for (; c + 4 <= n; c += 4) sqdist_avx2_x4(a, b + c, d, out + c);
  }
  if (g >= 2) {
    for (; c + 2 <= n; c += 2) sqdist_avx2_x2(a, b + c, d, out + c);
  }
  for (; c < n; ++c) out[c] = sqdist_avx2(a, b[c], d);
}
#endif

// Order-preserving unsigned image of a non-NaN float (negative scores included), and back
// (branch-free, so loops over keys vectorise).
inline uint32_t ordered_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t neg = static_cast<uint32_t>(static_cast<int32_t>(u) >> 31);
  return u ^ (neg | 0x80000000u);
}
inline float from_ordered_bits(uint32_t u) {
  const uint32_t pos = static_cast<uint32_t>(static_cast<int32_t>(u) >> 31);
  u ^= ~pos | 0x80000000u;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint64_t key(float value, int32_t index) {
  return (static_cast<uint64_t>(ordered_bits(value)) << 32) | static_cast<uint32_t>(index);
}
inline float key_value(uint64_t k) { return from_ordered_bits(static_cast<uint32_t>(k >> 32)); }
inline int32_t key_index(uint64_t k) { return static_cast<int32_t>(static_cast<uint32_t>(k)); }

// Scratch for one thread's bucket passes over up to n keys.
struct Scratch {
  std::vector<uint64_t> keys, spare;
  std::vector<uint32_t> bucket, counts;
  explicit Scratch(int64_t n)
      : keys(static_cast<size_t>(n)), spare(static_cast<size_t>(n)), bucket(static_cast<size_t>(n)),
        counts(static_cast<size_t>(n) + 1) {}
};

// bucket[i] for n buckets spread evenly over the values' [min, max]: a monotone function of
// the value (each step rounds monotonically), so bucket order is value order. False when
// the values are all equal (or their spread is not representable): no buckets.
inline bool assign_buckets(const uint64_t* a, int64_t n, uint32_t* bucket) {
  float lo = key_value(a[0]), hi = lo;
  for (int64_t i = 1; i < n; ++i) {
    const float v = key_value(a[i]);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  const float scale = static_cast<float>(n) / (hi - lo);
  if (!(hi > lo) || !(scale < std::numeric_limits<float>::infinity())) return false;
  const float top = static_cast<float>(n - 1);
  for (int64_t i = 0; i < n; ++i) {
    const float b = (key_value(a[i]) - lo) * scale;
    bucket[i] = static_cast<uint32_t>(b < top ? b : top);
  }
  return true;
}

// counts[v] = the start of bucket v in bucket order (counts has n + 1 entries).
inline void bucket_starts(const uint32_t* bucket, int64_t n, uint32_t* counts) {
  std::memset(counts, 0, sizeof(uint32_t) * static_cast<size_t>(n + 1));
  for (int64_t i = 0; i < n; ++i) ++counts[bucket[i] + 1];
  for (int64_t v = 1; v <= n; ++v) counts[v] += counts[v - 1];
}

// Sorts a[0..n) ascending by the whole key, using s.spare, s.bucket and s.counts. A bucket
// sort on the value, then each bucket by key (~1 key each; std::sort bounds a crowded one,
// e.g. collapsed data, at n log n). A byte-wise radix sort would have passes where every key
// hits one counter (the top byte of a narrow range of floats), serialised on its store.
// Returns the buffer holding the result (a or s.spare).
inline uint64_t* sort_keys(uint64_t* a, int64_t n, Scratch& s) {
  uint32_t* bucket = s.bucket.data();
  if (n < 64 || !assign_buckets(a, n, bucket)) {
    std::sort(a, a + n);
    return a;
  }
  uint32_t* start = s.counts.data();
  bucket_starts(bucket, n, start);
  uint64_t* out = a == s.spare.data() ? s.keys.data() : s.spare.data();
  for (int64_t i = 0; i < n; ++i) out[start[bucket[i]]++] = a[i];
  // start[v] is now the end of bucket v.
  int64_t begin = 0;
  for (int64_t v = 0; v < n; ++v) {
    const int64_t end = start[v];
    if (end - begin > 16) {
      std::sort(out + begin, out + end);
    } else {
      for (int64_t i = begin + 1; i < end; ++i) {
        const uint64_t x = out[i];
        int64_t j = i;
        for (; j > begin && out[j - 1] > x; --j) out[j] = out[j - 1];
        out[j] = x;
      }
    }
    begin = end;
  }
  return out;
}

// Moves k keys of smallest value to a[0..k) (in no order; ties at the k-th value broken
// arbitrarily), using s.bucket and s.counts: the bucket holding the k-th value is found by
// counting, the buckets below it are taken whole, and only that one is partitioned.
inline void select_smallest(uint64_t* a, int64_t n, int64_t k, Scratch& s) {
  if (k >= n) return;
  uint32_t* bucket = s.bucket.data();
  if (n < 64 || !assign_buckets(a, n, bucket)) {
    std::nth_element(a, a + (k - 1), a + n);
    return;
  }
  uint32_t* start = s.counts.data();
  bucket_starts(bucket, n, start);
  int64_t edge = 0;  // the bucket holding the k-th smallest: start[edge] < k <= start[edge + 1]
  while (start[edge + 1] < static_cast<uint32_t>(k)) ++edge;
  // Branch-free partitions (Lomuto): buckets below edge first, then bucket edge.
  const auto partition = [&](int64_t from, auto take) {
    int64_t to = from;
    for (int64_t i = from; i < n; ++i) {
      const uint64_t x = a[i];
      const uint32_t bx = bucket[i];
      a[i] = a[to];
      bucket[i] = bucket[to];
      a[to] = x;
      bucket[to] = bx;
      to += take(bx);
    }
    return to;
  };
  const uint32_t e = static_cast<uint32_t>(edge);
  const int64_t below = partition(0, [e](uint32_t bx) { return bx < e; });
  const int64_t mid = partition(below, [e](uint32_t bx) { return bx == e; });
  // below = start[edge] < k <= mid: the k-th smallest key (by value, then index) is in there.
  std::nth_element(a + below, a + (k - 1), a + mid);
}

}  // namespace rerank
}  // namespace ldreg
