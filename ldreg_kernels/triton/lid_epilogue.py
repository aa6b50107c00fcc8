"""LID epilogue in Triton: MoM and MLE from sorted kNN distances, with the eps guards of
``ldreg_kernels.estimators.lid_from_distances`` (same formulas, same degenerate outcomes):

- MoM: ``max(m, eps) / max(w - m, eps)``, m the mean of the first k-1 distances, w the k-th.
- MLE: ``k / max(-sum_j (ln max(r_j, eps) - ln max(w, eps)), eps)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["lid_from_distances"]


@triton.jit
def _lid_kernel(DIST, OUT, EPS, B, K, MLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    eps = tl.load(EPS)  # a tensor, not a scalar argument: Triton passes Python floats as fp32
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    cols = tl.arange(0, BLOCK_K)
    cmask = cols < K
    d = tl.load(DIST + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    zero = tl.zeros_like(d)
    w = tl.sum(tl.where(cols[None, :] == K - 1, d, zero), axis=1)
    if MLE:
        lr = tl.log(tl.maximum(d, eps) / tl.maximum(w, eps)[:, None])  # ratio first: scale-invariant error
        s = -tl.sum(tl.where(cmask[None, :], lr, zero), axis=1)
        lid = K / tl.maximum(s, eps)
    else:
        m = tl.sum(tl.where(cols[None, :] < K - 1, d, zero), axis=1) / (K - 1)
        lid = tl.maximum(m, eps) / tl.maximum(w - m, eps)
    tl.store(OUT + rows, lid, mask=rmask)


def lid_from_distances(dist: Tensor, estimator: str = "mom", eps: float = 1e-12) -> Tensor:
    """(B,) LID from ascending distances (B, k), k >= 2; float32 (float64 for float64 input).

    Forward only (no autograd): a fused epilogue for evaluation/metrics. Training goes
    through ``estimators.lid_from_distances``, which autograd differentiates.
    """
    if estimator not in ("mom", "mle"):
        raise ValueError(f"estimator must be 'mom' or 'mle', got {estimator!r}")
    if dist.dtype in (torch.float16, torch.bfloat16):
        dist = dist.float()
    dist = dist.contiguous()
    b, k = dist.shape
    out = torch.empty(b, dtype=dist.dtype, device=dist.device)
    if b:
        block_m = 16
        _lid_kernel[(triton.cdiv(b, block_m),)](
            dist, out, torch.full((1,), float(eps), dtype=dist.dtype, device=dist.device), b, k, MLE=estimator == "mle", BLOCK_M=block_m,
            BLOCK_K=max(16, triton.next_power_of_2(k)),
        )
    return out
