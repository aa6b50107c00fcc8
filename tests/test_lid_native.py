"""The C++ LID estimators (csrc/cpu/lid_cpu.cpp), which CPU tensors take: the same values and
gradients as the torch formulas (estimators._lid_formulas / _lid_backward), degenerate rows
included, float64 gradcheck, and one call each way instead of a chain of small aten calls."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from ldreg_kernels import estimators as E
from utils import generator

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.ldreg, "lid_native"), reason="C++ extension not built")


def sorted_dist(g: torch.Generator, b: int, k: int, dtype) -> torch.Tensor:
    """Ascending distances at a random scale with the rows the eps floors decide: all zero,
    all equal, duplicates of the query (leading zeros), and k - 1 zeros."""
    scale = 10.0 ** float(torch.randint(-6, 7, (), generator=g))
    d = (torch.rand(b, k, generator=g, dtype=torch.float64) * scale).sort(1).values
    d[0] = 0
    d[1] = scale
    d[2, : k // 2] = 0
    d[3, :-1] = 0
    return d.to(dtype)


def torch_backward(dist: torch.Tensor, lid: torch.Tensor, g: torch.Tensor, estimator: str, eps: float):
    class Ctx:
        saved_tensors = (dist, lid)

    Ctx.estimator, Ctx.eps = estimator, eps
    with torch.enable_grad():  # the torch formulas' branch (create_graph=True)
        return E._lid_backward(Ctx, g)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["mom", "mle"])
@pytest.mark.parametrize("k", [2, 5, 64, 513])
def test_native_matches_the_torch_formulas(dtype, estimator, k):
    g = generator("lid-native", str(dtype), estimator, k)
    dist = sorted_dist(g, 300, k, dtype)
    eps = 1e-6 if dtype == torch.float32 else 1e-12
    got = torch.ops.ldreg.lid_native(dist, estimator, eps)
    want = E._lid_formulas(dist, estimator, eps)
    tol = 8e-7 if dtype == torch.float32 else 4e-15  # sums in another order (double / compensated)
    torch.testing.assert_close(got, want, rtol=tol * (1 + k**0.5), atol=0)
    grad = torch.randn(300, generator=g, dtype=torch.float64).to(dtype)
    gb = torch.ops.ldreg.lid_backward_native(grad, dist, want, estimator, eps)
    gw = torch_backward(dist, want, grad, estimator, eps)
    assert gb.isfinite().all()
    # Relative to each row's largest entry: the MLE's last column is a difference of terms.
    row = gw.abs().amax(1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    assert ((gb - gw).abs() / row).max() <= 16 * tol * (1 + k**0.5)


@pytest.mark.parametrize("estimator", ["mom", "mle"])
def test_native_gradcheck(estimator):
    g = generator("lid-native-gradcheck", estimator)
    dist = (torch.rand(6, 7, generator=g, dtype=torch.float64) + 0.1).sort(1).values.requires_grad_()
    assert torch.autograd.gradcheck(lambda d: E._lid_op(d, estimator, 1e-12), (dist,))


def test_expanded_gradient_and_bad_arguments():
    g = generator("lid-native-args")
    dist = sorted_dist(g, 20, 6, torch.float32)
    lid = torch.ops.ldreg.lid_native(dist, "mom", 1e-6)
    ones = torch.ones((), dtype=torch.float32).expand(20)  # mean's gradient: stride 0
    torch.testing.assert_close(torch.ops.ldreg.lid_backward_native(ones, dist, lid, "mom", 1e-6),
                               torch_backward(dist, lid, ones.contiguous(), "mom", 1e-6), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="estimator must be 'mom' or 'mle', got 'max'"):
        torch.ops.ldreg.lid_native(dist, "max", 1e-6)
    with pytest.raises(ValueError, match=r"dist must be \(B, k\) with k >= 2, got shape \[20\]"):
        torch.ops.ldreg.lid_native(dist[:, 0], "mom", 1e-6)
    with pytest.raises(TypeError, match="dist must be float32 or float64, got Half"):
        torch.ops.ldreg.lid_native(dist.half(), "mom", 1e-6)
    with pytest.raises(ValueError, match=r"grad and lid must be \(B,\) for dist of shape \[20, 6\]"):
        torch.ops.ldreg.lid_backward_native(ones[:3], dist, lid, "mom", 1e-6)


def test_one_call_each_way_on_cpu():
    """lid_from_distances forward and backward on CPU: the op and its native twin, no chain
    of elementwise aten calls (the Python formulas took about 20 forward and 30 backward)."""
    g = generator("lid-native-count")
    dist = sorted_dist(g, 256, 32, torch.float32).requires_grad_()
    E.lid_from_distances(dist, "mle", 1e-6).sum().backward()  # warm
    with profile(activities=[ProfilerActivity.CPU]) as p:
        E.lid_from_distances(dist, "mle", 1e-6).backward(torch.ones(256))
    names = [e.name for e in p.events()]
    assert names.count("ldreg::lid_native") == 1 and names.count("ldreg::lid_backward_native") == 1
    elementwise = [n for n in names if n in ("aten::div", "aten::log", "aten::where", "aten::clamp_min", "aten::mul")]
    assert elementwise == [], elementwise
