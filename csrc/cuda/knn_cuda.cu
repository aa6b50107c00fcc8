// CUDA kNN: cuBLAS score tiles + per-row shared-memory candidate buffer, exact re-rank,
// sparse backward. Same algorithm and semantics as csrc/cpu/knn_cpu.cpp.
//
// Forward, per call:
//   1. Centre x and ref on the reference mean (distances are translation invariant; it
//      shrinks the cancellation in |r|^2 - 2 x.r). The reference is tiled into blocks of NB
//      rows and the queries into blocks of QB rows (QB * NB <= 4M scores); one at::addmm
//      (cuBLAS) per tile gives the (QB x NB) scores |r_j|^2 - 2 x_i.r_j in fp32 (fp64 for
//      double input). Never B x N.
//   2. select_kernel, one thread block per query row and tile, keeps the row's m = k + margin
//      smallest (score, index) pairs across tiles (state in global memory: O(B * m)). The
//      tile row is read in passes of kSelThreads scores; scores <= the row's threshold (and
//      not the row's own index) are appended to a shared buffer of `cap` >= m + kSelThreads
//      entries with a warp ballot. Before a pass that could overflow it, and at the end of a
//      tile that added candidates, the buffer is bitonic-sorted by (score, index), cut to m,
//      and the threshold drops to the m-th score. So the buffer can never overflow, and every
//      dropped reference row has a score >= the largest kept one.
//   3. rerank_kernel, one block per query row: exact distances of the m candidates by direct
//      differences (one warp per candidate, lanes stride over D, fp32 accumulation, fp64 for
//      double), bitonic sort by (distance, index) - exact ties go to the lower index, NaN
//      last - and the first k are written. It also flags rows where an unseen reference row
//      could still tie or beat the k-th neighbour within matmul rounding (the certificate,
//      knn.h): w^2 >= bound - c (|x_i|^2 + max_j |r_j|^2), bound = largest kept approximate
//      squared distance, c = certificate_coef(D, eps of the accumulation, 2^-10 when TF32 is
//      allowed for cuBLAS). Those rows are redone by redo_exhaustive (ATen, direct
//      differences against every reference row, streamed in bounded blocks).
// Backward: backward_coef_kernel, one thread per query row, forms the row's coefficients
// (g s) / r and 1 / s, s a power of two from the row's largest |g| (grad_row_scale in
// knn.h: g / r itself overflows or underflows at extreme feature scales). Then one block per query row, threads over features; grad_x_i in a register per
// feature (fixed order: deterministic); grad_ref by atomicAdd into an fp32/fp64 buffer
// (relaxed, run-to-run order varies). Under torch.use_deterministic_algorithms(True)
// grad_ref is a sorted segment reduction instead: the (query, neighbour) pairs are sorted by
// neighbour (stable: by query within it), and one block per reference row sums its segment
// in that order (backward_ref_sorted_kernel): bit-identical from run to run.
//
// Limits: k <= kMaxK = 4096. The selection buffer needs nextpow2(m + 256) entries and the
// re-rank buffer nextpow2(m) entries of (acc_t, int32) in shared memory (smem_plan.h): at
// k = 4096 (m = 5120) that is 8192 entries = 96 KiB (fp32: 64 KiB). A launch whose dynamic
// plus static shared memory exceeds 48 KiB is opted in with cudaFuncSetAttribute (static
// size queried with cudaFuncGetAttributes); A100 (163 KiB) and H100 (227 KiB) allow it.
// The device's opt-in limit is checked at run time with a clear error. make gpu-aot checks
// both rules for every k <= kMaxK against ptxas's static sizes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <type_traits>

#include "../knn.h"
#include "smem_plan.h"

#ifndef CUDA_KERNEL_ASSERT
#include <cassert>
#define CUDA_KERNEL_ASSERT(cond) assert(cond)
#endif

