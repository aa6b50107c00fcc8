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

#include <limits>
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

// Inputs whose largest magnitude m lies outside [2^-kRangeExp, 2^kRangeExp] (per the
// kernel's arithmetic: fp64 for double input, else fp32) are multiplied by a power of two
// that brings m into [1, 2): there squared distances can neither overflow nor underflow.
// Distances are scale-equivariant and the product is exact, so the result is the same,
// bit for bit, up to that power of two. Same windows as _host.RANGE_EXP.
constexpr int kRangeExpFloat = 32;
constexpr int kRangeExpDouble = 256;

struct RangeScale {
  double scale = 1.0;    // the inputs are multiplied by scale, the distances divided
  double max_abs = 0.0;  // m, for the error message
  // t * scale, or t itself when no scaling is needed.
  at::Tensor apply(const at::Tensor& t) const;
  // dist / scale in place; ValueError when float32 cannot hold the distances.
  void unscale(at::Tensor& dist) const;
};

// Raises ValueError (the Python API's message) if x or ref holds NaN or Inf (one device
// sync for both), else the scaling above. Same as _host.range_scale.
RangeScale range_scale(const at::Tensor& x, const at::Tensor& ref);

// Validates shapes/dtypes/devices/k for direct C++ callers; Python validates first with
// friendlier messages. Throws c10::ValueError / c10::TypeError.
void check_knn_args(const at::Tensor& x, const at::Tensor& ref, int64_t k, int64_t self_offset,
                    bool exclude_self);

// Empty forward outputs: dist (B, k) in the compute dtype (double for double x, else float,
// so half/bf16 inputs get float distances) and idx (B, k) int64.
std::tuple<at::Tensor, at::Tensor> empty_knn_outputs(const at::Tensor& x, int64_t k);

// Backward coefficients g_ij / r_ij in dist's dtype; 0 where r_ij == 0 (the subgradient
// torch.cdist uses: a coincident neighbour has no direction).
at::Tensor backward_coef(const at::Tensor& grad_dist, const at::Tensor& dist);

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
