"""Triton backend: fused selection kernel, exact re-rank + certificate, backward kernel.

On a machine without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1,
CPU tensors; set before ldreg_kernels is first imported, see conftest.py). Shapes are small
but chosen to straddle the kernel's blocks: B and N not multiples of BLOCK_M / BLOCK_N, D
not a power of two and larger than one D chunk (BLOCK_D <= 64), candidate buffers smaller
than N so the streaming merge and the safety net both run.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import ldreg_kernels as L  # noqa: E402
from ldreg_kernels import _host  # noqa: E402
from ldreg_kernels.backends import torch as torch_backend  # noqa: E402
from grad_bounds import assert_grad_close, grad_bounds  # noqa: E402
from utils import assert_knn_matches, features, generator, make_inputs, random_case  # noqa: E402

if "triton" not in L.available_backends("cuda" if torch.cuda.is_available() else "cpu"):
    pytest.skip("triton backend unavailable (needs triton, and CUDA or TRITON_INTERPRET=1 "
                "set before ldreg_kernels is imported)", allow_module_level=True)

import ldreg_kernels.backends.triton as T  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SEL_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _knn(x, ref, k, off=0, excl=True, precision=None, margin=None):
    d, i = T.knn_fwd.knn_forward(x.to(DEV), ref.to(DEV), k, off, excl, precision=precision, margin=margin)
    return d.cpu(), i.cpu()


@pytest.mark.parametrize("dtype", SEL_DTYPES, ids=str)
@pytest.mark.parametrize("precision", T.PRECISIONS)
def test_random_shapes_every_precision(precision, dtype):
    g = generator("triton-rand", precision, dtype)
    case = random_case(g, max_b=70, max_d=90)
    x, ref = make_inputs(case, g, dtype)
    dist, idx = _knn(x, ref, case["k"], case["self_offset"], precision=precision)
    assert dist.dtype == _host.compute_dtype(dtype)
    checked = assert_knn_matches(dist, idx, x, ref, case["k"], self_offset=case["self_offset"])
    assert checked > 0.5, f"gap check covered only {checked:.0%} of rows: {case}"


@pytest.mark.parametrize("dtype", SEL_DTYPES, ids=str)
@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_streaming_partial_selection(precision, dtype):
    """N well past the candidate buffer (64): streaming merge, ragged tiles, D over 2 chunks."""
    g = generator("triton-stream", precision, dtype)
    case = dict(b=45, n=203, d=100, k=7, self_offset=37, kind="manifold")
    x, ref = make_inputs(case, g, dtype)
    dist, idx = _knn(x, ref, case["k"], case["self_offset"], precision=precision)
    # The exact answer is unique given exact distances: equal to the torch backend's.
    d0, i0 = torch_backend.knn_forward(x, ref, case["k"], case["self_offset"], True)
    assert torch.equal(idx, i0) and torch.equal(dist, d0)
    assert_knn_matches(dist, idx, x, ref, case["k"], self_offset=case["self_offset"])


def test_memory_bank_exclude_self_false():
    g = generator("triton-bank")
    x = features(21, 19, g)
    bank = features(150, 19, g)
    dist, idx = _knn(x, bank, 9, excl=False)
    assert_knn_matches(dist, idx, x, bank, 9, exclude_self=False)


def test_k_near_n():
    g = generator("triton-knear")
    x = features(40, 9, g)
    for k in (38, 39):
        dist, idx = _knn(x, x, k)
        assert_knn_matches(dist, idx, x, x, k)


@pytest.mark.parametrize("n", [1100, 2000])
def test_large_k_512(n):
    """k = 512: 640 candidates, two levels over 5 segments of MAX_KP = 256 (the widest
    buffer that fits shared memory). N = 1100: every segment holds all its rows; N = 2000:
    400 rows a segment, full buffers, and the bound comes from them."""
    g = generator("triton-k512", n)
    ref = features(n, 6, g)
    x = ref[200:208].clone()
    assert T.knn_fwd._plan(512, n - 1, _host.default_margin(512)) == (640, T.MAX_KP, 5)
    dist, idx = _knn(x, ref, 512, 200, precision="ieee")
    assert_knn_matches(dist, idx, x, ref, 512, self_offset=200)


def test_plan_every_k_fits_a_kernel_buffer():
    """Every k the Triton forward takes selects with buffers of at most MAX_KP entries (wider
    ones exceed the A100/H100 shared memory: make gpu-aot), and the two-level union holds at
    least the c = k + margin candidates (SEG_SLACK x c slots)."""
    F = T.knn_fwd
    for k in range(1, 2100):
        for n_valid in (k, k + 1, k + 7, 3 * k, 1 << 20):
            c = min(k + _host.default_margin(k), n_valid)
            plan = F._plan(k, n_valid, _host.default_margin(k))
            if plan is None:
                assert c > F.MAX_CANDIDATES
                continue
            n_cand, kp, nseg = plan
            assert F.MIN_KP <= kp <= F.MAX_KP and kp & (kp - 1) == 0
            assert c <= n_cand <= n_valid
            if nseg > 1:
                assert n_cand == c and nseg * kp >= F.SEG_SLACK * c and nseg * (kp - 2) >= c
    assert F._plan(1639, 1 << 20, _host.default_margin(1639)) is not None
    assert F._plan(1640, 1 << 20, _host.default_margin(1640)) is None


def test_k_past_max_candidates_falls_back(monkeypatch):
    g = generator("triton-fallback")
    x = features(30, 5, g)
    calls = []
    fwd = torch_backend.knn_forward
    monkeypatch.setattr(T.knn_fwd, "MAX_CANDIDATES", 20)
    monkeypatch.setattr(torch_backend, "knn_forward", lambda *a, **kw: calls.append(a) or fwd(*a, **kw))
    dist, idx = _knn(x, x, 25)
    assert len(calls) == 1
    assert_knn_matches(dist, idx, x, x, 25)


@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_two_level_selection_full_segments(monkeypatch, precision):
    """MAX_KP = 64 and k = 90: 112 candidates from 4 strided segments of 175 rows, each
    buffer full; equal to the torch backend (the exact answer is unique)."""
    monkeypatch.setattr(T.knn_fwd, "MAX_KP", 64)
    g = generator("triton-2level", precision)
    case = dict(b=40, n=700, d=12, k=90, self_offset=300, kind="manifold")
    x, ref = make_inputs(case, g, torch.float32)
    assert T.knn_fwd._plan(90, 699, _host.default_margin(90)) == (112, 64, 4)
    dist, idx = _knn(x, ref, 90, 300, precision=precision)
    d0, i0 = torch_backend.knn_forward(x, ref, 90, 300, True)
    assert torch.equal(idx, i0) and torch.equal(dist, d0)


def test_two_level_overflowing_segment_is_redone(monkeypatch):
    """All near neighbours in one segment (rows = 0 mod 4): its 64-entry buffer cannot hold
    the 112 candidates, its largest key bounds the left-out rows, the certificate fails and
    the rows are redone exhaustively: still exact."""
    monkeypatch.setattr(T.knn_fwd, "MAX_KP", 64)
    g = generator("triton-2level-adv")
    ref = features(700, 8, g) + 5.0
    ref[::4] = 0.01 * features(175, 8, g)
    x = 0.01 * features(3, 8, g)
    redone = []
    exhaustive = _host.exhaustive
    monkeypatch.setattr(_host, "exhaustive", lambda xr, *a: redone.append(xr.shape[0]) or exhaustive(xr, *a))
    assert T.knn_fwd._plan(90, 700, _host.default_margin(90)) == (112, 64, 4)
    dist, idx = _knn(x, ref, 90, excl=False, precision="ieee")
    assert redone == [3]
    d0, i0 = torch_backend.knn_forward(x, ref, 90, 0, False)
    assert torch.equal(idx, i0) and torch.equal(dist, d0)


@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_ties_wider_than_margin_go_to_lower_index(precision):
    """128 points at distance exactly 1 from query 0, buffer 64: the safety net must redo it."""
    d = 64
    eye = torch.eye(d)
    x = torch.cat([torch.zeros(1, d), eye, -eye])
    dist, idx = _knn(x, x, 5, precision=precision)
    assert idx[0].tolist() == [1, 2, 3, 4, 5]
    assert torch.equal(dist[0], torch.ones(5))
    assert_knn_matches(dist, idx, x, x, 5)


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_duplicates_excluded_by_index(precision):
    g = generator("triton-dup", precision)
    x = features(140, 13, g)
    x[70:] = x[:70]
    dist, idx = _knn(x, x, 3, precision=precision)
    twin = (torch.arange(140) + 70) % 140
    assert (idx[:, 0] == twin).all() and (dist[:, 0] == 0).all()
    assert not (idx == torch.arange(140).unsqueeze(1)).any()
    assert_knn_matches(dist, idx, x, x, 3)


def test_selection_kernel_keeps_smallest_scores():
    """The kernel's buffer holds exactly the kp smallest (score, index) keys, own row excluded."""
    g = generator("triton-select")
    ref = features(150, 20, g, torch.float64).float()
    x = ref[:33].clone()
    own = torch.arange(33) + 0
    sq = (ref * ref).sum(1)
    keys = T.select_candidates(x.to(DEV), ref.to(DEV), sq.to(DEV), own.to(DEV), 64, "ieee").cpu()
    idx, score = T.knn_fwd._decode(keys)
    s_ref = sq - 2 * x.double() @ ref.double().t()
    s_ref[torch.arange(33), own] = float("inf")
    want = torch.sort(s_ref, 1).values[:, :64]
    # Scores are the kernel's fp32 values: compare to within fp32 rounding of |r|^2 scale.
    tol = 1e-5 * float(sq.max())
    assert (score.double() - want).abs().max() < tol
    assert (keys[:, 1:] > keys[:, :-1]).all(), "buffer must be strictly ascending"
    assert not (idx == own.unsqueeze(1)).any()


