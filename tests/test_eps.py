"""The range of ``eps`` (issue #24, item 3): finite everywhere it is accepted, refused below.

``eps`` is a fraction of each row's k-th distance (``ldreg_kernels.estimators``). Below
the square root of the compute dtype's smallest normal number (2**-63 in float32, which
half and bfloat16 use too; 2**-511 in float64) the floored values or the gradient's
1 / eps**2 leave the dtype: float32 gave Inf, -Inf, NaN or LID 0 at eps 1e-38, 1e-46 and
1e-300, and ``ldreg_loss`` returned nan. Such an eps is now refused with a ValueError; every
eps from the floor up to 1 gives a finite, positive LID, a finite loss and a finite
gradient, for both estimators, both regularisers, float32 and float64, on every backend,
on the rows whose LID the floors decide.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

import ldreg_kernels as L
from ldreg_kernels.estimators import lid_from_distances
from utils import features, generator

BACKENDS = L.available_backends("cpu")
FLOOR = {torch.float32: 2.0**-63, torch.float64: 2.0**-511}
F32_MSG = ("the smallest eps whose LID and gradient stay finite in float32{via}: pass eps >= 1.1e-19, "
           "or float64 features (eps >= 1.5e-154)")
F64_MSG = "the smallest eps whose LID and gradient stay finite in float64: pass eps >= 1.5e-154"
K = 4


def refusal(eps: float, dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return f"eps={eps!r} is below 2**-511 (about 1.492e-154), " + F64_MSG
    via = "" if dtype == torch.float32 else f" ({str(dtype)[6:]} is computed in float32)"
    return f"eps={eps!r} is below 2**-63 (about 1.084e-19), " + F32_MSG.format(via=via)


def degenerate_rows(g: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, int]]:
    """Random rows plus the rows whose LID the eps floors decide, at k = 4, and where each
    of those sits. Coordinates are small integers (exact in every dtype) except ``near``'s
    neighbour, placed so that m / w is a small multiple of eps (set per eps by the caller)."""
    d = 3
    e = torch.eye(d, dtype=torch.float64)
    blocks = {
        "star": torch.cat([torch.zeros(1, d, dtype=torch.float64), e, -e]) + 40,  # row 0: 6 neighbours at 1
        "dups": torch.cat([torch.zeros(4, d, dtype=torch.float64), 3 * e]) - 40,  # k - 1 duplicates: m = 0
        "zero": torch.full((5, d), 80.0, dtype=torch.float64),  # all k distances 0
        # query at 0, k - 2 duplicates, one neighbour at t (set later), the k-th at 1, then far rows
        "near": torch.cat([torch.zeros(3, d, dtype=torch.float64), e[:1], e[:1], 5 * e[1:]]) + torch.tensor([0, 120, 0]),
    }
    rows, at = [features(12, d, g, torch.float64)], {}
    for name, b in blocks.items():
        at[name] = sum(r.shape[0] for r in rows)
        rows.append(b)
    return torch.cat(rows).to(dtype), at


def place_near(x: torch.Tensor, at: dict[str, int], eps: float) -> torch.Tensor:
    """Put ``near``'s third neighbour at t = 6 eps from the query (k - 1 = 3 neighbours: m / w = 2 eps)."""
    x = x.clone()
    if eps > 0.01:  # no room below w = 1: the neighbour stays at 1
        return x
    t = torch.tensor(6 * eps, dtype=torch.float64).to(x.dtype)
    x[at["near"] + 3, 0] = t
    return x


def _accepted_eps(dtype: torch.dtype) -> list[float]:
    g = generator("eps-grid", str(dtype))
    lo = math.log(FLOOR[dtype])
    drawn = [math.exp(lo + float(torch.rand((), generator=g, dtype=torch.float64)) * -lo) for _ in range(2)]
    return [FLOOR[dtype], *drawn, 1e-12, 0.5]