namespace ldreg {

int64_t cudart_version_compiled() { return CUDART_VERSION; }

namespace {

constexpr int64_t kScoreElems = int64_t{1} << 22;  // 16 MiB of fp32 scores per tile
constexpr int64_t kMaxQueryBlock = 8192;
using cuda_smem::kMaxK;
using cuda_smem::kSelThreads;
using cuda_smem::next_pow2;
constexpr int kRerankThreads = 256;  // rerank_kernel block: 8 warps, one candidate each
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ bool is_nan(T v) { return v != v; }

__device__ __forceinline__ float dev_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double dev_sqrt(double v) { return sqrt(v); }

// Total order on (key, index): non-NaN keys ascending, then NaN; equal keys by index.
template <typename acc_t>
__device__ __forceinline__ bool key_less(acc_t a, int ia, acc_t b, int ib) {
  const bool an = is_nan(a), bn = is_nan(b);
  if (an != bn) return bn;
  if (!an && a != b) return a < b;
  return ia < ib;
}

// Ascending bitonic sort of key/id[0, p), p a power of two, in shared memory. Every thread
// of the block must call it; the caller syncs before (data written), it syncs after.
template <typename acc_t>
__device__ void bitonic_sort(acc_t* key, int* id, int p) {
  for (int size = 2; size <= p; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < (p >> 1); t += blockDim.x) {
        const int lo = 2 * t - (t & (stride - 1));
        const int hi = lo + stride;
        const bool asc = (lo & size) == 0;
        const acc_t klo = key[lo], khi = key[hi];
        const int ilo = id[lo], ihi = id[hi];
        const bool swap = asc ? key_less(khi, ihi, klo, ilo) : key_less(klo, ilo, khi, ihi);
        if (swap) {
          key[lo] = khi;
          key[hi] = klo;
          id[lo] = ihi;
          id[hi] = ilo;
        }
      }
      __syncthreads();
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
  for (int o = 16; o > 0; o >>= 1) {
    const acc_t u = __shfl_xor_sync(kFullMask, v, o);
    v = u > v ? u : v;
  }
  return v;
}

// Sorts the f buffered candidates, keeps the m smallest, lowers the threshold to the m-th.
// f is block-uniform; all threads call; ends synchronised.
template <typename acc_t>
__device__ void merge_buffer(acc_t* key, int* id, int f, int m, int* fill_s, acc_t* thr_s,
                             int* dirty_s) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  int p = 1;
  while (p < f) p <<= 1;  // p <= cap: f <= cap and cap is a power of two
  for (int c = f + threadIdx.x; c < p; c += blockDim.x) {
    key[c] = inf;
    id[c] = INT_MAX;  // after every real index (n < 2^31 - 1)
  }
  __syncthreads();
  bitonic_sort(key, id, p);
  if (threadIdx.x == 0) {
    *fill_s = f < m ? f : m;
    *thr_s = f >= m ? key[m - 1] : inf;
    *dirty_s = 0;
  }
  __syncthreads();
}

// One block per query row of the tile. State per row (global): cand_n[row] <= m entries in
// cand_d/cand_i (sorted and exactly m once the row has seen m candidates) and the
// threshold cand_t[row] (+inf while fewer than m).
template <typename acc_t>
__global__ void __launch_bounds__(kSelThreads)
select_kernel(const acc_t* __restrict__ score, int64_t ld, int64_t q0, int64_t j0, int jn,
              acc_t* __restrict__ cand_d, int* __restrict__ cand_i, int* __restrict__ cand_n,
              acc_t* __restrict__ cand_t, int m, int cap, int64_t self_offset,
              bool exclude_self) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* key = reinterpret_cast<acc_t*>(smem_raw);
  int* id = reinterpret_cast<int*>(key + cap);
  __shared__ int fill_s, dirty_s;
  __shared__ acc_t thr_s;
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();

  const int tid = threadIdx.x, lane = tid & 31;
  const int64_t row = q0 + blockIdx.x;
  // Own row as a column of this tile (out of [0, jn) when it lies in another tile).
  const int64_t own = exclude_self ? row + self_offset - j0 : -1;
  const acc_t* srow = score + static_cast<int64_t>(blockIdx.x) * ld;
  acc_t* rd = cand_d + row * m;
  int* ri = cand_i + row * m;

  const int f0 = cand_n[row];
  for (int c = tid; c < f0; c += blockDim.x) {
    key[c] = rd[c];
    id[c] = ri[c];
  }
  if (tid == 0) {
    fill_s = f0;
    thr_s = cand_t[row];
    dirty_s = 0;
  }
  __syncthreads();

