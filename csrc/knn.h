// Shared declarations of the ldreg native kNN kernels (CPU and CUDA).
//
// Op schemas (declared once, in knn.cpp) mirror the Python custom ops in
// ldreg_kernels/ops.py:
//   ldreg::knn_native(Tensor x, Tensor ref, int k, int self_offset, bool exclude_self)
//       -> (Tensor dist, Tensor idx)
//   ldreg::knn_backward_native(Tensor grad_dist, Tensor x, Tensor ref, Tensor idx,
//       Tensor dist, bool need_ref_grad) -> (Tensor grad_x, Tensor grad_ref)
// Semantics: see ldreg_kernels/torch_impl.py (the "torch" backend) and reference.py.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace ldreg {

// Extra candidates kept past k so that inexact selection cannot lose a true neighbour.
// Must equal ldreg_kernels.torch_impl.default_margin.
inline int64_t default_margin(int64_t k) { return k / 4 > 8 ? k / 4 : 8; }

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

// Rows whose selection was not provably exact are redone here: exact direct-difference
// distances to every reference row (cdist without the mm expansion), own row masked,
// stable sort (ties to the lower index). Chunked so no temporary exceeds ~4M elements.
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
