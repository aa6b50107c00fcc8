// CPU kNN: BLAS score tiles + per-row threshold buffer, exact re-rank, sparse backward.
//
// Forward, per call:
//   1. Centre on the reference mean (distances are translation invariant; it shrinks the
//      cancellation in |r|^2 - 2 x.r). Tile the reference into blocks of NB rows; for each
//      tile one at::addmm gives the (QB x NB) scores, then at::parallel_for over query
//      rows filters them into a per-row buffer that keeps the m = k + margin smallest
//      (threshold + nth_element). Memory: one score tile (<= 1M elements) plus O(B * m)
//      buffers; never B x N.
//   2. Per row, exact distances of the m candidates by direct differences (float for
//      float/half/bf16 input, double for double), lexicographic (distance, index) order,
//      keep k. Rows where an unseen reference row could still tie or beat the k-th
//      neighbour within matmul rounding (the certificate, knn.h) are redone exhaustively:
//      exact distances to every reference row, streamed through a 2k-entry buffer per
//      thread, so a collapsed batch (every row redone) costs no B x N memory.
// Backward: grad_x by rows; grad_ref by column blocks, so threads never write the same
// element and the sum order is fixed (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../knn.h"

namespace ldreg {
namespace {

constexpr int64_t kScoreElems = int64_t{1} << 20;  // 4 MiB of fp32 scores per tile
constexpr int64_t kFilterBlock = 32;

template <typename acc_t>
struct Cand {
  acc_t d;
  int64_t i;
  bool operator<(const Cand& o) const { return d < o.d || (d == o.d && i < o.i); }
};

// ||a - b||^2 with eight independent accumulators (vectorisable without -ffast-math).
template <typename scalar_t, typename acc_t>
inline acc_t sqdist(const scalar_t* a, const scalar_t* b, int64_t d) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    for (int u = 0; u < 8; ++u) {
      const acc_t t = static_cast<acc_t>(a[j + u]) - static_cast<acc_t>(b[j + u]);
      s[u] += t * t;
    }
  }
  for (; j < d; ++j) {
    const acc_t t = static_cast<acc_t>(a[j]) - static_cast<acc_t>(b[j]);
    s[0] += t * t;
  }
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// A score t with at least m of s[0..n) (skipping s[skip]) <= t. A 64-bucket histogram of
// a strided sample (at most ~512 scores; branch-free, unlike nth_element) proposes bucket
// edges; an exact vectorisable count over all n accepts the first edge that reaches m.
template <typename acc_t>
acc_t histogram_threshold(const acc_t* s, int64_t n, int64_t skip, int64_t m) {
  constexpr int kBuckets = 64;
  acc_t lo = std::numeric_limits<acc_t>::infinity(), hi = -lo;
  for (int64_t j = 0; j < n; ++j) {
    lo = std::min(lo, s[j]);
    hi = std::max(hi, s[j]);
  }
  if (!(hi > lo)) return hi;
  const acc_t width = (hi - lo) / kBuckets;
  const acc_t scale = 1 / width;
  const int64_t stride = std::max<int64_t>(1, n / 512);
  int32_t cnt[kBuckets] = {};
  for (int64_t j = 0; j < n; j += stride) {
    ++cnt[std::min<int64_t>(static_cast<int64_t>((s[j] - lo) * scale), kBuckets - 1)];
  }
  // Aim the sample at a little over m: the exact count below rarely needs a second edge.
  const int64_t want = (m + 1) * 5 / (4 * stride) + 1;
  int64_t cum = 0;
  int bk = 0;
  for (; bk < kBuckets - 1; ++bk) {
    cum += cnt[bk];
    if (cum >= want) break;
  }
  for (; bk < kBuckets - 1; ++bk) {
    const acc_t t = lo + static_cast<acc_t>(bk + 1) * width;
    int64_t le = 0;
    for (int64_t j = 0; j < n; ++j) le += s[j] <= t;
    if (skip >= 0 && skip < n && s[skip] <= t) --le;
    if (le >= m) return t;
  }
  return hi;
}

// The float case dominates the re-rank: compile it for AVX2 as well and let the loader
// pick at run time (GCC function multiversioning), so the wheel still runs on any x86-64.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
float sqdist_f32(const float* a, const float* b, int64_t d) {
  return sqdist<float, float>(a, b, d);
}

template <typename scalar_t, typename acc_t>
inline acc_t exact_sqdist(const scalar_t* a, const scalar_t* b, int64_t d) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return sqdist_f32(a, b, d);
  } else {
    return sqdist<scalar_t, acc_t>(a, b, d);
  }
}

