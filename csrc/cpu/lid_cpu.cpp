// The LID estimators (ldreg_kernels/estimators.py) and their written-out gradient, one pass
// per row on CPU tensors. At SSL batch sizes the Python formulas were some 20 small aten
// calls forward and 30 backward, about a third of an ldreg_loss step at B=256 (issue #23);
// here they are one call each, on one thread below kGrain rows (no thread pool start).
//
// The formulas, clamps and operation order are those of estimators.py, so the degenerate
// outcomes (w == 0, w == m, duplicates, the eps floors) are the same; only the order of
// the row sums differs from torch's reduction (more accurate: see Sum).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

namespace ldreg {
namespace {

constexpr int64_t kGrain = 2048;

bool is_mom(const std::string& estimator) {
  TORCH_CHECK_VALUE(estimator == "mom" || estimator == "mle", "estimator must be 'mom' or 'mle', got '", estimator,
                    "'");
  return estimator == "mom";
}

void check_dist(const at::Tensor& dist) {
  TORCH_CHECK_VALUE(dist.dim() == 2 && dist.size(1) >= 2, "dist must be (B, k) with k >= 2, got shape ",
                    dist.sizes());
  TORCH_CHECK_TYPE(dist.scalar_type() == at::kFloat || dist.scalar_type() == at::kDouble,
                   "dist must be float32 or float64, got ", dist.scalar_type());
}

// Row sums without the k ulps a plain running sum loses at large k (k = 512 is monitored):
// float sums in double, double sums compensated (Neumaier). Torch's reductions, which the
// estimators' tolerances were set on, use several accumulators for the same reason.
template <typename T>
struct Sum {
  double s = 0;
  void add(T v) { s += static_cast<double>(v); }
  T value() const { return static_cast<T>(s); }
};
template <>
struct Sum<double> {
  double s = 0, c = 0;
  void add(double v) {
    const double t = s + v;
    c += std::abs(s) >= std::abs(v) ? (s - t) + v : (v - t) + s;
    s = t;
  }
  double value() const { return s + c; }
};

// Each row relative to its k-th distance w (estimators._scale): ws = w where w > 0, else 1.
template <typename T>
struct Row {
  const T* d;
  int64_t k;
  T w, ws;
  bool positive;
  Row(const T* d_, int64_t k_) : d(d_), k(k_), w(d_[k_ - 1]), ws(w > 0 ? w : T(1)), positive(w > 0) {}
  // (m / w, (w - m) / w), m the mean of the first k - 1 (estimators._mom_ratios).
  std::pair<T, T> mom_ratios() const {
    Sum<T> s;
    for (int64_t j = 0; j + 1 < k; ++j) s.add(d[j]);
    const T m = s.value() * static_cast<T>(1.0 / static_cast<double>(k - 1));
    return {m / ws, (w - m) / ws};
  }
  // -sum ln max(r_j / w, eps), each term 0 for a row with w == 0.
  T mle_sum(T eps) const {
    if (!positive) return T(0);
    Sum<T> s;
    for (int64_t j = 0; j < k; ++j) s.add(std::log(std::max(d[j] / ws, eps)));
    return -s.value();
  }
};

template <typename T>
void lid_rows(const T* dist, int64_t b, int64_t k, bool mom, T eps, T* out) {
  at::parallel_for(0, b, kGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const Row<T> row(dist + i * k, k);
      if (mom) {
        const auto [rho, gam] = row.mom_ratios();
        out[i] = std::max(rho, eps) / std::max(gam, eps);
      } else {
        out[i] = (T(1) / std::max(row.mle_sum(eps), eps)) * static_cast<T>(k);
      }
    }
  });
}

// The gradient of lid_rows (estimators._lid_backward): a clamped term passes none, each
// factor is a ratio or its derivative, and w divides once, last.
template <typename T>
void lid_backward_rows(const T* g, const T* dist, const T* lid, int64_t b, int64_t k, bool mom, T eps, T* out) {
  at::parallel_for(0, b, kGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const Row<T> row(dist + i * k, k);
      T* o = out + i * k;
      if (mom) {
        const auto [rho, gam] = row.mom_ratios();
        const T a = std::max(rho, eps), c = std::max(gam, eps);
        const T ga = a == rho ? g[i] / c : T(0);
        const T gc = c == gam ? g[i] * lid[i] / c : T(0);
        const T gws = row.positive ? ga * rho - gc * gam : T(0);
        const T gm = (ga + gc) / row.ws / static_cast<T>(k - 1);
        const T gw = (gc + gws) / row.ws;
        for (int64_t j = 0; j + 1 < k; ++j) o[j] = gm;
        o[k - 1] = -gw;
        continue;
      }
      const T s = row.mle_sum(eps), sc = std::max(s, eps);
      const T gsw = (sc == s ? g[i] * lid[i] / sc : T(0)) / row.ws;
      int64_t live = 0;
      for (int64_t j = 0; j < k; ++j) {
        const T r = row.d[j] / row.ws, rc = std::max(r, eps);
        const bool on = rc == r && row.positive;
        live += on;
        o[j] = on ? gsw / rc : T(0);
      }
      o[k - 1] -= gsw * static_cast<T>(live);
    }
  });
}

at::Tensor lid_cpu(const at::Tensor& dist_, const std::string& estimator, double eps) {
  check_dist(dist_);
  const bool mom = is_mom(estimator);
  const at::Tensor dist = dist_.contiguous();
  at::Tensor out = at::empty({dist.size(0)}, dist.options());
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "ldreg_lid_cpu", [&] {
    lid_rows<scalar_t>(dist.const_data_ptr<scalar_t>(), dist.size(0), dist.size(1), mom, static_cast<scalar_t>(eps),
                       out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor lid_backward_cpu(const at::Tensor& grad_, const at::Tensor& dist_, const at::Tensor& lid_,
                            const std::string& estimator, double eps) {
  check_dist(dist_);
  const bool mom = is_mom(estimator);
  const int64_t b = dist_.size(0);
  TORCH_CHECK_VALUE(grad_.dim() == 1 && grad_.size(0) == b && lid_.dim() == 1 && lid_.size(0) == b,
                    "grad and lid must be (B,) for dist of shape ", dist_.sizes());
  const at::Tensor dist = dist_.contiguous();
  // The mean's gradient arrives expanded (stride 0): one small copy, as torch's ops do.
  const at::Tensor g = grad_.to(dist.scalar_type()).contiguous(), lid = lid_.to(dist.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(dist);
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "ldreg_lid_backward_cpu", [&] {
    lid_backward_rows<scalar_t>(g.const_data_ptr<scalar_t>(), dist.const_data_ptr<scalar_t>(),
                                lid.const_data_ptr<scalar_t>(), b, dist.size(1), mom, static_cast<scalar_t>(eps),
                                out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace ldreg

TORCH_LIBRARY_FRAGMENT(ldreg, m) {
  m.def("lid_native(Tensor dist, str estimator, float eps) -> Tensor");
  m.def("lid_backward_native(Tensor grad, Tensor dist, Tensor lid, str estimator, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(ldreg, CPU, m) {
  m.impl("lid_native", &ldreg::lid_cpu);
  m.impl("lid_backward_native", &ldreg::lid_backward_cpu);
}
