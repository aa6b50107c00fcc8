// Op schemas of the native kNN kernels and the device-independent pieces they share.
// Device kernels register under TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/.
#include "knn.h"

#include <torch/library.h>

#ifdef LDREG_WITH_PYTHON
#include <Python.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

namespace ldreg {

void check_knn_args(const at::Tensor& x, const at::Tensor& ref, int64_t k, int64_t self_offset,
                    bool exclude_self) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D (rows, features), got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(ref.dim() == 2, "ref must be 2-D (rows, features), got ", ref.dim(), "-D");
  TORCH_CHECK_VALUE(x.size(0) > 0 && x.size(1) > 0, "x is empty: shape ", x.sizes());
  TORCH_CHECK_VALUE(ref.size(0) > 0, "ref is empty: shape ", ref.sizes());
  TORCH_CHECK_VALUE(x.size(1) == ref.size(1), "x and ref must have the same feature dimension: x has D=",
                    x.size(1), ", ref has D=", ref.size(1));
  TORCH_CHECK_TYPE(x.is_floating_point(), "x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK_TYPE(x.scalar_type() == ref.scalar_type(), "x and ref must have the same dtype: x is ",
                   x.scalar_type(), ", ref is ", ref.scalar_type());
  TORCH_CHECK_VALUE(x.device() == ref.device(), "x and ref must be on the same device: x on ",
                    x.device(), ", ref on ", ref.device());
  const int64_t n = ref.size(0);
  TORCH_CHECK_VALUE(n < std::numeric_limits<int32_t>::max(), "ref has ", n,
                    " rows; at most 2^31 - 2 are supported");
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got k=", k);
  if (exclude_self) {
    TORCH_CHECK_VALUE(self_offset >= 0 && self_offset + x.size(0) <= n, "self_offset=", self_offset,
                      " puts the ", x.size(0), " queries outside ref's ", n, " rows");
    TORCH_CHECK_VALUE(k <= n - 1, "k=", k, " exceeds the N - 1 = ", n - 1,
                      " reference rows left after excluding self");
  } else {
    TORCH_CHECK_VALUE(k <= n, "k=", k, " exceeds the N = ", n, " reference rows");
  }
}

