"""Gradients are finite wherever the forward is, and scale exactly with the features
(issue #24 item 2).

LID is scale-free, so the gradient of ``ldreg_loss``/``lid`` at features c x is the one at
x times 1 / c. The backward's coefficients g / r do not scale like that: at c ~ 1e-20 in
float32 they reach ~1e40 (Inf, then NaN), at 1e30 ~1e-60 (0). Every backward therefore
takes them relative to a per-row power of two (``_host.row_scale`` in the Python backends,
``grad_row_scale`` in csrc/knn.h) and divides it out after the sum, which is exact.

Checked over scales 10^e, e in [-30, 30] for float32 and [-300, 300] for float64 (where
every distance still fits the dtype: |x| sqrt(D) 2 well below the largest float), for
every backend that runs here, both estimators and both regularisers, against the same
backend's gradient at scale 1. Also knn's own gradient for an upstream gradient that is
scale-free (d.sum()), goes like 1 / c (what the LID sends), or like c (d.pow(2).sum()).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import ldreg_kernels as L
from utils import SESSION_SEED, generator

BACKENDS = L.available_backends("cpu")
MAX_EXP = {torch.float32: 30, torch.float64: 300}
# Norm-wise: the largest entry's error against the largest entry. The inputs at scale c
# are rounded once more than at scale 1 (relative 6e-8 in float32), which the gradient
# amplifies by its conditioning; entries far below the largest need no relative match.
RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}
# The Triton interpreter takes ~0.6 s for a loss and its backward at 24 x 6.
EXAMPLES = {"triton": 3}
DEFAULT_EXAMPLES = 20
N_ROWS, DIM, K = 24, 6, 5

# Every backend takes the row scale from the row's largest |g| (csrc/knn.h grad_row_scale,
# _host.row_scale), so an upstream gradient that grows with the distances (g = 2 r from
# d.pow(2).sum(): g s ~ w^2 with a distance-based scale, NaN at 1e20 and 0 at 1e-25 in
# float32) stays in range too; reference runs the torch backward.
GRAD_GROWS_OK = {"cpu", "cuda", "reference", "torch", "triton"}


def _settings(backend: str):
    return settings(max_examples=EXAMPLES.get(backend, DEFAULT_EXAMPLES), deadline=None, database=None,
                    derandomize=False, print_blob=True, suppress_health_check=[HealthCheck.too_slow])


# (dtype, e): the scale 10^e, e over the dtype's range (hypothesis tries its ends too).
SCALES = st.sampled_from([torch.float32, torch.float64]).flatmap(
    lambda dt: st.tuples(st.just(dt), st.integers(-MAX_EXP[dt], MAX_EXP[dt])))


def _base(salt: object, n: int = N_ROWS, d: int = DIM) -> torch.Tensor:
    return torch.randn(n, d, generator=generator("grad-scale", salt), dtype=torch.float64)


def _at(x64: torch.Tensor, c: float, dtype: torch.dtype) -> torch.Tensor:
    """x64 * c in ``dtype``, a fresh leaf that requires grad."""
    return (x64 * c).to(dtype).requires_grad_()


def _grad(fn, x: torch.Tensor) -> torch.Tensor:
    x.grad = None
    fn(x).backward()
    return x.grad


def assert_scaled(got: torch.Tensor, c: float, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """got (at scale c) is finite and got * c == want (at scale 1), norm-wise."""
    assert torch.isfinite(got).all(), f"{what}: non-finite gradient at scale {c:.1e}: {got}"
    g, w = got.double() * c, want.double()
    ref = w.abs().max().item()
    assert ref > 0 and math.isfinite(ref), f"{what}: scale-1 gradient {ref}"
    err = (g - w).abs().max().item()
    assert err <= RTOL[dtype] * ref, f"{what}: at scale {c:.1e}, |grad * c - grad_1| = {err:.3e} > {RTOL[dtype]:.0e} * {ref:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ldreg_loss_gradient_scales(backend):
    @seed(SESSION_SEED)  # LDREG_TEST_SEED replays hypothesis' draws too
    @_settings(backend)
    @given(scale=SCALES, estimator=st.sampled_from(["mom", "mle"]), reg=st.sampled_from(["l1", "l2"]),
           salt=st.integers(0, 2**31 - 1))
    def check(scale, estimator, reg, salt):
        dtype, e = scale
        c = 10.0 ** e
        x64 = _base(salt)

        def loss(x):
            return L.ldreg_loss(x, k=K, beta=1.0, reg=reg, estimator=estimator, backend=backend)

        want = _grad(loss, _at(x64, 1.0, dtype))
        got = _grad(loss, _at(x64, c, dtype))
        assert_scaled(got, c, want, dtype, f"{backend} ldreg_loss {estimator} {reg} {dtype}")

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lid_gradient_scales(backend):
    @seed(SESSION_SEED)
    @_settings(backend)
    @given(scale=SCALES, estimator=st.sampled_from(["mom", "mle"]), salt=st.integers(0, 2**31 - 1))
    def check(scale, estimator, salt):
        dtype, e = scale
        c = 10.0 ** e
        x64 = _base(salt)
        wts = torch.rand(N_ROWS, generator=generator("grad-scale-w", salt), dtype=torch.float64).to(dtype) + 0.5

        def weighted_lid(x):
            return (L.lid(x, k=K, estimator=estimator, backend=backend) * wts).sum()

        want = _grad(weighted_lid, _at(x64, 1.0, dtype))
        got = _grad(weighted_lid, _at(x64, c, dtype))
        assert_scaled(got, c, want, dtype, f"{backend} lid {estimator} {dtype}")

    check()


def _knn_grads(backend, x64, r64, c, gfac, g1, dtype):
    """(grad_x, grad_ref) of sum(knn(x, ref)[0] * g1 * gfac) at features scaled by c."""
    x, ref = _at(x64, c, dtype), _at(r64, c, dtype)
    d, _ = L.knn(x, ref, k=K, exclude_self=False, backend=backend)
    d.backward((g1 * gfac).to(d.dtype))
    return x.grad, ref.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_gradient_scales(backend):
    """knn's own backward (to x and to a ref that requires grad) for an upstream gradient
    g1 * c^p: the gradient at c x is the one at x times c^p."""
    powers = [-1, 0, 1] if backend in GRAD_GROWS_OK else [-1, 0]

    @seed(SESSION_SEED)
    @_settings(backend)
    @given(scale=SCALES, p=st.sampled_from(powers), salt=st.integers(0, 2**31 - 1))
    def check(scale, p, salt):
        dtype, e = scale
        c = 10.0 ** e
        x64, r64 = _base(salt, n=12), _base((salt, "ref"), n=20)
        g1 = torch.randn(12, K, generator=generator("grad-scale-g", salt), dtype=torch.float64)
        want = _knn_grads(backend, x64, r64, 1.0, 1.0, g1, dtype)
        got = _knn_grads(backend, x64, r64, c, c**p, g1, dtype)
        for name, a, b in zip(("grad_x", "grad_ref"), got, want):  # got * c^-p == want
            assert_scaled(a, c ** (-p), b, dtype, f"{backend} knn {name} g ~ c^{p} {dtype}")

    check()


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
@pytest.mark.parametrize("estimator", ["mom", "mle"])
@pytest.mark.parametrize("scale", [1e-20, 1e-25])
def test_issue_reproducer_tiny_features(backend, estimator, scale):
    """The issue's reproducer: Inf at 1e-20 and NaN at 1e-25 on the cpu backend before."""
    torch.manual_seed(0)
    x = (torch.randn(40, 8) * scale).requires_grad_()
    L.ldreg_loss(x, k=5, beta=1.0, estimator=estimator, backend=backend).backward()
    assert x.grad.isfinite().all()
    assert x.grad.abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,scales", [(torch.float32, (1e-30, 1e30)), (torch.float64, (1e-300, 1e300))])
