"""Fused kNN forward in Triton: distance tiles with ``tl.dot`` + streaming top-(k + margin).

One program owns ``BLOCK_M`` queries and streams over the reference set in tiles of
``BLOCK_N`` rows. For each tile it computes the selection score ``|r_j|^2 - 2 x_i.r_j``
(the squared distance minus the per-row constant ``|x_i|^2``) with ``tl.dot``, looping over
D in chunks of ``BLOCK_D``, and merges the tile into a running candidate buffer of
``KP`` = next power of two >= k + margin entries per row. The B x N matrix is never written.

Top-k bookkeeping: every (score, index) pair is packed into one int64 key whose order is
(score, index): the high 32 bits hold the float32 score's bits mapped to a sign-correct
integer, the low 32 bits the reference index. The buffer is kept sorted ascending; a tile
(``BLOCK_N == KP``) is sorted descending, and the element-wise minimum of the two is a
bitonic sequence holding the KP smallest keys of their union, which one bitonic merge
(log2(KP) compare-and-swap stages) sorts again. A tile whose smallest
key cannot enter any row's buffer is skipped. Invalid columns (ragged edge, the query's own
row, excluded by index) get the key ``INT64_MAX`` and are never selected.

The host side (``knn_forward``) then re-ranks the candidates with exact direct-difference
distances (``_host.rerank``: fp32 accumulate, fp64 for fp64 input) and applies the
certificate of ``_host.certificate_coef`` for the selection precision. Rows it cannot prove
exact are selected again with ``"ieee"`` precision (when a faster precision was used) and,
if still uncertified, exhaustively (``_host.exhaustive``, bounded memory).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import _host
from .. import torch as torch_backend

__all__ = [
    "PRECISIONS",
    "get_precision",
    "set_precision",
    "selection_precision",
    "knn_forward",
    "select_candidates",
]

PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")

# Smallest candidate buffer (= reference tile width BLOCK_N): narrower tiles waste tl.dot.
MIN_KP = 64
# Candidate buffers wider than this fall back to the chunked torch selection (k > ~1600).
MAX_KP = 2048


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------- precision setting
_precision = os.environ.get("LDREG_TRITON_PRECISION", "tf32")
if _precision not in PRECISIONS:
    raise ValueError(f"LDREG_TRITON_PRECISION must be one of {PRECISIONS}, got {_precision!r}")


def get_precision() -> str:
    """The current selection precision of the Triton backend."""
    return _precision


def set_precision(precision: str) -> None:
    """Set the selection precision: "ieee" (fp32), "tf32", "tf32x3" or "bf16".

    Only the candidate selection uses it; returned distances are always exact (direct
    differences in fp32, fp64 for fp64 input). The default is "tf32", or the environment
    variable ``LDREG_TRITON_PRECISION`` read at import.
    """
    global _precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    _precision = precision


@contextlib.contextmanager
def selection_precision(precision: str):
    """Context manager: ``with selection_precision("ieee"): ...``."""
    old = get_precision()
    set_precision(precision)
    try:
        yield
    finally:
        set_precision(old)


# ---------------------------------------------------------------- kernel
# The bitonic network is written inline in the kernel (no nested jit calls: the interpreter
# re-patches triton.language on every nested call, which dominated its run time). Triton's
# tl.sort finds each element's compare-and-swap partner with an xor_sum reduction over a
# hypercube axis, which the interpreter runs element by element in Python; the partner is
# equally ``sum(pair) - x`` (exact in int64 with wrap-around), and tl.sum is a vectorised
# reduction in the interpreter and the same butterfly on a GPU.
@triton.jit
def _knn_select_kernel(
    X,  # (B, D) centred queries, fp32 or bf16
    R,  # (N, D) centred reference, same dtype
    SQR,  # (N,) fp32 |r_j|^2 of the centred reference
    OWN,  # (B,) int64: reference row excluded for each query (-1: none)
    OUT,  # (B, BLOCK_N) int64 packed keys, ascending
    B,
    N,
    D,
    stride_x,
    stride_r,
    EXCLUDE: tl.constexpr,
    PRECISION: tl.constexpr,
    IS_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LOG_N: tl.constexpr,  # log2(BLOCK_N)
    N_DIMS: tl.constexpr,  # log2(BLOCK_M * BLOCK_N)
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    if EXCLUDE:
        own = tl.load(OWN + rows, mask=rmask, other=-1)
    buf = tl.full([BLOCK_M, BLOCK_N], 0x7FFFFFFFFFFFFFFF, tl.int64)
    worst = tl.full([BLOCK_M], 0x7FFFFFFFFFFFFFFF, tl.int64)  # largest key kept, per row
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + offs_n
        cmask = cols < N
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            dmask = dd < D
            xt = tl.load(X + rows64[:, None] * stride_x + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
            rt = tl.load(R + cols64[:, None] * stride_r + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
            if IS_BF16:
                acc = tl.dot(xt, tl.trans(rt), acc)
            else:
                acc = tl.dot(xt, tl.trans(rt), acc, input_precision=PRECISION)
        sq = tl.load(SQR + cols, mask=cmask, other=0.0)
        score = sq[None, :] - 2.0 * acc
        bits = score.to(tl.int32, bitcast=True)
        skey = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # integer order == float order
        key = (skey.to(tl.int64) << 32) | cols64[None, :]
        invalid = (cols[None, :] >= N) | (rows[:, None] >= B)
        if EXCLUDE:
            invalid = invalid | (cols64[None, :] == own[:, None])
        key = tl.where(invalid, 0x7FFFFFFFFFFFFFFF, key)
        # Skip the merge when no key of the tile can enter any row's buffer.
        enters = tl.min(key, axis=1) < worst
        if tl.max(enters.to(tl.int32), axis=0) > 0:
            # Bitonic sort of the tile, descending, on the [2]*N_DIMS hypercube view.
            h = tl.reshape(key, [2] * N_DIMS)
            for st in tl.static_range(1, LOG_N + 1):
                for ii in tl.static_range(st):
                    y = tl.sum(h, axis=N_DIMS - st + ii, keep_dims=True) - h
                    is_right = tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - st + ii) + [2] + [1] * (st - 1 - ii))
                    if st < LOG_N:
                        flip = tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - st - 1) + [2] + [1] * st)
                        h = tl.where((h > y) != (flip ^ is_right), y, h)
                    else:
                        h = tl.where((h > y) == (is_right != 0), y, h)
            # min(ascending buffer, descending tile) is bitonic and holds the BLOCK_N
            # smallest keys of both; one ascending merge sorts it.
            h = tl.minimum(tl.reshape(buf, [2] * N_DIMS), h)
            for ii in tl.static_range(LOG_N):
                y = tl.sum(h, axis=N_DIMS - LOG_N + ii, keep_dims=True) - h
                is_right = tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - LOG_N + ii) + [2] + [1] * (LOG_N - 1 - ii))
                h = tl.where((h > y) != (is_right != 0), y, h)
            buf = tl.reshape(h, [BLOCK_M, BLOCK_N])
            worst = tl.max(buf, axis=1)
    tl.store(OUT + rows64[:, None] * BLOCK_N + offs_n[None, :], buf, mask=rmask[:, None])


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _config(kp: int, d: int, bf16: bool) -> dict:
    """Block sizes. BLOCK_N equals the candidate buffer width KP (the merge needs it)."""
    if _interpreting():
        # Interpreter: Python overhead per program and per loop step dominates; few big steps.
        return dict(BLOCK_M=32, BLOCK_D=max(16, min(64, _next_pow2(d))), num_warps=4)
    block_m = 64 if kp <= 128 else (32 if kp <= 256 else 16)
    block_d = max(16, min(64 if bf16 else 32, _next_pow2(d)))
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4 if kp <= 256 else 8)


def _decode(keys: Tensor) -> tuple[Tensor, Tensor]:
    """(indices int64, float32 scores) from packed keys."""
    idx = keys & 0xFFFFFFFF
    hi = (keys >> 32).to(torch.int32)
    score = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).view(torch.float32)
    return idx, score


def select_candidates(xs: Tensor, rs: Tensor, sq_ref: Tensor, own: Tensor | None, kp: int, precision: str) -> Tensor:
    """Packed keys (B, kp), ascending, of the kp smallest scores |r|^2 - 2 x.r per row.

    ``xs``/``rs`` are the centred fp32 features (cast to bf16 here for "bf16"); ``own`` (B,)
    holds the excluded reference row per query, or None. ``kp`` is a power of two >= 16.
    """
    bf16 = precision == "bf16"
    sel = torch.bfloat16 if bf16 else torch.float32
    xs = xs.to(sel).contiguous()
    rs = rs.to(sel).contiguous()
    b, d = xs.shape
    n = rs.shape[0]
    keys = torch.empty((b, kp), dtype=torch.int64, device=xs.device)
    if b == 0:
        return keys
    cfg = _config(kp, d, bf16)
    own_t = own if own is not None else torch.empty(1, dtype=torch.int64, device=xs.device)
    grid = (triton.cdiv(b, cfg["BLOCK_M"]),)
    _knn_select_kernel[grid](
        xs, rs, sq_ref.float().contiguous(), own_t.contiguous(), keys, b, n, d, xs.stride(0), rs.stride(0),
        EXCLUDE=own is not None, PRECISION="ieee" if bf16 else precision, IS_BF16=bf16,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=kp, BLOCK_D=cfg["BLOCK_D"],
        LOG_N=kp.bit_length() - 1, N_DIMS=(kp * cfg["BLOCK_M"]).bit_length() - 1, num_warps=cfg["num_warps"],
    )
    return keys


# ---------------------------------------------------------------- host forward
def knn_forward(
    x: Tensor,
    ref: Tensor,
    k: int,
    self_offset: int,
    exclude_self: bool,
    precision: str | None = None,
    margin: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(dist, idx), (B, k): same contract as the torch backend's, selection in Triton.

    Args:
        precision: selection precision (default: ``get_precision()``).
        margin: extra candidates past k (default ``_host.default_margin(k)``); the buffer
            is rounded up to a power of two, so usually more are kept.
    """
    precision = get_precision() if precision is None else precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    b, n = x.shape[0], ref.shape[0]
    n_valid = n - int(exclude_self)
    m = _host.default_margin(k) if margin is None else margin
    kp = max(MIN_KP, _next_pow2(min(k + m, n_valid)))
    if kp > MAX_KP:
        # Large k: the register-resident buffer would spill badly; use the chunked torch path.
        return torch_backend.knn_forward(x, ref, k, self_offset, exclude_self, margin)
    xs, rs, sq_x, sq_ref = _host.centred(x, ref)
    own = torch.arange(b, device=x.device) + self_offset if exclude_self else None
    rows = torch.arange(b, device=x.device)
    return _select_and_rerank(x, ref, xs, rs, sq_x, sq_ref, own, rows, k, kp, n_valid, precision)


