"""Fused kNN forward in Triton: distance tiles with ``tl.dot`` + streaming top-(k + margin).

One program owns ``BLOCK_M`` queries and one segment of the reference set, and streams over
that segment in tiles of ``BLOCK_N`` rows. For each tile it computes the selection score
``|r_j|^2 - 2 x_i.r_j`` (the squared distance minus the per-row constant ``|x_i|^2``) with
``tl.dot``, looping over D in chunks of ``BLOCK_D``, and merges the tile into a running
candidate buffer of ``KP`` entries per row (a power of two, 64 <= KP <= ``MAX_KP``). The
B x N matrix is never written.

Top-k bookkeeping: every (score, index) pair is packed into one int64 key whose order is
(score, index): the high 32 bits hold the float32 score's bits mapped to a sign-correct
integer, the low 32 bits the reference index. The buffer is kept sorted ascending; a tile
(``BLOCK_N == KP``) is sorted descending, and the element-wise minimum of the two is a
bitonic sequence holding the KP smallest keys of their union, which one bitonic merge
(log2(KP) compare-and-swap stages) sorts again. A tile whose smallest
key cannot enter any row's buffer is skipped. Invalid columns (ragged edge, the query's own
row, excluded by index) get the key ``INT64_MAX`` and are never selected.

Large k, two levels. The buffer lives in registers and the merge's layout changes go
through shared memory, so a wide buffer does not fit a GPU: KP = 1024 needs 266 KB of
shared memory per block and KP = 2048 528 KB, against 163 KB (A100) and 227 KB (H100)
(``tools/gpu_aot.py``). When the c = k + margin candidates need more than ``MAX_KP``
entries, the reference is split into ``nseg`` strided segments (segment s holds the rows
j = s (mod nseg), so neighbours that sit together in index order, as in a class-sorted
batch or a memory bank, spread over all segments) with nseg * MAX_KP >= 2c; each
(query block, segment) program keeps its segment's MAX_KP smallest keys, and the host
keeps the c smallest of their union (level two, a ``topk`` over packed keys). Every
reference row left out then scores at least the smaller of the last kept key and the
largest key of any segment buffer that was full, and that is the bound the certificate
uses: a segment that held more than MAX_KP of a row's true candidates (an adversarial
order) costs that row a redo, never exactness. Candidates past ``MAX_CANDIDATES`` (k >
1639) go to the chunked torch selection.

The host side (``knn_forward``) then re-ranks the candidates with exact direct-difference
distances (``_host.rerank``: fp32 accumulate, fp64 for fp64 input) and applies the
certificate of ``_host.certificate_coef`` for the selection precision. Rows it cannot prove
exact are selected again with ``"ieee"`` precision (when a faster precision was used) and,
if still uncertified, exhaustively (``_host.exhaustive``, bounded memory).

Under the Triton interpreter (CPU tests) ``tl.dot`` ignores ``input_precision``;
``_emulate_input_rounding`` rounds the selection inputs as each precision reads them, so the
tests see its error, its certificate and its redo path.
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
from . import rerank

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
# Widest buffer one program keeps; more candidates take the two-level path (module
# docstring). KP = 512 would fit too with BLOCK_M = 16 (ptxas: 135 KB of shared memory,
# 24-92 B of spills; 2.3-2.5 KB with BLOCK_M = 32), but each width is one more kernel to
# compile (4 precisions x 2 cards), and segments of 256 give a GPU more programs to run.
# Which is faster is for a GPU to measure.
MAX_KP = 256
# Two levels: nseg * MAX_KP >= SEG_SLACK * c. With randomly placed neighbours a segment
# expects c / nseg <= MAX_KP / 2 of a row's c candidates; overflowing its buffer is then a
# many-sigma event, and it only costs the row a redo.
SEG_SLACK = 2
# More candidates per row than this (k + margin > 2048, k > 1639): chunked torch selection.
MAX_CANDIDATES = 2048
# Level-two keys held at once (query rows x nseg x MAX_KP int64): 16M keys = 128 MiB.
KEY_ELEMS = 1 << 24


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
# Not specialised (no "== 1" or "% 16 == 0" variants): B and N, which change with the
# batch (a last partial batch would otherwise compile the kernel again mid-training), and
# NSEG (one compiled kernel serves nseg = 1 and every nseg > 1). They only bound loops and
# masks. D and the row strides stay specialised: divisibility by 16 lets the loads
# vectorise, and the feature dimension does not change from batch to batch.
@triton.jit(do_not_specialize=["B", "N", "NSEG"])
def _knn_select_kernel(
    X,  # (B, D) centred queries, fp32 or bf16
    R,  # (N, D) centred reference, same dtype
    SQR,  # (N,) fp32 |r_j|^2 of the centred reference
    OWN,  # (B,) int64: reference row excluded for each query (-1: none; a load, not a
    #       constexpr switch, so exclude_self on and off share one compiled kernel)
    OUT,  # (B, NSEG, BLOCK_N) int64 packed keys, each segment's ascending
    B,
    N,
    D,
    NSEG,  # reference segments; program (i, s) streams the rows j = s (mod NSEG)
    stride_x,
    stride_r,
    PRECISION: tl.constexpr,
    IS_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LOG_N: tl.constexpr,  # log2(BLOCK_N)
    N_DIMS: tl.constexpr,  # log2(BLOCK_M * BLOCK_N)
):
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    own = tl.load(OWN + rows, mask=rmask, other=-1)
    buf = tl.full([BLOCK_M, BLOCK_N], 0x7FFFFFFFFFFFFFFF, tl.int64)
    worst = tl.full([BLOCK_M], 0x7FFFFFFFFFFFFFFF, tl.int64)  # largest key kept, per row
    n_seg = (N - seg + NSEG - 1) // NSEG  # rows of this segment
    for n0 in range(0, n_seg, BLOCK_N):
        cols = seg + (n0 + offs_n) * NSEG
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
        invalid = (cols[None, :] >= N) | (rows[:, None] >= B) | (cols64[None, :] == own[:, None])
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
    tl.store(OUT + (rows64[:, None] * NSEG + seg) * BLOCK_N + offs_n[None, :], buf, mask=rmask[:, None])


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _config(kp: int, d: int, precision: str) -> dict:
    """Block sizes. BLOCK_N equals the candidate buffer width KP (the merge needs it).

    BLOCK_M x KP int64 keys live in registers, two copies during a merge; ptxas -v
    (``make gpu-aot``) sized these to spill (almost) nothing on sm_80 and sm_90: BLOCK_M=64
    at KP=128 spilled 1.2-2.6 KB per thread, so KP >= 128 takes 32 rows, and KP=256 spreads
    them over 8 warps. "tf32x3" splits both tiles into hi and lo parts: with 32-wide D
    chunks it spilled 0.2-0.7 KB, with 16-wide ones nothing.
    """
    if _interpreting():
        # Interpreter: Python overhead per program and per loop step dominates; few big steps.
        return dict(BLOCK_M=32, BLOCK_D=max(16, min(64, _next_pow2(d))), num_warps=4)
    block_m = 64 if kp <= 64 else 32
    widest = {"bf16": 64, "tf32x3": 16}.get(precision, 32)
    block_d = max(16, min(widest, _next_pow2(d)))
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=8 if kp >= 256 else 4)


def _plan(k: int, n_valid: int, margin: int) -> tuple[int, int, int] | None:
    """(n_cand, kp, nseg) for k neighbours among n_valid reference rows, or None when the
    torch selection takes over (more than ``MAX_CANDIDATES`` candidates).

    One level (nseg = 1) when the c = min(k + margin, n_valid) candidates fit a kernel
    buffer: kp = c rounded up to a power of two (>= ``MIN_KP``) and the re-rank gets all
    min(kp, n_valid) keys it holds. Else two levels: ``MAX_KP``-wide buffers over nseg
    strided segments, nseg * MAX_KP >= ``SEG_SLACK`` * c, and the re-rank gets the c
    smallest keys of their union. That union holds at least c valid keys: segment sizes
    differ by at most 2 (strided, one own row excluded), so if one segment has a full
    buffer every segment holds >= MAX_KP - 2 keys, nseg * (MAX_KP - 2) >= c; if none is
    full the union is every valid row.
    """
    c = min(k + margin, n_valid)
    if c > MAX_CANDIDATES:
        return None
    kp = max(MIN_KP, _next_pow2(c))
    if kp <= MAX_KP:
        return min(kp, n_valid), kp, 1
    return c, MAX_KP, -(-SEG_SLACK * c // MAX_KP)


def _decode(keys: Tensor) -> tuple[Tensor, Tensor]:
    """(indices int64, float32 scores) from packed keys."""
    idx = keys & 0xFFFFFFFF
    hi = (keys >> 32).to(torch.int32)
    score = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).view(torch.float32)
    return idx, score


def _emulate_input_rounding(xs: Tensor, rs: Tensor, precision: str) -> tuple[Tensor, Tensor, str]:
    """(xs, rs, "ieee"): the selection inputs rounded as ``precision``'s matmul reads them,
    for the Triton interpreter, whose ``tl.dot`` is an fp32 ``np.matmul`` that ignores
    ``input_precision`` (and multiplies bf16 tensors as their raw 16-bit patterns). The
    kernel then runs in "ieee" on the rounded fp32 values, so CPU tests see the error the
    certificate's ``_host.INPUT_UNIT[precision]`` must cover, and its redo path:

    - "tf32": inputs truncated to 10 mantissa bits (``_host.round_to_tf32``, the model the
      certificate assumes);
    - "tf32x3": the hi + lo split, hi = tf32(v), lo = tf32(v - hi), and the three products
      hi.hi + hi.lo + lo.hi (lo.lo dropped) as one dot over [hi, hi, lo] . [hi, lo, hi];
    - "bf16": inputs rounded to bf16; their products are exact in the fp32 accumulator.
    """
    if precision == "tf32":
        return _host.round_to_tf32(xs), _host.round_to_tf32(rs), "ieee"
    if precision == "tf32x3":
        xh, rh = _host.round_to_tf32(xs), _host.round_to_tf32(rs)
        xl, rl = _host.round_to_tf32(xs.float() - xh), _host.round_to_tf32(rs.float() - rh)
        return torch.cat([xh, xh, xl], dim=1), torch.cat([rh, rl, rh], dim=1), "ieee"
    if precision == "bf16":
        return xs.to(torch.bfloat16).float(), rs.to(torch.bfloat16).float(), "ieee"
    return xs, rs, precision


def select_candidates(
    xs: Tensor, rs: Tensor, sq_ref: Tensor, own: Tensor | None, kp: int, precision: str, nseg: int = 1
) -> Tensor:
    """Packed keys (B, nseg * kp): for each of the nseg strided reference segments (rows
    j = s mod nseg), the kp smallest scores |r|^2 - 2 x.r of each row, ascending.

    ``xs``/``rs`` are the centred fp32 features (cast to bf16 here for "bf16"); ``own`` (B,)
    holds the excluded reference row per query, or None. ``kp`` is a power of two,
    ``MIN_KP <= kp <= MAX_KP`` on a GPU. Empty slots (a segment with fewer than kp valid
    rows) hold ``INT64_MAX``.
    """
    if _interpreting():
        xs, rs, precision = _emulate_input_rounding(xs, rs, precision)
    bf16 = precision == "bf16"
    sel = torch.bfloat16 if bf16 else torch.float32
    xs = xs.to(sel).contiguous()
    rs = rs.to(sel).contiguous()
    b, d = xs.shape
    n = rs.shape[0]
    keys = torch.empty((b, nseg * kp), dtype=torch.int64, device=xs.device)
    if b == 0:
        return keys
    cfg = _config(kp, d, precision)
    own_t = own if own is not None else torch.full((b,), -1, dtype=torch.int64, device=xs.device)
    grid = (triton.cdiv(b, cfg["BLOCK_M"]), nseg)
    _knn_select_kernel[grid](
        xs, rs, sq_ref.float().contiguous(), own_t.contiguous(), keys, b, n, d, nseg, xs.stride(0), rs.stride(0),
        PRECISION="ieee" if bf16 else precision, IS_BF16=bf16,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=kp, BLOCK_D=cfg["BLOCK_D"],
        LOG_N=kp.bit_length() - 1, N_DIMS=(kp * cfg["BLOCK_M"]).bit_length() - 1, num_warps=cfg["num_warps"],
    )
    return keys


def _candidates(xs: Tensor, rs: Tensor, sq_ref: Tensor, own: Tensor | None, plan, precision: str) -> tuple[Tensor, Tensor]:
    """(candidate indices (R, n_cand), bound key (R,)): every reference row left out of the
    candidates has a key > the bound key, so a score >= its score (the certificate's bound)."""
    n_cand, kp, nseg = plan
    keys = select_candidates(xs, rs, sq_ref, own, kp, precision, nseg)
    if nseg == 1:
        keys = keys[:, :n_cand]
        return keys & 0xFFFFFFFF, keys[:, -1]
    # Level two: the n_cand smallest keys of the union; a full segment buffer dropped rows
    # with keys above its largest (an unfilled one holds INT64_MAX and dropped none).
    seg_last = keys.view(-1, nseg, kp)[:, :, -1].amin(dim=1)
    keys = torch.topk(keys, n_cand, dim=1, largest=False, sorted=True).values
    return keys & 0xFFFFFFFF, torch.minimum(keys[:, -1], seg_last)


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

    One host sync in the common case: the inputs' extremes (NaN/Inf check and fp32's range
    window, which the selection needs whatever the input dtype) are read together with the
    number of rows the certificate cannot prove and the number of distances too small to
    trust unchecked. Unproven rows go through the redo cascade (``_redo``), small distances
    through ``_host.in_range``, with a sync per stage, only then. Inputs outside the window,
    or whose distances fail that check, run again at fp32's top scale
    (``_host.run_in_range``); float64 that fails there too goes to the torch backend's
    float64 selection, which raises ValueError if even float64 cannot hold the distances.

    Args:
        precision: selection precision (default: ``get_precision()``).
        margin: extra candidates past k (default ``_host.default_margin(k)``); a one-level
            buffer is rounded up to a power of two, so usually more are kept.
    """
    precision = get_precision() if precision is None else precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    n = ref.shape[0]
    n_valid = n - int(exclude_self)
    m = _host.default_margin(k) if margin is None else margin
    plan = _plan(k, n_valid, m)
    if plan is None:
        return torch_backend.knn_forward(x, ref, k, self_offset, exclude_self, margin)
    ct, dim = _host.compute_dtype(x.dtype), x.shape[1]
    ext = _host.extremes(x, ref)
    q = _Queries.of(x, ref, self_offset if exclude_self else None)
    dist, idx, redo = _select_and_rerank(q, None, k, plan, n_valid, precision)
    # The window and the top scale are fp32's (the selection's) whatever the input; the
    # small-distance limit is the re-rank's (fp64 for fp64 input).
    scale, max_abs, n_redo, n_small = _host.read_checks(ext, redo, dist, torch.float32, dim, ct)  # the one sync
    if scale == 1.0:
        if n_redo:
            _redo(q, _host.first_rows(redo, n_redo), dist, idx, k, plan, n_valid, precision)
            n_small = None  # redone rows: check again
        if _host.in_range(x, ref, dist, idx, ct, n_small):
            return dist, idx
        scale = _host.top_scale(max_abs, torch.float32, dim)

    def run(xs: Tensor, rs: Tensor) -> tuple[Tensor, Tensor]:
        qs = _Queries.of(xs, rs, self_offset if exclude_self else None)
        d, i, rd = _select_and_rerank(qs, None, k, plan, n_valid, precision)
        n = 0 if rd is None else int(rd.sum())
        if n:
            _redo(qs, _host.first_rows(rd, n), d, i, k, plan, n_valid, precision)
        return d, i

    # float64 beyond what fp32's top scale leaves it: the torch backend selects in float64.
    fallback = None
    if ct == torch.float64:
        fallback = lambda xo, ro: torch_backend.knn_forward(xo, ro, k, self_offset, exclude_self, margin)  # noqa: E731
    return _host.run_in_range(run, x, ref, scale, max_abs, torch.float32, ct, fallback)


class _Queries:
    """The inputs of one forward, centred once: queries, reference, their squared norms, and
    each query's excluded reference row (None: none)."""

    def __init__(self, x, ref, xs, rs, sq_x, sq_ref, own):
        self.x, self.ref, self.xs, self.rs, self.sq_x, self.sq_ref, self.own = x, ref, xs, rs, sq_x, sq_ref, own

    @classmethod
    def of(cls, x: Tensor, ref: Tensor, self_offset: int | None) -> "_Queries":
        xs, rs, sq_x, sq_ref = _host.centred(x, ref)
        own = None if self_offset is None else torch.arange(x.shape[0], device=x.device) + self_offset
        return cls(x, ref, xs, rs, sq_x, sq_ref, own)