def test_selection_kernel_segments():
    """nseg = 3 strided segments of 50 rows, kp = 32: each segment's buffer holds the 32
    smallest keys among its own rows (j = s mod 3), own row excluded."""
    g = generator("triton-select-seg")
    ref = features(150, 20, g, torch.float64).float()
    x = ref[:33].clone()
    own = torch.arange(33)
    sq = (ref * ref).sum(1)
    keys = T.select_candidates(x.to(DEV), ref.to(DEV), sq.to(DEV), own.to(DEV), 32, "ieee", nseg=3).cpu()
    s_ref = sq - 2 * x.double() @ ref.double().t()
    s_ref[torch.arange(33), own] = float("inf")
    tol = 1e-5 * float(sq.max())
    for s, seg in enumerate(keys.view(33, 3, 32).unbind(1)):
        idx, score = T.knn_fwd._decode(seg)
        assert (idx % 3 == s).all() and not (idx == own.unsqueeze(1)).any()
        assert (seg[:, 1:] > seg[:, :-1]).all()
        want = torch.sort(s_ref[:, s::3], 1).values[:, :32]
        assert (score.double() - want).abs().max() < tol


def test_precision_setting():
    assert T.get_precision() in T.PRECISIONS
    old = T.get_precision()
    with T.selection_precision("bf16"):
        assert T.get_precision() == "bf16"
    assert T.get_precision() == old
    with pytest.raises(ValueError):
        T.set_precision("fp8")
    with pytest.raises(ValueError):
        T.knn_fwd.knn_forward(torch.zeros(4, 2), torch.zeros(4, 2), 2, 0, True, precision="fp16")


