"""The "torch" backend: chunked matmul selection, exact re-rank, sparse backward.

Runs on any device PyTorch runs on. Memory is O(chunk * N + B * k): queries are processed
in row chunks sized so that no temporary exceeds the device's budget (``_budget``: a
fraction of free memory on a GPU, cache-sized on a CPU), and a forward + backward makes a
small number of aten calls that does not grow with B unless the budget forces more chunks.

Selection uses ``|r|^2 - 2 x.r`` from a matmul, which may be inexact (cancellation, or
TF32 if the user enabled it), so it keeps ``k + margin`` candidates and then recomputes
their distances as direct differences ``||x_i - r_j||`` in float32 (float64 for float64
input) and keeps the best k. Rows the certificate (``_host.certificate_coef``) cannot prove
exact are redone exhaustively. Ties in exact distance go to the lower reference index.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _budget, _host
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

    One host sync: the inputs' extremes (the NaN/Inf check and the range window,
    ``_host.window_scale``), the number of rows the certificate cannot prove and the number
    of distances too small to trust unchecked (``_host.small_limit``) are read together,
    after the selection and the re-rank were queued. Rows left unproven are redone
    exhaustively, small distances checked (``_host.in_range``; more syncs, only then).
    Inputs outside the window, or whose distances fail that check, are run again scaled by
    a power of two to the top of the range (``_host.run_in_range``), which raises
    ValueError if even there some distance is out of reach.

    Args:
        margin: candidates kept past k (default ``_host.default_margin(k)``).
        precision: selection precision for the certificate, default
            :func:`selection_precision`. "tf32" on a device without TF32 (CPU) emulates it
            by truncating the selection inputs, as a TF32 matmul reads them.
    """
    ct = _host.compute_dtype(x.dtype)
    dim = x.shape[1]
    ext = _host.extremes(x, ref)
    dist, idx, redo = _select_and_rerank(x, ref, k, self_offset, exclude_self, margin, precision)
    scale, max_abs, n_redo, n_small = _host.read_checks(ext, redo, dist, ct, dim)  # the one sync
    if scale == 1.0:
        if n_redo:
            _redo(x, ref, k, self_offset, exclude_self, dist, idx, _host.first_rows(redo, n_redo))
            n_small = None  # redone rows: check again
        if _host.in_range(x, ref, dist, idx, ct, n_small):
            return dist, idx
        scale = _host.top_scale(max_abs, ct, dim)

    def run(xs: Tensor, rs: Tensor) -> tuple[Tensor, Tensor]:
        d, i, rd = _select_and_rerank(xs, rs, k, self_offset, exclude_self, margin, precision)
        n = 0 if rd is None else int(rd.sum())
        if n:
            _redo(xs, rs, k, self_offset, exclude_self, d, i, _host.first_rows(rd, n))
        return d, i

    return _host.run_in_range(run, x, ref, scale, max_abs, ct)


def _redo(x: Tensor, ref: Tensor, k: int, self_offset: int, exclude_self: bool, dist: Tensor, idx: Tensor,
          rows: Tensor) -> None:
    """Rows the certificate left unproven, redone exhaustively, in place."""
    d2, i2 = _host.exhaustive(x[rows], ref, k, rows + self_offset if exclude_self else None)
    dist[rows], idx[rows] = d2.to(dist.dtype), i2