  for (int jb = 0; jb < jn; jb += blockDim.x) {
    const int f = fill_s;
    __syncthreads();  // everyone has read fill_s before anyone appends
    if (f + static_cast<int>(blockDim.x) > cap) merge_buffer(key, id, f, m, &fill_s, &thr_s, &dirty_s);
    const acc_t t = thr_s;
    const int j = jb + tid;
    bool take = false;
    acc_t s = inf;
    if (j < jn) {
      s = srow[j];
      if (is_nan(s)) s = inf;  // NaN scores rank last but still fill a short row
      take = s <= t && static_cast<int64_t>(j) != own;
    }
    const unsigned ball = __ballot_sync(kFullMask, take);
    if (ball != 0u) {
      int base = 0;
      if (lane == 0) {
        base = atomicAdd(&fill_s, __popc(ball));
        dirty_s = 1;
      }
      base = __shfl_sync(kFullMask, base, 0);
      if (take) {
        const int pos = base + __popc(ball & ((1u << lane) - 1u));
        key[pos] = s;
        id[pos] = static_cast<int>(j0 + j);
      }
    }
    __syncthreads();
  }

  const int f = fill_s, dirty = dirty_s;
  __syncthreads();
  if (dirty && f >= m) merge_buffer(key, id, f, m, &fill_s, &thr_s, &dirty_s);
  const int fn = fill_s;  // <= m
  for (int c = tid; c < fn; c += blockDim.x) {
    rd[c] = key[c];
    ri[c] = id[c];
  }
  if (tid == 0) {
    cand_n[row] = fn;
    cand_t[row] = thr_s;
  }
}

// One block per query row: exact distances of the m candidates, (distance, index) sort,
// first k out, near-tie flag.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRerankThreads)
rerank_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ ref, int64_t dim,
              const acc_t* __restrict__ cand_d, const int* __restrict__ cand_i, int m, int p2,
              int k, const acc_t* __restrict__ sqx, const acc_t* __restrict__ max_sqr,
              acc_t err_scale, bool check, acc_t* __restrict__ dist, int64_t* __restrict__ idx,
              bool* __restrict__ redo) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* key = reinterpret_cast<acc_t*>(smem_raw);
  int* id = reinterpret_cast<int*>(key + p2);
  __shared__ acc_t red[32];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * dim;
  const acc_t* rd = cand_d + row * m;
  const int* ri = cand_i + row * m;

  for (int c = warp; c < m; c += nwarps) {
    const int j = ri[c];
    const scalar_t* rr = ref + static_cast<int64_t>(j) * dim;
    acc_t s = 0;
    for (int64_t d = lane; d < dim; d += 32) {
      const acc_t t = static_cast<acc_t>(xr[d]) - static_cast<acc_t>(rr[d]);
      s += t * t;
    }
    s = warp_sum(s);
    if (lane == 0) {
      key[c] = dev_sqrt(s);
      id[c] = j;
    }
  }
  for (int c = m + tid; c < p2; c += blockDim.x) {
    key[c] = std::numeric_limits<acc_t>::quiet_NaN();
    id[c] = INT_MAX;
  }
  // Largest kept approximate score: no dropped reference row scored lower.
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int c = tid; c < m; c += blockDim.x) {
    const acc_t v = rd[c];
    mx = v > mx ? v : mx;
  }
  mx = warp_max(mx);
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  bitonic_sort(key, id, p2);

  for (int c = tid; c < k; c += blockDim.x) {
    dist[row * k + c] = key[c];
    idx[row * k + c] = id[c];
  }
  if (tid == 0) {
    acc_t top = red[0];
    for (int w = 1; w < nwarps; ++w) top = red[w] > top ? red[w] : top;
    const acc_t bound = top + sqx[row];
    const acc_t w = key[k - 1];
    redo[row] = check && !certified<acc_t>(w, bound, sqx[row] + *max_sqr, err_scale);
  }
}

// One thread per query row: the row's scaled coefficients (g s) / r and 1 / s
// (backward_row_coef in knn.h). k is small next to D, and this is O(B k) of the work.
template <typename acc_t>
__global__ void backward_coef_kernel(const acc_t* __restrict__ grad, const acc_t* __restrict__ dist, int64_t b,
                                     int64_t k, acc_t* __restrict__ coef, acc_t* __restrict__ inv) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= b) return;
  inv[row] = backward_row_coef<acc_t>(grad + row * k, dist + row * k, k, coef + row * k);
}

