"""Host-side helpers every kNN backend shares, and the one exactness certificate.

Backends select candidates with a fast, inexact score (``|r|^2 - 2 x.r`` from a matmul,
possibly on TF32/bf16 inputs), then re-rank them with exact direct differences. Whether that
re-rank is provably the exact answer is decided here, once, by :func:`certificate_coef` and
:func:`uncertified`; rows it cannot certify are redone by :func:`exhaustive`, whose memory is
bounded whatever the data (a collapsed batch sends every row there).

The C++ kernels carry the same certificate and margin inline in ``csrc/knn.h``; the ops
``ldreg::certificate_coef`` and ``ldreg::default_margin`` export them so a test checks both
agree.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _budget

# Deduplicating the reference (torch.unique over its rows) costs about as much as the
# direct distances of 40 query rows (N=262144, D=256, 2-core CPU: 1.1 s); below this many
# redone rows it cannot pay for itself.
DEDUP_MIN_ROWS = 64

# Relative error of rounding one selection input to the selection format, per Triton/cuBLAS
# selection precision. Conservative: TF32 taken as truncation to 10 mantissa bits (some
# tensor-core paths truncate), bf16 as one unit of its 8-bit significand, 3xTF32 as the
# hi + lo split of two truncations (|x - hi - lo| <= 2^-20 |x|) plus the dropped lo*lo
# product (<= 2^-20 |x||r|), i.e. <= 3 * 2^-20 per product = 2 * (1.5 * 2^-20) -> 2^-19.
INPUT_UNIT = {"ieee": 0.0, "tf32": 2.0**-10, "tf32x3": 2.0**-19, "bf16": 2.0**-8}
FP32_EPS = 2.0**-23


# Range scaling (:func:`window_scale`). Inputs whose largest magnitude m lies inside
# [2^-e, 2^e] for the selection arithmetic (RANGE_EXP) run as they are; outside it they are
# scaled by a power of two s that puts m s at the top of the range (:func:`top_scale`:
# [2^(t - 1), 2^t), t = TOP_EXP - ceil(log2(D) / 2), so the largest squared quantity, about
# 16 D (m s)^2, stays below 2^123 in float32 and 2^1019 in float64). Scaling by a power of
# two is exact, and the top leaves the most room below: a distance d is computed to full
# accuracy whenever its squares stay clear of the subnormals, d s >= sqrt(D) SMALL_FRAC
# (:func:`small_limit`: the D squared terms then lose at most D 2^-126 (2^-1022) to flushing,
# half a unit of d^2). So float32 distances are exact for d >= 2^-108 D m (float64:
# 2^-989 D m) whatever else the batch holds; a returned distance below the limit
# (:func:`in_range`) is redone at the top scale, and raises ValueError there
# (:func:`range_error`). Same constants as kRangeExp*, kTopExp*, kSmallExp* in csrc/knn.h.
RANGE_EXP = {torch.float32: 32, torch.float64: 256}
TOP_EXP = {torch.float32: 59, torch.float64: 507}
SMALL_EXP = {torch.float32: -51, torch.float64: -484}
# The guarantees those constants give, as documented (README, "Bad and degenerate input").
EXACT_EXP = {torch.float32: -108, torch.float64: -989}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Distances are computed and returned in float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, without the (no-op, but counted) ``to`` call when it is already."""
    return t if t.dtype == dtype else t.to(dtype)


