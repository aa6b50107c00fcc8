"""torch.compile(fullgraph=True, dynamic=True) of every public entry point (issue #24, item 4).

Users compile their training step with dynamic shapes (a last partial batch of odd size).
The argument checks must trace: ``hasattr`` on an argument (``_validate.as_real``) and
``math.isfinite`` on a module's float attribute (a SymFloat under dynamic=True) did not.
Each function is compiled once and run at three batch sizes: the first call's graph serves
them all (no recompilation), and values and gradients equal eager mode's.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import ldreg_kernels as L
from utils import features, generator

BATCHES = (24, 31, 40)  # odd and even, none a power of two


def _entry(name: str, backend: str):
    """(fn of features -> (scalar to differentiate, extra outputs to compare), module or None)."""
    if name == "knn":
        return (lambda h: (lambda d, i: (d.square().sum(), (d, i)))(*L.knn(h, k=5, backend=backend))), None
    if name == "lid":
        return (lambda h: (lambda v: (v.log().sum(), (v,)))(L.lid(h, k=5, estimator="mle", backend=backend))), None
    if name == "ldreg_loss":
        return (lambda h: (L.ldreg_loss(h, k=5, beta=0.3, reg="l2", backend=backend), ())), None
    if name == "ldreg_loss_with_stats":
        def fn(h):
            loss, stats = L.ldreg_loss_with_stats(h, k=4, beta=0.3, ks=(6, 12), estimators=("mle", "mom"),
                                                  backend=backend)
            return loss, tuple(stats.lids[key] for key in sorted(stats.lids))
        return fn, None
    reg = L.LDReg(k=5, beta=0.2, estimator="mle", backend=backend,
                  monitor_ks=(8, 12) if name == "LDReg-monitor" else ())
    return (lambda h: (reg(h), ())), reg


NAMES = ["knn", "lid", "ldreg_loss", "ldreg_loss_with_stats", "LDReg", "LDReg-monitor"]
CASES = [(n, b) for b in ("cpu", "torch") for n in NAMES]
# The interpreter is slow: the two entry points that cover every op (forward, backward, monitor).
if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in L.available_backends("cpu"):
    CASES += [("ldreg_loss_with_stats", "triton"), ("LDReg-monitor", "triton")]


@pytest.mark.parametrize("name, backend", CASES, ids=[f"{n}-{b}" for n, b in CASES])
def test_compile_fullgraph_dynamic_matches_eager_without_recompiling(name, backend):
    if backend not in L.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} not available here")
    torch._dynamo.reset()
    fn, module = _entry(name, backend)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    compiles = []
    for b in BATCHES:
        # float64: inductor fuses the estimators' arithmetic in another order, and MoM's
        # m / (w - m) magnifies float32 rounding past any fixed tolerance on some rows.
        x = features(b, 7, generator("compile-dynamic", name, backend, b), torch.float64)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        lc, outs_c = compiled(xc)
        compiles.append(counter.frame_count)
        stats_c = module.last_stats.to_dict() if module is not None and module.monitor_ks else None
        lc.backward()
        le, outs_e = fn(xe)
        le.backward()
        torch.testing.assert_close(lc, le, msg=f"{name} B={b}")
        for oc, oe in zip(outs_c, outs_e, strict=True):
            assert oc.shape == oe.shape and oc.shape[0] == b
            torch.testing.assert_close(oc, oe, msg=f"{name} B={b}")
        torch.testing.assert_close(xc.grad, xe.grad, msg=f"{name} B={b} gradient")
        if stats_c is not None:
            assert stats_c.keys() == module.last_stats.to_dict().keys()
            for key, v in module.last_stats.to_dict().items():
                assert stats_c[key] == pytest.approx(v, rel=1e-9), key
    # The first call may hand the backend a graph twice (dynamo restarts its analysis once to
    # specialise a float default such as eps); no later batch size compiles again.
    assert compiles[0] >= 1 and compiles == [compiles[0]] * len(BATCHES), \
        f"{name}: backend compiles after each of the batches {BATCHES}: {compiles}"


@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (lambda h: L.lid(h, k=4, eps=2.0), ValueError,
         "eps must be in (0, 1), a fraction of each row's k-th neighbour distance, got 2.0"),
        (lambda h: L.ldreg_loss(h, k=4, beta=float("nan")), ValueError, "beta must be finite, got nan"),
        (lambda h: L.lid(h, k=4, eps="1e-9"), TypeError, "eps must be a real number, got str"),
        (lambda h: L.ldreg_loss(h, k=4, beta=[0.1]), TypeError, "beta must be a real number, got list"),
    ],
)
def test_bad_arguments_raise_the_eager_error_under_compile(call, exc, msg):
    """The traceable checks still refuse bad arguments with the eager message (without
    fullgraph, torch.compile runs the frame eagerly and the error is the same exception)."""
    torch._dynamo.reset()
    x = features(16, 4, generator("compile-dynamic-errors"))
    with pytest.raises(exc, match=re.escape(msg)):
        torch.compile(call, dynamic=True)(x)


def test_module_float_attributes_are_checked_under_compile():
    """A module's beta reaches check_reg_args as a SymFloat under dynamic=True; a beta set
    to inf after construction is still refused."""
    torch._dynamo.reset()
    reg = L.LDReg(k=4, beta=0.1)
    reg.beta = float("inf")
    x = features(16, 4, generator("compile-dynamic-beta"))
    with pytest.raises(ValueError, match=re.escape("beta must be finite, got inf")):
        torch.compile(lambda h: reg(h), dynamic=True)(x)