def _select_and_rerank(x, ref, xs, rs, sq_x, sq_ref, own, rows, k, kp, n_valid, precision):
    """Select + exact re-rank for the query rows ``rows``; uncertified rows cascade."""
    xr = x[rows]
    keys = select_candidates(xs[rows], rs, sq_ref, None if own is None else own[rows], kp, precision)
    n_cand = min(kp, n_valid)
    cand, score = _decode(keys[:, :n_cand])
    dist, idx = _host.rerank(xr, ref, cand, k)
    if n_cand < n_valid and rows.numel():
        ct = sq_x.dtype
        bound = score[:, -1].to(ct) + sq_x[rows]  # approx. squared distance of the last candidate
        # Selection accumulates in fp32 whatever the input; fp64 input is rounded to fp32
        # (one unit) on top of the precision's own input rounding.
        unit = _host.INPUT_UNIT[precision] + (_host.FP32_EPS if ct == torch.float64 else 0.0)
        coef = _host.certificate_coef(xs.shape[1], _host.FP32_EPS, unit)
        redo = _host.redo_rows(dist[:, -1], bound, sq_x[rows], sq_ref.max(), coef)
        if redo.numel():
            if precision != "ieee":
                d2, i2 = _select_and_rerank(x, ref, xs, rs, sq_x, sq_ref, own, rows[redo], k, kp, n_valid, "ieee")
            else:
                d2, i2 = _host.exhaustive(xr[redo], ref, k, None if own is None else own[rows[redo]])
            dist[redo], idx[redo] = d2.to(dist.dtype), i2
    return dist, idx
