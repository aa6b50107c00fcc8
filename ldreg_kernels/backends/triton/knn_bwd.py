"""Triton backward of the kNN distances: grad_x, and (optionally) grad_ref by atomic scatter,
or by a sorted segment reduction under ``torch.use_deterministic_algorithms(True)``.

For the k selected neighbours of each query, with c_ij = g_ij / r_ij (0 where r_ij == 0,
the subgradient torch.cdist and the torch backend use)::

    grad_x_i   =  sum_j c_ij (x_i - ref_j)
    grad_ref_j = -sum_{i: j in N(i)} c_ij (x_i - ref_j)

Direct differences, never ``sum(c) x_i - sum(c ref_j)``. Accumulated in the distances'
dtype (fp32, fp64 for fp64 input) and cast back to the input dtype, as the torch backend does.
c_ij is formed as (s_i g_ij) / r_ij and the sums divided by s_i, s_i the power of two of row
i's gradient scale (``_host.row_scale``), so that tiny or huge features neither overflow nor
flush it.

grad_x sums each row's k terms in a fixed order: deterministic. grad_ref, by default, is
scattered with float atomic adds (relaxed ordering: only the sum matters, no other memory
is published through them), so its summation order, hence its last bits, vary from run to
run. With deterministic algorithms enabled, grad_ref is instead reduced per reference row:
the (query, neighbour) pairs are sorted by neighbour index (a stable sort, so by query
within a row) and one program sums each row's segment in that order. Same terms, bit for
bit (the same expressions), in a fixed order: bit-identical from run to run, and equal to
the atomic result to summation rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import _host

__all__ = ["knn_backward"]


# B is not specialised: it changes with the batch (a last partial batch would compile the
# kernel again); it only masks rows. D, K and the strides are fixed over a training run.
@triton.jit(do_not_specialize=["B"])
def _knn_bwd_kernel(
    G, X, R, IDX, DIST, WS, GX, GREF,
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
    s = tl.load(WS + rows64, mask=rmask, other=1.0)  # the row's gradient scale (_host.row_scale)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=GX.dtype.element_ty)
    for j in range(0, K):
        nb = tl.load(IDX + rows64 * K + j, mask=rmask, other=0)
        g = tl.load(G + rows64 * K + j, mask=rmask, other=0.0).to(GX.dtype.element_ty)
        r = tl.load(DIST + rows64 * K + j, mask=rmask, other=0.0)
        c = tl.where(r > 0, (g * s) / tl.where(r > 0, r, 1.0), 0.0)  # s g / r: in range at any scale
        rj = tl.load(R + nb[:, None] * stride_r + dd[None, :], mask=m2, other=0.0).to(GX.dtype.element_ty)
        contrib = c[:, None] * (xi - rj)
        acc += contrib
        if NEED_REF:
            tl.atomic_add(GREF + nb[:, None] * D + dd[None, :], -(contrib / s[:, None]), mask=m2, sem="relaxed")
    tl.store(GX + rows64[:, None] * D + dd[None, :], acc / s[:, None], mask=m2)


# N is not specialised (a memory bank is fixed, but exclude_self batches have N = B).
@triton.jit(do_not_specialize=["N"])
def _knn_bwd_ref_sorted_kernel(
    G, X, R, ORDER, START, DIST, WS, GREF,
    N, D, K,
    stride_x, stride_r,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad_ref rows [pid * BLOCK_J, +BLOCK_J), features [pid_d * BLOCK_D, +BLOCK_D): row j
    sums the pairs ORDER[START[j]:START[j + 1]] (flat indices i * K + jj into idx, sorted
    by (j, i)) in that order; no atomics."""
    pid_j = tl.program_id(0)
    pid_d = tl.program_id(1)
    js = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = js < N
    js64 = js.to(tl.int64)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    m2 = jmask[:, None] & dmask[None, :]
    start = tl.load(START + js64, mask=jmask, other=0)
    count = tl.load(START + js64 + 1, mask=jmask, other=0) - start
    rj = tl.load(R + js64[:, None] * stride_r + dd[None, :], mask=m2, other=0.0).to(GREF.dtype.element_ty)
    acc = tl.zeros([BLOCK_J, BLOCK_D], dtype=GREF.dtype.element_ty)
    for t in range(0, tl.max(count, axis=0)):
        live = jmask & (t < count)
        e = tl.load(ORDER + start + t, mask=live, other=0)  # flat index i * K + jj
        i = e // K
        g = tl.load(G + e, mask=live, other=0.0).to(GREF.dtype.element_ty)
        r = tl.load(DIST + e, mask=live, other=0.0)
        s = tl.load(WS + i, mask=live, other=1.0)
        c = tl.where(r > 0, (g * s) / tl.where(r > 0, r, 1.0), 0.0)
        xi = tl.load(X + i[:, None] * stride_x + dd[None, :], mask=live[:, None] & dmask[None, :], other=0.0)
        acc += (c[:, None] * (xi.to(GREF.dtype.element_ty) - rj)) / s[:, None]
    tl.store(GREF + js64[:, None] * D + dd[None, :], -acc, mask=m2)


