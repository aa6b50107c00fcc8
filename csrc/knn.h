// Shared declarations of the ldreg native kNN kernels (CPU and CUDA).
//
// Op schemas (declared once, in knn.cpp) mirror the Python custom ops in
// ldreg_kernels/ops.py:
//   ldreg::knn_native(Tensor x, Tensor ref, int k, int self_offset, bool exclude_self)
//       -> (Tensor dist, Tensor idx)
//   ldreg::knn_backward_native(Tensor grad_dist, Tensor x, Tensor ref, Tensor idx,
//       Tensor dist, bool need_ref_grad) -> (Tensor grad_x, Tensor grad_ref)
// Semantics: see ldreg_kernels/backends/torch.py (the "torch" backend) and reference.py.
#pragma once

#include <ATen/ATen.h>

#include <math.h>

#include <limits>
#include <string>
#include <tuple>

namespace ldreg {

// Extra candidates kept past k: a wider candidate set makes the certificate pass more
// often. The same function as ldreg_kernels._host.default_margin (a test checks parity
// through the exported op ldreg::default_margin).
inline int64_t default_margin(int64_t k) { return k / 4 > 8 ? k / 4 : 8; }

// The exactness certificate's coefficient c: a row's k-th neighbour w is proven exact
// unless  w^2 >= bound - c * (|x|^2 + max_j |r_j|^2),  bound = the largest approximate
// squared distance kept. dim = D, acc_unit = machine epsilon of the accumulation,
// input_unit = rounding of the selection inputs (2^-10 for TF32, 0 for none).
// Rigorous (worst case); the derivation of every constant is in
// ldreg_kernels._host.certificate_coef, which this must equal bit for bit (tested through
// the exported op ldreg::certificate_coef).
inline double certificate_coef(int64_t dim, double acc_unit, double input_unit) {
  const double u = acc_unit, v = input_unit;
  if (static_cast<double>(dim) * u > 1.0 / 64 || v > 1.0 / 256) {
    return std::numeric_limits<double>::infinity();
  }
  const double w = (1 + v) * (1 + v);
  return 17.0 / 16.0 * ((4.0 * static_cast<double>(dim) + 22.0) * w * u + 2 * v + v * v);
}

#ifdef __CUDACC__
#define LDREG_HOST_DEVICE __host__ __device__
#else
#define LDREG_HOST_DEVICE
#endif

// The certificate's test for one row: true when no reference row left out of the
// candidates can beat or tie the k-th neighbour w. a = |x|^2 + max_j |r_j|^2. Written as
// "provably less" so that anything unprovable (coef = inf with a = 0, i.e. inf * 0 = NaN,
// or an overflowed NaN) fails it and the row is redone. Same as _host.redo_rows.
template <typename T>
LDREG_HOST_DEVICE inline bool certified(T w, T bound, T a, T coef) {
  return w * w < bound - coef * a;
}

// Range scaling. Inputs whose largest magnitude m lies inside [2^-kRangeExp, 2^kRangeExp]
// (per the kernel's arithmetic: fp64 for double input, else fp32) run as they are; outside
// it they are multiplied by the power of two s that puts m s in [2^(t - 1), 2^t),
// t = kTopExp - ceil(log2(D) / 2): the top of the range, where no squared quantity of the
// search (about 16 D (m s)^2) can overflow, and the most room is left below. Distances are
// scale-equivariant and the product is exact, so the result is the same, bit for bit, up to
// that power of two. A distance d (as computed, scaled) is exact while d >= sqrt(D)
// 2^kSmallExp: its D squared terms then lose at most D 2^-126 (2^-1022) to flushing. So
// float32 distances are exact for d >= 2^-108 D m (float64: 2^-989 D m); a batch whose
// returned distances fall below that limit (knn_in_range) is run again at the top scale, and
// raises ValueError there. Same constants as _host.RANGE_EXP, TOP_EXP, SMALL_EXP, EXACT_EXP.
constexpr int kRangeExpFloat = 32;
constexpr int kRangeExpDouble = 256;
constexpr int kTopExpFloat = 59;
constexpr int kTopExpDouble = 507;
constexpr int kSmallExpFloat = -51;
constexpr int kSmallExpDouble = -484;
constexpr int kExactExpFloat = -108;
constexpr int kExactExpDouble = -989;

struct RangeScale {
  double scale = 1.0;    // the inputs are multiplied by scale, the distances divided
  double max_abs = 0.0;  // m, for the error message
  // t * scale (in float for half/bf16 t, whose own range a scale up could overflow), or t
  // itself when no scaling is needed.
  at::Tensor apply(const at::Tensor& t) const;
  // dist / scale in place; ValueError when the dtype cannot hold the distances: one overflows
  // float32, or a nonzero one is below the dtype's smallest normal (subnormal: too few bits,
  // and the backward's 1 / r overflows).
  void unscale(at::Tensor& dist) const;
};

// Raises ValueError (the Python API's message) if x or ref holds NaN or Inf (one device
// sync for both), else the scaling above. Same as _host.range_scale.
RangeScale range_scale(const at::Tensor& x, const at::Tensor& ref);

// The top scale for max |feature| m (1 for m = 0), D = dim, fp64 arithmetic if dbl. Same as
// _host.top_scale.
double top_scale(double m, int64_t dim, bool dbl);

// Whether dist (computed from x and ref scaled by a power of two, in dist's dtype) holds no
// distance that may have lost accuracy to underflow: none below sqrt(D) 2^kSmallExp except
// exact zeros, and each zero a true duplicate (x_i equal to ref[idx_ij] in every feature).
// One sync in the common case (none below the limit); more only when some are. Same as
// _host.in_range.
bool distances_in_range(const at::Tensor& x, const at::Tensor& ref, const at::Tensor& dist, const at::Tensor& idx);

// The ValueError message for a batch whose distances cannot all be held exactly.
std::string range_error_message(double max_abs, int64_t dim, bool dbl);

// A forward under the range rule: run(xs, refs) -> (dist, idx) on the inputs scaled by
// range_scale; if distances_in_range fails, again at the top scale, and ValueError if it
// fails there too; the distances divided by the scale. Used by knn_cpu and knn_cuda. Same
// as the Python forwards' use of _host.read_checks / in_range / run_in_range.
template <typename Run>
std::tuple<at::Tensor, at::Tensor> knn_in_range(const at::Tensor& x, const at::Tensor& ref, Run&& run) {
  RangeScale range = range_scale(x, ref);
  const bool dbl = x.scalar_type() == at::kDouble;
  at::Tensor dist, idx;
  std::tie(dist, idx) = run(range.apply(x).contiguous(), range.apply(ref).contiguous());
  if (!distances_in_range(x, ref, dist, idx)) {
    TORCH_CHECK_VALUE(range.scale == 1.0, range_error_message(range.max_abs, x.size(1), dbl));
    range.scale = top_scale(range.max_abs, x.size(1), dbl);
    std::tie(dist, idx) = run(range.apply(x).contiguous(), range.apply(ref).contiguous());
    TORCH_CHECK_VALUE(distances_in_range(x, ref, dist, idx), range_error_message(range.max_abs, x.size(1), dbl));
  }
  range.unscale(dist);
  return {dist, idx};
}

// Validates shapes/dtypes/devices/k for direct C++ callers; Python validates first with
// friendlier messages. Throws c10::ValueError / c10::TypeError.
void check_knn_args(const at::Tensor& x, const at::Tensor& ref, int64_t k, int64_t self_offset,
                    bool exclude_self);

// Empty forward outputs: dist (B, k) in the compute dtype (double for double x, else float,
// so half/bf16 inputs get float distances) and idx (B, k) int64.
std::tuple<at::Tensor, at::Tensor> empty_knn_outputs(const at::Tensor& x, int64_t k);

// The exponent e of v = m 2^e, m in [0.5, 1) (frexp), for finite v > 0.
template <typename T>
LDREG_HOST_DEVICE inline int frexp_exponent(T v) {
  int e = 0;
  if constexpr (sizeof(T) == sizeof(float)) {
    frexpf(v, &e);
  } else {
    frexp(v, &e);
  }
  return e;
}

// The backward's per-row scale s: a power of two with gmax s in [0.5, 1), gmax the row's
// largest |g_ij| over its nonzero distances, clamped to [2^-(emax-2), 2^(emax-2)]
// (2^+-126 for float, 2^+-1022 for double) so that s and 1 / s are normal, exact powers
// of two; 1 where gmax is 0 or not finite.
//
// Why: the backward's coefficients g / r leave the dtype's range at extreme feature
// scales. The LID's gradient goes like 1 / w (w the row's largest distance), so at
// w ~ 1e-20 in float32 g / r ~ 1e40 (Inf), at w ~ 1e30 ~1e-60 (0). The backward forms
// c'_ij = (g_ij s_i) / r_ij instead, sums c'_ij (x_i - ref_j) and multiplies the sum by
// 1 / s_i, exactly a division by s_i: scaling by a power of two is exact, so nothing
// changes where nothing overflowed or underflowed. Each term |c' (x - ref)| <= |g| s < 1
// (|x - ref| = r) and a row's sum is below k; c' itself, <= 1 / r, overflows only for
// subnormal distances.
//
// Taken from gmax rather than from w (ldreg_kernels._host.row_scale uses 2^e, w = m 2^e,
// m in [0.5, 1)): for the LID's gradient the two agree up to a small power of two, so the
// results are the same, but w alone fails any other upstream gradient at extreme scales:
// with g = 2 r (the gradient of sum r^2) s ~ w makes g s ~ w^2, Inf at |x| ~ 1e20 in
// float32 and 0 at 1e-25.
template <typename T>
LDREG_HOST_DEVICE inline T grad_row_scale(T gmax) {
  constexpr int lim = sizeof(T) == sizeof(float) ? 126 : 1022;
  if (!(gmax > 0) || !(gmax - gmax == 0)) return T(1);  // 0, NaN, Inf (x - x is NaN for Inf)
  int e = 0;  // gmax = m 2^e, m in [0.5, 1): s = 2^-e
  if constexpr (sizeof(T) == sizeof(float)) {
    frexpf(gmax, &e);
  } else {
    frexp(gmax, &e);
  }
  e = e > lim ? lim : (e < -lim ? -lim : e);
  if constexpr (sizeof(T) == sizeof(float)) {
    return ldexpf(1.0f, -e);
  } else {
    return ldexp(1.0, -e);
  }
}

// One row of backward coefficients from the row's k distances r and upstream gradients g:
// coef_c = (g_c s) / r_c, 0 where r_c == 0 (the subgradient torch.cdist uses: a coincident
// neighbour has no direction), s = grad_row_scale(max |g_c| over r_c > 0). Returns 1 / s
// (exact), the factor the row's sums are multiplied by: grad_x_i once, each grad_ref
// contribution on its own.
template <typename T>
LDREG_HOST_DEVICE inline T backward_row_coef(const T* g, const T* r, int64_t k, T* coef) {
  T gmax = 0;
  for (int64_t c = 0; c < k; ++c) {
    const T a = g[c] < 0 ? -g[c] : g[c];
    gmax = r[c] > 0 && a > gmax ? a : gmax;
  }
  const T s = grad_row_scale<T>(gmax);
  for (int64_t c = 0; c < k; ++c) coef[c] = r[c] > 0 ? (g[c] * s) / r[c] : T(0);
  return T(1) / s;
}

// Zeroed gradient accumulators in dist's dtype: grad_x (B, D), and grad_ref (N, D) when
// need_ref_grad (else undefined).
std::tuple<at::Tensor, at::Tensor> zero_grad_buffers(const at::Tensor& x, const at::Tensor& ref,
                                                     const at::Tensor& dist, bool need_ref_grad);

// The backward op's outputs: the accumulators cast to x's / ref's dtype; an empty (0, D)
// grad_ref when it was not needed.
std::tuple<at::Tensor, at::Tensor> finish_grads(const at::Tensor& gx, const at::Tensor& gref,
                                                const at::Tensor& x, const at::Tensor& ref);

void check_backward_args(const at::Tensor& grad_dist, const at::Tensor& x, const at::Tensor& ref,
                         const at::Tensor& idx, const at::Tensor& dist);

// Rows the certificate could not prove exact are redone here (the CUDA path; the CPU
// kernel streams its own): exact direct-difference distances to every reference row
// (cdist without the mm expansion), own row masked, (distance, index) order. The reference
// is streamed in column blocks with a running best-k list, so no temporary exceeds ~4M
// elements however many rows are redone (ldreg_kernels._host.exhaustive does the same).
void redo_exhaustive(const at::Tensor& x, const at::Tensor& ref, const at::Tensor& rows,
                     int64_t k, int64_t self_offset, bool exclude_self, at::Tensor& dist,
                     at::Tensor& idx);

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& x, const at::Tensor& ref, int64_t k,
                                           int64_t self_offset, bool exclude_self);
std::tuple<at::Tensor, at::Tensor> knn_backward_cpu(const at::Tensor& grad_dist,
                                                    const at::Tensor& x, const at::Tensor& ref,
                                                    const at::Tensor& idx, const at::Tensor& dist,
                                                    bool need_ref_grad);

#ifdef LDREG_WITH_CUDA
// CUDART_VERSION seen by nvcc when csrc/cuda/ was compiled.
int64_t cudart_version_compiled();
#endif

}  // namespace ldreg
