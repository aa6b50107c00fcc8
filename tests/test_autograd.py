"""Backward passes, custom-op registration (opcheck) and torch.compile."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ldreg_kernels as L
from ldreg_kernels import reference, registry
from utils import features, generator


def _min_gap(x, ref, k, exclude_self):
    """Smallest gap between consecutive ones of each row's k + 1 nearest distances."""
    d = torch.cdist(x, ref)
    if exclude_self:
        d[torch.arange(x.shape[0]), torch.arange(x.shape[0])] = float("inf")
    return float(d.sort(1).values[:, : k + 2].diff(dim=1).min())


def _inputs(backend, tag, b=14, n=23, d=6):
    """x (b, d) and ref (n, d), float64, redrawn until no two of a row's 8 nearest distances
    lie within 1e-4 of each other, against ref, x itself, or ref with x in its first b rows
    (the three references below): gradcheck's central differences (eps 1e-6) would otherwise
    straddle a neighbour swap, a kink, about once in a few hundred runs."""
    g = generator("grad", backend, tag)
    while True:
        x = features(b, d, g, torch.float64)
        ref = features(n, d, g, torch.float64)
        inside = torch.cat([x, ref[b:]])
        if min(_min_gap(x, ref, 7, False), _min_gap(x, x, 7, True), _min_gap(x, inside, 7, True)) > 1e-4:
            return x.requires_grad_(), ref


def test_gradcheck_knn_fixed_ref(device_backend):
    dev, backend = device_backend
    x, ref = _inputs(backend, "fixed")
    x, ref = x.detach().to(dev).requires_grad_(), ref.to(dev)
    assert torch.autograd.gradcheck(lambda a: L.knn(a, ref, 5, exclude_self=False, backend=backend)[0], (x,))


def test_gradcheck_knn_ref_requires_grad(device_backend):
    dev, backend = device_backend
    x, ref = _inputs(backend, "both")
    x, ref = x.detach().to(dev).requires_grad_(), ref.to(dev).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, r: L.knn(a, r, 5, exclude_self=False, backend=backend)[0], (x, ref)
    )


def test_gradcheck_self_reference_not_detached(device_backend):
    """ref=x (not detached): the gradient reaches x through both the queries and the reference."""
    dev, backend = device_backend
    x, _ = _inputs(backend, "self")
    x = x.detach().to(dev).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: L.knn(a, a, 4, exclude_self=True, backend=backend)[0], (x,))


@pytest.mark.parametrize("estimator", ["mom", "mle"])
@pytest.mark.parametrize("reg", ["l1", "l2"])
def test_gradcheck_lid_and_loss(device_backend, estimator, reg):
    dev, backend = device_backend
    x, ref = _inputs(backend, estimator + reg)
    x, ref = x.detach().to(dev).requires_grad_(), ref.to(dev)
    ref[:14] = x.detach()  # queries inside ref: self excluded at offset 0
    assert torch.autograd.gradcheck(lambda a: L.lid(a, ref, 6, estimator=estimator, exclude_self=True, backend=backend), (x,))
    assert torch.autograd.gradcheck(
        lambda a: L.ldreg_loss(a, ref, 6, 0.7, reg=reg, estimator=estimator, exclude_self=True, backend=backend), (x,)
    )


def test_grad_matches_autograd_through_oracle(device_backend):
    """Our backward op vs plain autograd through the oracle's cdist + sort, with one shared grad_output."""
    dev, backend = device_backend
    g = generator("oraclegrad", backend)
    x = features(40, 11, g, torch.float64)
    ref = features(60, 11, g, torch.float64)
    gout = torch.randn(40, 7, generator=g, dtype=torch.float64)
    xa, ra = x.clone().requires_grad_(), ref.clone().requires_grad_()
    d_or, _ = reference.knn(xa, ra, 7, exclude_self=False)
    gx_or, gr_or = torch.autograd.grad(d_or, (xa, ra), gout)
    xb, rb = x.to(dev).requires_grad_(), ref.to(dev).requires_grad_()
    d, _ = L.knn(xb, rb, 7, exclude_self=False, backend=backend)
    gx, gr = torch.autograd.grad(d, (xb, rb), gout.to(dev))
    torch.testing.assert_close(gx.cpu(), gx_or, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gr.cpu(), gr_or, rtol=1e-10, atol=1e-12)