def _grad_ref_sorted(grad_dist: Tensor, x: Tensor, ref: Tensor, idx: Tensor, dist: Tensor, ws: Tensor,
                     gref: Tensor) -> None:
    """Deterministic grad_ref (module docstring): a stable sort of the flat neighbour
    indices, segment starts by binary search (no atomics, no bincount), one reduction
    kernel. O(B k) extra memory."""
    n, d = ref.shape
    k = idx.shape[1]
    sorted_j, order = torch.sort(idx.reshape(-1), stable=True)
    start = torch.searchsorted(sorted_j, torch.arange(n + 1, device=idx.device, dtype=sorted_j.dtype))
    block_j, block_d = 16, max(16, min(128, triton.next_power_of_2(d)))
    grid = (triton.cdiv(n, block_j), triton.cdiv(d, block_d))
    _knn_bwd_ref_sorted_kernel[grid](
        grad_dist, x, ref, order, start, dist, ws, gref, n, d, k, x.stride(0), ref.stride(0),
        BLOCK_J=block_j, BLOCK_D=block_d,
    )


def knn_backward(
    grad_dist: Tensor, x: Tensor, ref: Tensor, idx: Tensor, dist: Tensor, need_ref_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Same contract as the torch backend's ``knn_backward``: (grad_x, grad_ref or None).

    Under ``torch.use_deterministic_algorithms(True)`` grad_ref is reduced without atomics,
    so the result is bit-identical from run to run (module docstring)."""
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
    grad_dist, idx, dist = grad_dist.contiguous(), idx.contiguous(), dist.contiguous()
    gx = torch.empty((b, d), dtype=ct, device=x.device)
    gref = torch.zeros(ref.shape, dtype=ct, device=x.device) if need_ref_grad else None
    sorted_ref = need_ref_grad and torch.are_deterministic_algorithms_enabled()
    if b and d and k:
        block_m, block_d = 16, max(16, min(128, triton.next_power_of_2(d)))
        grid = (triton.cdiv(b, block_m), triton.cdiv(d, block_d))
        atomic_ref = need_ref_grad and not sorted_ref
        ws = _host.row_scale(grad_dist.to(ct)).reshape(-1)
        _knn_bwd_kernel[grid](
            grad_dist, x, ref, idx, dist, ws, gx,
            gref if atomic_ref else gx, b, d, k, x.stride(0), ref.stride(0),
            NEED_REF=atomic_ref, BLOCK_M=block_m, BLOCK_D=block_d,
        )
        if sorted_ref and ref.shape[0]:
            _grad_ref_sorted(grad_dist, x, ref, idx, dist, ws, gref)
    elif b:
        gx.zero_()
    return gx.to(x.dtype), None if gref is None else gref.to(ref.dtype)
