"""Triton backward of the kNN distances: grad_x and (optionally) grad_ref by atomic scatter.

For the k selected neighbours of each query, with c_ij = g_ij / r_ij (0 where r_ij == 0,
the subgradient torch.cdist and the torch backend use)::

    grad_x_i   =  sum_j c_ij (x_i - ref_j)
    grad_ref_j = -sum_{i: j in N(i)} c_ij (x_i - ref_j)      (atomic adds)

Direct differences, never ``sum(c) x_i - sum(c ref_j)``. Accumulated in the distances'
dtype (fp32, fp64 for fp64 input) and cast back to the input dtype, as the torch backend does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["knn_backward"]


@triton.jit
def _knn_bwd_kernel(
    G, X, R, IDX, DIST, GX, GREF,
    B, D, K,
    stride_x, stride_r,
    NEED_REF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    m2 = rmask[:, None] & dmask[None, :]
    xi = tl.load(X + rows64[:, None] * stride_x + dd[None, :], mask=m2, other=0.0).to(GX.dtype.element_ty)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=GX.dtype.element_ty)
    for j in range(0, K):
        nb = tl.load(IDX + rows64 * K + j, mask=rmask, other=0)
        g = tl.load(G + rows64 * K + j, mask=rmask, other=0.0).to(GX.dtype.element_ty)
        r = tl.load(DIST + rows64 * K + j, mask=rmask, other=0.0)
        c = tl.where(r > 0, g / tl.where(r > 0, r, 1.0), 0.0)
        rj = tl.load(R + nb[:, None] * stride_r + dd[None, :], mask=m2, other=0.0).to(GX.dtype.element_ty)
        contrib = c[:, None] * (xi - rj)
        acc += contrib
        if NEED_REF:
            tl.atomic_add(GREF + nb[:, None] * D + dd[None, :], -contrib, mask=m2)
    tl.store(GX + rows64[:, None] * D + dd[None, :], acc, mask=m2)


def knn_backward(
    grad_dist: Tensor, x: Tensor, ref: Tensor, idx: Tensor, dist: Tensor, need_ref_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Same contract as the torch backend's ``knn_backward``: (grad_x, grad_ref or None)."""
    ct = dist.dtype
    b, d = x.shape
    k = idx.shape[1]
    if idx.numel():
        # The kernel gathers ref[idx] unchecked. Like the CUDA backward's CUDA_KERNEL_ASSERT
        # (and torch's own indexing), an index outside [0, N) is an error, not a stray read:
        # torch._assert_async raises at once on the CPU and as a device-side assert on a
        # GPU, without a host sync, before the kernel runs.
        torch._assert_async(((idx >= 0) & (idx < ref.shape[0])).all(), "knn_backward (triton): idx outside [0, N)")
    x, ref = x.contiguous(), ref.contiguous()
    gx = torch.empty((b, d), dtype=ct, device=x.device)
    gref = torch.zeros(ref.shape, dtype=ct, device=x.device) if need_ref_grad else None
    if b and d and k:
        block_m, block_d = 16, max(16, min(128, triton.next_power_of_2(d)))
        grid = (triton.cdiv(b, block_m), triton.cdiv(d, block_d))
        _knn_bwd_kernel[grid](
            grad_dist.contiguous(), x, ref, idx.contiguous(), dist.contiguous(), gx,
            gref if gref is not None else gx, b, d, k, x.stride(0), ref.stride(0),
            NEED_REF=need_ref_grad, BLOCK_M=block_m, BLOCK_D=block_d,
        )
    elif b:
        gx.zero_()
    return gx.to(x.dtype), None if gref is None else gref.to(ref.dtype)