// One block per query row, threads over features. coef is scaled by the row's s and
// inv = 1 / s, an exact power of two: multiplying by it is the division by s, applied to
// the row's sum (grad_x) and to each grad_ref contribution.
template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const acc_t* __restrict__ coef, const acc_t* __restrict__ inv,
                                const scalar_t* __restrict__ x, const scalar_t* __restrict__ ref,
                                const int64_t* __restrict__ idx, int64_t k, int64_t dim, int64_t n,
                                acc_t* __restrict__ gx, acc_t* __restrict__ gref) {
  const int64_t row = blockIdx.x;
  const acc_t* cr = coef + row * k;
  const int64_t* ir = idx + row * k;
  const acc_t iv = inv[row];
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    const acc_t xd = static_cast<acc_t>(x[row * dim + d]);
    acc_t acc = 0;
    for (int64_t c = 0; c < k; ++c) {
      const acc_t cf = cr[c];
      if (cf == 0) continue;
      const int64_t j = ir[c];
      CUDA_KERNEL_ASSERT(j >= 0 && j < n);
      const acc_t v = cf * (xd - static_cast<acc_t>(ref[j * dim + d]));
      acc += v;
      if (gref != nullptr) atomicAdd(gref + j * dim + d, -(v * iv));
    }
    gx[row * dim + d] = acc * iv;
  }
}

// grad_ref without atomics: one block per reference row j, threads over features; the
// pairs order[start[j] .. start[j + 1]) (flat indices i * k + c into idx, sorted by (j, i))
// are summed in that order. The terms are the same expressions as backward_kernel's.
template <typename scalar_t, typename acc_t>
__global__ void backward_ref_sorted_kernel(const acc_t* __restrict__ coef, const acc_t* __restrict__ inv,
                                           const scalar_t* __restrict__ x, const scalar_t* __restrict__ ref,
                                           const int64_t* __restrict__ order,
                                           const int64_t* __restrict__ start, int64_t k, int64_t dim,
                                           acc_t* __restrict__ gref) {
  const int64_t j = blockIdx.x;
  const int64_t p0 = start[j], p1 = start[j + 1];
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    const acc_t rd = static_cast<acc_t>(ref[j * dim + d]);
    acc_t acc = 0;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t e = order[p];
      const acc_t cf = coef[e];
      if (cf == 0) continue;
      const int64_t i = e / k;
      acc += (cf * (static_cast<acc_t>(x[i * dim + d]) - rd)) * inv[i];
    }
    gref[j * dim + d] = -acc;
  }
}

