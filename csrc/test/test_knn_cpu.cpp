// Standalone C++ test of the CPU kernels (built by CMakeLists.txt, run by ctest): the
// kNN against a brute-force double-precision scan, self excluded by index, and the
// backward against finite differences of sum(dist).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

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

int main() {
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