def default_margin(k: int) -> int:
    """Extra candidates kept past k: a wider candidate set makes the certificate pass more
    often (the k-th distance is further from the last candidate's). Same as csrc/knn.h."""
    return max(8, k // 4)


row_chunk = _budget.chunk_rows


def certificate_coef(dim: int, acc_unit: float, input_unit: float = 0.0) -> float:
    """Coefficient c of the certificate: a row's k-th neighbour is proven exact unless
    ``w^2 >= bound - c * (|x|^2 + max_j |r_j|^2)``.

    Notation: x and r_j are the centred query and reference rows (centred on the reference
    mean, in the compute dtype), D = ``dim``, u = ``acc_unit`` (the machine epsilon, one full
    ulp, of the arithmetic that accumulates the scores and the exact distances: 2^-23 for
    fp32, 2^-52 for fp64; a full ulp rather than half so that truncating adders, as in
    tensor cores, are covered), v = ``input_unit`` (the relative rounding of a selection
    input to the selection format; 0 when the matmul reads the inputs as they are).
    A = |x|^2 + max_j |r_j|^2, so 2|x||r_j| <= A, |r_j|^2 <= A and d_j^2 <= 2A.
    ``bound`` = (largest approximate score kept) + |x|^2; every reference row left out of
    the candidates has an approximate score at least that large, w is the k-th exact
    distance found among the candidates.

    Error of a left-out row's true squared distance d_j^2 below ``bound`` (standard model of
    floating-point arithmetic, gamma_n <= n u; Higham, Accuracy and Stability, ch. 3):

    - centring, x - mu and r - mu each rounded once: |d^2(centred) - d^2| <= 2u(|x| + |r|)^2
      <= 4u A;
    - rounding of the selection inputs (TF32, bf16, ...): |x~.r~ - x.r| <= (2v + v^2)
      sum|x_i r_i| <= (2v + v^2)|x||r| (Cauchy-Schwarz), doubled by the -2 x.r: (2v + v^2) A;
    - the dot product's accumulation, any summation order: <= D u (1 + v)^2 |x||r|,
      doubled: D u (1 + v)^2 A;
    - the norms |r_j|^2 and |x|^2: D u (|x|^2 + |r|^2) <= D u A;
    - score |r|^2 - 2x.r, then + |x|^2, then bound - c A: three roundings of values <= 2A:
      6u A.

    Error of the exact k-th distance w above its computed value: differences, squares, a
    D-term sum, sqrt, and squaring again: (D + 6) u w^2, with w^2 < bound <= 2A(1 + ...)
    whenever the certificate passes: 2(D + 6) u A.

    Total: ((4D + 22)(1 + v)^2 u + 2v + v^2) A. Second-order terms (products of two of the
    above, gamma_n versus n u, the rounding of A itself) are absorbed by a factor 17/16,
    valid while D u <= 1/64 and v <= 2^-8; past that (fp32 with D > 131072) the coefficient
    is infinite and every row is redone exhaustively.

    The bound is rigorous (worst case, not probabilistic): if the certificate passes, no
    left-out reference row can be closer than, or tie with, the k-th neighbour, so the
    re-ranked answer, lower-index tie-break included, is the exact one. It is loose by
    about sqrt(D) against typical rounding, which costs only redos on rows whose k-th and
    (k + margin)-th distances nearly coincide.

    Args:
        dim: feature dimension D.
        acc_unit: machine epsilon of the accumulation (``torch.finfo(dtype).eps``).
        input_unit: a value of :data:`INPUT_UNIT` for the selection precision.

    Returns:
        c, or ``inf`` where the first-order model does not hold.
    """
    u, v = float(acc_unit), float(input_unit)
    if dim * u > 1.0 / 64 or v > 2.0**-8:
        return math.inf
    return 17.0 / 16.0 * ((4 * dim + 22) * (1 + v) ** 2 * u + 2 * v + v * v)


def uncertified(w: Tensor, bound: Tensor, sq_x: Tensor, max_sq_ref: Tensor | float, coef: float) -> Tensor:
    """(R,) bool: the rows the certificate cannot prove exact (see :func:`certificate_coef`).

    A row passes only if ``w^2 < bound - err`` provably holds, so whatever cannot be
    compared (an infinite ``coef`` times A = 0 is NaN) is redone. A mask, not indices: the
    caller reads its count at its one host sync. Same as ``certified`` in csrc/knn.h.

    Args:
        w: (R,) k-th exact distance per row.
        bound: (R,) approximate squared distance of the last candidate kept per row.
        sq_x: (R,) |x|^2 of the centred queries; ``max_sq_ref``: max_j |r_j|^2.
        coef: :func:`certificate_coef` for this selection.
    """
    ct = bound.dtype
    w, err = as_dtype(w, ct), torch.add(as_dtype(sq_x, ct), max_sq_ref)  # A; times coef (a Scalar) below
    return ~(torch.add(bound, err, alpha=-coef) > w * w)


def first_rows(mask: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` True entries of ``mask``, ascending, given their number (read
    at an earlier sync): a stable sort, where ``nonzero`` would sync again to size its output."""
    return torch.argsort(mask.to(torch.int8), descending=True, stable=True)[:count]


def row_scale(grad: Tensor) -> Tensor:
    """(B, 1): for each row of a kNN backward's incoming gradient, the power of two s with
    max_j |g_ij| s in [0.5, 1) (1 for a zero row), clamped to 2^+-126 (float32) / 2^+-1022
    (float64) so that s and 1 / s are exact normal numbers. Same as ``grad_row_scale`` in
    csrc/knn.h.

    The coefficients g / r leave the dtype's range at extreme feature scales: the LID's
    gradient goes like 1 / w (at w ~ 1e-20 in float32, g / r ~ 1e40 overflows; at 1e30,
    1e-60 flushes to 0), a loss on the distances themselves like w. Taken as (g s) / r, each
    term of a row's sum is at most 1 in size, and the sum is divided by s after: in range
    at any scale the forward accepts, exact where nothing overflowed."""
    g = grad.abs().amax(dim=1, keepdim=True)
    lim = 1022 if g.dtype == torch.float64 else 126
    s = (torch.frexp(g).mantissa / g).nan_to_num_(nan=1.0)  # 2^-e for g = m 2^e; 0 / 0 -> 1
    return s.clamp_(2.0**-lim, 2.0**lim)


def round_to_tf32(t: Tensor) -> Tensor:
    """fp32 values truncated to TF32's 10 mantissa bits: what a TF32 matmul reads.

    Emulates TF32 selection where the hardware has none (CPU, the Triton interpreter), with
    the truncation model the certificate assumes.
    """
    return (t.float().contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def centred(x: Tensor, ref: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x - mu, ref - mu, |x - mu|^2, |ref - mu|^2) in the compute dtype, mu = ref's mean.

    Distances are translation invariant: centring on the reference mean shrinks |x|^2 and
    |r|^2, and with them the certificate's error (it scales with A). Half inputs are
    selected in fp32 (fp16 |r|^2 overflows at |r| ~ 256).
    """
    ct = compute_dtype(x.dtype)
    rc = as_dtype(ref, ct)
    mu = rc.mean(dim=0)
    xs, rs = as_dtype(x, ct) - mu, rc - mu
    return xs, rs, (xs * xs).sum(dim=1), (rs * rs).sum(dim=1)


def exact_distances(x: Tensor, ref: Tensor, idx: Tensor) -> Tensor:
    """||x_i - ref[idx_ij]|| as direct differences, (B, m), in the compute dtype.

    Rows are gathered in chunks sized by :func:`_budget.budget` for the device (one chunk on
    a GPU at the paper's shapes), into one buffer reused in place: a fresh temporary per
    chunk made the CPU page-fault on every chunk. Each row's norm is the same computation
    whatever the chunking, so the result is too, bit for bit.
    """
    ct = compute_dtype(x.dtype)
    b, m = idx.shape
    d = x.shape[1]
    out = torch.empty((b, m), dtype=ct, device=x.device)
    if out.numel() == 0:
        return out
    rc, x3, flat = as_dtype(ref, ct), as_dtype(x, ct).unsqueeze(1), idx.reshape(-1)
    step = row_chunk(b, m * d, _budget.budget(x.device).gather)
    buf = torch.empty((step * m, d), dtype=ct, device=x.device)
    full = buf.view(step, m, d)
    for s in range(0, b, step):  # views made once, and only a ragged last chunk slices buf
        r = min(step, b - s)
        g = full if r == step else buf[: r * m].view(r, m, d)
        torch.index_select(rc, 0, flat[s * m : (s + r) * m], out=g.view(r * m, d))
        torch.sub(g, x3[s : s + r], out=g)
        torch.linalg.vector_norm(g, dim=2, out=out[s : s + r])
    return out


def rerank(x: Tensor, ref: Tensor, cand: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact distances of candidate indices (B, m), the k smallest, ties to the lower index.

    float32: non-negative distances order like their bits, so ``(bits << 32) | index`` is one
    int64 key in (distance, index) order and one topk selects and sorts, ties included.
    float64 leaves no room for the index: a stable sort over index-sorted candidates."""
    if compute_dtype(x.dtype) == torch.float32:
        d = exact_distances(x, ref, cand)
        keys = torch.topk(d.view(torch.int32).to(torch.int64).bitwise_left_shift_(32).bitwise_or_(cand),
                          k, dim=1, largest=False, sorted=True).values
        return keys.bitwise_right_shift(32).to(torch.int32).view(torch.float32), keys.bitwise_and_(0xFFFFFFFF)
    cand, _ = torch.sort(cand, dim=1)
    d = exact_distances(x, ref, cand)
    d, order = torch.sort(d, dim=1, stable=True)
    return d[:, :k].contiguous(), torch.gather(cand, 1, order[:, :k])


def exhaustive(x: Tensor, ref: Tensor, k: int, own: Tensor | None) -> tuple[Tensor, Tensor]:
    """Exact kNN of every row of ``x`` against all of ``ref`` (direct differences), skipping
    reference row ``own[i]`` for query i; ties to the lower index.

    Streams the reference in column blocks with a running (rows, k) best list, so memory is
    O(``_budget.budget(device).exhaustive``) however many rows need it (a collapsed batch sends all of them).
    Distances come from ``torch.cdist`` without the matmul expansion (no rows x N x D
    temporary). When many rows are redone (``DEDUP_MIN_ROWS``) and the reference has many
    exact duplicates (a collapsed batch, the case that needs this most), it is
    deduplicated first: a duplicate's distance is the same computation
    on the same operands, so distances to the distinct rows, spread back, are identical.
    float32 distances are non-negative, so their bits order like the values and
    ``(bits << 32) | index`` is one int64 key in (distance, index) order: a topk of keys
    selects exactly, ties included, at a fraction of a stable sort's cost.
    """
    b, n = x.shape[0], ref.shape[0]
    ct = compute_dtype(x.dtype)
    dist = torch.empty((b, k), dtype=ct, device=x.device)
    idx = torch.empty((b, k), dtype=torch.int64, device=x.device)
    if b == 0:
        return dist, idx
    budget = _budget.budget(x.device).exhaustive
    cols = max(k, min(n, budget // 8))
    step = row_chunk(b, k + cols, budget)
    refc = as_dtype(ref, ct)
    uniq = inv = None
    if b >= DEDUP_MIN_ROWS:
        uniq, inv = torch.unique(refc, dim=0, return_inverse=True)
        if 2 * uniq.shape[0] > n:
            uniq = inv = None
    for s in range(0, b, step):
        xc = x[s : s + step].to(ct)
        r = xc.shape[0]
        if uniq is not None:
            du = torch.cdist(xc, uniq, compute_mode="donot_use_mm_for_euclid_dist")
        best = torch.empty((r, 0), dtype=torch.int64 if ct == torch.float32 else ct, device=x.device)
        best_i = torch.empty((r, 0), dtype=torch.int64, device=x.device)
        for j0 in range(0, n, cols):
            blk = refc[j0 : j0 + cols]
            if uniq is None:
                d = torch.cdist(xc, blk, compute_mode="donot_use_mm_for_euclid_dist")
            else:
                d = du[:, inv[j0 : j0 + cols]]
            if own is not None:  # own row to +inf where it lies in this block, without a sync
                col = own[s : s + step].unsqueeze(1) - j0
                inside = (col >= 0) & (col < blk.shape[0])
                col = col.clamp(0, blk.shape[0] - 1)
                d.scatter_(1, col, torch.where(inside, float("inf"), d.gather(1, col)))
            j = torch.arange(j0, j0 + blk.shape[0], device=x.device)
            if ct == torch.float32:
                keys = (d.view(torch.int32).to(torch.int64) << 32) | j
                best = torch.topk(torch.cat([best, keys], dim=1), k, dim=1, largest=False).values
            else:
                # float64: no room for the index in the key. Earlier blocks hold lower
                # indices, so a stable sort of [best, block] is the (distance, index) order.
                cd, order = torch.sort(torch.cat([best, d], dim=1), dim=1, stable=True)
                best_i = torch.gather(torch.cat([best_i, j.expand(r, -1)], dim=1), 1, order[:, :k])
                best = cd[:, :k]
        if ct == torch.float32:
            dist[s : s + step] = (best >> 32).to(torch.int32).view(torch.float32)
            idx[s : s + step] = best & 0xFFFFFFFF
        else:
            dist[s : s + step], idx[s : s + step] = best, best_i
    return dist, idx


def extremes(x: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """(max |x|, max |ref|) as 0-d tensors on the device, without a host sync; float32 or
    float64 (half inputs widened, so that counts read beside them stay exact).

    The infinity norm propagates NaN and an Inf is its own maximum, so these two values also
    tell whether the inputs are finite (:func:`window_scale`), without a boolean copy of a
    large ``ref``."""
    ct = compute_dtype(x.dtype)
    inf = float("inf")
    if x.dtype == ct:
        return torch.linalg.vector_norm(x, inf), torch.linalg.vector_norm(ref, inf)
    return torch.linalg.vector_norm(x, inf, dtype=ct), torch.linalg.vector_norm(ref, inf, dtype=ct)


def _check_finite(mx: float, mr: float) -> None:
    for name, v in (("x", mx), ("ref", mr)):
        if not math.isfinite(v):
            raise ValueError(
                f"{name} contains NaN or Inf; LID is undefined for non-finite features "
                "(check the encoder output before the regulariser)"
            )


def top_scale(m: float, arith: torch.dtype, dim: int) -> float:
    """The power of two s with m s in [2^(t - 1), 2^t), t = ``TOP_EXP[arith]`` - ceil(log2(D) / 2):
    the largest scale at which no squared quantity of the search can overflow (1.0 for m = 0).
    At most 2^1023 (float64 m below ~1e-155: every distance float64 can represent is then far
    above :func:`small_limit`)."""
    if m == 0:
        return 1.0
    t = TOP_EXP[arith] - (max(dim - 1, 0).bit_length() + 1) // 2
    return math.ldexp(1.0, min(t - math.frexp(m)[1], 1023))


def small_limit(arith: torch.dtype, dim: int) -> float:
    """Distances (in the units they were computed in) below which they may have lost
    accuracy to subnormal squares: sqrt(D) 2^SMALL_EXP. Exact zeros are checked apart."""
    return math.sqrt(dim) * math.ldexp(1.0, SMALL_EXP[arith])


def window_scale(mx: float, mr: float, arith: torch.dtype, dim: int) -> tuple[float, float]:
    """(scale, m) from the two values of :func:`extremes` read on the host: 1.0 when
    m = max(|x|, |ref|) lies in the window of ``arith`` (:data:`RANGE_EXP`), else
    :func:`top_scale`. ValueError for NaN/Inf."""
    _check_finite(mx, mr)
    m = max(mx, mr)
    lim = RANGE_EXP[arith]
    if m == 0 or 2.0**-lim <= m <= 2.0**lim:
        return 1.0, m
    return top_scale(m, arith, dim), m


def read_checks(
    ext: tuple[Tensor, Tensor], redo: Tensor | None, dist: Tensor, arith: torch.dtype, dim: int,
    dist_arith: torch.dtype | None = None,
) -> tuple[float, float, int, int]:
    """The one host sync of a forward: the inputs' :func:`extremes`, the number of rows in
    ``redo`` (the certificate's mask; None: none) and the smallest distance in ``dist``,
    read together (a minimum is one call; a count would need a bool-to-float copy).

    Returns (scale, m, n_redo, small): :func:`window_scale` for ``arith`` (ValueError for
    NaN/Inf), the count, and 1 if some distance lies below :func:`small_limit` (zeros
    included; ``dist_arith``: the arithmetic they were computed in, default ``arith``),
    else 0: the ``n_small`` of :func:`in_range`."""
    ct = ext[0].dtype
    parts = [*ext, dist.amin()] if redo is None else [*ext, dist.amin(), redo.sum(dtype=ct)]
    host = torch.stack(parts).tolist()
    scale, m = window_scale(host[0], host[1], arith, dim)
    small = int(host[2] < small_limit(dist_arith or arith, dim))
    return scale, m, int(host[3]) if redo is not None else 0, small


def range_scale(x: Tensor, ref: Tensor, arith: torch.dtype) -> tuple[float, float]:
    """(scale, m): :func:`window_scale` of the inputs' :func:`extremes`, one host sync.

    Multiplying by a power of two is exact and distances are scale-equivariant, so a
    backend run on the scaled inputs returns the same neighbours and, divided by the scale,
    the same distances bit for bit, where the unscaled squared distances would overflow
    (|x| ~ 1e19 in fp32) or underflow. Raises ValueError for NaN/Inf. Same as
    ``range_scale`` in csrc/knn.cpp.
    """
    mx, mr = torch.stack(extremes(x, ref)).tolist()
    return window_scale(mx, mr, arith, x.shape[1])


def in_range(x: Tensor, ref: Tensor, dist: Tensor, idx: Tensor, arith: torch.dtype, n_small: int | None = None) -> bool:
    """Whether ``dist`` (computed in ``arith`` from ``x``, ``ref`` scaled by a power of two)
    holds no distance that may have lost accuracy to underflow: none is below
    :func:`small_limit` except exact zeros, and each zero is a true duplicate (``x_i`` equal
    to ``ref[idx_ij]`` in every feature: a difference whose squares all flushed to zero
    reads 0 too). ``n_small``: 0 if no distance is below the limit (True without a sync),
    nonzero if some is, None if not known yet. Host syncs; chunked by the device's gather budget.
    Same as ``knn_in_range`` in csrc/knn.cpp."""
    dim = x.shape[1]
    lim = small_limit(arith, dim)
    if n_small == 0:
        return True
    small = dist < lim
    if n_small is None and not bool(small.any()):
        return True
    if bool((small & (dist > 0)).any()):
        return False
    rows, cols = small.nonzero(as_tuple=True)
    js = idx[rows, cols]
    step = row_chunk(rows.numel(), dim, _budget.budget(x.device).gather)
    for s in range(0, rows.numel(), step):
        if bool((x[rows[s : s + step]] != ref[js[s : s + step]]).any()):
            return False
    return True


def range_error(arith: torch.dtype, m: float, dim: int) -> ValueError:
    """The ValueError for a batch whose distances ``arith`` cannot all hold exactly."""
    name = "float32" if arith == torch.float32 else "float64"
    floor = math.ldexp(float(dim), EXACT_EXP[arith])
    hint = "pass float64 features" if arith == torch.float32 else "rescale or drop the outlying rows"
    return ValueError(
        f"the features span too wide a range for {name}: beside features up to |{m:g}| some nonzero "
        f"distance is too small for {name} to hold exactly (the distances are exact when every nonzero "
        f"neighbour distance is at least 2^{EXACT_EXP[arith]} * D * max|feature| = {floor * m:g}); {hint}"
    )


def scaled_inputs(x: Tensor, ref: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``x`` and ``ref`` times ``scale`` in the compute dtype (a half input scaled up would
    overflow its own dtype)."""
    ct = compute_dtype(x.dtype)
    return mul_pow2(as_dtype(x, ct), scale), mul_pow2(as_dtype(ref, ct), scale)


def mul_pow2(t: Tensor, scale: float) -> Tensor:
    """``t * scale`` for a power of two ``scale``, exact: in two steps where ``scale`` is no
    normal float32 (a Scalar is rounded to the tensor's dtype: 2^150 would read inf)."""
    e = math.frexp(scale)[1] - 1
    if -126 <= e <= 127 or t.dtype == torch.float64:
        return t * scale
    return t * math.ldexp(1.0, e // 2) * math.ldexp(1.0, e - e // 2)


def unscale(dist: Tensor, scale: float, max_abs: float) -> Tensor:
    """``dist / scale`` (exact); ValueError when the dtype cannot hold the distances: one
    overflows float32, or a nonzero one falls below the dtype's smallest normal, where it keeps
    fewer bits than the dtype's precision (and the backward's 1 / distance overflows). Only a
    scaled run can produce either: unscaled, such a distance fails :func:`in_range` first."""
    dist = mul_pow2(dist, 1.0 / scale)
    tiny = torch.finfo(dist.dtype).tiny
    bad = (dist > 0) & (dist < tiny)
    if dist.dtype != torch.float64:
        bad |= ~torch.isfinite(dist)
    if bool(bad.any()):
        if dist.dtype != torch.float64 and not bool(torch.isfinite(dist).all()):
            raise ValueError(
                f"the distances overflow float32 (largest |feature| is {max_abs:g}); pass float64 features"
            )
        raise underflow_error(dist.dtype, max_abs)
    return dist


def underflow_error(dtype: torch.dtype, max_abs: float) -> ValueError:
    """The ValueError for a nonzero distance below the dtype's smallest normal."""
    name = "float32" if dtype != torch.float64 else "float64"
    hint = "pass float64 features" if name == "float32" else "rescale the features"
    return ValueError(
        f"the distances underflow {name}: some nonzero neighbour distance is below {torch.finfo(dtype).tiny:g}, "
        f"{name}'s smallest normal, where it cannot be held to {name}'s precision (largest |feature| is "
        f"{max_abs:g}); {hint}"
    )


def run_in_range(run, x: Tensor, ref: Tensor, scale: float, m: float, arith: torch.dtype, dist_arith: torch.dtype | None = None,
                 fallback=None) -> tuple[Tensor, Tensor]:
    """The slow path of every Python forward: ``run`` (scaled inputs -> (dist, idx)) at the
    top scale :func:`top_scale` (``scale``, when the first attempt already ran there: then
    only the check), checked by :func:`in_range` against the original inputs, unscaled.
    ``fallback`` (optional, (x, ref) -> (dist, idx)): what to run instead of raising
    :func:`range_error` (Triton's fp32 selection of float64 hands over to a float64 one)."""
    dim = x.shape[1]
    xs, rs = scaled_inputs(x, ref, scale)
    dist, idx = run(xs, rs)
    if not in_range(x, ref, dist, idx, dist_arith or arith):
        if fallback is not None:
            return fallback(x, ref)
        raise range_error(dist_arith or arith, m, dim)
    return unscale(dist, scale, m), idx
