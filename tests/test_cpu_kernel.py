"""The "cpu" kernel's blocking (issue #16): reference chunks of ~4 MiB, per-thread blocks of
128 query rows x 1024 columns, a per-row threshold that only drops, and the skipped exact
distances of the re-rank. Each case pushes one of those paths and checks against the float64
oracle, and that the thread count changes nothing. Float scores come from the packed-panel
kernels (csrc/cpu/score_tile.h: AVX2 or AVX-512) or BLAS, whichever csrc/cpu/score_choice.h
measured fastest at that dimension; LDREG_CPU_SCORES forces one, and all must agree bit for bit.
"""

import pytest
import torch

import ldreg_kernels as L
from ldreg_kernels import registry
from utils import assert_knn_matches, features, generator

pytestmark = pytest.mark.skipif(
    "cpu" not in L.available_backends("cpu"), reason=f"C++ extension not built: {registry.LOAD_ERRORS.get('cpu')}"
)


@pytest.mark.parametrize(
    "b, n, d, k",
    [
        (3, 9000, 512, 7),  # fewer rows than threads x block; five reference chunks of 2048, ragged last
        (300, 5000, 128, 300),  # large k: the margin (k/4) candidates mostly skipped by the certificate test
        (130, 1030, 16, 5),  # a ragged query block (130 = 128 + 2) and a ragged 6-column block
    ],
)
def test_blocks_match_oracle(b, n, d, k):
    g = generator("cpu-blocks", b, n, d, k)
    both = features(n + b, d, g)  # one draw, one scale: separate draws made far queries (no gap to check)
    ref, x = both[:n], both[n:]
    dist, idx = L.knn(x, ref, k, exclude_self=False, backend="cpu")
    # Index sets are compared where the k-th gap allows (most rows; fewer at k=300, D=128).
    assert assert_knn_matches(dist, idx, x, ref, k, exclude_self=False) > 0.5


def test_nearest_rows_last_keeps_lowering_the_threshold():
    """Reference rows in decreasing distance from the queries' centre: every later block
    passes the threshold, so the per-row buffer fills and shrinks again and again."""
    g = generator("cpu-descending")
    ref = features(6000, 32, g)
    x = features(64, 32, g) * 0.1
    order = torch.argsort(ref.norm(dim=1), descending=True)
    ref = ref[order].contiguous()
    dist, idx = L.knn(x, ref, 40, exclude_self=False, backend="cpu")
    assert assert_knn_matches(dist, idx, x, ref, 40, exclude_self=False) > 0.9


