"""Autocast (mixed precision): every backend returns what it returns outside autocast.

The official LDReg configs train with AMP on. Without an autocast rule the matmuls inside
the ops ran in bf16/fp16 (max relative LID error 0.76 on clustered data) and the C++
kernels received bf16 tensors they had not dispatched on (a RuntimeError). The ops now run
with autocast off on float32 inputs, so the answers are the fp32 ones, bit for bit.
On a GPU the same tests run on CUDA with fp16 and bf16 (``device_backend``).
"""

from __future__ import annotations

import pytest
import torch

import ldreg_kernels as L
from utils import generator

AMP_DTYPES = [torch.bfloat16, torch.float16]


def clustered(n: int, d: int, salt: str) -> torch.Tensor:
    """The reproducer's data: 10 centres, tight clusters (where bf16 selection goes wrong)."""
    g = generator("autocast", salt)
    centres = torch.randn(10, d, generator=g).repeat_interleave(n // 10, 0)
    return centres + 0.01 * torch.randn(centres.shape, generator=g)


def _size(backend: str) -> int:
    return 200 if backend == "triton" else 1000  # the Triton interpreter is slow


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES, ids=["bf16", "fp16"])
def test_autocast_changes_nothing(device_backend, amp_dtype):
    dev, backend = device_backend
    x = clustered(_size(backend), 64, backend).to(dev)
    want_d, want_i = L.knn(x, k=16, backend=backend)
    want_lid = L.lid(x, k=16, backend=backend)
    xg = x.clone().requires_grad_()
    L.ldreg_loss(xg, k=16, beta=1.0, backend=backend).backward()
    with torch.autocast(dev, dtype=amp_dtype):
        d, i = L.knn(x, k=16, backend=backend)
        lid = L.lid(x, k=16, backend=backend)
        xa = x.clone().requires_grad_()
        loss = L.ldreg_loss(xa, k=16, beta=1.0, backend=backend)
    loss.backward()
    assert d.dtype == torch.float32 and lid.dtype == torch.float32
    assert torch.equal(i, want_i) and torch.equal(d, want_d) and torch.equal(lid, want_lid)
    assert torch.allclose(xa.grad, xg.grad, rtol=1e-6, atol=0)


def test_autocast_lid_matches_float64(device_backend):
    """The issue's reproducer, against the float64 oracle: within fp32 accuracy."""
    dev, backend = device_backend
    x = clustered(_size(backend), 64, "oracle").to(dev)
    want = L.lid(x.double(), k=16, backend="reference")
    with torch.autocast(dev, dtype=torch.bfloat16):
        got = L.lid(x, k=16, backend=backend)
    assert ((got.double() - want).abs() / want).max() < 1e-4


def test_half_features_under_autocast_are_computed_in_float32(device_backend):
    """bf16 features (an AMP encoder's output) give the fp32 answer on their bf16 values."""
    dev, backend = device_backend
    x = clustered(_size(backend) // 2, 32, "bf16").to(dev).bfloat16()
    with torch.autocast(dev, dtype=torch.bfloat16):
        got = L.lid(x, k=8, backend=backend)
    assert got.dtype == torch.float32
    assert torch.equal(got, L.lid(x.float(), k=8, backend=backend))


def test_autocast_under_torch_compile():
    """The autocast rule keeps torch.compile whole (fullgraph) and gives the eager answer."""
    backend = "cpu" if "cpu" in L.available_backends("cpu") else "torch"
    x = clustered(400, 32, "compile")

    def f(t):
        return L.ldreg_loss(t, k=8, beta=1.0, backend=backend)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = f(x)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(eager, compiled) and eager.dtype == torch.float32


def test_autocast_fallback_for_torch_before_2_7():
    """torch < 2.7 has no torch.library.register_autocast; _op's fallback registers the same
    rule by hand. Forced here on a scratch op: under autocast its inputs arrive in float32,
    and autocast is off inside it (an addmm there stays float32)."""
    from ldreg_kernels import _op

    seen = []

    @torch.library.custom_op("ldregtest::autocast_probe", mutates_args=())
    def probe(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        seen.append((x.dtype, w.dtype))
        return torch.mm(x, w)

    probe.register_fake(lambda x, w: x.new_empty((x.shape[0], w.shape[1])))
    _op._register_autocast_fallback(probe, "cpu")
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(4, 3, generator=g, dtype=torch.bfloat16), torch.randn(3, 2, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = probe(x, w)
    assert seen == [(torch.float32, torch.float32)] and out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() @ w)
