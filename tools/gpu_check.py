"""One command for a lent GPU: build with CUDA, test on CUDA, sanitize, benchmark.

    python3 tools/gpu_check.py --out $OUT            # on the device machine (make gpu-check)
    python tools/gpu_check.py --out runs/gc --dry-run  # here, without a GPU: every step's CPU form

A GPU is lent rarely and for 10-minute calls, so every step writes its log as it goes and
the summary is rewritten after each step: a call killed at its limit still returns what ran.
Steps (``--steps`` picks a subset, in this order):

build       the extension with CUDA kernels (``LDREG_REQUIRE_EXT=1``: a failed build fails);
            dry run: the CPU-only build.
backends    ``cuda``, ``triton`` and ``torch`` load on CUDA (dry run: ``cpu`` and ``torch``
            on CPU) and a tiny kNN on each matches the reference backend.
tests       the whole suite; on a GPU every ``device_backend`` test also runs on CUDA for each
            backend. Dry run: collection only, checking the CUDA parametrisation is there.
sanitizer   compute-sanitizer memcheck and racecheck over a small forward + backward of the
            cuda and triton backends (``tools/sanitize_workload.py``); dry run: the workload
            on CPU, without the sanitizer.
bench       the GPU sweep's first part (``benchmarks.run --sweep gpu --part 1/3``); dry run:
            the smoke sweep.

Exit status: 0 when every step passed, 1 otherwise. Writes ``<out>/summary.md`` (a table of
steps, status, seconds) and ``<out>/<step>.log``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("build", "backends", "tests", "sanitizer", "bench")

_BACKENDS_CHECK = r"""
import sys, torch, ldreg_kernels as L
dev = sys.argv[1]
want = set(sys.argv[2].split(","))
have = set(L.available_backends(dev))
print("available on", dev, sorted(have))
missing = want - have
if missing:
    from ldreg_kernels import registry
    sys.exit(f"missing on {dev}: {sorted(missing)}; load errors: {registry.LOAD_ERRORS}")
g = torch.Generator().manual_seed(1)
x = torch.randn(300, 40, generator=g).to(dev)
d0, i0 = L.knn(x, k=17, backend="reference")
for b in sorted(want):
    d, i = L.knn(x, k=17, backend=b)
    err = ((d - d0).abs() / d0[:, -1:]).max().item()
    print(f"{b}: max rel distance error {err:.2e}, index mismatches {(i != i0).sum().item()}")
    assert err < 1e-5, b
"""


@dataclass
class Result:
    step: str
    status: str
    seconds: float
    note: str = ""


@dataclass
class Check:
    out: str
    dry: bool
    python: str
    results: list[Result] = field(default_factory=list)

    def run(self, step: str, cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> bool:
        """Run ``cmd`` from the repo root, log to <out>/<step>.log, record the outcome."""
        log = os.path.join(self.out, f"{step}.log")
        t0 = time.monotonic()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
                note = "" if rc == 0 else f"exit {rc}"
            except subprocess.TimeoutExpired:
                rc, note = 124, f"timed out after {timeout:.0f} s"
            except FileNotFoundError as e:
                rc, note = 127, str(e)
        self.record(step, rc == 0, time.monotonic() - t0, note)
        return rc == 0

    def record(self, step: str, ok: bool, seconds: float, note: str = "") -> None:
        status = "pass" if ok else "FAIL"
        prev = next((r for r in self.results if r.step == step), None)
        if prev is not None:  # a step of several commands fails if any does
            prev.seconds += seconds
            prev.note = "; ".join(filter(None, [prev.note, note]))
            if not ok:
                prev.status = status
        else:
            self.results.append(Result(step, status, seconds, note))
        self.write_summary()
        print(f"[gpu-check] {step}: {status} ({seconds:.0f} s){' ' + note if note else ''}", flush=True)

    def write_summary(self) -> None:
        lines = [f"# gpu-check{' (dry run, no GPU)' if self.dry else ''}", "", _machine(), "",
                 "| step | status | seconds | note |", "|---|---|---|---|"]
        lines += [f"| {r.step} | {r.status} | {r.seconds:.0f} | {r.note} |" for r in self.results]
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


def _machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        return f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpu}"
    except Exception as e:  # the summary must be written whatever is broken
        return f"torch not importable: {e}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for summary.md and the logs")
    p.add_argument("--dry-run", action="store_true", help="the CPU form of every step (no GPU needed)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-k cuda -x'")
    p.add_argument("--bench-part", default="1/3", help="slice of the GPU sweep to run (benchmarks.run --part)")
    p.add_argument("--step-timeout", type=float, default=None, help="seconds per command (default: none)")
    a = p.parse_args(argv)
    steps = [s for s in a.steps.split(",") if s]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        p.error(f"unknown steps {bad}; choose from {','.join(STEPS)}")
    os.makedirs(a.out, exist_ok=True)
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device here; use --dry-run to check the steps on CPU")
    c = Check(os.path.abspath(a.out), a.dry_run, sys.executable)
    c.write_summary()
    py, to = sys.executable, a.step_timeout
    dev = "cpu" if a.dry_run else "cuda"
    require = {"LDREG_REQUIRE_EXT": "1"}

    if "build" in steps:
        env = {**require, "MAX_JOBS": str(os.cpu_count() or 2)}
        if not a.dry_run:  # one card's arch: half the compile time of the default 8.0;9.0
            major, minor = torch.cuda.get_device_capability()
            env |= {"LDREG_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}"}
        c.run("build", [py, "setup.py", "build_ext", "--inplace"], env, to)
    if "backends" in steps:
        want = "cpu,torch" if a.dry_run else "cuda,triton,torch"
        c.run("backends", [py, "-c", _BACKENDS_CHECK, dev, want], require, to)
    if "tests" in steps:
        junit = os.path.join(c.out, "junit.xml")
        # --pytest-args may name test files; else the whole suite.
        extra = a.pytest_args.split()
        paths = [] if any(t.startswith("tests") for t in extra) else ["tests"]
        base = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *paths, *extra]
        if a.dry_run:
            ok = c.run("tests", base + ["--collect-only"], require, to)
            n = _count_cuda_params(os.path.join(c.out, "tests.log"))
            c.record("tests", ok and n > 0, 0, f"{n} CUDA-parametrised tests collected (skipped here)")
        else:
            c.run("tests", base + [f"--junitxml={junit}", "--durations=15"], require, to)
    if "sanitizer" in steps:
        work = [py, os.path.join("tools", "sanitize_workload.py"), "--device", dev]
        if a.dry_run:
            c.run("sanitizer", work, require, to)
        else:
            san = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
            # The caching allocator hides out-of-bounds accesses inside its blocks.
            env = {**require, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
            for tool in ("memcheck", "racecheck"):
                c.run("sanitizer", [san, f"--tool={tool}", "--error-exitcode=1", *work], env, to)
    if "bench" in steps:
        bench = os.path.join(c.out, "bench")
        sweep = ["--sweep", "smoke"] if a.dry_run else ["--sweep", "gpu", "--part", a.bench_part]
        c.run("bench", [py, "-m", "benchmarks.run", *sweep, "--out-dir", bench, "--no-progress"], None, to)
    print(open(os.path.join(c.out, "summary.md")).read())
    return 0 if all(r.status == "pass" for r in c.results) else 1


def _count_cuda_params(log: str) -> int:
    """Collected test ids that name a CUDA parametrisation (``[cuda-<backend>...]``)."""
    with open(log) as f:
        return sum(1 for line in f if "[cuda-" in line)


if __name__ == "__main__":
    sys.exit(main())