def test_many_ties_shrink_and_order_by_index():
    """Duplicated reference rows: equal scores at the threshold; order (distance, index)."""
    g = generator("cpu-ties")
    base = features(50, 8, g)
    ref = base.repeat(60, 1)  # 3000 rows, each value 60 times
    x = ref[:200]
    dist, idx = L.knn(x, ref, 70, exclude_self=True, backend="cpu")
    d64 = torch.cdist(x.double(), ref.double())
    d64[torch.arange(200), torch.arange(200)] = float("inf")
    want_d, want_i = torch.sort(d64, dim=1, stable=True)
    assert torch.equal(idx, want_i[:, :70])
    assert torch.allclose(dist.double(), want_d[:, :70], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, d", [(700, 64), (5000, 512)])  # one reference chunk; several (~4 MiB each)
def test_self_knn_reuses_the_centred_queries_bit_for_bit(n, d):
    """Where ref is x's own memory (ldreg_loss(x) passes x.detach()), the kernel reuses the
    centred queries and their norms as the reference's: the answer equals a separate copy's
    bit for bit, and the oracle's."""
    x = features(n, d, generator("cpu-self-alias", n, d))
    k = 16
    got = torch.ops.ldreg.knn_native(x, x.detach(), k, 0, True)
    copy = torch.ops.ldreg.knn_native(x, x.clone(), k, 0, True)
    assert torch.equal(got[0], copy[0]) and torch.equal(got[1], copy[1])
    assert assert_knn_matches(got[0], got[1], x, x, k) > 0.9


def test_thread_count_changes_nothing():
    g = generator("cpu-threads")
    ref = features(5000, 64, g)
    x = ref[:700]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        d1, i1 = L.knn(x, ref, 20, exclude_self=True, backend="cpu")
        torch.set_num_threads(max(2, old))
        d2, i2 = L.knn(x, ref, 20, exclude_self=True, backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(i1, i2) and torch.equal(d1, d2)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


# Which forced kernels this CPU runs (the C++ side checks the same with __builtin_cpu_supports).
_FLAGS = _cpu_flags()
_RUNS = {"blas": True, "avx2": {"avx2", "fma"} <= _FLAGS, "avx512": "avx512f" in _FLAGS}


def _draw(tag: str, b: int, n: int, d: int, k: int, dtype: torch.dtype, exclude_self: bool):
    """Queries, reference and self offset from one draw (separate draws have separate scales:
    far queries, no gap to check); self-kNN queries are reference rows from a random offset."""
    g = generator(tag, b, n, d, k)
    both = features(n + b, d, g, dtype)
    ref = both[:n]
    off = int(torch.randint(0, n - b + 1, (), generator=g)) if exclude_self else 0
    return (ref[off : off + b] if exclude_self else both[n:]), ref, off


@pytest.mark.parametrize(
    "b, n, d, k, dtype, exclude_self",
    [
        (131, 40000, 64, 16, torch.float32, False),  # three reference chunks, ragged 6-row group and 16/32-column panel
        (257, 9000, 256, 64, torch.float32, True),  # self rows inside later column blocks
        (40, 3000, 8, 1100, torch.float32, True),  # m > 1024: later blocks filter against an infinite threshold
        (64, 5003, 33, 9, torch.bfloat16, False),  # bf16 input scores in float
        (100, 2500, 17, 5, torch.float16, True),
        (7, 1040, 5, 3, torch.float32, True),  # one ragged group; the last panel holds 16 of 32 columns
        (300, 5000, 128, 300, torch.float32, False),  # large k: whole panels pass, the buffer shrinks often
    ],
)
def test_every_score_kernel_gives_the_same_answer(monkeypatch, b, n, d, k, dtype, exclude_self):
    """Every score kernel hands the exact re-rank a candidate set holding the true k nearest,
    so the answers are identical; and they equal the float64 oracle."""
    kernels = [kn for kn, ok in _RUNS.items() if ok]
    if len(kernels) < 2:
        pytest.skip(f"this CPU runs only {kernels}")
    x, ref, off = _draw("cpu-panels", b, n, d, k, dtype, exclude_self)
    got = {}
    for kn in kernels:
        monkeypatch.setenv("LDREG_CPU_SCORES", kn)
        assert torch.ops.ldreg.cpu_score_kernel(d).startswith(kn + ":")
        got[kn] = L.knn(x, ref, k, exclude_self=exclude_self, self_offset=off, backend="cpu")
    dist, idx = got["blas"]
    for kn in kernels[1:]:
        assert torch.equal(got[kn][0], dist) and torch.equal(got[kn][1], idx), kn
    checked = assert_knn_matches(dist, idx, x.float(), ref.float(), k, exclude_self=exclude_self, self_offset=off)
    assert checked > 0.5


def test_the_old_switch_still_means_blas(monkeypatch):
    monkeypatch.delenv("LDREG_CPU_SCORES", raising=False)
    monkeypatch.setenv("LDREG_CPU_BLAS_SCORES", "1")
    assert torch.ops.ldreg.cpu_score_kernel(40).startswith("blas: forced")


def test_auto_measures_once_per_dimension(monkeypatch):
    """auto: the choice is one this CPU runs, stated with the measured times, and cached (the
    second call returns the same text, times included)."""
    monkeypatch.delenv("LDREG_CPU_SCORES", raising=False)
    monkeypatch.delenv("LDREG_CPU_BLAS_SCORES", raising=False)
    first = torch.ops.ldreg.cpu_score_kernel(72)
    kernel, why = first.split(": ", 1)
    assert _RUNS[kernel]
    if sum(_RUNS.values()) > 1:
        assert why.startswith("measured at D=72") and all(f" {kn} " in why for kn, ok in _RUNS.items() if ok)
    assert torch.ops.ldreg.cpu_score_kernel(72) == first


def test_a_bad_or_unrunnable_forced_kernel_is_refused(monkeypatch):
    monkeypatch.setenv("LDREG_CPU_SCORES", "fast")
    with pytest.raises(ValueError, match="LDREG_CPU_SCORES must be auto, blas, avx2 or avx512, got 'fast'"):
        L.knn(torch.randn(20, 4), k=3, backend="cpu")
    missing = [kn for kn, ok in _RUNS.items() if not ok]
    if missing:
        monkeypatch.setenv("LDREG_CPU_SCORES", missing[0])
        with pytest.raises(ValueError, match=f"LDREG_CPU_SCORES={missing[0]}: this CPU lacks"):
            L.knn(torch.randn(20, 4), k=3, backend="cpu")
    with pytest.raises(ValueError, match="dim must be positive"):
        torch.ops.ldreg.cpu_score_kernel(0)


# Exact distances of the re-rank go 1, 2 or 4 candidates per call (csrc/cpu/rerank.h,
# sqdist_multi): each candidate keeps the same lanes, chains and reduction, so the bits match.
_GROUPS = ["1"] + ["2", "4"] * _RUNS["avx2"]


@pytest.mark.parametrize(
    "b, n, d, k, dtype, exclude_self",
    [
        (70, 700, 5, 9, torch.float32, True),  # D under one 8-lane vector: the tail alone
        (33, 2100, 33, 64, torch.float32, False),  # a ragged tail; k = one chunk of 64 exactly
        (17, 400, 2048, 100, torch.float32, True),  # k > 64: a full chunk and a ragged one per row
        (301, 3000, 24, 40, torch.float32, False),  # candidates past the k (certificate misses) go grouped too
        (40, 900, 64, 7, torch.bfloat16, False),  # not float: one at a time, whatever the group
    ],
)
def test_every_rerank_group_gives_the_same_answer(monkeypatch, b, n, d, k, dtype, exclude_self):
    if len(_GROUPS) < 2:
        pytest.skip("this CPU has no AVX2: the re-rank runs one candidate at a time only")
    x, ref, off = _draw("cpu-rerank-group", b, n, d, k, dtype, exclude_self)
    got = {}
    for grp in _GROUPS:
        monkeypatch.setenv("LDREG_CPU_RERANK_GROUP", grp)
        got[grp] = L.knn(x, ref, k, exclude_self=exclude_self, self_offset=off, backend="cpu")
    dist, idx = got["1"]
    for grp in _GROUPS[1:]:
        assert torch.equal(got[grp][0], dist) and torch.equal(got[grp][1], idx), grp
    assert assert_knn_matches(dist, idx, x.float(), ref.float(), k, exclude_self=exclude_self, self_offset=off) > 0.5


def test_a_bad_or_unrunnable_rerank_group_is_refused(monkeypatch):
    x = torch.randn(20, 4)
    monkeypatch.setenv("LDREG_CPU_RERANK_GROUP", "3")
    with pytest.raises(ValueError, match="LDREG_CPU_RERANK_GROUP must be 1, 2 or 4, got '3'"):
        L.knn(x, k=3, backend="cpu")
    if "2" not in _GROUPS:
        monkeypatch.setenv("LDREG_CPU_RERANK_GROUP", "2")
        with pytest.raises(ValueError, match="LDREG_CPU_RERANK_GROUP=2: this CPU lacks AVX2/FMA; use 1"):
            L.knn(x, k=3, backend="cpu")
    monkeypatch.setenv("LDREG_CPU_RERANK_GROUP", "1")  # runs on every CPU
    assert torch.equal(L.knn(x, k=3, backend="cpu")[1], L.knn(x, k=3, backend="reference")[1])


# The float backward's row kernel: AVX2 (32 features in registers over the k neighbours) or the
# scalar grad_row, forced with LDREG_CPU_GRAD_SIMD; both fuse each step, so the bits match.
@pytest.mark.parametrize(
    "b, n, d, k, exclude_self",
    [
        (70, 700, 5, 9, True),  # D under one 32-feature block: the scalar tail alone
        (33, 2100, 37, 64, False),  # one block and a ragged tail
        (129, 129, 2048, 64, True),  # self-kNN, whole blocks only
    ],
)
def test_both_grad_paths_give_the_same_bits_and_the_oracle_gradient(monkeypatch, b, n, d, k, exclude_self):
    x, ref, off = _draw("cpu-grad-simd", b, n, d, k, torch.float32, exclude_self)
    dist, idx = L.knn(x, ref, k, exclude_self=exclude_self, self_offset=off, backend="cpu")
    g = generator("cpu-grad-simd-g", b, k)
    grad_dist = torch.randn(b, k, generator=g)
    grad_dist[0, : k // 2] = 0  # zero coefficients are skipped: the same on both paths
    got = {}
    for v in ("0", "1") if _RUNS["avx2"] else ("0",):
        monkeypatch.setenv("LDREG_CPU_GRAD_SIMD", v)
        got[v] = torch.ops.ldreg.knn_backward_native(grad_dist, x, ref, idx, dist, False)[0]
    if "1" in got:
        assert torch.equal(got["0"], got["1"])
    # d r_ij / d x_i = (x_i - ref_j) / r_ij, in float64 at the same neighbours
    x64, r64, d64 = x.double(), ref.double(), dist.double()
    want = (grad_dist.double() / d64).unsqueeze(-1).mul(x64.unsqueeze(1) - r64[idx]).sum(1)
    torch.testing.assert_close(got["0"].double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_a_bad_grad_simd_setting_is_refused(monkeypatch):
    x = torch.randn(20, 4, requires_grad=True)
    monkeypatch.setenv("LDREG_CPU_GRAD_SIMD", "yes")
    with pytest.raises(ValueError, match="LDREG_CPU_GRAD_SIMD must be 0 or 1, got 'yes'"):
        L.ldreg_loss(x, k=3, backend="cpu").backward()


# Self-kNN of float rows by exact pair distances (csrc/cpu/self_pairs.h), against the score path
# (LDREG_CPU_PAIRS=off): one float distance definition everywhere, so every kernel, the score
# path's re-rank and its exhaustive redo give the same bits, and auto's timed choice between
# the paths moves only the speed.
_PAIRS = ["off", "scalar"] + ["avx2"] * _RUNS["avx2"] + ["avx512"] * _RUNS["avx512"] + ["auto"]


@pytest.mark.parametrize(
    "b, d, k, exclude_self, kind",
    [
        (70, 5, 9, True, "gauss"),  # D under one 16-lane step: the masked tail alone
        (131, 37, 16, True, "gauss"),  # ragged 4-row tiles and a ragged tail
        (64, 2048, 63, True, "gauss"),  # k = N - 1: every other row
        (90, 24, 12, False, "gauss"),  # own row kept (distance 0)
        (120, 40, 20, True, "ties"),  # integer features: many equal distances, ties by index
        (200, 32, 30, True, "collapsed"),  # near-identical rows: the score path redoes every row
    ],
)
def test_every_pairs_kernel_and_the_score_path_give_the_same_bits(monkeypatch, b, d, k, exclude_self, kind):
    g = generator("cpu-pairs", b, d, k, exclude_self, kind)
    x = features(b, d, g)
    if kind == "ties":
        x = (x * 2).round()
    elif kind == "collapsed":
        x = 1.0 + 1e-4 * x
    got = {}
    for v in _PAIRS:
        monkeypatch.setenv("LDREG_CPU_PAIRS", v)
        got[v] = L.knn(x, k=k, exclude_self=exclude_self, backend="cpu")
    dist, idx = got["off"]
    for v in _PAIRS[1:]:
        assert torch.equal(got[v][0], dist) and torch.equal(got[v][1], idx), v
    assert assert_knn_matches(dist, idx, x, x, k, exclude_self=exclude_self) > 0.5


def test_a_bad_or_unrunnable_pairs_kernel_is_refused(monkeypatch):
    x = torch.randn(20, 4)
    monkeypatch.setenv("LDREG_CPU_PAIRS", "fast")
    with pytest.raises(ValueError, match="LDREG_CPU_PAIRS must be auto, off, avx512, avx2 or scalar, got 'fast'"):
        L.knn(x, k=3, backend="cpu")
    for v, lacks in (("avx512", "AVX-512F"), ("avx2", "AVX2/FMA")):
        if v not in _PAIRS:
            monkeypatch.setenv("LDREG_CPU_PAIRS", v)
            with pytest.raises(ValueError, match=f"LDREG_CPU_PAIRS={v}: this CPU lacks {lacks}"):
                L.knn(x, k=3, backend="cpu")
            break
    monkeypatch.setenv("LDREG_CPU_PAIRS", "scalar")  # runs on every CPU
    assert torch.equal(L.knn(x, k=3, backend="cpu")[1], L.knn(x, k=3, backend="reference")[1])