std::tuple<at::Tensor, at::Tensor> empty_knn_outputs(const at::Tensor& x, int64_t k) {
  const auto ct = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {at::empty({x.size(0), k}, x.options().dtype(ct)), at::empty({x.size(0), k}, x.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor> zero_grad_buffers(const at::Tensor& x, const at::Tensor& ref,
                                                     const at::Tensor& dist, bool need_ref_grad) {
  at::Tensor gx = at::zeros(x.sizes(), x.options().dtype(dist.scalar_type()));
  return {gx, need_ref_grad ? at::zeros(ref.sizes(), gx.options()) : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor> finish_grads(const at::Tensor& gx, const at::Tensor& gref,
                                                const at::Tensor& x, const at::Tensor& ref) {
  if (!gref.defined()) return {gx.to(x.scalar_type()), at::empty({0, ref.size(1)}, ref.options())};
  return {gx.to(x.scalar_type()), gref.to(ref.scalar_type())};
}

void check_backward_args(const at::Tensor& grad_dist, const at::Tensor& x, const at::Tensor& ref,
                         const at::Tensor& idx, const at::Tensor& dist) {
  TORCH_CHECK_VALUE(idx.dim() == 2 && idx.sizes() == dist.sizes() && idx.sizes() == grad_dist.sizes(),
                    "idx, dist and grad_dist must share one (B, k) shape");
  TORCH_CHECK_VALUE(idx.size(0) == x.size(0), "idx has ", idx.size(0), " rows, x has ", x.size(0));
  TORCH_CHECK_VALUE(x.dim() == 2 && ref.dim() == 2 && x.size(1) == ref.size(1), "x and ref must be (B, D) and (N, D)");
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "idx must be int64");
  TORCH_CHECK_TYPE(dist.scalar_type() == at::kFloat || dist.scalar_type() == at::kDouble,
                   "dist must be float32 or float64");
}

RangeScale range_scale(const at::Tensor& x, const at::Tensor& ref) {
  // aminmax propagates NaN, and an Inf is its own extreme: one reduction per tensor checks
  // finiteness and finds the magnitude, without a boolean copy of the (possibly huge) ref.
  const auto xm = at::aminmax(x), rm = at::aminmax(ref);
  const at::Tensor ext = at::stack({std::get<0>(xm).to(at::kDouble), std::get<1>(xm).to(at::kDouble),
                                    std::get<0>(rm).to(at::kDouble), std::get<1>(rm).to(at::kDouble)})
                             .cpu();
  const double* v = ext.const_data_ptr<double>();
  const char* names[2] = {"x", "ref"};
  for (int t = 0; t < 2; ++t) {
    TORCH_CHECK_VALUE(std::isfinite(v[2 * t]) && std::isfinite(v[2 * t + 1]), names[t],
                      " contains NaN or Inf; LID is undefined for non-finite features "
                      "(check the encoder output before the regulariser)");
  }
  RangeScale r;
  r.max_abs = std::max({-v[0], v[1], -v[2], v[3]});
  const bool dbl = x.scalar_type() == at::kDouble;
  const int lim = dbl ? kRangeExpDouble : kRangeExpFloat;
  if (r.max_abs == 0 || (r.max_abs >= std::ldexp(1.0, -lim) && r.max_abs <= std::ldexp(1.0, lim))) return r;
  r.scale = top_scale(r.max_abs, x.size(1), dbl);
  return r;
}

double top_scale(double m, int64_t dim, bool dbl) {
  if (m == 0) return 1.0;
  int c = 0;  // ceil(log2(dim) / 2): 2^c >= sqrt(dim)
  while ((int64_t{1} << (2 * c)) < dim) ++c;
  const int t = (dbl ? kTopExpDouble : kTopExpFloat) - c;
  int e = 0;
  std::frexp(m, &e);  // m = f * 2^e, f in [0.5, 1)
  return std::ldexp(1.0, std::min(t - e, 1023));  // 2^1023 at most: see _host.top_scale
}

namespace {
// t *= s for a power of two s, exact: in two steps where s is no normal float (a Scalar is
// rounded to the tensor's dtype: 2^150 would read inf).
void mul_pow2_(at::Tensor& t, double s) {
  int e = 0;
  std::frexp(s, &e);
  e -= 1;  // s = 2^e
  if ((e >= -126 && e <= 127) || t.scalar_type() == at::kDouble) {
    t.mul_(s);
  } else {
    t.mul_(std::ldexp(1.0, e / 2)).mul_(std::ldexp(1.0, e - e / 2));
  }
}
}  // namespace

at::Tensor RangeScale::apply(const at::Tensor& t) const {
  if (scale == 1.0) return t;
  const auto st = t.scalar_type();
  at::Tensor out = st == at::kDouble || st == at::kFloat ? t.clone() : t.to(at::kFloat);
  mul_pow2_(out, scale);
  return out;
}

void RangeScale::unscale(at::Tensor& dist) const {
  if (scale == 1.0) return;  // then distances_in_range has passed: nothing subnormal
  mul_pow2_(dist, 1.0 / scale);
  const bool dbl = dist.scalar_type() == at::kDouble;
  const double tiny = dbl ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  at::Tensor bad = dist.gt(0).logical_and_(dist.lt(tiny));
  if (!dbl) bad.logical_or_(at::isfinite(dist).logical_not_());
  if (!bad.any().item<bool>()) return;
  TORCH_CHECK_VALUE(dbl || at::isfinite(dist).all().item<bool>(), "the distances overflow float32 (largest |feature| is ",
                    max_abs, "); pass float64 features");
  // Below the smallest normal a distance keeps fewer bits than the dtype's precision, and the
  // backward's 1 / distance overflows. Same as _host.unscale.
  const char* name = dbl ? "float64" : "float32";
  TORCH_CHECK_VALUE(false, "the distances underflow ", name, ": some nonzero neighbour distance is below ", tiny, ", ",
                    name, "'s smallest normal, where it cannot be held to ", name,
                    "'s precision (largest |feature| is ", max_abs, "); ",
                    dbl ? "rescale the features" : "pass float64 features");
}

bool distances_in_range(const at::Tensor& x, const at::Tensor& ref, const at::Tensor& dist, const at::Tensor& idx) {
  const bool dbl = dist.scalar_type() == at::kDouble;
  const double limit = std::sqrt(static_cast<double>(x.size(1))) *
                       std::ldexp(1.0, dbl ? kSmallExpDouble : kSmallExpFloat);
  const at::Tensor small = dist.lt(limit);
  if (!small.any().item<bool>()) return true;
  if (small.logical_and(dist.gt(0)).any().item<bool>()) return false;
  // Zeros: a true duplicate, or a difference whose squares all flushed to zero.
  const at::Tensor nz = small.nonzero();
  const at::Tensor rows = nz.select(1, 0), js = idx.index({rows, nz.select(1, 1)});
  // Elements gathered per chunk (x rows and ref rows, each): on a CPU 1 MiB of fp32, so that a
  // collapsed batch (every distance 0) stays within test_certificate's 16 MiB peak; on a GPU
  // 16 MiB, fewer syncs.
  const int64_t budget = x.is_cuda() ? int64_t{1} << 22 : int64_t{1} << 18;
  const int64_t n = rows.numel(), step = std::max<int64_t>(1, budget / std::max<int64_t>(1, x.size(1)));
  for (int64_t s = 0; s < n; s += step) {
    const int64_t len = std::min(step, n - s);
    if (x.index_select(0, rows.narrow(0, s, len)).ne(ref.index_select(0, js.narrow(0, s, len))).any().item<bool>()) {
      return false;
    }
  }
  return true;
}

std::string range_error_message(double max_abs, int64_t dim, bool dbl) {
  const char* name = dbl ? "float64" : "float32";
  const int e = dbl ? kExactExpDouble : kExactExpFloat;
  std::ostringstream os;
  os << "the features span too wide a range for " << name << ": beside features up to |" << max_abs
     << "| some nonzero distance is too small for " << name
     << " to hold exactly (the distances are exact when every nonzero neighbour distance is at least 2^" << e
     << " * D * max|feature| = " << std::ldexp(static_cast<double>(dim), e) * max_abs << "); "
     << (dbl ? "rescale or drop the outlying rows" : "pass float64 features");
  return os.str();
}

void redo_exhaustive(const at::Tensor& x, const at::Tensor& ref, const at::Tensor& rows,
                     int64_t k, int64_t self_offset, bool exclude_self, at::Tensor& dist,
                     at::Tensor& idx) {
  const int64_t r = rows.numel(), n = ref.size(0);
  if (r == 0) return;
  constexpr int64_t kBudget = int64_t{1} << 22;
  const auto ct = dist.scalar_type();
  const bool packed = ct == at::kFloat;  // (distance bits << 32 | index): one exact int64 key
  const at::Tensor refc = ref.to(ct);
  const int64_t cols = std::max<int64_t>(k, std::min<int64_t>(n, kBudget / 8));
  const int64_t step = std::max<int64_t>(1, std::min<int64_t>(r, kBudget / (k + cols)));
  const auto lopt = x.options().dtype(at::kLong);
  for (int64_t s = 0; s < r; s += step) {
    const at::Tensor rc = rows.narrow(0, s, std::min(step, r - s));
    const at::Tensor xc = x.index_select(0, rc).to(ct);
    at::Tensor best = at::empty({rc.size(0), 0}, packed ? lopt : xc.options());
    at::Tensor best_i = at::empty({rc.size(0), 0}, lopt);
    for (int64_t j0 = 0; j0 < n; j0 += cols) {
      const int64_t jn = std::min(cols, n - j0);
      at::Tensor d = at::cdist(xc, refc.narrow(0, j0, jn), 2.0, /*donot_use_mm*/ 2);
      if (exclude_self) {
        const at::Tensor col = rc + (self_offset - j0);
        const at::Tensor hit = at::nonzero((col >= 0) & (col < jn)).flatten();
        d.index_put_({hit, col.index_select(0, hit)}, std::numeric_limits<double>::infinity());
      }
      const at::Tensor j = at::arange(j0, j0 + jn, lopt);
      if (packed) {
        const at::Tensor keys = d.view(at::kInt).to(at::kLong).bitwise_left_shift(32).bitwise_or(j);
        best = std::get<0>(at::topk(at::cat({best, keys}, 1), k, 1, /*largest=*/false));
      } else {
        // Earlier blocks hold lower indices: a stable sort of [best, block] is the
        // (distance, index) order.
        auto sorted = at::sort(at::cat({best, d}, 1), /*stable=*/true, /*dim=*/1, /*descending=*/false);
        best_i = at::cat({best_i, j.expand({rc.size(0), jn})}, 1).gather(1, std::get<1>(sorted).narrow(1, 0, k));
        best = std::get<0>(sorted).narrow(1, 0, k);
      }
    }
    if (packed) {
      best_i = best.bitwise_and(0xFFFFFFFFLL);
      best = best.bitwise_right_shift(32).to(at::kInt).view(at::kFloat);
    }
    dist.index_copy_(0, rc, best);
    idx.index_copy_(0, rc, best_i);
  }
}

// CUDA_VERSION the extension was compiled against (0 for a CPU-only build), so Python can
// refuse a CUDA-version mismatch with a clear message instead of a cryptic launch error.
int64_t compiled_cuda_version() {
#ifdef LDREG_WITH_CUDA
  return cudart_version_compiled();
#else
  return 0;
#endif
}

}  // namespace ldreg

TORCH_LIBRARY_FRAGMENT(ldreg, m) {
  m.def("knn_native(Tensor x, Tensor ref, int k, int self_offset, bool exclude_self) -> (Tensor, Tensor)");
  m.def(
      "knn_backward_native(Tensor grad_dist, Tensor x, Tensor ref, Tensor idx, Tensor dist, "
      "bool need_ref_grad) -> (Tensor, Tensor)");
  m.def("compiled_cuda_version() -> int", &ldreg::compiled_cuda_version);
  // The certificate and margin the kernels use, exported so a test can check they equal
  // the Python ones (ldreg_kernels._host).
  m.def("certificate_coef(int dim, float acc_unit, float input_unit) -> float",
        [](int64_t dim, double acc_unit, double input_unit) {
          return ldreg::certificate_coef(dim, acc_unit, input_unit);
        });
  m.def("default_margin(int k) -> int", [](int64_t k) { return ldreg::default_margin(k); });
}

#ifdef LDREG_WITH_PYTHON
// An empty Python module: importing ldreg_kernels._C loads the library, whose static
// initialisers register the ops above (no pybind11 needed).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