// Prepares a launch of `kernel` with `bytes` of dynamic shared memory: a clear error where
// the device cannot give that much, and the opt-in attribute where dynamic plus static
// shared memory exceeds 48 KiB (without it such a launch fails). Every launch with dynamic
// shared memory goes through here (make gpu-aot checks it).
template <typename Kernel>
void prepare_smem(Kernel kernel, size_t bytes, int device, int64_t k, const char* what) {
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK_VALUE(bytes + attr.sharedSizeBytes <= static_cast<size_t>(optin), "knn (cuda): k=", k,
                    " needs ", bytes, " + ", attr.sharedSizeBytes, " bytes of shared memory for the ",
                    what, " buffer, more than this device allows per block (", optin,
                    "); use a smaller k or backend='torch'");
  if (cuda_smem::needs_optin(bytes, attr.sharedSizeBytes)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

template <typename scalar_t, typename acc_t>
void knn_cuda_impl(const at::Tensor& x, const at::Tensor& ref, int64_t k, int64_t self_offset,
                   bool exclude_self, at::Tensor& dist, at::Tensor& idx) {
  const int64_t b = x.size(0), n = ref.size(0), dim = x.size(1);
  const int64_t n_valid = n - (exclude_self ? 1 : 0);
  const int64_t m = std::min(k + default_margin(k), n_valid);
  const auto ct = dist.scalar_type();
  const int device = x.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  const cuda_smem::Plan plan = cuda_smem::plan(m, sizeof(acc_t));
  const int64_t cap = plan.cap, p2 = plan.p2;
  const size_t smem_sel = plan.select_bytes, smem_rr = plan.rerank_bytes;
  prepare_smem(select_kernel<acc_t>, smem_sel, device, k, "selection");
  prepare_smem(rerank_kernel<scalar_t, acc_t>, smem_rr, device, k, "re-rank");

  const at::Tensor mu = at::mean(ref, {0}, /*keepdim=*/false, ct);
  const at::Tensor xs = x.to(ct) - mu;
  const at::Tensor sqx = (xs * xs).sum(1).contiguous();
  const int64_t qb = std::min<int64_t>(b, kMaxQueryBlock);
  const int64_t nb = std::min<int64_t>(n, std::max<int64_t>(256, kScoreElems / qb));

  const auto fopt = x.options().dtype(ct);
  at::Tensor cand_d = at::empty({b, m}, fopt);
  at::Tensor cand_i = at::empty({b, m}, x.options().dtype(at::kInt));
  at::Tensor cand_n = at::zeros({b}, x.options().dtype(at::kInt));
  at::Tensor cand_t = at::full({b}, std::numeric_limits<double>::infinity(), fopt);
  at::Tensor max_sqr = at::zeros({}, fopt);

  for (int64_t q0 = 0; q0 < b; q0 += qb) {
    const int64_t qn = std::min(qb, b - q0);
    const at::Tensor xq = xs.narrow(0, q0, qn);
    for (int64_t j0 = 0; j0 < n; j0 += nb) {
      const int64_t jn = std::min(nb, n - j0);
      const at::Tensor rt = ref.narrow(0, j0, jn).to(ct) - mu;
      const at::Tensor sqr = (rt * rt).sum(1);
      if (q0 == 0) max_sqr = at::maximum(max_sqr, sqr.max());
      const at::Tensor score = at::addmm(sqr.unsqueeze(0), xq, rt.t(), 1, -2).contiguous();
      select_kernel<acc_t><<<static_cast<unsigned>(qn), kSelThreads, smem_sel, stream>>>(
          score.data_ptr<acc_t>(), jn, q0, j0, static_cast<int>(jn), cand_d.data_ptr<acc_t>(),
          cand_i.data_ptr<int>(), cand_n.data_ptr<int>(), cand_t.data_ptr<acc_t>(),
          static_cast<int>(m), static_cast<int>(cap), self_offset, exclude_self);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  // cuBLAS rounds fp32 inputs to TF32 (10-bit mantissa) when the user allowed it.
  const bool tf32 = std::is_same_v<acc_t, float> && at::globalContext().allowTF32CuBLAS();
  const acc_t err_scale = static_cast<acc_t>(
      certificate_coef(dim, std::numeric_limits<acc_t>::epsilon(), tf32 ? 1.0 / 1024.0 : 0.0));
  const bool check = m < n_valid;
  at::Tensor redo = at::empty({b}, x.options().dtype(at::kBool));
  rerank_kernel<scalar_t, acc_t><<<static_cast<unsigned>(b), kRerankThreads, smem_rr, stream>>>(
      x.data_ptr<scalar_t>(), ref.data_ptr<scalar_t>(), dim, cand_d.data_ptr<acc_t>(),
      cand_i.data_ptr<int>(), static_cast<int>(m), static_cast<int>(p2), static_cast<int>(k),
      sqx.data_ptr<acc_t>(), max_sqr.data_ptr<acc_t>(), err_scale, check,
      dist.data_ptr<acc_t>(), idx.data_ptr<int64_t>(), redo.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (check) {
    const at::Tensor rows = at::nonzero(redo).flatten();  // synchronises
    if (rows.numel() > 0) redo_exhaustive(x, ref, rows, k, self_offset, exclude_self, dist, idx);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& x_, const at::Tensor& ref_, int64_t k,
                                            int64_t self_offset, bool exclude_self) {
  check_knn_args(x_, ref_, k, self_offset, exclude_self);
  TORCH_CHECK_VALUE(x_.is_cuda(), "knn_cuda needs CUDA tensors, got ", x_.device());
  TORCH_CHECK_VALUE(k <= kMaxK, "the cuda backend supports k <= ", kMaxK,
                    " (its candidate buffer lives in shared memory), got k=", k,
                    "; use backend='torch' for larger k");
  const c10::cuda::CUDAGuard guard(x_.device());
  // The range rule (knn_in_range in knn.h): scaled where needed, small distances checked.
  return knn_in_range(x_, ref_, [&](const at::Tensor& x, const at::Tensor& ref) {
    at::Tensor dist, idx;
    std::tie(dist, idx) = empty_knn_outputs(x, k);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ldreg_knn_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      knn_cuda_impl<scalar_t, acc_t>(x, ref, k, self_offset, exclude_self, dist, idx);
    });
    return std::make_tuple(dist, idx);
  });
}

std::tuple<at::Tensor, at::Tensor> knn_backward_cuda(const at::Tensor& grad_dist,
                                                     const at::Tensor& x_, const at::Tensor& ref_,
                                                     const at::Tensor& idx_, const at::Tensor& dist_,
                                                     bool need_ref_grad) {
  check_backward_args(grad_dist, x_, ref_, idx_, dist_);
  TORCH_CHECK_VALUE(x_.is_cuda(), "knn_backward_cuda needs CUDA tensors, got ", x_.device());
  for (const at::Tensor* t : {&grad_dist, &ref_, &idx_, &dist_}) {
    TORCH_CHECK_VALUE(t->device() == x_.device(), "knn_backward_cuda: all tensors must be on ",
                      x_.device(), ", got one on ", t->device());
  }
  TORCH_CHECK_TYPE(x_.scalar_type() == ref_.scalar_type(), "x and ref must have the same dtype: x is ",
                   x_.scalar_type(), ", ref is ", ref_.scalar_type());
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), ref = ref_.contiguous(), idx = idx_.contiguous();
  const at::Tensor dist = dist_.contiguous();
  const int64_t b = x.size(0), dim = x.size(1), k = idx.size(1), n = ref.size(0);
  const at::Tensor grad = grad_dist.to(dist.scalar_type()).contiguous();
  const at::Tensor coef = at::empty({b, k}, dist.options());
  const at::Tensor inv = at::empty({b}, dist.options());
  at::Tensor gx, gref;
  std::tie(gx, gref) = zero_grad_buffers(x, ref, dist, need_ref_grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ldreg_knn_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK_TYPE(dist.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                     "dist must be float64 for float64 x, else float32");
    // Deterministic mode: no atomics for grad_ref (sorted segment reduction below).
    const bool sorted_ref = need_ref_grad && at::globalContext().deterministicAlgorithms();
    if (b > 0 && dim > 0) {
      const int threads = static_cast<int>(std::clamp<int64_t>(next_pow2(dim), 32, 256));
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
      constexpr int kCoefThreads = 256;
      backward_coef_kernel<acc_t><<<static_cast<unsigned>((b + kCoefThreads - 1) / kCoefThreads), kCoefThreads, 0,
                                    stream>>>(grad.data_ptr<acc_t>(), dist.data_ptr<acc_t>(), b, k,
                                              coef.data_ptr<acc_t>(), inv.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(b), threads, 0, stream>>>(
          coef.data_ptr<acc_t>(), inv.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), ref.data_ptr<scalar_t>(),
          idx.data_ptr<int64_t>(), k, dim, n, gx.data_ptr<acc_t>(),
          need_ref_grad && !sorted_ref ? gref.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (sorted_ref && n > 0 && k > 0) {
        // Stable sort of the flat neighbour indices: pairs grouped by reference row, by
        // query within a row. Segment starts by binary search (bincount would use atomics).
        // Indices outside [0, n) (backward_kernel asserts on those it uses) fall outside
        // every segment [start[j], start[j + 1]) and are never read.
        const auto sorted = idx.reshape({-1}).sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
        const at::Tensor order = std::get<1>(sorted).contiguous();
        const at::Tensor start = at::searchsorted(std::get<0>(sorted), at::arange(n + 1, idx.options())).contiguous();
        backward_ref_sorted_kernel<scalar_t, acc_t><<<static_cast<unsigned>(n), threads, 0, stream>>>(
            coef.data_ptr<acc_t>(), inv.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), ref.data_ptr<scalar_t>(),
            order.data_ptr<int64_t>(), start.data_ptr<int64_t>(), k, dim, gref.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return finish_grads(gx, gref, x, ref);
}

}  // namespace ldreg

TORCH_LIBRARY_IMPL(ldreg, CUDA, m) {
  m.impl("knn_native", &ldreg::knn_cuda);
  m.impl("knn_backward_native", &ldreg::knn_backward_cuda);
}
