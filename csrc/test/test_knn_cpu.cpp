// Standalone C++ test of the CPU kernels (built by CMakeLists.txt, run by ctest): the
// kNN against a brute-force double-precision scan, self excluded by index, and the
// backward against finite differences of sum(dist); the re-rank's key sort and selection
// (cpu/rerank.h) against std::sort on crowded, tied, negative and collapsed values.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/rerank.h"
#include "knn.h"

static int failures = 0;
#define EXPECT(cond, ...)                  \
  do {                                     \
    if (!(cond)) {                         \
      std::fprintf(stderr, "FAIL: " __VA_ARGS__); \
      std::fprintf(stderr, "\n");          \
      ++failures;                          \
    }                                      \
  } while (0)

static void test_forward(int64_t b, int64_t n, int64_t d, int64_t k, int64_t off) {
  at::manual_seed(1234 + b + n);
  const at::Tensor ref = at::randn({n, d}, at::kDouble);
  const at::Tensor x = ref.narrow(0, off, b).clone();
  auto [dist, idx] = ldreg::knn_cpu(x, ref, k, off, true);
  const auto xa = x.accessor<double, 2>();
  const auto ra = ref.accessor<double, 2>();
  for (int64_t i = 0; i < b; ++i) {
    std::vector<std::pair<double, int64_t>> all;
    for (int64_t j = 0; j < n; ++j) {
      if (j == i + off) continue;
      double s = 0;
      for (int64_t c = 0; c < d; ++c) s += (xa[i][c] - ra[j][c]) * (xa[i][c] - ra[j][c]);
      all.emplace_back(std::sqrt(s), j);
    }
    std::sort(all.begin(), all.end());
    for (int64_t c = 0; c < k; ++c) {
      EXPECT(idx[i][c].item<int64_t>() == all[c].second, "row %ld col %ld: idx %ld want %ld", (long)i, (long)c,
             (long)idx[i][c].item<int64_t>(), (long)all[c].second);
      EXPECT(std::abs(dist[i][c].item<double>() - all[c].first) <= 1e-12 * all[c].first, "row %ld col %ld: dist",
             (long)i, (long)c);
    }
  }
}

static void test_backward() {
  at::manual_seed(7);
  const at::Tensor x = at::randn({9, 5}, at::kDouble);
  const at::Tensor ref = at::randn({30, 5}, at::kDouble);
  auto [dist, idx] = ldreg::knn_cpu(x, ref, 4, 0, false);
  auto [gx, gref] = ldreg::knn_backward_cpu(at::ones_like(dist), x, ref, idx, dist, true);
  const double h = 1e-6;
  for (int64_t i = 0; i < 9; ++i) {
    for (int64_t c = 0; c < 5; ++c) {
      at::Tensor xp = x.clone(), xm = x.clone();
      xp[i][c] += h;
      xm[i][c] -= h;
      // Same neighbour set: the distance sum is smooth in x.
      const double fp = at::gather(at::cdist(xp, ref), 1, idx).sum().item<double>();
      const double fm = at::gather(at::cdist(xm, ref), 1, idx).sum().item<double>();
      EXPECT(std::abs((fp - fm) / (2 * h) - gx[i][c].item<double>()) < 1e-6, "grad x[%ld][%ld]", (long)i, (long)c);
    }
  }
  EXPECT(gref.size(0) == 30, "grad_ref shape");
  EXPECT(std::abs(gref.sum().item<double>() + gx.sum().item<double>()) < 1e-9, "grad_ref sums to -grad_x");
}

// Keys of n values drawn by `kind`: 0 spread, 1 a few distinct values (many ties), 2 all
// equal (collapsed), 3 a narrow band plus outliers (crowded buckets), signs mixed.
static std::vector<uint64_t> random_keys(int64_t n, int kind, std::mt19937& g) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int32_t> idx(0, 1 << 30);
  std::vector<uint64_t> keys(static_cast<size_t>(n));
  for (auto& key : keys) {
    float v = nd(g);
    if (kind == 1) v = std::round(v * 2.0f);
    if (kind == 2) v = -3.5f;
    if (kind == 3) v = (idx(g) % 10 == 0) ? v * 1e6f : 1.0f + v * 1e-6f;
    key = ldreg::rerank::key(v, idx(g));
  }
  return keys;
}

static void test_rerank_keys() {
  std::mt19937 g(20261125);
  for (int64_t n : {1, 5, 63, 64, 65, 300, 2577}) {
    for (int kind = 0; kind < 4; ++kind) {
      const std::vector<uint64_t> keys = random_keys(n, kind, g);
      std::vector<uint64_t> want = keys;
      std::sort(want.begin(), want.end());
      for (const uint64_t key : keys) {
        EXPECT(ldreg::rerank::key(ldreg::rerank::key_value(key), ldreg::rerank::key_index(key)) == key, "key round trip");
      }
      ldreg::rerank::Scratch s(n);
      std::copy(keys.begin(), keys.end(), s.keys.begin());
      const uint64_t* got = ldreg::rerank::sort_keys(s.keys.data(), n, s);
      EXPECT(std::equal(want.begin(), want.end(), got), "sort_keys n=%ld kind=%d", (long)n, kind);
      for (int64_t k : {int64_t{1}, n / 3 + 1, n}) {
        std::copy(keys.begin(), keys.end(), s.keys.begin());
        ldreg::rerank::select_smallest(s.keys.data(), n, k, s);
        std::vector<uint64_t> first(s.keys.begin(), s.keys.begin() + k);
        std::sort(first.begin(), first.end());
        std::vector<uint64_t> all(s.keys.begin(), s.keys.begin() + n);
        std::sort(all.begin(), all.end());
        EXPECT(all == want, "select_smallest lost keys n=%ld kind=%d k=%ld", (long)n, kind, (long)k);
        // The k kept have the k smallest values (ties at the k-th value may be any of them).
        EXPECT(ldreg::rerank::key_value(first.back()) == ldreg::rerank::key_value(want[k - 1]),
               "select_smallest n=%ld kind=%d k=%ld", (long)n, kind, (long)k);
      }
    }
  }
}

int main() {
  test_rerank_keys();
  test_forward(37, 37, 7, 5, 0);
  test_forward(20, 600, 3, 16, 311);  // several score tiles, queries at an offset
  test_backward();
  if (failures) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("test_knn_cpu: all checks passed\n");
  return 0;
}