def test_ends_of_the_range(backend, dtype, scales):
    """Both estimators and regularisers, lid and knn (g ~ 1 / c) at the two ends of each
    dtype's range: fixed cases that run whatever hypothesis draws."""
    x64 = _base("ends", n=16)
    for c in scales:
        for est in ("mom", "mle"):
            for reg in ("l1", "l2"):
                def loss(x):
                    return L.ldreg_loss(x, k=K, beta=1.0, reg=reg, estimator=est, backend=backend)
                assert_scaled(_grad(loss, _at(x64, c, dtype)), c, _grad(loss, _at(x64, 1.0, dtype)), dtype,
                              f"{backend} ldreg_loss {est} {reg} {dtype}")
        g1 = torch.randn(16, K, generator=generator("ends-g"), dtype=torch.float64)
        for p in ((-1, 0, 1) if backend in GRAD_GROWS_OK else (-1, 0)):
            got = _knn_grads(backend, x64, x64 + 0.25, c, c**p, g1, dtype)
            want = _knn_grads(backend, x64, x64 + 0.25, 1.0, 1.0, g1, dtype)
            for name, a, b in zip(("grad_x", "grad_ref"), got, want):
                assert_scaled(a, c ** (-p), b, dtype, f"{backend} knn {name} g ~ c^{p} {dtype}")


def test_native_op_at_the_float32_limits():
    """ldreg::knn_backward_native straight, at distances near the largest float32 and in
    the smallest normals, for an upstream gradient of 1 and of 1 / w: finite and within a
    few float32 units of the float64 formula sum_j g_j (x - ref_j) / r_j (at r > 2^126 the
    scaled coefficients (g s) / r <= 1 / r are subnormal: a few bits fewer)."""
    if "cpu" not in BACKENDS:
        pytest.skip("native extension not built")
    for w_scale in (2.0**126, 2.0**-120):
        for g_scale in (1.0, 1.0 / w_scale):
            ref = torch.tensor([[1.0], [1.5], [1.9], [-1.2]], dtype=torch.float64) * w_scale
            x = torch.zeros(1, 1, dtype=torch.float64)
            idx = torch.tensor([[0, 1, 2, 3]])
            dist = (x - ref[idx[0]]).abs().T
            g = torch.tensor([[1.0, -0.5, 2.0, 0.75]], dtype=torch.float64) * g_scale
            want_x = (g * (x - ref[idx[0]]).T / dist).sum()
            gx, gref = torch.ops.ldreg.knn_backward_native(g.float(), x.float(), ref.float(), idx, dist.float(), True)
            assert torch.isfinite(gx).all() and torch.isfinite(gref).all(), (w_scale, g_scale, gx, gref)
            assert abs(gx.double().item() - want_x.item()) <= 1e-5 * abs(want_x.item()), (w_scale, g_scale, gx, want_x)
            assert torch.allclose(gref.double().flatten(), -(g * (x - ref[idx[0]]).T / dist).flatten(), rtol=1e-5, atol=0)