def test_zero_distance_contributes_zero_gradient(device_backend):
    """A duplicate neighbour (r = 0) has no direction; like torch.cdist it gives 0, never NaN."""
    dev, backend = device_backend
    g = generator("zero", backend)
    x = features(10, 5, g, torch.float64)
    x[5:] = x[:5]
    xa = x.clone().to(dev).requires_grad_()
    d, idx = L.knn(xa, xa.detach(), 3, backend=backend)
    assert (d[:, 0] == 0).all()
    gout = torch.zeros_like(d)
    gout[:, 0] = 1.0  # only the zero-distance neighbour
    (gx,) = torch.autograd.grad(d, (xa,), gout)
    assert torch.equal(gx, torch.zeros_like(gx))
    loss = L.ldreg_loss(xa, k=3, beta=1.0, backend=backend)
    (gl,) = torch.autograd.grad(loss, (xa,))
    assert torch.isfinite(gl).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_grad_dtype(device_backend, dtype):
    dev, backend = device_backend
    g = generator("lpgrad", backend, dtype)
    x = features(30, 9, g, dtype).to(dev).requires_grad_()
    L.ldreg_loss(x, k=5, beta=1.0, backend=backend).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    # Same gradient as float32 on the same (rounded) values, within bf16's rounding.
    x32 = x.detach().float().requires_grad_()
    L.ldreg_loss(x32, k=5, beta=1.0, backend=backend).backward()
    torch.testing.assert_close(x.grad.float(), x32.grad.to(dtype).float(), rtol=0, atol=0)


def test_opcheck_every_forward_op(device_backend):
    dev, backend = device_backend
    op = registry.resolve_backend(backend, torch.device(dev)).default
    for tag, excl, off in [("a", False, 0), ("b", True, 3)]:
        g = generator("opcheck", backend, tag)
        x = features(12, 7, g, torch.float64).to(dev).requires_grad_()
        ref = features(20, 7, g, torch.float64).to(dev).requires_grad_()
        torch.library.opcheck(op, (x, ref, 4, off, excl))
        torch.library.opcheck(op, (x.detach().float(), ref.detach().float(), 4, off, excl))


def test_opcheck_every_backward_op(device_backend):
    dev, backend = device_backend
    op = getattr(torch.ops.ldreg, registry.BACKENDS[backend].backward).default
    g = generator("opcheck-bwd", backend)
    x = features(12, 7, g, torch.float64).to(dev)
    ref = features(20, 7, g, torch.float64).to(dev)
    d, i = L.knn(x, ref, 4, exclude_self=False, backend="torch")
    gd = torch.randn(d.shape, generator=g, dtype=torch.float64).to(dev)
    for need_ref in (False, True):
        torch.library.opcheck(op, (gd, x, ref, i, d, need_ref))


def test_double_backward_raises_clearly(device_backend):
    """create_graph=True works for the first gradient; differentiating it again names the
    limitation instead of torch's "no autograd formula was registered"."""
    dev, backend = device_backend
    x = features(20, 5, generator("double-bwd"), torch.float64).to(dev).requires_grad_()
    (g,) = torch.autograd.grad(L.ldreg_loss(x, k=4, beta=1.0, backend=backend), x, create_graph=True)
    want = torch.autograd.grad(L.ldreg_loss(x, k=4, beta=1.0, backend=backend), x)[0]
    # On CPU the plain backward takes the LID gradient's C++ twin, create_graph its torch
    # formulas (differentiable): the same values up to the sums' order.
    torch.testing.assert_close(g.detach(), want, rtol=1e-13, atol=1e-16)
    with pytest.raises(RuntimeError, match="double backward through the kNN ops .* is not implemented"):
        g.square().sum().backward()


class _OpLog(TorchDispatchMode):
    """Records every ldreg op the dispatcher runs."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "ldreg":
            self.ops.append(func._opname)
        return func(*args, **(kwargs or {}))


def test_backward_follows_forward(device_backend, monkeypatch):
    """Each backend's autograd runs its own backward op, and only that one."""
    dev, backend = device_backend
    g = generator("bwd-follows", backend)
    x = features(40, 9, g).to(dev).requires_grad_()
    ref = features(70, 9, g).to(dev).requires_grad_()
    d, _ = L.knn(x, ref, 5, exclude_self=False, backend=backend)
    with _OpLog() as log:
        d.sum().backward()
    assert log.ops == [registry.BACKENDS[backend].backward], log.ops
    assert x.grad is not None and ref.grad is not None


def test_python_backward_kernels_run(monkeypatch):
    """The Python backward ops call their own kernels (wrapped here to count calls)."""
    from ldreg_kernels.backends import torch as torch_backend

    impls = [(torch_backend, "knn_backward", "torch")]
    if "triton" in L.available_backends("cpu"):
        from ldreg_kernels.backends.triton import knn_bwd

        impls.append((knn_bwd, "knn_backward", "triton"))
    for module, attr, backend in impls:
        calls = []
        orig = getattr(module, attr)
        monkeypatch.setattr(module, attr, lambda *a, _o=orig: calls.append(1) or _o(*a))
        x = features(30, 6, generator("bwd-count", backend)).requires_grad_()
        L.ldreg_loss(x, k=4, backend=backend).backward()
        assert calls == [1], backend


def test_torch_compile_fullgraph_matches_eager():
    g = generator("compile")
    x = features(48, 16, g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()

    def step(a):
        return (a**2).mean() + L.ldreg_loss(a, k=8, beta=0.5, backend="torch")

    compiled = torch.compile(step, fullgraph=True)
    lc = compiled(x1)
    lc.backward()
    le = step(x2)
    le.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(x1.grad, x2.grad)
