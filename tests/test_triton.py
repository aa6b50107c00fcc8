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


def assert_same_knn(dist, idx, d0, i0, d):
    """The same neighbours, and the same exact distances up to the order of their sums: the
    fused re-rank (Triton) and torch's vector_norm each sum D squared differences, each
    within (D + 6) u of the true square (``_host.certificate_coef``)."""
    assert torch.equal(idx, i0)
    u = torch.finfo(d0.dtype).eps
    torch.testing.assert_close(dist, d0, rtol=(d + 6) * u, atol=0)


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
    assert_same_knn(dist, idx, d0, i0, case["d"])
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
    assert_same_knn(dist, idx, d0, i0, 12)


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
    assert_same_knn(dist, idx, d0, i0, 8)


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
    assert_same_knn(d.detach().cpu(), i.cpu(), d0.detach(), i0, 21)
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


# ---------------------------------------------------------------- selection precision (TF32, bf16)
def _scores(x, ref, sq, keys):
    """float64 scores |r_j|^2 - 2 x.r_j of the kernel's candidates, and the kernel's own."""
    idx, score = T.knn_fwd._decode(keys)
    want = sq.double()[idx] - 2 * (x.double().unsqueeze(1) * ref.double()[idx]).sum(-1)
    return score.double(), want


@pytest.mark.parametrize("precision", ["tf32", "tf32x3", "bf16"])
def test_selection_sees_the_precisions_input_rounding(precision):
    """The kernel's scores carry the input rounding of ``precision``: within the
    certificate's model of it (2 v |x||r| for input unit v = INPUT_UNIT, plus the fp32
    accumulation) of the exact scores, and, for TF32 and bf16, visibly not ieee's. Under
    the interpreter, whose tl.dot ignores input_precision, this holds only because
    knn_fwd._emulate_input_rounding rounds the inputs: without it the TF32 scores equal
    ieee's (and the bf16 ones are garbage), and this test fails."""
    g = generator("triton-emulate", precision)
    ref = features(150, 20, g) * 3.0 + 1.0
    x = ref[:33] + 0.1 * features(33, 20, g)
    sq = (ref * ref).sum(1)
    score, exact = _scores(x, ref, sq, T.select_candidates(x.to(DEV), ref.to(DEV), sq.to(DEV), None, 64, precision).cpu())
    s_ieee, exact_ieee = _scores(x, ref, sq, T.select_candidates(x.to(DEV), ref.to(DEV), sq.to(DEV), None, 64, "ieee").cpu())
    v = _host.INPUT_UNIT[precision]
    scale = float(x.norm(dim=1).max() * ref.norm(dim=1).max())
    fp32 = 2 * (20 + 4) * _host.FP32_EPS * float(sq.max() + scale)  # accumulation and norms
    assert (score - exact).abs().max() <= 2 * (2 * v + v * v) * scale + fp32
    ieee_err = float((s_ieee - exact_ieee).abs().max())
    assert ieee_err <= fp32
    if precision != "tf32x3":  # 2^-19 relative: at fp32's own level here
        assert float((score - exact).abs().max()) > 10 * max(ieee_err, fp32 / 100), "input rounding not applied"


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_tf32_near_ties_are_redone_in_ieee_and_exact(monkeypatch, precision):
    """Near-ties at the k-th neighbour that TF32 (or bf16) selection gets wrong: 300
    reference points at squared distance 1 + 0.5 u (u uniform) from queries at |x| = 30
    from the reference mean. The TF32 score error (~2^-10 |x||r| ~ 1) is far above the
    spacing of the distances (~0.002), so the TF32 candidates miss true neighbours (checked
    below: this fails if the emulation is removed), the certificate with INPUT_UNIT["tf32"]
    rejects every row, and the redo selects again in "ieee", whose certificate passes (no
    exhaustive redo). The answer equals the float64 oracle's."""
    from ldreg_kernels import reference

    g = generator("triton-tf32-ties", precision)
    d, n, k = 16, 300, 5

    def shell(m):
        v = torch.randn(m, d, generator=g)
        return v / v.norm(dim=1, keepdim=True) * torch.sqrt(1 + 0.5 * torch.rand(m, 1, generator=g))

    q = torch.zeros(d)
    q[0] = 30.0
    ref = torch.cat([q + shell(n), -q + shell(n)])  # mean ~ 0: x.r ~ 900 for the near shell
    x = q + 0.01 * torch.randn(8, d, generator=g)
    d64, i64 = reference.knn(x.double(), ref.double(), k, exclude_self=False)
    xs, rs, _, sq_ref = _host.centred(x, ref)
    keys = T.select_candidates(xs.to(DEV), rs.to(DEV), sq_ref.to(DEV), None, 64, precision).cpu()
    missed = [int((~torch.isin(i64[r], keys[r] & 0xFFFFFFFF)).sum()) for r in range(8)]
    assert sum(missed) > 0, f"{precision} selection found every true neighbour: is the input rounding emulated?"

    calls, exhaustive = [], []
    sel, exh = T.knn_fwd._select_and_rerank, _host.exhaustive
    def spy(q, rows, *a):
        calls.append((q.x.shape[0] if rows is None else rows.numel(), a[-1]))
        return sel(q, rows, *a)

    monkeypatch.setattr(T.knn_fwd, "_select_and_rerank", spy)
    monkeypatch.setattr(_host, "exhaustive", lambda xr, *a: exhaustive.append(xr.shape[0]) or exh(xr, *a))
    dist, idx = _knn(x, ref, k, excl=False, precision=precision)
    assert calls == [(8, precision), (8, "ieee")] and exhaustive == []
    # The float64 answer, up to near-ties float32 cannot order (the oracle's own gap rule).
    assert assert_knn_matches(dist, idx, x, ref, k, exclude_self=False) > 0.5
    torch.testing.assert_close(dist.double(), d64, rtol=4 * _host.FP32_EPS, atol=0)


