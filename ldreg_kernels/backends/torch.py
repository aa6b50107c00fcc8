"""The "torch" backend: chunked matmul selection, exact re-rank, sparse backward.

Runs on any device PyTorch runs on. Memory is O(chunk * N + B * k): queries are processed
in row chunks sized so that no temporary exceeds a fixed element budget, and the
B x N distance matrix is never formed.

Selection uses ``|r|^2 - 2 x.r`` from a matmul, which may be inexact (cancellation, or
TF32 if the user enabled it), so it keeps ``k + margin`` candidates and then recomputes
their distances as direct differences ``||x_i - r_j||`` in float32 (float64 for float64
input) and keeps the best k. Rows the certificate (``_host.certificate_coef``) cannot prove
exact are redone exhaustively. Ties in exact distance go to the lower reference index.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _host
from .._op import Backend, define_backward_op, define_knn_op

__all__ = ["knn_forward", "knn_backward", "selection_precision", "BACKENDS"]

_DEVICES = ("cpu", "cuda", "mps", "xpu")


# Fewest query rows per score tile before the reference is split into column blocks.
TILE_ROWS = 256


def selection_precision(x: Tensor) -> str:
    """"tf32" where torch's matmul rounds fp32 inputs to TF32 (CUDA, allowed by the user)."""
    if x.is_cuda and _host.compute_dtype(x.dtype) == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def knn_forward(
    x: Tensor,
    ref: Tensor,
    k: int,
    self_offset: int,
    exclude_self: bool,
    margin: int | None = None,
    precision: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(dist, idx), (B, k), of the k nearest rows of ``ref`` to each row of ``x``.

    Args:
        margin: candidates kept past k (default ``_host.default_margin(k)``).
        precision: selection precision for the certificate, default
            :func:`selection_precision`. "tf32" on a device without TF32 (CPU) emulates it
            by truncating the selection inputs, as a TF32 matmul reads them.
    """
    b, n = x.shape[0], ref.shape[0]
    n_valid = n - int(exclude_self)
    n_cand = min(k + (_host.default_margin(k) if margin is None else margin), n_valid)
    precision = selection_precision(x) if precision is None else precision
    ct = _host.compute_dtype(x.dtype)
    xs, rs, sq_x, sq_ref = _host.centred(x, ref)
    xsel, rsel = xs, rs
    if precision == "tf32" and not x.is_cuda:
        xsel, rsel = _host.round_to_tf32(xs), _host.round_to_tf32(rs)
    cand = torch.empty((b, n_cand), dtype=torch.int64, device=x.device)
    bound = torch.empty(b, dtype=ct, device=x.device)  # approx. squared distance of the last candidate
    # Score tiles of at most SCORE_ELEMS: whole reference rows while that leaves chunks of at
    # least TILE_ROWS queries, else TILE_ROWS queries against column blocks with a running
    # top-n_cand. (Whole rows of a big bank meant a few queries per matmul, each re-reading
    # the whole bank: time quadratic in N.)
    step = _host.row_chunk(b, n, _host.SCORE_ELEMS)
    cols = n
    if step < min(b, TILE_ROWS):
        step = min(b, TILE_ROWS)
        cols = max(n_cand, _host.SCORE_ELEMS // step)
    for s in range(0, b, step):
        rows = torch.arange(min(step, b - s), device=x.device)
        own = rows + s + self_offset
        top_v = top_i = None
        for c0 in range(0, n, cols):
            c1 = min(n, c0 + cols)
            score = torch.addmm(sq_ref[c0:c1], xsel[s : s + step], rsel[c0:c1].t(), beta=1.0, alpha=-2.0)
            if exclude_self:  # own rows in this block to +inf; no boolean indexing (a host sync on CUDA)
                col = (own - c0).clamp(0, c1 - c0 - 1)
                score[rows, col] = torch.where((own >= c0) & (own < c1), float("inf"), score[rows, col])
            ids = torch.arange(c0, c1, device=x.device).expand(score.shape[0], -1)
            if top_v is not None:
                score, ids = torch.cat([top_v, score], dim=1), torch.cat([top_i, ids], dim=1)
            top = torch.topk(score, min(n_cand, score.shape[1]), dim=1, largest=False, sorted=False)
            top_v, top_i = top.values, ids.gather(1, top.indices)
        cand[s : s + step] = top_i
        bound[s : s + step] = top_v.max(dim=1).values + sq_x[s : s + step]
    dist, idx = _host.rerank(x, ref, cand, k)
    if n_cand < n_valid:
        coef = _host.certificate_coef(x.shape[1], torch.finfo(ct).eps, _host.INPUT_UNIT[precision])
        redo = _host.redo_rows(dist[:, -1], bound, sq_x, sq_ref.max(), coef)
        if redo.numel():
            d2, i2 = _host.exhaustive(x[redo], ref, k, redo + self_offset if exclude_self else None)
            dist[redo], idx[redo] = d2.to(dist.dtype), i2
    return dist, idx


def knn_backward(
    grad_dist: Tensor, x: Tensor, ref: Tensor, idx: Tensor, dist: Tensor, need_ref_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Gradients of sum(grad_dist * dist) w.r.t. x and (optionally) ref.

    d r_ij / d x_i = (x_i - ref_j) / r_ij through the k selected neighbours only; a zero
    distance contributes zero (the subgradient torch.cdist uses). Direct differences, not
    ``sum(c) x_i - sum(c ref_j)``, which cancels badly for near-duplicate neighbours.
    """
    ct = dist.dtype
    coef = torch.where(dist > 0, grad_dist.to(ct) / dist, torch.zeros((), dtype=ct, device=dist.device))
    gx = torch.empty(x.shape, dtype=ct, device=x.device)
    gref = torch.zeros(ref.shape, dtype=ct, device=x.device) if need_ref_grad else None
    step = _host.row_chunk(idx.shape[0], idx.shape[1] * x.shape[1], _host.GATHER_ELEMS)
    for s in range(0, idx.shape[0], step):
        ic = idx[s : s + step]
        contrib = coef[s : s + step].unsqueeze(2) * (x[s : s + step].to(ct).unsqueeze(1) - ref[ic].to(ct))
        gx[s : s + step] = contrib.sum(dim=1)
        if gref is not None:
            gref.index_add_(0, ic.reshape(-1), contrib.reshape(-1, x.shape[1]), alpha=-1.0)
    return gx.to(x.dtype), None if gref is None else gref.to(ref.dtype)


knn_backward_torch = define_backward_op("torch", lambda *a: knn_backward(*a))
knn_torch = define_knn_op("torch", lambda *a: knn_forward(*a), knn_backward_torch)

BACKENDS = (Backend("torch", _DEVICES, lambda: torch.ops.ldreg.knn_torch, "knn_backward_torch"),)
