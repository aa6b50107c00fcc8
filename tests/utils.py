"""Test helpers: random inputs, oracle comparison with gap-aware index checks, tolerances."""

from __future__ import annotations

import os
import zlib

import torch

from ldreg_kernels import reference

# A fresh seed per session unless pinned; printed in the pytest header to reproduce a failure.
SESSION_SEED = int(os.environ.get("LDREG_TEST_SEED", int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF))

# Per-dtype relative accuracy of the returned distances (computed in fp32 for <= fp32 input).
DIST_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def generator(*salt: object) -> torch.Generator:
    """A CPU generator seeded from the session seed and the caller's salt (e.g. test id)."""
    h = zlib.crc32(repr(salt).encode())
    return torch.Generator().manual_seed((SESSION_SEED * 1_000_003 + h) % (2**63))


def features(n: int, d: int, g: torch.Generator, dtype=torch.float32, kind: str = "gauss") -> torch.Tensor:
    """Random features: isotropic Gaussian, or a noisy low-dimensional manifold (kind="manifold")."""
    if kind == "manifold":
        z = torch.randn(n, max(1, d // 3), generator=g, dtype=torch.float64)
        a = torch.randn(z.shape[1], d, generator=g, dtype=torch.float64)
        x = torch.tanh(z @ a) + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(n, d, generator=g, dtype=torch.float64) * (0.1 + 3 * torch.rand((), generator=g, dtype=torch.float64))
    return x.to(dtype)


def random_case(g: torch.Generator, max_b: int = 70, max_d: int = 40) -> dict:
    """Random B <= N, D, k (2 <= k <= N-1), self_offset, data kind."""
    b = int(torch.randint(3, max_b, (), generator=g))
    n = b + int(torch.randint(0, 40, (), generator=g))
    d = int(torch.randint(1, max_d, (), generator=g))
    k = int(torch.randint(2, n, (), generator=g))
    off = int(torch.randint(0, n - b + 1, (), generator=g))
    kind = "manifold" if int(torch.randint(0, 2, (), generator=g)) else "gauss"
    return dict(b=b, n=n, d=d, k=k, self_offset=off, kind=kind)


def make_inputs(case: dict, g: torch.Generator, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, ref) with x placed inside ref at self_offset, as in a gathered batch."""
    ref = features(case["n"], case["d"], g, dtype, case["kind"])
    x = ref[case["self_offset"] : case["self_offset"] + case["b"]].clone()
    return x, ref


def oracle(x: torch.Tensor, ref: torch.Tensor, k: int, exclude_self=True, self_offset=0):
    """float64 (dist, idx) with k+1 columns (the extra one gives the k-th/k+1-th gap)."""
    kk = min(k + 1, ref.shape[0] - int(exclude_self))
    return reference.knn(x.double(), ref.double(), kk, exclude_self, self_offset)


def robust_cdist(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """float64 (B, N) distances by direct differences, each pair's difference scaled by the
    power of two of its largest |component| first: no square under- or overflows, so the
    distances are exact to float64 rounding at any magnitude (plain cdist flushes
    differences below ~1e-154 and overflows above ~1e154). Rows in chunks."""
    x, ref = x.double(), ref.double()
    out = torch.empty(x.shape[0], ref.shape[0], dtype=torch.float64)
    step = max(1, (1 << 22) // max(1, ref.shape[0] * x.shape[1]))
    for s in range(0, x.shape[0], step):
        out[s : s + step] = robust_norm(x[s : s + step].unsqueeze(1) - ref.unsqueeze(0))
    return out


def robust_norm(diff: torch.Tensor) -> torch.Tensor:
    """||diff|| over the last dim in float64, each vector scaled by the power of two of its
    largest |component| first (no square under- or overflows). A subnormal largest component
    (its power of two, 2^1040 or so, would overflow) is first raised by 2^600, exactly."""
    diff = diff.double()
    mx = diff.abs().amax(dim=-1, keepdim=True)
    one = torch.ones((), dtype=torch.float64)
    pre = torch.where(mx < 2.0**-900, torch.full((), 2.0**600, dtype=torch.float64), one)
    diff, mx = diff * pre, mx * pre
    p = torch.where(mx > 0, torch.exp2(-torch.frexp(mx).exponent.double()), one)
    return torch.linalg.vector_norm(diff * p, dim=-1) / p[..., 0] / pre[..., 0]


def robust_oracle(x: torch.Tensor, ref: torch.Tensor, k: int, exclude_self=True, self_offset=0):
    """:func:`oracle` on :func:`robust_cdist`: (dist, idx) with k + 1 columns, stable order."""
    d = robust_cdist(x, ref)
    if exclude_self:
        rows = torch.arange(x.shape[0])
        d[rows, rows + self_offset] = float("inf")
    kk = min(k + 1, ref.shape[0] - int(exclude_self))
    dist, idx = torch.sort(d, dim=1, stable=True)
    return dist[:, :kk], idx[:, :kk]


def first_mismatches(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, n: int = 5) -> str:
    rows = torch.nonzero(mask).flatten()[:n].tolist()
    return "; ".join(f"row {r}: got {a[r].tolist()} want {b[r].tolist()}" for r in rows)


def assert_knn_matches(dist, idx, x, ref, k, exclude_self=True, self_offset=0, rtol=None, robust=False):
    """Sorted distances match the float64 oracle; index sets match where the gap allows.
    ``robust``: against :func:`robust_oracle` (features beyond float64's squaring range).

    Returns the fraction of rows whose index set was checked, so a caller can assert the
    check was not vacuous.
    """
    d64, i64 = (robust_oracle if robust else oracle)(x, ref, k, exclude_self, self_offset)
    rtol = DIST_RTOL[x.dtype] if rtol is None else rtol
    assert dist.shape == (x.shape[0], k) and idx.shape == (x.shape[0], k)
    assert idx.dtype == torch.int64
    want = d64[:, :k]
    scale = want[:, -1:].clamp_min(1e-300)
    bad = ((dist.double() - want).abs() > rtol * scale + 1e-300).any(1)
    assert not bad.any(), "distance mismatch: " + first_mismatches(dist, want, bad)
    # Returned distances must be the exact distances of the returned indices.
    if robust:
        direct = torch.stack([robust_cdist(x[i : i + 1], ref[idx[i]])[0] for i in range(x.shape[0])]) \
            if x.shape[0] else torch.empty(0, k, dtype=torch.float64)
    else:
        direct = torch.linalg.vector_norm(x.double().unsqueeze(1) - ref.double()[idx], dim=2)
    bad = ((dist.double() - direct).abs() > rtol * scale).any(1)
    assert not bad.any(), "distances are not those of the returned indices: " + first_mismatches(dist, direct, bad)
    if exclude_self:
        own = torch.arange(x.shape[0]).unsqueeze(1) + self_offset
        assert not (idx == own).any(), "a query's own row was returned"
    if d64.shape[1] == k:  # k == N - excluded: the whole reference set is the answer
        sep = torch.ones(x.shape[0], dtype=torch.bool)
    else:
        sep = (d64[:, k] - d64[:, k - 1]) > 8 * rtol * d64[:, k]
    got = torch.sort(idx, 1).values
    ref_sets = torch.sort(i64[:, :k], 1).values
    bad = sep & (got != ref_sets).any(1)
    assert not bad.any(), "index sets differ: " + first_mismatches(got, ref_sets, bad)
    return float(sep.float().mean())


# Relative LID accuracy per unit of the estimator's condition number (measured on fp32:
# worst 2.8e-7 over 80 random 300 x 48 cases, i.e. ~2.4 ulp).
LID_RTOL = {torch.float64: 1e-13, torch.float32: 6e-7, torch.bfloat16: 6e-7, torch.float16: 6e-7}


def lid_rtol(d64: torch.Tensor, estimator: str, dtype) -> torch.Tensor:
    """Per-row relative LID tolerance: LID_RTOL times (1 + the estimator's condition number).

    MoM: dLID/LID ~ eps * w/(w - m). MLE: dLID/LID ~ eps * LID.
    """
    if estimator == "mom":
        w, m = d64[:, -1], d64[:, :-1].mean(1)
        cond = w / (w - m)
    else:
        cond = reference.lid_mle(d64)
    return LID_RTOL[dtype] * (1 + cond)