# ---------------------------------------------------------------- refused below the floor
ENTRY_POINTS = {
    "lid": lambda x, eps: L.lid(x, k=K, eps=eps),
    "ldreg_loss": lambda x, eps: L.ldreg_loss(x, k=K, eps=eps),
    "lid_stats": lambda x, eps: L.lid_stats(x, ks=(K, 6), eps=eps),
    "ldreg_loss_with_stats": lambda x, eps: L.ldreg_loss_with_stats(x, k=K, ks=(6,), eps=eps),
    "LDReg": lambda x, eps: L.LDReg(k=K, eps=eps)(x),
    "geometric_mean_lid": lambda x, eps: L.geometric_mean_lid(x, k=K, eps=eps),
    "lid_from_distances": lambda x, eps: lid_from_distances(torch.ones(3, K, dtype=x.dtype), "mom", eps),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_eps_below_the_dtype_floor_is_refused(entry, dtype):
    """The issue's eps values (1e-38, 1e-46, 1e-300), and the first double below the floor."""
    if entry == "lid_from_distances" and dtype in (torch.float16, torch.bfloat16):
        pytest.skip("lid_from_distances sees the float32 distances of half input")
    x = features(12, 3, generator("eps-refused", entry, str(dtype)), dtype)
    floor = FLOOR[torch.float64 if dtype == torch.float64 else torch.float32]
    for eps in (1e-38, 1e-46, 1e-300, math.nextafter(floor, 0.0)):
        if eps >= floor:
            continue
        with pytest.raises(ValueError, match=re.escape(refusal(eps, dtype))):
            ENTRY_POINTS[entry](x, eps)
    out = ENTRY_POINTS[entry](x, floor)  # the floor itself is accepted
    values = out[0] if isinstance(out, tuple) else out
    values = torch.stack(list(values.lids.values())) if isinstance(values, L.LidStats) else values
    assert torch.isfinite(torch.as_tensor(values)).all()


def test_the_issues_reproducer_is_refused():
    """``L.lid(torch.ones(10, 3), k=4, eps=1e-300)`` gave nan."""
    with pytest.raises(ValueError, match=re.escape(refusal(1e-300, torch.float32))):
        L.lid(torch.ones(10, 3), k=4, eps=1e-300)
    with pytest.raises(ValueError, match=re.escape(refusal(1e-300, torch.float64))):
        L.lid(torch.ones(10, 3, dtype=torch.float64), k=4, eps=1e-300)
    # Where the dtype is not known yet (a module, a metric), (0, 1) is checked at once and the
    # floor at each call: eps=1e-100 suits float64 features, not float32 ones.
    reg = L.LDReg(k=4, eps=1e-100)
    assert torch.isfinite(reg(torch.ones(10, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match=re.escape(refusal(1e-100, torch.float32))):
        reg(torch.ones(10, 3))


def test_the_floor_is_checked_inside_the_metadata_exchange_of_a_global_ref():
    """With ref="global" the checks run where every rank sees them (no process group: the
    local batch); the dtype is known there."""
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match=re.escape(refusal(1e-30, torch.float32))):
        L.lid(x, "global", k=4, eps=1e-30)
    with pytest.raises(ValueError, match=re.escape(refusal(1e-30, torch.float32))):
        L.ldreg_loss(x, "global", k=4, eps=1e-30)


# ---------------------------------------------------------------- finite everywhere accepted
def _check_finite(backend: str, dtype: torch.dtype, eps: float, combos) -> None:
    base, at = degenerate_rows(generator("eps-finite", backend, str(dtype)), dtype)
    x0 = place_near(base, at, eps)
    for est, reg in combos:
        where = f"{backend} {dtype} eps={eps!r} {est} {reg}"
        lids = L.lid(x0, k=K, estimator=est, eps=eps, backend=backend)
        assert torch.isfinite(lids).all() and (lids > 0).all(), (where, lids)
        x = x0.clone().requires_grad_()
        loss = L.ldreg_loss(x, k=K, beta=1.0, reg=reg, estimator=est, eps=eps, backend=backend)
        loss.backward()
        assert torch.isfinite(loss), where
        assert torch.isfinite(x.grad).all(), (where, x.grad[~torch.isfinite(x.grad).all(1)])
        # The documented outcomes of the degenerate rows (estimators.py), at every accepted eps.
        star, dups, zero, near = (float(lids[at[n]]) for n in ("star", "dups", "zero", "near"))
        if est == "mom":
            assert star == pytest.approx(1 / eps, rel=1e-6), where
            assert dups == pytest.approx(eps, rel=1e-6) and zero == 1.0, where
            # m / w = 2 eps: LID = 2 eps / (1 - 2 eps), the smallest the floor lets through
            if eps <= 0.01:
                assert near == pytest.approx(2 * eps / (1 - 2 * eps), rel=1e-5), where
        else:
            assert star == pytest.approx(K / eps, rel=1e-6) and zero == pytest.approx(K / eps, rel=1e-6), where


COMBOS = list(itertools.product(("mom", "mle"), ("l1", "l2")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_every_accepted_eps_gives_finite_lid_loss_and_gradient(backend, dtype):
    for eps in _accepted_eps(dtype):
        _check_finite(backend, dtype, eps, COMBOS)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_the_floor_is_finite_on_triton(dtype):
    """The interpreter is slow: the floor only, every estimator and regulariser."""
    _check_finite("triton", dtype, FLOOR[dtype], COMBOS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_no_eps_in_0_1_gives_nan_inf_or_zero(dtype):
    """A log grid over the whole of (0, 1): each eps is refused with the floor's message, or
    gives finite, positive LIDs and a finite loss and gradient (before: Inf, -Inf, NaN, 0)."""
    refused = 0
    for e10 in range(-320, 0, 7):
        eps = 10.0**e10
        if eps == 0.0:
            continue
        try:
            L.lid(torch.ones(6, 2, dtype=dtype), k=K, eps=eps)
        except ValueError as err:
            assert str(err) == refusal(eps, dtype)
            refused += 1
            continue
        _check_finite("torch", dtype, eps, COMBOS)
    assert refused == sum(1 for e10 in range(-320, 0, 7) if 0 < 10.0**e10 < FLOOR[dtype])