# ---------------------------------------------------------------- compiled variants
class _FakeSelect:
    """Stands in for _knn_select_kernel: records each launch and fills OUT as the kernel
    would (fp32 scores, packed keys, each segment's BLOCK_N smallest), in torch, so the real
    host code (re-rank, certificate) runs on without the interpreter's cost."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((args, kw, grid))
            xs, rs, sq, own, out, b, n = args[:7]
            nseg, bn = args[8], kw["BLOCK_N"]
            bits = (sq[None, :] - 2.0 * (xs.float() @ rs.float().t())).view(torch.int32)
            key = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) << 32) | torch.arange(n)
            has = own >= 0
            key[torch.nonzero(has).flatten(), own[has]] = torch.iinfo(torch.int64).max
            out = out.view(b, nseg, bn)
            out.fill_(torch.iinfo(torch.int64).max)
            for s in range(nseg):
                seg = torch.sort(key[:, s::nseg], dim=1).values[:, :bn]
                out[:, s, : seg.shape[1]] = seg

        return launch


class _Record:
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((args, kw, grid))


@pytest.mark.skipif(DEV == "cuda", reason="records launches on CPU tensors")
def test_changing_batch_size_compiles_no_new_variants(monkeypatch):
    """A training run's batch sizes (512, 512, 300, 511, 17: a last partial batch, odd
    sizes) through ldreg_loss-style forward + backward (exclude_self, x = ref, grad_ref) map
    to one compiled variant per kernel and precision, in normal and deterministic mode.

    What is measured: the JIT cache key. A GPU JITFunction compiles once per distinct
    (signature, constexprs, specialisation attributes, options) of a launch; the interpreter
    does not specialise at all, so the launches are recorded here (the real host code
    with the GPU block sizes, ``_interpreting`` off) and each is bound by Triton's own
    binder for sm_80 (``tools/gpu_aot.py``'s ``specialise``: the code path JITFunction.run
    uses to build its cache key). Without ``do_not_specialize`` on B and N, 512 (a multiple
    of 16) and 300 bind different attributes and this fails."""
    import importlib.util
    import sys

    from triton.runtime.jit import JITFunction

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    aot = sys.modules.get("gpu_aot")
    if aot is None:
        spec = importlib.util.spec_from_file_location("gpu_aot", os.path.join(root, "tools", "gpu_aot.py"))
        aot = sys.modules["gpu_aot"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(aot)

    def as_jit(kern):
        return kern if isinstance(kern, JITFunction) else JITFunction(kern.fn, **kern.kwargs)

    mods = {"_knn_select_kernel": T.knn_fwd, "_knn_bwd_kernel": T.knn_bwd, "_knn_bwd_ref_sorted_kernel": T.knn_bwd}
    jits = {name: as_jit(getattr(mod, name)) for name, mod in mods.items()}
    recs = {name: _FakeSelect() if name == "_knn_select_kernel" else _Record() for name in mods}
    for name, mod in mods.items():
        monkeypatch.setattr(mod, name, recs[name])
    monkeypatch.setattr(T.knn_fwd, "_interpreting", lambda: False)
    g = generator("triton-variants")
    feats = features(512, 64, g)
    for det in (False, True):
        torch.use_deterministic_algorithms(det)
        try:
            for b in (512, 512, 300, 511, 17):
                xb = feats[:b].clone().requires_grad_()
                d, _ = L.knn(xb, xb, 16, exclude_self=True, backend="triton")
                d.sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
    variants = {}
    for name, rec in recs.items():
        assert rec.calls, f"{name} never launched"
        for args, kw, _ in rec.calls:
            launch = aot.Launch("m", name, "", (), args, kw)
            variants.setdefault((name, kw.get("PRECISION")), set()).add(aot.specialise(launch, jits[name], 80)["key"])
    counts = {key: len(v) for key, v in variants.items()}
    # The backward kernel: grad_ref by atomics (normal) or by the sorted reduction (deterministic).
    assert counts == {("_knn_select_kernel", T.get_precision()): 1, ("_knn_bwd_kernel", None): 2,
                      ("_knn_bwd_ref_sorted_kernel", None): 1}, counts
