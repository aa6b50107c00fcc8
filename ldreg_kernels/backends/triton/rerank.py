"""Fused exact re-rank in Triton: direct-difference distances of the selected candidates.

The selection (``knn_fwd``) keeps k + margin candidates per query from an inexact score. Their
exact distances ``||x_i - ref_j||`` are direct differences, accumulated in fp32 (fp64 for
fp64 input) and rounded once by a correctly rounded square root, the arithmetic the
certificate's error model assumes (``_host.certificate_coef``). One program takes
``BLOCK_P`` (query, candidate) pairs, flattened row-major, and streams the feature dimension
in ``BLOCK_D`` chunks, so the B x m x D differences are never written (the torch path gathers
them in chunks).

For fp32 the kernel writes one int64 key per pair, ``(distance bits << 32) | index``:
non-negative floats order like their bit patterns, so one sort of the keys is the
(distance, lower index) order, ties included. fp64 distances leave no room for the index;
they are written as they are and the host sorts them stably over index-sorted candidates.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import _host

__all__ = ["rerank", "exact_keys"]


# P (pairs) changes with the batch: not specialised, so a last partial batch does not compile
# again. M (candidates per row) and D are fixed over a run.
@triton.jit(do_not_specialize=["P"])
def _rerank_kernel(
    X,  # (B, D) queries, any float dtype
    R,  # (N, D) reference, same dtype
    CAND,  # (B * M,) int64 candidate indices, row-major
    OUT,  # (B * M,) int64 keys (KEYS) or fp64 distances
    P,
    M,
    D,
    stride_x,
    stride_r,
    KEYS: tl.constexpr,  # fp32 arithmetic, packed keys out; else fp64 distances out
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    p64 = p.to(tl.int64)
    i = p64 // M
    j = tl.load(CAND + p64, mask=pmask, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    if KEYS:
        acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_P], dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        m2 = pmask[:, None] & (dd < D)[None, :]
        xv = tl.load(X + i[:, None] * stride_x + dd[None, :], mask=m2, other=0.0).to(acc.dtype)
        rv = tl.load(R + j[:, None] * stride_r + dd[None, :], mask=m2, other=0.0).to(acc.dtype)
        diff = xv - rv
        acc += tl.sum(diff * diff, axis=1)
    if KEYS:
        dist = tl.sqrt_rn(acc)
        out = (dist.to(tl.int32, bitcast=True).to(tl.int64) << 32) | j
        tl.store(OUT + p64, out, mask=pmask)
    else:  # fp64 sqrt is correctly rounded (PTX has no approximate one)
        tl.store(OUT + p64, tl.sqrt(acc), mask=pmask)


def _config(d: int, fp64: bool) -> dict:
    """Block sizes: BLOCK_P x BLOCK_D values of x and of ref in registers, 32 x 128 fp32 over
    4 warps (64 registers a thread for the two tiles); half the width for fp64."""
    if os.environ.get("TRITON_INTERPRET") == "1":  # few, large programs: the interpreter's cost is per step
        return dict(BLOCK_P=256, BLOCK_D=max(16, min(256, triton.next_power_of_2(d))), num_warps=4)
    widest = 64 if fp64 else 128
    return dict(BLOCK_P=32, BLOCK_D=max(16, min(widest, triton.next_power_of_2(d))), num_warps=4)


def exact_keys(x: Tensor, ref: Tensor, cand: Tensor) -> Tensor:
    """(B, m) int64 keys ``(fp32 distance bits << 32) | index`` (fp32 arithmetic), or fp64
    distances for fp64 input, of the candidate pairs (x_i, ref[cand_ij])."""
    b, m = cand.shape
    fp64 = _host.compute_dtype(x.dtype) == torch.float64
    out = torch.empty((b, m), dtype=torch.float64 if fp64 else torch.int64, device=x.device)
    if out.numel() == 0:
        return out
    cfg = _config(x.shape[1], fp64)
    grid = (triton.cdiv(b * m, cfg["BLOCK_P"]),)
    _rerank_kernel[grid](
        x, ref, cand, out, b * m, m, x.shape[1], x.stride(0), ref.stride(0),
        KEYS=not fp64, BLOCK_P=cfg["BLOCK_P"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )
    return out


def rerank(x: Tensor, ref: Tensor, cand: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k nearest of each row's candidates (B, m), exact, ascending, ties to the lower index:
    the fused kernel, then one sort (``_host.rerank``'s contract)."""
    x, ref, cand = x.contiguous(), ref.contiguous(), cand.contiguous()
    if _host.compute_dtype(x.dtype) == torch.float64:
        cand, _ = torch.sort(cand, dim=1)
        d, order = torch.sort(exact_keys(x, ref, cand), dim=1, stable=True)
        return d[:, :k].contiguous(), torch.gather(cand, 1, order[:, :k])
    keys = torch.topk(exact_keys(x, ref, cand), k, dim=1, largest=False, sorted=True).values
    return (keys >> 32).to(torch.int32).view(torch.float32), keys & 0xFFFFFFFF