def _select_and_rerank(
    x: Tensor, ref: Tensor, k: int, self_offset: int, exclude_self: bool, margin: int | None, precision: str | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dist, idx, redo): the re-ranked k best of k + margin candidates per row, and the
    rows the certificate cannot prove exact (None when every valid row was a candidate)."""
    b, n = x.shape[0], ref.shape[0]
    n_valid = n - int(exclude_self)
    n_cand = min(k + (_host.default_margin(k) if margin is None else margin), n_valid)
    precision = selection_precision(x) if precision is None else precision
    ct = _host.compute_dtype(x.dtype)
    xs, rs, sq_x, sq_ref = _host.centred(x, ref)
    xsel, rsel = xs, rs
    if precision == "tf32" and not x.is_cuda:
        xsel, rsel = _host.round_to_tf32(xs), _host.round_to_tf32(rs)
    # Score tiles within the device's budget: whole reference rows while that leaves chunks
    # of at least TILE_ROWS queries, else TILE_ROWS queries against column blocks with a
    # running top-n_cand. (Whole rows of a big bank meant a few queries per matmul, each
    # re-reading the whole bank: time quadratic in N.) One tile on a GPU at the paper's shapes.
    tile = _budget.budget(x.device).score
    step = _host.row_chunk(b, n, tile)
    cols = n
    if step < min(b, TILE_ROWS):
        step = min(b, TILE_ROWS)
        cols = max(n_cand, tile // step)
    if step >= b and cols >= n:
        cand, top_v = _top_candidates(xsel, rsel, sq_ref, 0, 0, n, n_cand, exclude_self, self_offset)
        bound = top_v.amax(dim=1) + sq_x  # approx. squared distance of the last candidate
    else:
        cand = torch.empty((b, n_cand), dtype=torch.int64, device=x.device)
        bound = torch.empty(b, dtype=ct, device=x.device)
        for s in range(0, b, step):
            top_v = top_i = None
            for c0 in range(0, n, cols):
                ids, v = _top_candidates(xsel[s : s + step], rsel, sq_ref, s, c0, min(n, c0 + cols), n_cand,
                                         exclude_self, self_offset)
                if top_v is not None:
                    v, ids = torch.cat([top_v, v], dim=1), torch.cat([top_i, ids], dim=1)
                    top = torch.topk(v, n_cand, dim=1, largest=False, sorted=False)
                    v, ids = top.values, ids.gather(1, top.indices)
                top_v, top_i = v, ids
            cand[s : s + step] = top_i
            bound[s : s + step] = top_v.amax(dim=1) + sq_x[s : s + step]
    dist, idx = _host.rerank(x, ref, cand, k)
    if n_cand >= n_valid:
        return dist, idx, None
    coef = _host.certificate_coef(x.shape[1], torch.finfo(ct).eps, _host.INPUT_UNIT[precision])
    return dist, idx, _host.uncertified(dist[:, -1], bound, sq_x, sq_ref.max(), coef)


def _top_candidates(
    xq: Tensor, rsel: Tensor, sq_ref: Tensor, s: int, c0: int, c1: int, n_cand: int, exclude_self: bool,
    self_offset: int,
) -> tuple[Tensor, Tensor]:
    """(reference indices, scores) of the n_cand smallest scores ``|r|^2 - 2 x.r`` of queries
    s.. (``xq``) against reference rows c0..c1, unsorted."""
    whole = c0 == 0 and c1 == rsel.shape[0]  # (slicing the whole range is two more calls)
    score = torch.addmm(sq_ref if whole else sq_ref[c0:c1], xq, (rsel if whole else rsel[c0:c1]).t(),
                        beta=1.0, alpha=-2.0)
    if exclude_self:  # query s + t's own row s + t + self_offset: one diagonal of the tile
        score.diagonal(s + self_offset - c0).fill_(float("inf"))
    top = torch.topk(score, min(n_cand, c1 - c0), dim=1, largest=False, sorted=False)
    return (top.indices if c0 == 0 else top.indices + c0), top.values


def knn_backward(
    grad_dist: Tensor, x: Tensor, ref: Tensor, idx: Tensor, dist: Tensor, need_ref_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Gradients of sum(grad_dist * dist) w.r.t. x and (optionally) ref.

    d r_ij / d x_i = (x_i - ref_j) / r_ij through the k selected neighbours only; a zero
    distance contributes zero (the subgradient torch.cdist uses). Direct differences, not
    ``sum(c) x_i - sum(c ref_j)``, which cancels badly for near-duplicate neighbours. The
    differences are gathered in chunks of the device's budget into one buffer reused in
    place, and each row's sum is one batched matmul; no host sync. The coefficients are
    taken relative to each row's gradient scale (``_host.row_scale``), so extreme feature
    scales neither overflow nor flush them.
    """
    ct = dist.dtype
    b, k = idx.shape
    d = x.shape[1]
    gx = torch.empty((b, d), dtype=ct, device=x.device)
    gref = torch.zeros(ref.shape, dtype=ct, device=x.device) if need_ref_grad else None
    if gx.numel() == 0 or k == 0:
        return gx.zero_().to(x.dtype), None if gref is None else gref.to(ref.dtype)
    g = _host.as_dtype(grad_dist, ct)
    s = _host.row_scale(g)
    # s g / r, and 0 (r itself) where r = 0: the zero subgradient, whatever x_i - ref_j
    coef = torch.where(dist.bool(), (g * s).div_(dist), dist)
    rc, x3, flat = _host.as_dtype(ref, ct), _host.as_dtype(x, ct).unsqueeze(1), idx.reshape(-1)
    c3, gx3, s3 = coef.unsqueeze(1), gx.unsqueeze(1), s.unsqueeze(2)
    step = _host.row_chunk(b, k * d, _budget.budget(x.device).gather)
    buf = torch.empty((step * k, d), dtype=ct, device=x.device)
    full = buf.view(step, k, d)
    for s0 in range(0, b, step):  # views made once, and only a ragged last chunk slices buf
        r = min(step, b - s0)
        g = full if r == step else buf[: r * k].view(r, k, d)
        ic = flat[s0 * k : (s0 + r) * k]
        torch.index_select(rc, 0, ic, out=g.view(r * k, d))
        torch.sub(x3[s0 : s0 + r], g, out=g)  # x_i - ref_j
        torch.bmm(c3[s0 : s0 + r], g, out=gx3[s0 : s0 + r])
        if gref is not None:
            g.mul_(c3[s0 : s0 + r].transpose(1, 2)).div_(s3[s0 : s0 + r])
            gref.index_add_(0, ic, g.view(-1, d), alpha=-1.0)
    return _host.as_dtype(gx.div_(s), x.dtype), None if gref is None else _host.as_dtype(gref, ref.dtype)


knn_backward_torch = define_backward_op("torch", lambda *a: knn_backward(*a))
knn_torch = define_knn_op("torch", lambda *a: knn_forward(*a), knn_backward_torch, checks_input=True)

BACKENDS = (Backend("torch", _DEVICES, lambda: torch.ops.ldreg.knn_torch, "knn_backward_torch"),)