// Exact kNN of one query against every reference row but `own`, in (distance, index)
// order, through `tmp` (2k entries): candidates are appended until it fills, then an
// nth_element keeps the k smallest. Reference rows arrive in index order, so once k are
// kept a later row enters only if strictly closer than the k-th (it loses a tie).
template <typename scalar_t, typename acc_t>
void exhaustive_row(const scalar_t* xr, const scalar_t* rp, int64_t n, int64_t dim, int64_t k,
                    int64_t own, Cand<acc_t>* tmp, acc_t* dout, int64_t* iout) {
  int64_t cnt = 0;
  bool kept = false;
  acc_t thr = std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    if (j == own) continue;
    const acc_t d = std::sqrt(exact_sqdist<scalar_t, acc_t>(xr, rp + j * dim, dim));
    if (kept ? !(d < thr) : !(d <= thr)) continue;
    tmp[cnt++] = {d, j};
    if (cnt == 2 * k) {
      std::nth_element(tmp, tmp + (k - 1), tmp + cnt);
      cnt = k;
      kept = true;
      thr = tmp[k - 1].d;
    }
  }
  std::partial_sort(tmp, tmp + k, tmp + cnt);
  for (int64_t c = 0; c < k; ++c) {
    dout[c] = tmp[c].d;
    iout[c] = tmp[c].i;
  }
}

