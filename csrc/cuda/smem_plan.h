// Shared-memory plan of the CUDA kNN kernels (knn_cuda.cu): the dynamic shared memory each
// launch asks for, and when a launch needs the opt-in attribute. Plain C++ with no CUDA or
// torch dependency, so that tools/gpu_aot.py (make gpu-aot) compiles this header alone and
// checks the rule for every k, static shared memory from ptxas included, without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ldreg::cuda_smem {

constexpr int64_t kMaxK = 4096;   // largest k of the cuda backend
constexpr int kSelThreads = 256;  // select_kernel block (multiple of 32: warp ballots)
// A block may use at most 48 KiB of shared memory, static and dynamic together, unless the
// kernel was given cudaFuncAttributeMaxDynamicSharedMemorySize.
constexpr size_t kNoOptinBytes = 48 * 1024;

constexpr int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

struct Plan {
  int64_t cap;          // select_kernel buffer entries: room for m + one pass of kSelThreads
  int64_t p2;           // rerank_kernel sort entries
  size_t select_bytes;  // dynamic shared memory of select_kernel
  size_t rerank_bytes;  // dynamic shared memory of rerank_kernel
};

// m = min(k + margin, n_valid) candidates per row; entries are (acc_t, int32) pairs.
constexpr Plan plan(int64_t m, size_t acc_size) {
  const size_t ent = acc_size + sizeof(int);
  const int64_t cap = next_pow2(m + kSelThreads), p2 = next_pow2(m);
  return {cap, p2, static_cast<size_t>(cap) * ent, static_cast<size_t>(p2) * ent};
}

// Whether a launch with this much dynamic shared memory, on a kernel with this much static
// shared memory, must first raise cudaFuncAttributeMaxDynamicSharedMemorySize.
constexpr bool needs_optin(size_t dynamic_bytes, size_t static_bytes) {
  return dynamic_bytes + static_bytes > kNoOptinBytes;
}

}  // namespace ldreg::cuda_smem
