"""Bad input gets a clear error naming the argument; degenerate input gets finite values."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import ldreg_kernels as L
from utils import features, generator

X = features(10, 4, generator("errors-x"))
REF = features(20, 4, generator("errors-ref"))


def _raises(exc, msg, fn, *args, **kw):
    with pytest.raises(exc, match=re.escape(msg)):
        fn(*args, **kw)


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(k=0), ValueError, "k must be >= 1, got k=0"),
        (dict(k=-3), ValueError, "k must be >= 1, got k=-3"),
        (dict(k=10), ValueError, "k=10 exceeds the N - 1 = 9 reference rows left after excluding self"),
        (dict(k=11, exclude_self=False), ValueError, "k=11 exceeds the N = 10 reference rows"),
        (dict(k=2.0), TypeError, "k must be an int, got float"),
        (dict(k=True), TypeError, "k must be an int, got bool"),
        (dict(k=torch.tensor(3.0)), TypeError, "k must be an int, got Tensor"),
        (dict(k=3, self_offset=0.0), TypeError, "self_offset must be an int, got float"),
        (dict(k=3, self_offset=1), ValueError, "self_offset=1 puts the 10 queries outside ref's 10 rows"),
        (dict(k=3, self_offset=-1), ValueError, "self_offset=-1 puts the 10 queries outside"),
        (dict(k=3, backend="nope"), ValueError, "backend must be 'auto' or one of"),
    ],
)
def test_bad_k_offset_backend(kwargs, exc, msg):
    _raises(exc, msg, L.knn, X, **kwargs)


def test_integer_and_real_scalars_of_any_kind_are_accepted():
    """numpy and 0-d tensor scalars are numbers: k/self_offset via __index__, beta/eps via float."""
    np = pytest.importorskip("numpy")
    want = L.knn(X, REF, 3, exclude_self=True, self_offset=5)
    for k, off in ((np.int64(3), np.int32(5)), (torch.tensor(3), torch.tensor(5))):
        got = L.knn(X, REF, k, exclude_self=True, self_offset=off)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    loss = L.ldreg_loss(X, None, 3, 0.1, eps=1e-9)
    for beta, eps in ((np.float32(0.1), np.float64(1e-9)), (torch.tensor(0.1, dtype=torch.float64), torch.tensor(1e-9))):
        assert torch.allclose(L.ldreg_loss(X, None, np.int64(3), beta, eps=eps), loss)
        assert L.LDReg(np.int64(3), beta, eps=eps).beta == pytest.approx(0.1)


def test_sparse_features_are_rejected_by_name():
    _raises(TypeError, "x must be a dense (strided) tensor, got layout torch.sparse_coo; pass x.to_dense()",
            L.knn, X.to_sparse(), k=3)
    _raises(TypeError, "ref must be a dense (strided) tensor, got layout torch.sparse_csr; pass ref.to_dense()",
            L.lid, X, REF.to_sparse_csr(), 3)


def test_k_limit_with_separate_ref():
    _raises(ValueError, "k=20 exceeds the N - 1 = 19", L.knn, X, REF, 20, exclude_self=True)
    _raises(ValueError, "k=21 exceeds the N = 20 reference rows", L.knn, X, REF, 21)
    assert L.knn(X, REF, 20)[0].shape == (10, 20)


def test_exclude_self_defaults_to_ref_is_none():
    """A tensor ref (a memory bank) keeps every row; None excludes each query's own row."""
    bank = torch.cat([X, REF])
    d, i = L.knn(X, bank, 3, backend="torch")
    assert (i[:, 0] == torch.arange(10)).all() and (d[:, 0] == 0).all()  # the query's copy in the bank
    d, i = L.knn(X, None, 3, backend="torch")
    assert not (i == torch.arange(10).unsqueeze(1)).any()
    d2, i2 = L.knn(X, X, 3, exclude_self=True, backend="torch")
    assert torch.equal(i, i2) and torch.equal(d, d2)
    _raises(ValueError, "self_offset=3 needs exclude_self=True: with a tensor ref, exclude_self defaults to "
            "False since 0.2.0", L.knn, X, bank, 3, self_offset=3)
    _raises(TypeError, "exclude_self must be a bool or None, got int", L.knn, X, bank, 3, exclude_self=1)


