"""The C++ extension's kernels directly: tiling, backward vs the torch backend, raw-op checks and errors.

The generic suites (test_knn, test_autograd, test_errors) already run the "cpu" backend
through the public API; these tests reach what the API does not show.
"""

import re

import pytest
import torch

import ldreg_kernels as L
from ldreg_kernels import registry
from ldreg_kernels.backends import torch as torch_backend
from utils import assert_knn_matches, features, generator

pytestmark = pytest.mark.skipif(
    "cpu" not in L.available_backends("cpu"), reason=f"C++ extension not built: {registry.LOAD_ERRORS.get('cpu')}"
)


@pytest.mark.parametrize(
    "b, n, off",
    [
        (300, 9000, 0),  # reference tiles of 4096 rows: three tiles, a ragged last one
        (8300, 8300, 0),  # many query chunks of 128 rows and three reference tiles
        (5000, 5300, 173),  # queries inside a larger reference at an offset
    ],
)
def test_tiled_shapes_match_oracle(b, n, off):
    g = generator("tiles", b, n)
    ref = features(n, 6, g, torch.float64, "manifold").float()
    x = ref[off : off + b]
    dist, idx = L.knn(x, ref, 9, exclude_self=True, self_offset=off, backend="cpu")
    assert assert_knn_matches(dist, idx, x, ref, 9, self_offset=off) > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("need_ref", [False, True])
def test_backward_native_equals_torch_backend(dtype, need_ref):
    g = generator("bwd-native", dtype, need_ref)
    x = features(70, 37, g, dtype)
    ref = features(90, 37, g, dtype)
    d, i = L.knn(x, ref, 11, exclude_self=False, backend="torch")
    d[3, 0] = 0.0  # a zero distance: contributes nothing
    gd = torch.randn(d.shape, generator=g, dtype=d.dtype)
    gx, gr = torch.ops.ldreg.knn_backward_native(gd, x, ref, i, d, need_ref)
    wx, wr = torch_backend.knn_backward(gd, x, ref, i, d, need_ref)
    # Same fp32 sums in another order; bf16 output rounds once more: allow one bf16 ulp.
    tol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, wx, **tol)
    if need_ref:
        torch.testing.assert_close(gr, wr, **tol)
    else:
        assert gr.shape == (0, 37)


def test_backward_native_is_deterministic():
    g = generator("bwd-det")
    x = features(300, 64, g)
    d, i = L.knn(x, x, 20, exclude_self=False, backend="cpu")
    gd = torch.randn(d.shape, generator=g)
    a = torch.ops.ldreg.knn_backward_native(gd, x, x, i, d, True)
    b = torch.ops.ldreg.knn_backward_native(gd, x, x, i, d, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_opcheck_raw_native_ops():
    g = generator("opcheck-native")
    x = features(12, 7, g)
    ref = features(20, 7, g)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.ldreg.knn_native.default, (x, ref, 4, 2, True), test_utils=utils)
    d, i = torch.ops.ldreg.knn_native(x, ref, 4, 2, True)
    gd = torch.randn(d.shape, generator=g)
    torch.library.opcheck(torch.ops.ldreg.knn_backward_native.default, (gd, x, ref, i, d, True), test_utils=utils)


@pytest.mark.parametrize(
    "args, exc, msg",
    [
        ((0, 0, True), ValueError, "k must be >= 1, got k=0"),
        ((20, 0, True), ValueError, "k=20 exceeds the N - 1 = 19 reference rows left after excluding self"),
        ((21, 0, False), ValueError, "k=21 exceeds the N = 20 reference rows"),
        ((3, 15, True), ValueError, "self_offset=15 puts the 10 queries outside ref's 20 rows"),
    ],
)
def test_cpp_callers_get_clear_errors(args, exc, msg):
    """Direct torch.ops callers (and C++ users) get the same messages as the Python API."""
    g = generator("cpp-errors")
    x, ref = features(10, 4, g), features(20, 4, g)
    k, off, excl = args
    with pytest.raises(exc, match=re.escape(msg)):
        torch.ops.ldreg.knn_native(x, ref, k, off, excl)


def test_cpp_type_errors():
    g = generator("cpp-types")
    x, ref = features(10, 4, g), features(20, 4, g)
    with pytest.raises(TypeError, match=re.escape("x and ref must have the same dtype")):
        torch.ops.ldreg.knn_native(x, ref.double(), 3, 0, False)
    with pytest.raises(ValueError, match=re.escape("x and ref must have the same feature dimension: x has D=4, ref has D=3")):
        torch.ops.ldreg.knn_native(x, ref[:, :3], 3, 0, False)


def test_cpu_only_build_reports_no_cuda():
    assert int(torch.ops.ldreg.compiled_cuda_version()) == 0 or torch.version.cuda is not None
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' runs on \\['cuda'\\], not on cpu tensors"):
            L.knn(features(5, 3, generator("nocuda")), k=2, backend="cuda")


@pytest.mark.parametrize("bad", [-1, 20])
def test_native_backward_rejects_out_of_range_indices(bad):
    """A direct caller's bad idx raises instead of reading outside ref (the API never passes one)."""
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(5, 3, generator=g), torch.randn(20, 3, generator=g)
    d, i = L.knn(x, ref, 4, backend="cpu")
    i = i.clone()
    i[2, 1] = bad
    with pytest.raises(IndexError, match=re.escape(f"idx holds {bad}, outside the reference's rows [0, 20)")):
        torch.ops.ldreg.knn_backward_native(torch.ones_like(d), x, ref, i, d, True)