def test_op_autograd_matches_torch_backend():
    g = generator("triton-op-grad")
    x = features(37, 21, g, kind="manifold")
    gout = torch.randn(37, 6, generator=g)
    xa = x.clone().to(DEV).requires_grad_()
    xb = x.clone().requires_grad_()
    with T.selection_precision("tf32"):
        d, i = L.knn(xa, xa, 6, exclude_self=True, backend="triton")
    d0, i0 = L.knn(xb, xb, 6, exclude_self=True, backend="torch")
    assert torch.equal(i.cpu(), i0) and torch.equal(d.detach().cpu(), d0.detach())
    (ga,) = torch.autograd.grad(d, (xa,), gout.to(DEV))
    (gb,) = torch.autograd.grad(d0, (xb,), gout)
    # Different kernels (Triton vs torch) sum the same terms in different orders: equal to
    # rounding, not bitwise. x is both the queries and the reference, so its gradient is
    # grad_x + grad_ref, each within its bound (grad_bounds.py).
    bx, br = grad_bounds(gout, x, x, i0, d0.detach())
    assert_grad_close(ga, gb, bx + br, "grad through the op")


# ---------------------------------------------------------------- backward kernel
@pytest.mark.parametrize("need_ref", [False, True])
@pytest.mark.parametrize("dtype", SEL_DTYPES, ids=str)
def test_backward_kernel_matches_torch(dtype, need_ref):
    g = generator("triton-bwd", dtype, need_ref)
    ref = features(61, 37, g, dtype)
    x = ref[5:34].clone()
    x[3] = ref[40]  # a zero-distance neighbour: contributes 0, not NaN
    dist, idx = torch_backend.knn_forward(x, ref, 9, 5, True)
    gd = torch.randn(dist.shape, generator=g, dtype=dist.dtype)
    want_x, want_r = torch_backend.knn_backward(gd, x, ref, idx, dist, need_ref)
    got_x, got_r = T.knn_bwd.knn_backward(gd.to(DEV), x.to(DEV), ref.to(DEV), idx.to(DEV), dist.to(DEV), need_ref)
    assert got_x.dtype == dtype and torch.isfinite(got_x.float()).all()
    # Same terms, summed in another order: within the rounding bound of grad_bounds.py
    # (derived from the dtype's unit roundoff and the number of terms), not bitwise.
    bx, br = grad_bounds(gd, x, ref, idx, dist)
    assert_grad_close(got_x, want_x, bx, "grad_x")
    if need_ref:
        assert got_r.dtype == dtype
        assert_grad_close(got_r, want_r, br, "grad_ref")
    else:
        assert got_r is None


@pytest.mark.parametrize("bad", [-1, 61])
def test_backward_rejects_out_of_range_idx(bad):
    """An index outside [0, N) raises (a device-side assert on a GPU) instead of a stray read."""
    if DEV == "cuda":
        pytest.skip("a device-side assert would poison the CUDA context of the test session")
    g = generator("triton-bwd-idx")
    ref = features(61, 5, g)
    x = ref[:10].clone()
    dist, idx = torch_backend.knn_forward(x, ref, 4, 0, True)
    idx[2, 3] = bad
    with pytest.raises(RuntimeError, match="outside"):
        T.knn_bwd.knn_backward(torch.ones_like(dist), x, ref, idx, dist, True)


def test_torch_compile_fullgraph_through_triton_op():
    """ldreg::knn_triton is an opaque custom op: torch.compile(fullgraph=True) keeps it whole."""
    g = generator("triton-compile")
    x = features(40, 16, g).to(DEV)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()

    def step(a):
        return (a**2).mean() + L.ldreg_loss(a, k=8, beta=0.5, backend="triton")

    lc = torch.compile(step, fullgraph=True)(x1)
    lc.backward()
    le = step(x2)
    le.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(x1.grad, x2.grad)
