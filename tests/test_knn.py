"""Every backend's forward against the float64 oracle (reference.py)."""

import pytest
import torch

import ldreg_kernels as L
from ldreg_kernels import reference
from utils import assert_knn_matches, features, generator, lid_rtol, make_inputs, oracle, random_case

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trial", range(6))
def test_random_shapes_match_oracle(device_backend, dtype, trial):
    dev, backend = device_backend
    g = generator("knn", backend, dtype, trial)
    case = random_case(g)
    x, ref = make_inputs(case, g, dtype)
    dist, idx = L.knn(x.to(dev), ref.to(dev), case["k"], exclude_self=True, self_offset=case["self_offset"], backend=backend)
    assert dist.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    checked = assert_knn_matches(dist.cpu(), idx.cpu(), x, ref, case["k"], self_offset=case["self_offset"])
    assert checked > 0.5, f"gap check covered only {checked:.0%} of rows: {case}"


@pytest.mark.parametrize("estimator", ["mom", "mle"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lid_matches_oracle(device_backend, estimator, dtype):
    dev, backend = device_backend
    g = generator("lid", backend, estimator, dtype)
    x = features(300, 48, g, dtype, "manifold")
    k = 20
    got = L.lid(x.to(dev), k=k, estimator=estimator, backend=backend).cpu().double()
    d64, _ = oracle(x, x, k)
    want = {"mom": reference.lid_mom, "mle": reference.lid_mle}[estimator](d64[:, :k])
    rel = (got - want).abs() / want
    tol = lid_rtol(d64[:, :k], estimator, dtype)
    assert (rel <= tol).all(), f"max rel err {rel.max():.2e}, worst row tol {tol[rel.argmax()]:.2e}"
    if dtype == torch.float32:  # the condition-scaled tolerance is still float32-tight here
        assert float(tol.median()) < 3e-5


def test_exclude_self_false_and_memory_bank(device_backend):
    dev, backend = device_backend
    g = generator("bank", backend)
    x = features(37, 19, g)
    bank = features(211, 19, g)
    dist, idx = L.knn(x.to(dev), bank.to(dev), 9, exclude_self=False, backend=backend)
    assert_knn_matches(dist.cpu(), idx.cpu(), x, bank, 9, exclude_self=False)


def test_duplicate_rows_exclude_self_by_index(device_backend):
    dev, backend = device_backend
    g = generator("dup", backend)
    x = features(40, 13, g)
    x[20:] = x[:20]  # every row has an exact twin
    dist, idx = L.knn(x.to(dev), k=3, backend=backend)
    dist, idx = dist.cpu(), idx.cpu()
    rows = torch.arange(40)
    twin = (rows + 20) % 40
    assert (idx[:, 0] == twin).all(), "the twin (not the query itself) must be the nearest"
    assert (dist[:, 0] == 0).all()
    assert not (idx == rows.unsqueeze(1)).any()
    assert_knn_matches(dist, idx, x, x, 3)


def test_exact_ties_go_to_lower_index(device_backend):
    dev, backend = device_backend
    # Query 0 at the origin, every other point at distance exactly 1 (powers of two: no rounding).
    d = 8
    eye = torch.eye(d)
    x = torch.cat([torch.zeros(1, d), eye, -eye])
    dist, idx = L.knn(x.to(dev), k=5, backend=backend)
    assert idx[0].cpu().tolist() == [1, 2, 3, 4, 5]
    assert torch.equal(dist[0].cpu(), torch.ones(5))


def test_non_contiguous_and_transposed_inputs(device_backend):
    dev, backend = device_backend
    g = generator("strided", backend)
    base = features(64, 90, g)
    x = base.t().contiguous().t()[:, ::3]  # column-major, then strided
    assert not x.is_contiguous()
    dist, idx = L.knn(x.to(dev), k=7, backend=backend)
    assert_knn_matches(dist.cpu(), idx.cpu(), x.contiguous(), x.contiguous(), 7)


def test_k_equals_n_minus_one(device_backend):
    dev, backend = device_backend
    g = generator("kmax", backend)
    x = features(17, 5, g)
    dist, idx = L.knn(x.to(dev), k=16, backend=backend)
    assert_knn_matches(dist.cpu(), idx.cpu(), x, x, 16)
    assert (torch.sort(idx.cpu(), 1).values == torch.tensor([[j for j in range(17) if j != i] for i in range(17)])).all()


def test_backends_agree_with_each_other():
    g = generator("agree")
    x = features(150, 33, g, torch.float64)
    outs = {b: L.knn(x, k=12, backend=b) for b in L.available_backends("cpu")}
    d0, i0 = outs["reference"]
    for b, (d, i) in outs.items():
        torch.testing.assert_close(d, d0, rtol=1e-12, atol=0, msg=lambda m: f"{b}: {m}")
        assert torch.equal(i, i0), b


@pytest.mark.parametrize("tile_rows, score_elems", [(256, 100), (8, 100), (8, 2000), (256, 10**6)])
def test_torch_backend_chunking_is_invisible(monkeypatch, tile_rows, score_elems):
    """Tiny budgets force many query chunks and, below tile_rows queries a chunk, reference
    column blocks merged through a running top-k (ragged blocks, own rows on block edges),
    and gathered chunks of a row or two in the re-rank and the backward; neither the result
    nor the gradient may change, and the result equals the oracle."""
    from ldreg_kernels import _budget
    from ldreg_kernels.backends import torch as torch_backend

    g = generator("chunks", tile_rows, score_elems)
    x = features(53, 21, g, torch.float64)
    ref = features(97, 21, g, torch.float64)
    ref[10:63] = x
    grad = torch.rand(53, 6, generator=g, dtype=torch.float64)

    def run():
        xx, rr = x.clone().requires_grad_(), ref.clone().requires_grad_()
        d, i = L.knn(xx, rr, 6, exclude_self=True, self_offset=10, backend="torch")
        d.backward(grad)
        return d.detach(), i, xx.grad, rr.grad

    want = run()  # one chunk
    oracle_d, oracle_i = L.knn(x, ref, 6, exclude_self=True, self_offset=10, backend="reference")
    assert torch.equal(want[1], oracle_i) and torch.allclose(want[0], oracle_d, rtol=1e-13, atol=0)
    monkeypatch.setattr(_budget, "CPU_SCORE_ELEMS", score_elems)
    monkeypatch.setattr(_budget, "CPU_GATHER_ELEMS", 6 * 21 + 50)  # one row a chunk, ragged at the end
    monkeypatch.setattr(torch_backend, "TILE_ROWS", tile_rows)
    got = run()
    for a, b, what in zip(got, want, ("dist", "idx", "grad_x", "grad_ref")):
        assert torch.equal(a, b), what


def test_lid_mom_est_dropin_semantics():
    """The drop-in keeps the official code's k = min(k, b-2) and column-0 drop."""
    g = generator("dropin")
    x = features(30, 10, g, torch.float64)
    lids = reference.lid_mom_est(x, x, k=64)  # k clipped to 28
    a = torch.sort(torch.cdist(x, x), 1).values
    m = a[:, 1:28].mean(1)
    torch.testing.assert_close(lids, m / (a[:, 28] - m))
    # Without duplicates, column 0 is the query itself, so it equals our self-excluded MoM
    # with k=28 neighbours.
    torch.testing.assert_close(lids, L.lid(x, k=28, backend="reference"), rtol=1e-9, atol=0)
    idx, lids2 = reference.lid_mom_est(x, x, k=5, get_idx=True)
    assert idx.shape == (30, 30) and torch.equal(idx[:, 0], torch.arange(30))


def test_oracle_against_brute_force_loops():
    """The oracle itself, against plain Python loops over pairs."""
    g = generator("brute")
    x = features(12, 4, g, torch.float64)
    ref = features(15, 4, g, torch.float64)
    ref[3:15] = x
    dist, idx = reference.knn(x, ref, 4, True, 3)
    for i in range(12):
        pairs = sorted(
            (float(((x[i] - ref[j]) ** 2).sum().sqrt()), j) for j in range(15) if j != i + 3
        )[:4]
        assert idx[i].tolist() == [j for _, j in pairs]
        assert dist[i].tolist() == pytest.approx([d for d, _ in pairs], rel=1e-14)
    r = dist
    assert reference.lid_mle(r).tolist() == pytest.approx(
        [-4 / sum(float(torch.log(r[i, j] / r[i, 3])) for j in range(4)) for i in range(12)], rel=1e-12
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists only on CUDA")
def test_torch_backend_exact_with_tf32_enabled(monkeypatch):
    """With TF32 matmuls the selection is coarse; the redo bound must widen to stay exact."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    g = generator("tf32")
    x = features(1500, 512, g, torch.float32, "manifold")
    dist, idx = L.knn(x.cuda(), k=32, backend="torch")
    assert assert_knn_matches(dist.cpu(), idx.cpu(), x, x, 32) > 0.9
