"""Count what one step asks of the device: aten calls, host syncs and kernel launches.

On a GPU every aten call is a kernel launch or a dispatcher trip of several microseconds,
and a sync (``aten::_local_scalar_dense``, ``aten::nonzero``, ``aten::unique*``, a
``.tolist()``/``.item()``) stalls the host until the queue drains; a step of about a
millisecond of GPU work must keep both small. Both are deterministic, so they are counted on
the CPU with ``torch.profiler`` (every ``aten::`` event, nested ones included) and tests may
assert them.

Under ``TRITON_INTERPRET=1`` a Triton launch runs in Python on the host, copying its tensors
with aten calls of its own; :func:`count` wraps each launch in a ``triton::launch`` range and
counts it as one launch, leaving out what the interpreter did inside.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ["Counts", "count"]

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique", "sync::tolist")
LAUNCH = "triton::launch"
TOLIST = "sync::tolist"  # Tensor.tolist reads the device without an aten op of its own
ASSERT = "aten::_assert_async"  # a device-side assert on CUDA (its CPU form reads the value)


@dataclass(frozen=True)
class Counts:
    """aten calls (nested included), sync-type ops among them, Triton launches, per-name tally."""

    aten: int
    syncs: int
    launches: int
    names: Counter

    def row(self) -> dict:
        return {"aten_calls": self.aten, "syncs": self.syncs, "triton_launches": self.launches}


@contextlib.contextmanager
def _marked_triton_launches():
    """Wrap every Triton kernel launch in a ``triton::launch`` profiler range."""
    try:
        from triton.runtime import interpreter, jit
    except ImportError:
        yield
        return
    patched = []
    for owner, attr in ((interpreter.GridExecutor, "__call__"), (jit.JITFunction, "run")):
        if hasattr(owner, attr):
            orig = getattr(owner, attr)

            def wrapped(self, *a, _orig=orig, **kw):
                with record_function(LAUNCH):
                    return _orig(self, *a, **kw)

            setattr(owner, attr, wrapped)
            patched.append((owner, attr, orig))
    try:
        yield
    finally:
        for owner, attr, orig in patched:
            setattr(owner, attr, orig)


@contextlib.contextmanager
def _marked_tolist():
    """Record every ``Tensor.tolist`` (a host sync) as a ``sync::tolist`` event."""
    orig = torch.Tensor.tolist

    def tolist(self):
        with record_function(TOLIST):
            return orig(self)

    torch.Tensor.tolist = tolist
    try:
        yield
    finally:
        torch.Tensor.tolist = orig


@contextlib.contextmanager
def _without_kineto_trace_lines():
    """torch 2.13's profiler writes two "USDT: ... profiler_start/stop" lines to stderr (fd 2,
    from C++) per profile: 40+ lines of noise in `make demo`. Its stderr is caught in a file
    and written back without them, so any other message still shows."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(True) if not ln.startswith("USDT:")]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def count(step: Callable[[], object], warmup: int = 1) -> Counts:
    """Profile one call of ``step`` (after ``warmup`` calls) and count its device work.

    ``Tensor.tolist`` counts as a sync; the value read of ``torch._assert_async`` does not
    (on CUDA it is a device-side assert, no sync)."""
    for _ in range(warmup):
        step()
    with _without_kineto_trace_lines(), _marked_triton_launches(), _marked_tolist(), \
            profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names: Counter = Counter()
    launches = 0
    for e in prof.events():
        skip, p = False, e.cpu_parent
        while p is not None:
            if p.name in (LAUNCH, ASSERT):
                skip = p.name == LAUNCH or e.name == "aten::_local_scalar_dense"
                break
            p = p.cpu_parent
        if skip:
            continue
        if e.name == LAUNCH:
            launches += 1
        elif e.name.startswith("aten::") or e.name == TOLIST:
            names[e.name] += 1
    syncs = sum(v for n, v in names.items() if n.startswith(SYNC_OPS))
    return Counts(sum(v for n, v in names.items() if n.startswith("aten::")), syncs, launches, names)
