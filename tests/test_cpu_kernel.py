"""The "cpu" kernel's blocking (issue #16): reference chunks of ~4 MiB, per-thread blocks of
128 query rows x 1024 columns, a per-row threshold that only drops, and the skipped exact
distances of the re-rank. Each case pushes one of those paths and checks against the float64
oracle, and that the thread count changes nothing. Float scores come from the packed-panel
kernel (csrc/cpu/score_tile.h) on AVX2+FMA CPUs; LDREG_CPU_BLAS_SCORES=1 selects the BLAS
path, and the two must agree bit for bit.
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


def _avx2_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@pytest.mark.skipif(not _avx2_fma(), reason="the packed-panel score kernel needs AVX2 and FMA")
@pytest.mark.parametrize(
    "b, n, d, k, dtype, exclude_self",
    [
        (131, 40000, 64, 16, torch.float32, False),  # three reference chunks, ragged 6-row group and 16-column panel
        (257, 9000, 256, 64, torch.float32, True),  # self rows inside later column blocks
        (40, 3000, 8, 1100, torch.float32, True),  # m > 1024: later blocks filter against an infinite threshold
        (64, 5003, 33, 9, torch.bfloat16, False),  # bf16 input scores in float
        (100, 2500, 17, 5, torch.float16, True),
    ],
)
def test_panel_kernel_equals_blas_path(monkeypatch, b, n, d, k, dtype, exclude_self):
    """Both score paths hand the exact re-rank a candidate set holding the true k nearest, so
    the answers are identical; and both equal the float64 oracle."""
    g = generator("cpu-panels", b, n, d, k)
    ref = features(n, d, g, dtype)
    off = int(torch.randint(0, n - b + 1, (), generator=g)) if exclude_self else 0
    x = ref[off : off + b] if exclude_self else features(b, d, g, dtype)
    got = {}
    for env in ("1", "0"):
        monkeypatch.setenv("LDREG_CPU_BLAS_SCORES", env)
        got[env] = L.knn(x, ref, k, exclude_self=exclude_self, self_offset=off, backend="cpu")
    assert torch.equal(got["1"][0], got["0"][0]) and torch.equal(got["1"][1], got["0"][1])
    dist, idx = got["0"]
    checked = assert_knn_matches(dist, idx, x.float(), ref.float(), k, exclude_self=exclude_self, self_offset=off)
    assert checked > 0.5