@pytest.mark.parametrize(
    "x, ref, exc, msg",
    [
        (X, REF[:, :3], ValueError, "x and ref must have the same feature dimension: x has D=4, ref has D=3"),
        (X, REF.double(), TypeError, "x and ref must have the same dtype: x is torch.float32, ref is torch.float64"),
        (X, REF.to("meta"), ValueError, "x and ref must be on the same device: x on cpu, ref on meta"),
        (X[0], None, ValueError, "x must be 2-D (rows, features), got shape (4,)"),
        (X.unsqueeze(0), None, ValueError, "x must be 2-D (rows, features), got shape (1, 10, 4)"),
        (X, REF[0], ValueError, "ref must be 2-D (rows, features), got shape (4,)"),
        (X[:0], None, ValueError, "x is empty: shape (0, 4)"),
        (X, REF[:0], ValueError, "ref is empty: shape (0, 4)"),
        (X[:, :0], None, ValueError, "x is empty: shape (10, 0)"),
        (X.long(), None, TypeError, "x must be a floating-point tensor (float16, bfloat16, float32, float64), got torch.int64"),
        (X, REF.int(), TypeError, "ref must be a floating-point tensor"),
        (X.bool(), None, TypeError, "got torch.bool"),
        (X.numpy(), None, TypeError, "x must be a torch.Tensor, got ndarray"),
        (X, REF.tolist(), TypeError, "ref must be a torch.Tensor, got list"),
    ],
)
def test_bad_tensors(x, ref, exc, msg):
    _raises(exc, msg, L.knn, x, ref, 2, exclude_self=ref is None)
    _raises(exc, msg, L.lid, x, ref, 2, exclude_self=ref is None)
    _raises(exc, msg, L.ldreg_loss, x, ref, 2, 0.1, exclude_self=ref is None)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs(device_backend, bad):
    dev, backend = device_backend
    x = X.clone()
    x[3, 1] = bad
    _raises(ValueError, "x contains NaN or Inf", L.knn, x.to(dev), k=3, backend=backend)
    ref = REF.clone()
    ref[7, 2] = bad
    _raises(ValueError, "ref contains NaN or Inf", L.lid, X.to(dev), ref.to(dev), 3, exclude_self=False, backend=backend)
    _raises(ValueError, "x contains NaN or Inf", L.LDReg(k=3, backend=backend), x.to(dev).requires_grad_())


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(k=1), ValueError, "k must be >= 2 to estimate LID, got k=1"),
        (dict(k=3, estimator="mean"), ValueError, "estimator must be one of ('mom', 'mle'), got 'mean'"),
        (dict(k=3, eps=0.0), ValueError, "eps must be in (0, 1), a fraction of each row's k-th neighbour distance, got 0.0"),
        (dict(k=3, eps=-1e-3), ValueError, "eps must be in (0, 1), a fraction of each row's k-th neighbour distance, got -0.001"),
        (dict(k=3, eps=float("inf")), ValueError, "eps must be in (0, 1), a fraction of each row's k-th neighbour distance, got inf"),
        (dict(k=3, eps=float("nan")), ValueError, "eps must be in (0, 1), a fraction of each row's k-th neighbour distance, got nan"),
        (dict(k=3, eps=1.0), ValueError, "eps must be in (0, 1), a fraction of each row's k-th neighbour distance, got 1.0"),
        (dict(k=3, eps="1e-9"), TypeError, "eps must be a real number, got str"),
        (dict(k="3"), TypeError, "k must be an int, got str"),
        (dict(k=None), TypeError, "k must be an int, got NoneType"),
        (dict(k=3.0), TypeError, "k must be an int, got float"),
        (dict(k=True), TypeError, "k must be an int, got bool"),
    ],
)
def test_bad_lid_args(kwargs, exc, msg):
    _raises(exc, msg, L.lid, X, **kwargs)
    _raises(exc, msg, L.LDReg, **kwargs)


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(beta=float("nan")), ValueError, "beta must be finite, got nan"),
        (dict(beta=float("-inf")), ValueError, "beta must be finite, got -inf"),
        (dict(beta="0.1"), TypeError, "beta must be a real number, got str"),
        (dict(beta=None), TypeError, "beta must be a real number, got NoneType"),
        (dict(beta=1j), TypeError, "beta must be a real number, got complex"),
        (dict(beta=torch.tensor([0.1, 0.2])), TypeError, "beta must be a real number, got Tensor"),
        (dict(beta=torch.tensor(0.1, requires_grad=True)), TypeError, "beta must not require grad"),
        (dict(reg="l3"), ValueError, "reg must be one of ('l1', 'l2'), got 'l3'"),
    ],
)
def test_bad_loss_args(kwargs, exc, msg):
    _raises(exc, msg, L.ldreg_loss, X, None, 3, **{"beta": 0.1, **kwargs})
    _raises(exc, msg, L.LDReg, 3, **kwargs)