template <typename scalar_t, typename acc_t>
void knn_cpu_impl(const at::Tensor& x, const at::Tensor& ref, int64_t k, int64_t self_offset,
                  bool exclude_self, at::Tensor& dist, at::Tensor& idx) {
  const int64_t b = x.size(0), n = ref.size(0), dim = x.size(1);
  const int64_t n_valid = n - (exclude_self ? 1 : 0);
  const int64_t m = std::min(k + default_margin(k), n_valid);
  const auto ct = dist.scalar_type();

  const at::Tensor mu = at::mean(ref, {0}, /*keepdim=*/false, ct);
  const at::Tensor xs = x.to(ct) - mu;
  const at::Tensor sqx = (xs * xs).sum(1);
  // Wide reference tiles: the first tile's histogram threshold is then close to the final
  // one, so few scores pass the filter afterwards. Query rows fill the score budget.
  const int64_t nb = std::min<int64_t>(n, 4096);
  const int64_t qb = std::min<int64_t>(b, std::max<int64_t>(64, kScoreElems / nb));

  // Per row: a buffer of up to 2m candidates below the row's threshold. When it fills, an
  // nth_element keeps the m smallest and the threshold drops to the m-th score. Amortised
  // O(1) per accepted score, and the common case is one predictable compare per score.
  const int64_t cap = 2 * m + kFilterBlock;  // shrink at 2m; one block of slack for the writes
  std::vector<Cand<acc_t>> buf(static_cast<size_t>(b * cap));
  std::vector<int64_t> count(static_cast<size_t>(b), 0);
  std::vector<acc_t> thr(static_cast<size_t>(b), std::numeric_limits<acc_t>::infinity());
  auto shrink = [&](int64_t row) {
    Cand<acc_t>* c = buf.data() + row * cap;
    const auto by_score = [](const Cand<acc_t>& a, const Cand<acc_t>& b) { return a.d < b.d; };
    std::nth_element(c, c + (m - 1), c + count[row], by_score);
    count[row] = m;
    thr[row] = c[m - 1].d;
  };
  acc_t max_sqr = 0;

  for (int64_t q0 = 0; q0 < b; q0 += qb) {
    const int64_t qn = std::min(qb, b - q0);
    const at::Tensor xq = xs.narrow(0, q0, qn);
    for (int64_t j0 = 0; j0 < n; j0 += nb) {
      const int64_t jn = std::min(nb, n - j0);
      const at::Tensor rt = ref.narrow(0, j0, jn).to(ct) - mu;
      const at::Tensor sqr = (rt * rt).sum(1);
      if (q0 == 0) max_sqr = std::max(max_sqr, sqr.max().template item<acc_t>());
      const at::Tensor score = at::addmm(sqr.unsqueeze(0), xq, rt.t(), 1, -2).contiguous();
      const acc_t* sp = score.data_ptr<acc_t>();
      at::parallel_for(0, qn, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t row = q0 + r;
          const int64_t own = exclude_self ? row + self_offset : -1;
          Cand<acc_t>* c = buf.data() + row * cap;
          const acc_t* srow = sp + r * jn;
          int64_t cnt = count[row];
          if (cnt == 0 && jn - (own >= j0 && own < j0 + jn ? 1 : 0) >= m) {
            // First tile of this row: the m-th smallest score of any subset bounds the
            // global m-th from above, so it is a valid (and already tight) threshold.
            thr[row] = histogram_threshold(srow, jn, own - j0, m);
          }
          acc_t t = thr[row];
          for (int64_t jb = 0; jb < jn; jb += kFilterBlock) {
            const int64_t je = std::min(jn, jb + kFilterBlock);
            // Branch-free compaction: every score is written, only passing ones are kept.
            // Pass rates of 5-20% make a branch here mispredict constantly.
            for (int64_t j = jb; j < je; ++j) {
              c[cnt] = {srow[j], j0 + j};
              cnt += static_cast<int64_t>((srow[j] <= t) & (j0 + j != own));
            }
            if (cnt >= 2 * m) {
              count[row] = cnt;
              shrink(row);
              cnt = count[row];
              t = thr[row];
            }
          }
          count[row] = cnt;
        }
      });
    }
  }
  // Keep exactly the m smallest scores per row; h[m - 1] ends up the largest kept.
  at::parallel_for(0, b, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      if (count[row] > m) shrink(row);
      Cand<acc_t>* c = buf.data() + row * cap;
      std::swap(*std::max_element(c, c + m, [](const Cand<acc_t>& a, const Cand<acc_t>& b) { return a.d < b.d; }), c[m - 1]);
    }
  });

  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* rp = ref.data_ptr<scalar_t>();
  const acc_t* sqxp = sqx.data_ptr<acc_t>();
  acc_t* dp = dist.data_ptr<acc_t>();
  int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<uint8_t> redo(static_cast<size_t>(b), 0);
  // Selection reads the inputs as they are (no TF32 on CPU): only accumulation rounding.
  const acc_t coef = static_cast<acc_t>(certificate_coef(dim, std::numeric_limits<acc_t>::epsilon(), 0.0));

  at::parallel_for(0, b, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      Cand<acc_t>* h = buf.data() + row * cap;
      // Approximate squared distance of the largest kept candidate: no dropped row is closer.
      const acc_t bound = h[m - 1].d + sqxp[row];
      const scalar_t* xr = xp + row * dim;
      for (int64_t c = 0; c < m; ++c) {
        h[c].d = std::sqrt(exact_sqdist<scalar_t, acc_t>(xr, rp + h[c].i * dim, dim));
      }
      std::partial_sort(h, h + k, h + m);
      for (int64_t c = 0; c < k; ++c) {
        dp[row * k + c] = h[c].d;
        ip[row * k + c] = h[c].i;
      }
      const acc_t w = h[k - 1].d;
      redo[row] = (m < n_valid) && !certified<acc_t>(w, bound, sqxp[row] + max_sqr, coef);
    }
  });

  std::vector<int64_t> rows;
  for (int64_t row = 0; row < b; ++row)
    if (redo[row]) rows.push_back(row);
  at::parallel_for(0, static_cast<int64_t>(rows.size()), 1, [&](int64_t r0, int64_t r1) {
    std::vector<Cand<acc_t>> tmp(static_cast<size_t>(2 * k));
    for (int64_t t = r0; t < r1; ++t) {
      const int64_t row = rows[t];
      exhaustive_row<scalar_t, acc_t>(xp + row * dim, rp, n, dim, k, exclude_self ? row + self_offset : -1,
                                      tmp.data(), dp + row * k, ip + row * k);
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_cpu_impl(const at::Tensor& grad_dist, const at::Tensor& x, const at::Tensor& ref,
                       const at::Tensor& idx, const at::Tensor& dist, at::Tensor& gx,
                       at::Tensor* gref) {
  const int64_t b = x.size(0), k = idx.size(1), dim = x.size(1);
  const at::Tensor coef_t = backward_coef(grad_dist, dist);
  const acc_t* coef = coef_t.data_ptr<acc_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* rp = ref.data_ptr<scalar_t>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  acc_t* gxp = gx.data_ptr<acc_t>();

  at::parallel_for(0, b, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      acc_t* g = gxp + i * dim;
      const scalar_t* xi = xp + i * dim;
      for (int64_t c = 0; c < k; ++c) {
        const acc_t cf = coef[i * k + c];
        if (cf == 0) continue;
        const scalar_t* rj = rp + ip[i * k + c] * dim;
        for (int64_t d = 0; d < dim; ++d) g[d] += cf * (static_cast<acc_t>(xi[d]) - static_cast<acc_t>(rj[d]));
      }
    }
  });
  if (gref == nullptr) return;
  acc_t* grp = gref->data_ptr<acc_t>();
  // Each thread owns a block of feature columns of grad_ref: no races, fixed sum order.
  at::parallel_for(0, dim, 16, [&](int64_t d0, int64_t d1) {
    for (int64_t i = 0; i < b; ++i) {
      const scalar_t* xi = xp + i * dim;
      for (int64_t c = 0; c < k; ++c) {
        const acc_t cf = coef[i * k + c];
        if (cf == 0) continue;
        const int64_t j = ip[i * k + c];
        const scalar_t* rj = rp + j * dim;
        acc_t* g = grp + j * dim;
        for (int64_t d = d0; d < d1; ++d) g[d] -= cf * (static_cast<acc_t>(xi[d]) - static_cast<acc_t>(rj[d]));
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& x_, const at::Tensor& ref_, int64_t k,
                                           int64_t self_offset, bool exclude_self) {
  check_knn_args(x_, ref_, k, self_offset, exclude_self);
  TORCH_CHECK_VALUE(x_.is_cpu(), "knn_cpu needs CPU tensors, got ", x_.device());
  const RangeScale range = range_scale(x_, ref_);
  const at::Tensor x = range.apply(x_).contiguous(), ref = range.apply(ref_).contiguous();
  at::Tensor dist, idx;
  std::tie(dist, idx) = empty_knn_outputs(x, k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ldreg_knn_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    knn_cpu_impl<scalar_t, acc_t>(x, ref, k, self_offset, exclude_self, dist, idx);
  });
  range.unscale(dist);
  return {dist, idx};
}

std::tuple<at::Tensor, at::Tensor> knn_backward_cpu(const at::Tensor& grad_dist, const at::Tensor& x_,
                                                    const at::Tensor& ref_, const at::Tensor& idx_,
                                                    const at::Tensor& dist_, bool need_ref_grad) {
  check_backward_args(grad_dist, x_, ref_, idx_, dist_);
  const at::Tensor x = x_.contiguous(), ref = ref_.contiguous(), idx = idx_.contiguous();
  const at::Tensor dist = dist_.contiguous();
  at::Tensor gx, gref;
  std::tie(gx, gref) = zero_grad_buffers(x, ref, dist, need_ref_grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ldreg_knn_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK_TYPE(dist.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                     "dist must be float64 for float64 x, else float32");
    backward_cpu_impl<scalar_t, acc_t>(grad_dist, x, ref, idx, dist, gx, need_ref_grad ? &gref : nullptr);
  });
  return finish_grads(gx, gref, x, ref);
}

}  // namespace ldreg

TORCH_LIBRARY_IMPL(ldreg, CPU, m) {
  m.impl("knn_native", &ldreg::knn_cpu);
  m.impl("knn_backward_native", &ldreg::knn_backward_cpu);
}