def _select_and_rerank(q: _Queries, rows: Tensor | None, k: int, plan, n_valid: int, precision: str):
    """(dist, idx, redo) for the query rows ``rows`` (None: all): Triton selection, the fused
    exact re-rank, and the rows the certificate cannot prove (None when every valid row was
    a candidate)."""
    n_cand, kp, nseg = plan
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    xs, sq_x = pick(q.xs), pick(q.sq_x)
    own = None if q.own is None else pick(q.own)
    r = xs.shape[0]
    step = _host.row_chunk(r, nseg * kp, KEY_ELEMS)
    if step >= r:
        cand, bound_key = _candidates(xs, q.rs, q.sq_ref, own, plan, precision)
    else:  # level-two keys past KEY_ELEMS: a few row chunks
        cand = torch.empty((r, n_cand), dtype=torch.int64, device=xs.device)
        bound_key = torch.empty(r, dtype=torch.int64, device=xs.device)
        for s in range(0, r, step):
            cand[s : s + step], bound_key[s : s + step] = _candidates(
                xs[s : s + step], q.rs, q.sq_ref, None if own is None else own[s : s + step], plan, precision
            )
    dist, idx = rerank.rerank(pick(q.x), q.ref, cand, k)
    if n_cand >= n_valid or r == 0:
        return dist, idx, None
    ct = sq_x.dtype
    bound = _decode(bound_key)[1].to(ct) + sq_x  # approx. squared distance bounding the left-out rows
    # Selection accumulates in fp32 whatever the input; fp64 input is rounded to fp32
    # (one unit) on top of the precision's own input rounding.
    unit = _host.INPUT_UNIT[precision] + (_host.FP32_EPS if ct == torch.float64 else 0.0)
    coef = _host.certificate_coef(xs.shape[1], _host.FP32_EPS, unit)
    return dist, idx, _host.uncertified(dist[:, -1], bound, sq_x, q.sq_ref.max(), coef)


def _redo(q: _Queries, rows: Tensor, dist: Tensor, idx: Tensor, k: int, plan, n_valid: int, precision: str) -> None:
    """Rows the certificate left unproven, in place: selected again in "ieee" (when a faster
    precision was used), and what that still leaves, exhaustively (``_host.exhaustive``)."""
    if precision != "ieee":
        d2, i2, redo = _select_and_rerank(q, rows, k, plan, n_valid, "ieee")
        n2 = 0 if redo is None else int(redo.sum())  # a second sync, only on this path
        if n2:
            sub = _host.first_rows(redo, n2)
            d2[sub], i2[sub] = _exhaustive(q, rows[sub], k)
    else:
        d2, i2 = _exhaustive(q, rows, k)
    dist[rows], idx[rows] = d2.to(dist.dtype), i2


def _exhaustive(q: _Queries, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return _host.exhaustive(q.x[rows], q.ref, k, None if q.own is None else q.own[rows])