def test_module_rejects_bad_backend_and_k_type():
    _raises(ValueError, "backend must be 'auto' or one of", L.LDReg, 3, backend="fast")
    _raises(TypeError, "k must be an int, got float", L.LDReg, 3.0)


def test_explicit_unavailable_backend_says_why(monkeypatch):
    from ldreg_kernels import registry

    def broken():
        raise ImportError("compiled module not built")

    monkeypatch.setitem(registry.BACKENDS, "fake", registry.Backend("fake", ("cpu",), broken))
    _raises(RuntimeError, "backend 'fake' is not available: compiled module not built", L.knn, X, k=2, backend="fake")
    monkeypatch.setitem(registry.BACKENDS, "gpuonly", registry.Backend("gpuonly", ("cuda",), lambda: None))
    _raises(RuntimeError, "backend 'gpuonly' runs on ['cuda'], not on cpu tensors", L.knn, X, k=2, backend="gpuonly")


def test_auto_falls_back_with_one_warning(monkeypatch):
    from ldreg_kernels import registry

    def broken():
        raise ImportError("not built")

    monkeypatch.setitem(registry.BACKENDS, "cpu", registry.Backend("cpu", ("cpu",), broken))
    monkeypatch.setattr(registry, "_warned", set())
    with pytest.warns(UserWarning, match=re.escape("backend 'cpu' unavailable (not built); falling back")):
        d_auto, _ = L.knn(X, k=3)
    d_torch, _ = L.knn(X, k=3, backend="torch")
    assert torch.equal(d_auto, d_torch)


