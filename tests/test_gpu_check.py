"""tools/gpu_check.py, the one command for a lent GPU, runs end to end here in its dry-run
form, so a GPU session does not spend its minutes on a broken script."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_collects_the_cuda_parametrisation(tmp_path):
    out = tmp_path / "gc"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--out", str(out), "--dry-run",
         "--steps", "backends,tests,sanitizer", "--pytest-args", "tests/test_errors.py tests/test_autograd.py"],
        capture_output=True, text=True, timeout=600,
    )
    summary = (out / "summary.md").read_text()
    assert r.returncode == 0, summary + r.stdout[-2000:]
    rows = {line.split("|")[1].strip(): line for line in summary.splitlines() if line.startswith("| ") and "step" not in line}
    assert set(rows) == {"backends", "tests", "sanitizer"} and all("| pass |" in v for v in rows.values())
    n = int(rows["tests"].split("|")[4].split()[0])
    assert n > 0, rows["tests"]  # "<n> CUDA-parametrised tests collected (skipped here)"
    assert "0 failures" in (out / "sanitizer.log").read_text()


def test_refuses_to_run_for_real_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA device here; use --dry-run" in r.stderr
