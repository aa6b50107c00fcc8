"""torch.use_deterministic_algorithms(True) and the kNN backward.

grad_ref is a scatter: by default the Triton and CUDA backwards add into it with float
atomics, whose order (hence last bits) varies from run to run on a GPU. In deterministic
mode they reduce it per reference row in a fixed order instead (a stable sort of the
neighbour indices, then one segment sum per row; knn_bwd.py, knn_cuda.cu). The tests: in
deterministic mode every backend's gradients are bit-identical from run to run and equal
to the default path's within the rounding bound of grad_bounds.py; the Triton sorted
reduction is what runs (under the interpreter the atomics are sequential, hence
deterministic anyway, so the test checks the path, not only the bits). On a GPU the same
tests run for the cuda and triton backends (``device_backend``).
"""

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import ldreg_kernels as L  # noqa: E402
from grad_bounds import assert_grad_close, grad_bounds  # noqa: E402
from utils import features, generator  # noqa: E402


@contextlib.contextmanager
def deterministic(on: bool = True):
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


def _hub_case(dev, dtype=torch.float32):
    """Queries and a memory bank where a few bank rows are the neighbour of many queries
    (long segments next to empty ones), plus an exact duplicate (zero distance)."""
    g = generator("det-hub", dtype)
    bank = features(90, 24, g, dtype)
    x = torch.cat([bank[:3].repeat(12, 1) + 0.05 * features(36, 24, g, dtype), features(21, 24, g, dtype)])
    x[-1] = bank[50]
    return x.to(dev), bank.to(dev)


def _grads(x, bank, k, backend, gout):
    xa, ra = x.clone().requires_grad_(), bank.clone().requires_grad_()
    d, i = L.knn(xa, ra, k, exclude_self=False, backend=backend)
    gx, gr = torch.autograd.grad(d, (xa, ra), gout)
    return gx, gr, d.detach(), i


def test_deterministic_backward_every_backend(device_backend):
    dev, backend = device_backend
    x, bank = _hub_case(dev)
    k = 7
    gout = torch.randn(x.shape[0], k, generator=generator("det-gout")).to(dev)
    gx0, gr0, d, i = _grads(x, bank, k, backend, gout)
    with deterministic():
        gx1, gr1, _, _ = _grads(x, bank, k, backend, gout)
        gx2, gr2, _, _ = _grads(x, bank, k, backend, gout)
    assert torch.equal(gx1, gx2) and torch.equal(gr1, gr2), "deterministic mode: runs differ"
    bx, br = grad_bounds(gout, x, bank, i, d)
    assert_grad_close(gx1, gx0, bx, "grad_x, deterministic vs default")
    assert_grad_close(gr1, gr0, br, "grad_ref, deterministic vs default")


triton_only = pytest.mark.skipif(
    "triton" not in L.available_backends("cuda" if torch.cuda.is_available() else "cpu"),
    reason="triton backend unavailable")


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_triton_deterministic_mode_runs_the_sorted_reduction(monkeypatch, dtype):
    from ldreg_kernels.backends import torch as torch_backend
    from ldreg_kernels.backends.triton import knn_bwd

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, bank = _hub_case(dev, dtype)
    dist, idx = torch_backend.knn_forward(x, bank, 7, 0, False)
    gd = torch.randn(dist.shape, generator=generator("det-gd", dtype), dtype=dist.dtype).to(dev)
    sorted_calls, atomic = [], []
    sorted_fn, kern = knn_bwd._grad_ref_sorted, knn_bwd._knn_bwd_kernel
    monkeypatch.setattr(knn_bwd, "_grad_ref_sorted", lambda *a: sorted_calls.append(1) or sorted_fn(*a))

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kw):
                atomic.append(kw["NEED_REF"])
                return kern[grid](*args, **kw)
            return run

    monkeypatch.setattr(knn_bwd, "_knn_bwd_kernel", Spy())
    gx0, gr0 = knn_bwd.knn_backward(gd, x, bank, idx, dist, True)
    assert (sorted_calls, atomic) == ([], [True])
    with deterministic():
        gx1, gr1 = knn_bwd.knn_backward(gd, x, bank, idx, dist, True)
        gx2, gr2 = knn_bwd.knn_backward(gd, x, bank, idx, dist, True)
    assert sorted_calls == [1, 1] and atomic == [True, False, False]  # no atomics in deterministic mode
    assert torch.equal(gx1, gx2) and torch.equal(gr1, gr2)
    assert torch.equal(gx1, gx0)  # grad_x: the same kernel, the same order
    _, br = grad_bounds(gd, x, bank, idx, dist)
    assert_grad_close(gr1, gr0, br, "grad_ref, sorted vs atomic")
    # Bank rows nobody picked get exactly zero.
    unused = torch.ones(bank.shape[0], dtype=torch.bool, device=dev)
    unused[idx.reshape(-1)] = False
    assert unused.any() and (gr1[unused] == 0).all()
