"""Smoke test of the benchmark entry point (python -m benchmarks.run) on the tiny preset.

No timing assertions: it checks that the run completes and writes its CSV/MD/PNG, that the
oracle, the floor and our backends have rows, that the exact methods find the float64
oracle's neighbours with small LID and gradient errors, and that a missing peer package or
an out-of-memory peer is recorded as a row instead of crashing the run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import ldreg_kernels as L

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks import plot, providers, report, run  # noqa: E402


def _oom(*args, **kwargs):
    raise MemoryError("simulated")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    # Peers "not installed" whatever this venv has (None in sys.modules fails their lookup),
    # and mm-topk running out of memory.
    mp.setitem(sys.modules, "faiss", None)
    mp.setitem(sys.modules, "pykeops", None)
    mp.setattr(providers, "mm_topk_knn", _oom)
    ours = [f"ours-{b}" for b in L.available_backends("cpu") if b not in ("reference", "triton")]
    names = ["oracle", "paper", "mm-topk", "faiss", "keops", "floor"] + ours
    try:
        rows = run.main(["--sweep", "smoke", "--device", "cpu", "--methods", ",".join(names), "--repeats", "3",
                         "--out-dir", str(out), "--name", "smoke", "--no-progress"])
    finally:
        mp.undo()
    return out, rows, ours


def _row(rows, method, mode, shape):
    (r,) = [r for r in rows if r["method"] == method and r["mode"] == mode and (r["B"], r["N"]) == shape]
    return r


def test_files_written(smoke):
    out, _, ours = smoke
    for ext in ("csv", "json", "md", "png"):
        assert (out / f"smoke.{ext}").stat().st_size > 0
    assert report.read_csv(str(out / "smoke.csv"))[0]["torch"] == torch.__version__
    md = (out / "smoke.md").read_text()
    for name in ["oracle", "floor", *ours]:
        assert f"| {name} |" in md
    assert "skipped: faiss not installed" in md and "skipped: pykeops not installed" in md
    assert "## Our best backend per shape" in md
    plot.main([str(out / "smoke.csv")])  # redraws from the CSV alone


@pytest.mark.parametrize("shape", [(64, 64), (32, 256)])
def test_rows_and_accuracy(smoke, shape):
    _, rows, ours = smoke
    assert ours, "no backend of ours ran"
    floor = _row(rows, "floor", "fwd", shape)
    assert floor["status"] == "ok" and floor["ms"] > 0
    for name in ["oracle", "paper", *ours]:
        fwd, full = _row(rows, name, "fwd", shape), _row(rows, name, "full", shape)
        assert fwd["status"] == "ok" and full["status"] == "ok", (name, fwd["status"], full["status"])
        assert fwd["recall"] == 1.0, name
        assert fwd["lid_err"] < 1e-4, (name, fwd["lid_err"])
        assert full["grad_err"] < 1e-4, (name, full["grad_err"])
        assert fwd["ms"] > 0 and full["ms"] > 0
        assert isinstance(fwd["peak_mib"], float) and fwd["peak_mib"] >= 0, (name, fwd["peak_mib"])


def test_missing_and_failing_peers_are_rows(smoke):
    _, rows, _ = smoke
    for mode in ("fwd", "full"):
        assert _row(rows, "faiss", mode, (64, 64))["status"] == "skipped: faiss not installed"
        assert _row(rows, "keops", mode, (64, 64))["status"] == "skipped: pykeops not installed"
        assert _row(rows, "mm-topk", mode, (32, 256))["status"] == "OOM"