# ------------------------------------------------------------------ degenerate inputs
def test_equidistant_neighbours_are_finite_and_identical(device_backend):
    """w == m (all k neighbours at the same distance): MoM = m/eps, MLE = k/eps, never inf/NaN."""
    dev, backend = device_backend
    d = 6
    eye = torch.eye(d, dtype=torch.float64)
    x = torch.cat([torch.zeros(1, d, dtype=torch.float64), eye, -eye]).to(dev)
    eps = 1e-9
    mom = L.lid(x, k=5, estimator="mom", eps=eps, backend=backend)[0]
    mle = L.lid(x, k=5, estimator="mle", eps=eps, backend=backend)[0]
    assert float(mom) == pytest.approx(1.0 / eps) and float(mle) == pytest.approx(5 / eps)
    xr = x.clone().requires_grad_()
    loss = L.ldreg_loss(xr, k=5, beta=1.0, eps=eps, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(xr.grad).all()


@pytest.mark.parametrize("estimator", ["mom", "mle"])
def test_all_zero_distances_are_finite(device_backend, estimator):
    """A fully collapsed batch (all rows equal): every distance is 0, LID stays finite."""
    dev, backend = device_backend
    x = features(1, 8, generator("collapse")).expand(16, 8).contiguous().to(dev).requires_grad_()
    lids = L.lid(x, k=4, estimator=estimator, backend=backend)
    assert torch.isfinite(lids).all() and (lids > 0).all()
    expected = 1.0 if estimator == "mom" else 4 / 1e-12
    assert torch.allclose(lids.double().cpu(), torch.full((16,), expected, dtype=torch.float64))
    for reg in ("l1", "l2"):
        loss = L.ldreg_loss(x, k=4, beta=1.0, reg=reg, estimator=estimator, backend=backend)
        (g,) = torch.autograd.grad(loss, (x,))
        assert torch.isfinite(loss) and torch.isfinite(g).all()


# ------------------------------------------------------------------ ref="global" and FeatureQueue
BAD_REF = "ref must be a tensor, None, 'global' or 'global_grad', got 'bogus'"


def test_unknown_ref_string():
    _raises(ValueError, BAD_REF, L.knn, X, "bogus", 3)
    _raises(ValueError, BAD_REF, L.lid, X, "bogus", 3)
    _raises(ValueError, BAD_REF, L.ldreg_loss, X, "bogus", 3)
    _raises(ValueError, BAD_REF, L.LDReg(3), X, "bogus")
    _raises(ValueError, "ref must be a tensor, None, 'global' or 'global_grad', got 'Global'", L.knn, X, "Global", 3)


@pytest.mark.parametrize("ref", ["global", "global_grad"])
def test_global_ref_bad_args(ref):
    """Without a process group the same checks run (under DDP they raise on every rank)."""
    msg = f"self_offset must be 0 with ref={ref!r} (this rank's offset in the gathered batch is computed), got 3"
    _raises(ValueError, msg, L.knn, X, ref, 3, self_offset=3)
    _raises(ValueError, msg, L.LDReg(3), X, ref, 3)
    _raises(TypeError, "k must be an int, got float", L.lid, X, ref, 3.0)
    _raises(ValueError, "k must be >= 2 to estimate LID, got k=1", L.lid, X, ref, 1)
    _raises(ValueError, "k=10 exceeds the N - 1 = 9 reference rows left after excluding self", L.knn, X, ref, 10)
    _raises(ValueError, "reg must be one of ('l1', 'l2'), got 'l3'", L.ldreg_loss, X, ref, 3, reg="l3")
    _raises(ValueError, "x must be 2-D (rows, features), got shape (4,)", L.knn, X[0], ref, 3)
    _raises(ValueError, "backend must be 'auto' or one of", L.knn, X, ref, 3, backend="nope")


@pytest.mark.parametrize(
    "args, exc, msg",
    [
        ((0, 4), ValueError, "size must be a positive int, got 0"),
        ((4, 2.5), ValueError, "dim must be a positive int, got 2.5"),
        ((True, 4), ValueError, "size must be a positive int, got True"),
        ((4, 4, torch.int64), TypeError, "dtype must be a floating-point torch.dtype, got torch.int64"),
        ((4, 4, "float32"), TypeError, "dtype must be a floating-point torch.dtype, got 'float32'"),
    ],
)
def test_feature_queue_bad_construction(args, exc, msg):
    _raises(exc, msg, L.FeatureQueue, *args)


@pytest.mark.parametrize(
    "feats, exc, msg",
    [
        (torch.zeros(3, 5), ValueError, "feats must have shape (n, 4) for this queue, got (3, 5)"),
        (torch.zeros(4), ValueError, "feats must have shape (n, 4) for this queue, got (4,)"),
        (torch.zeros(3, 4, dtype=torch.float64), TypeError,
         "feats must have the queue's dtype torch.float32, got torch.float64"),
        (torch.zeros(3, 4, device="meta"), ValueError, "feats must be on the queue's device cpu, got meta"),
        ([[0.0] * 4], TypeError, "feats must be a torch.Tensor, got list"),
    ],
)
def test_feature_queue_bad_enqueue(feats, exc, msg):
    q = L.FeatureQueue(8, 4)
    _raises(exc, msg, q.enqueue, feats)
    assert len(q) == 0  # nothing was written


def test_feature_queue_bad_state_and_use():
    q = L.FeatureQueue(8, 4)
    q.enqueue(torch.randn(5, 4))
    state = q.state_dict()
    _raises(ValueError, "saved queue buffer must have shape (8, 4), got (4, 4)",
            q.load_state_dict, {**state, "buffer": torch.zeros(4, 4)})
    _raises(TypeError, "saved queue buffer must have the queue's dtype torch.float32, got torch.float64",
            q.load_state_dict, {**state, "buffer": state["buffer"].double()})
    _raises(ValueError, "saved queue position is inconsistent: ptr=3, filled=5, size=8",
            q.load_state_dict, {**state, "ptr": 3})
    with pytest.raises(KeyError):
        q.load_state_dict({"buffer": state["buffer"]})
    # An empty queue as ref, or one smaller than k: the usual clear errors.
    _raises(ValueError, "ref is empty: shape (0, 4)", L.lid, X, L.FeatureQueue(8, 4).features(), 3, exclude_self=False)
    _raises(ValueError, "k=6 exceeds the N = 5 reference rows", L.lid, X, q.features(), 6, exclude_self=False)


def test_auto_on_cuda_picks_torch_until_the_gpu_suite_has_passed():
    """cuda and triton have never run on a GPU: "auto" must not pick them (issue #13). Resolving
    needs no GPU: the registry only matches the device type."""
    from ldreg_kernels import registry

    assert registry.resolve_backend("auto", torch.device("cuda")) is torch.ops.ldreg.knn_torch


# ------------------------------------------------------------------ import-time settings
def _python(script: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter with ``env`` over this one's (``""`` unsets)."""
    full = {k: v for k, v in os.environ.items() if k not in env}
    full.update({k: v for k, v in env.items() if v})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300, env=full)


def test_a_bad_triton_precision_setting_disables_triton_not_the_import():
    """LDREG_TRITON_PRECISION=bogus made ``import ldreg_kernels`` itself raise, so even the cpu
    backend was unusable (issue #24). Now triton alone is unavailable, saying why."""
    r = _python("""
        import torch, ldreg_kernels as L
        from ldreg_kernels import registry
        print(repr(registry.LOAD_ERRORS.get("triton")))
        x = torch.randn(10, 3)
        print(L.lid(x, k=3).shape, L.lid(x, k=3, backend="torch").shape)
        print("triton" in L.available_backends("cpu"))
        try:
            L.lid(x, k=3, backend="triton")
        except RuntimeError as e:
            print(e)
    """, LDREG_TRITON_PRECISION="bogus", TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr
    if "ImportError" in r.stdout.splitlines()[0]:
        pytest.skip(f"triton does not import here: {r.stdout.splitlines()[0]}")
    why = "ValueError: LDREG_TRITON_PRECISION must be one of ('ieee', 'tf32', 'tf32x3', 'bf16'), got 'bogus'"
    assert r.stdout.splitlines() == [
        repr(why), "torch.Size([10]) torch.Size([10])", "False", f"backend 'triton' is not available: {why}",
    ]


def test_triton_on_cpu_without_the_interpreter_names_triton_interpret():
    r = _python("""
        import torch, ldreg_kernels as L
        try:
            L.lid(torch.randn(10, 3), k=2, backend="triton")
        except RuntimeError as e:
            print(e)
    """, TRITON_INTERPRET="")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        "backend 'triton' runs on ['cuda'], not on cpu tensors (Triton runs on CPU tensors only under the "
        "interpreter: set TRITON_INTERPRET=1 before importing ldreg_kernels; slow, for tests)\n")
