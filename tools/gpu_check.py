"""One device call on a lent GPU: build, the tests CI cannot run, memcheck, shapes A-D.

    python3 tools/gpu_check.py --out $OUT              # on the device machine (make gpu-check)
    python tools/gpu_check.py --out runs/gc --dry-run  # here, no GPU: every step's CPU form (make gpu-check-dry)

The device budget (the device tool's README): 15 minutes of device time in all, the machine's
start (1-2 min) and idle time included; one call at most 10 minutes; at most 8 files back from
$OUT, no deeper than 2 folders. So this is ONE call that ends inside 540 s:

- Every step has a time limit (``PLAN``; ``--limit STEP=S`` overrides one) and the fixed
  steps' limits sum to at most ``--budget`` (540 s). A step that hits its limit is killed
  with its process group and recorded as TIMEOUT with the limit; the run goes on.
  ``racecheck`` runs last, only with the time left (at most 60 s).
- It writes at most 4 files, all at the top of --out: ``summary.md`` (rewritten as each
  step starts and ends, so a killed call still says where it stopped), ``gpu-check.log``
  (every step's output, one after another), ``junit.xml`` (every pytest step's suites) and
  ``bench.tar.gz`` (the benchmark's csv/json/md/png). Everything else goes to a temp dir.
- pytest runs with -v (one line per test, flushed), so a killed log shows the test that ran
  last; the summary names it.
- The device has no install and no pip: the package is built in place
  (``setup.py build_ext --inplace``) and every subprocess gets PYTHONPATH=<repo root>
  (a dry run hides .venv's editable install to prove it).

Steps, in order (``--steps`` picks a subset):

preflight  versions of Python, torch, CUDA, Triton, setuptools, nvcc, ninja and
           compute-sanitizer; Python.h; a C++ compiler; the CUDA runtime under CUDA_HOME;
           free GPU memory; the package importable through PYTHONPATH from another cwd.
           A missing prerequisite stops the run with one line in summary.md.
build      the extension with CUDA kernels for this card only (TORCH_CUDA_ARCH_LIST=<its
           capability>, LDREG_FORCE_CUDA=1, LDREG_REQUIRE_EXT=1). Dry run: the extension
           already built here loads (the command is logged, not run).
backends   cuda, triton and torch load on CUDA and a tiny kNN on each matches the reference.
tests      every ``device_backend`` test on CUDA (ids ``[cuda-<backend>]``: autocast,
           determinism, errors, autograd, opcheck, ...) and fp16 AMP training on CUDA.
triton     tests/test_triton.py on CUDA tensors, and the Triton deterministic reduction.
fuzz       the hypothesis fuzz of the cuda and triton backends on CUDA.
memcheck   compute-sanitizer --tool=memcheck over a small forward + backward of the cuda and
           triton backends (tools/sanitize_workload.py --quick).
bench      shapes A-D (issue 22) with few repeats: ours against the paper's cdist+sort,
           mm+topk, torch.compile of the oracle and the bare matmul (benchmarks.run).
racecheck  compute-sanitizer --tool=racecheck over one case, with the time left.

Dry run: the test steps collect only (and check that the selection is not empty), memcheck
runs the workload without the sanitizer, bench runs tiny shapes with the same methods, and a
last ``outputs`` row checks what --out holds (files, depth, summary.md first).

Exit status: 0 when no step failed or timed out, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 540  # one device call (10 min) less a minute for the transfers and the summary
MAX_FILES, MAX_DEPTH = 8, 2  # what comes back from $OUT
RACECHECK_MAX_S, RACECHECK_MIN_S = 60, 15

# Default limit (seconds) of each step on the device; the fixed steps sum to <= BUDGET_S.
PLAN: dict[str, int] = {
    "preflight": 20,  # importing torch + the package cold, nvcc and sanitizer --version
    "build": 140,  # 3 sources, one arch; ~2.5 min for two archs on 2 slow cores
    "backends": 25,
    "tests": 120,
    "triton": 60,
    "fuzz": 45,
    "memcheck": 45,
    "bench": 85,
}
STEPS = (*PLAN, "racecheck")  # racecheck: the time left, at most RACECHECK_MAX_S

# Shapes A-D of the standing GPU issue (B, N, D, k): B == N is a batch against itself.
BENCH_SHAPES = ["1024,4096,2048,64", "4096,4096,2048,64", "1024,4096,2048,512", "4096,1048576,256,64"]
BENCH_METHODS = ["paper", "mm-topk", "oracle-compiled", "floor", "ours-torch", "ours-cuda", "ours-triton"]
BENCH_FEW = ["--repeats", "5", "--min-repeats", "2", "--warmup", "1", "--max-s", "0.3", "--max-call-s", "5"]
DRY_BENCH_SHAPES = ["48,160,16,8", "64,64,16,8"]

# What runs on the device: only what CI cannot (CI runs every CPU test).
PYTEST_STEPS: dict[str, list[str]] = {
    "tests": ["tests", "-k", "cuda- or amp_fp16_on_cuda", "--ignore=tests/test_triton.py",
              "--ignore=tests/test_fuzz.py", "--ignore=tests/test_gpu_aot.py", "--ignore=tests/test_gpu_check.py"],
    "triton": ["tests/test_triton.py",
               "tests/test_deterministic.py::test_triton_deterministic_mode_runs_the_sorted_reduction"],
    "fuzz": ["tests/test_fuzz.py", "-k", "fuzz_against_oracle and (cuda or triton)"],
}
PYTEST_BASE = ["-v", "-p", "no:cacheprovider", "-rfEs", "--tb=short", "--durations=10"]

# A dry run hides an editable install (a finder on sys.meta_path) from every subprocess, as
# the device has none: only PYTHONPATH can then find the tree.
HIDE_EDITABLE = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')"
    " and 'editable' not in type(f).__name__.lower()]\n"
)

_PROBE = r"""
import json, os, sys
out = {"python": sys.version.split()[0]}
try:
    import ldreg_kernels
    out["ldreg_kernels"] = os.path.dirname(os.path.abspath(ldreg_kernels.__file__))
except Exception as e:
    out["ldreg_kernels_error"] = f"{type(e).__name__}: {e}"
try:
    import torch
    out.update(torch=torch.__version__, cuda=torch.version.cuda, gpu=torch.cuda.is_available())
    if out["gpu"]:
        free, total = torch.cuda.mem_get_info()
        p = torch.cuda.get_device_properties(0)
        out.update(name=p.name, cc=f"{p.major}.{p.minor}", free_gib=free / 2**30, total_gib=total / 2**30)
except Exception as e:
    out["torch_error"] = f"{type(e).__name__}: {e}"
for mod in ("triton", "setuptools"):
    try:
        out[mod] = __import__(mod).__version__
    except Exception as e:
        out[mod] = None
print(json.dumps(out))
"""

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

_EXT_LOADS = r"""
import ldreg_kernels as L
from ldreg_kernels import registry
from ldreg_kernels.backends import native
assert "cpu" in L.available_backends("cpu"), registry.LOAD_ERRORS
print("the extension built here loads; CUDA kernels:", native.CUDA_BUILT)
"""


@dataclass
class Row:
    step: str
    limit: float | None
    status: str = "pending"
    seconds: float | None = None
    note: str = ""


@dataclass
class Check:
    out: str
    dry: bool
    budget: float
    rows: dict[str, Row]
    tmp: str
    env: dict[str, str]
    t0: float = field(default_factory=time.monotonic)
    header: list[str] = field(default_factory=list)
    stopped: str = ""

    @property
    def log(self) -> str:
        return os.path.join(self.out, "gpu-check.log")

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    # ---------------------------------------------------------------- summary and log
    def write_summary(self) -> None:
        mode = " (dry run, no GPU)" if self.dry else ""
        lines = [f"# gpu-check{mode}", ""] + self.header
        lines += [f"plan: {self.budget:.0f} s; elapsed {time.monotonic() - self.t0:.0f} s", ""]
        if self.stopped:
            lines += [f"**Stopped: {self.stopped}**", ""]
        lines += ["| step | status | seconds | limit s | note |", "|---|---|---|---|---|"]
        for r in self.rows.values():
            secs = "" if r.seconds is None else f"{r.seconds:.0f}"
            limit = "" if r.limit is None else f"{r.limit:.0f}"
            lines.append(f"| {r.step} | {r.status} | {secs} | {limit} | {r.note.replace('|', '/')} |")
        path = os.path.join(self.out, "summary.md")
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(path + ".tmp", path)

    def say(self, text: str) -> None:
        with open(self.log, "a") as f:
            f.write(text + "\n")
        print(f"[gpu-check {time.monotonic() - self.t0:4.0f}s] {text}", flush=True)

    def start(self, step: str, limit: float | None = None) -> Row:
        r = self.rows[step]
        if limit is not None:
            r.limit = limit
        r.status, r.seconds, r.note = "running", None, f"started at {time.monotonic() - self.t0:.0f} s"
        self.write_summary()
        self.say(f"==== step {step} (limit {r.limit:.0f} s)" if r.limit else f"==== step {step}")
        return r

    def finish(self, step: str, status: str, seconds: float, note: str = "") -> None:
        r = self.rows[step]
        r.status, r.seconds, r.note = status, seconds, note
        self.write_summary()
        self.say(f"==== step {step}: {status} in {seconds:.0f} s{': ' + note if note else ''}")

    # ---------------------------------------------------------------- one command
    def run(self, cmd: list[str], limit: float, env: dict[str, str] | None = None) -> tuple[int, float, bool]:
        """Run ``cmd`` from the repo root in its own process group, output appended to the log;
        kill the group at ``limit``. (exit status, seconds, timed out)."""
        full_env = {**self.env, **(env or {})}
        t = time.monotonic()
        with open(self.log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            try:
                p = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                f.write(f"cannot start: {e}\n")
                return 127, time.monotonic() - t, False
            try:
                rc, timed_out = p.wait(timeout=max(limit, 1)), False
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(p)
                rc = p.wait()
                f.write(f"\n[gpu-check] killed at its {limit:.0f} s limit\n")
            except BaseException:  # our own kill (SIGTERM) or ^C: take the children with us
                _kill_group(p)
                raise
        return rc, time.monotonic() - t, timed_out

    def step(self, step: str, cmd: list[str], env: dict[str, str] | None = None, ok_note=None) -> bool:
        """A step of one command: start, run within the step's limit, record."""
        r = self.rows[step]
        if self.left() < r.limit:  # an earlier step ran past its limit (a slow kill): keep the plan
            r.limit = max(self.left(), 1)
        r = self.start(step)
        mark = _log_size(self.log)
        rc, secs, timed_out = self.run(cmd, r.limit, env)
        text = _log_since(self.log, mark)
        if timed_out:
            last = _last_test(text)
            note = f"hit its {r.limit:.0f} s limit" + (f"; last test: {last}" if last else "")
            self.finish(step, "TIMEOUT", secs, note)
            return False
        note = ok_note(text, rc) if ok_note else ("" if rc == 0 else f"exit {rc}")
        if isinstance(note, tuple):
            status, note = note
        else:
            status = "pass" if rc == 0 else "FAIL"
        self.finish(step, status, secs, note)
        return status == "pass"

    def skip(self, step: str, why: str) -> None:
        r = self.rows[step]
        r.status, r.note = "skip", why
        self.write_summary()
        self.say(f"==== step {step}: skip ({why})")


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _kill_group(p: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            p.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _log_size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def _log_since(path: str, mark: int) -> str:
    with open(path, errors="replace") as f:
        f.seek(mark)
        return f.read()


def _last_test(text: str) -> str:
    """The last test id pytest -v printed (the one running, if it was killed)."""
    ids = re.findall(r"^(tests/\S+::\S+)", text, re.M)
    return ids[-1] if ids else ""


def _pytest_result(text: str, rc: int) -> str:
    """pytest's closing line ('3 failed, 120 passed, 2 skipped in 40.1s'), or why none."""
    m = re.findall(r"^=+ (.*(?:passed|failed|error|skipped|deselected|no tests ran).*) =+$", text, re.M)
    line = m[-1] if m else ""
    if rc == 5:
        return f"no tests selected ({line})" if line else "no tests selected"
    return line or f"exit {rc}"


# ---------------------------------------------------------------- preflight
def cuda_runtime_found(home: str) -> bool:
    """libcudart under a CUDA home, where setup.py looks for it (lib64/, lib/, targets/*/lib/)."""
    return any(glob.glob(os.path.join(glob.escape(home), d, "libcudart.so*"))
               for d in ("lib64", "lib", "targets/*/lib"))


def find_cuda_home() -> tuple[str | None, str]:
    """(CUDA home with a runtime, how it was found) from CUDA_HOME, the nvcc on PATH (also
    through a wrapper's parent), or /usr/local/cuda."""
    tried = []
    cands = [(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"), "CUDA_HOME")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands += [(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"nvcc on PATH ({nvcc})")]
    cands += [("/usr/local/cuda", "default")]
    for home, how in cands:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and cuda_runtime_found(home):
            return home, how
        if home:
            tried.append(home)
    return None, "no nvcc with a CUDA runtime beside it in " + ", ".join(tried or ["(none)"])


def _version(cmd: list[str], pattern: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, out)
    return m.group(1) if m else (out.strip().splitlines() or ["?"])[-1]


def preflight(c: Check) -> tuple[bool, dict]:
    """Versions and prerequisites. Returns (ok, facts); a missing prerequisite is one line."""
    r = c.start("preflight")
    t = time.monotonic()
    facts: dict = {}
    missing: list[str] = []
    warn: list[str] = []
    cwd = tempfile.mkdtemp(dir=c.tmp)  # another cwd: only PYTHONPATH can find the tree
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], cwd=cwd, env=c.env, capture_output=True,
                             text=True, timeout=max(r.limit, 5))
        probe = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}
        if not probe:
            missing.append(f"the probe failed: {out.stderr.strip()[-300:]}")
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        probe = {}
        missing.append(f"the probe failed: {e}")
    facts.update(probe)
    pkg = os.path.join(ROOT, "ldreg_kernels")
    if probe and probe.get("ldreg_kernels") != pkg:
        missing.append(f"ldreg_kernels is not importable from the tree through PYTHONPATH "
                       f"({probe.get('ldreg_kernels') or probe.get('ldreg_kernels_error')})")
    if sys.version_info < (3, 10):
        missing.append(f"Python >= 3.10 (this is {sys.version.split()[0]})")
    if "torch_error" in probe:
        missing.append(f"torch ({probe['torch_error']})")
    include = sysconfig.get_paths()["include"]
    facts["python_h"] = os.path.exists(os.path.join(include, "Python.h"))
    if not facts["python_h"]:
        missing.append(f"Python.h (not in {include}: the Python headers, e.g. python3-dev)")
    st = probe.get("setuptools")
    if st is None or int(re.match(r"\d*", st).group() or 0) < 77:
        missing.append(f"setuptools >= 77 (found {st}; setup.py refuses older ones)")
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(shlex.split(cxx)[0]) is None:
        missing.append(f"a C++ compiler ({cxx!r} is not on PATH)")
    ninja = shutil.which("ninja") or (os.path.join(os.path.dirname(sys.executable), "ninja")
                                      if os.path.exists(os.path.join(os.path.dirname(sys.executable), "ninja")) else None)
    facts["ninja"] = _version([ninja, "--version"], r"(\S+)") if ninja else None
    if not ninja:
        warn.append("no ninja: a slow serial build")
    home, how = find_cuda_home()
    facts["cuda_home"] = home
    facts["nvcc"] = _version([os.path.join(home, "bin", "nvcc"), "--version"], r"release (\S+),") if home else None
    san = shutil.which("compute-sanitizer") or (os.path.join(home, "bin", "compute-sanitizer") if home else "")
    facts["sanitizer"] = san if san and os.path.exists(san) else None
    facts["sanitizer_version"] = (_version([san, "--version"], r"[Vv]ersion (\S+)") if facts["sanitizer"] else None)
    if not c.dry:
        if probe.get("torch") and not probe.get("cuda"):
            missing.append(f"a CUDA build of torch (torch {probe['torch']} is a CPU build)")
        if probe.get("torch") and not probe.get("gpu"):
            missing.append("a visible GPU (torch.cuda.is_available() is False)")
        if probe.get("triton") is None:
            missing.append("triton (import failed)")
        if home is None:
            missing.append(f"the CUDA toolkit: {how}")
        if facts["sanitizer"] is None:
            warn.append("no compute-sanitizer: memcheck and racecheck skipped")
    gpu = (f"{probe.get('name')} (sm_{str(probe.get('cc')).replace('.', '')}), {probe.get('free_gib', 0):.1f} of "
           f"{probe.get('total_gib', 0):.1f} GiB free") if probe.get("gpu") else "no GPU"
    c.header = [
        f"- torch {probe.get('torch')}, CUDA {probe.get('cuda')}, Triton {probe.get('triton')}, Python "
        f"{probe.get('python')}, setuptools {st}, ninja {facts['ninja']}",
        f"- nvcc {facts['nvcc']} (CUDA_HOME={home}, {how}); compute-sanitizer {facts['sanitizer_version']}; "
        f"Python.h {'present' if facts['python_h'] else 'MISSING'}",
        f"- {gpu}; ldreg_kernels from {probe.get('ldreg_kernels')}; test seed {c.env.get('LDREG_TEST_SEED')}",
        "",
    ]
    c.say("\n".join(c.header).strip())
    secs = time.monotonic() - t
    if missing:
        c.stopped = "missing prerequisite: " + "; ".join(missing)
        c.finish("preflight", "FAIL", secs, "missing: " + "; ".join(missing))
        return False, facts
    c.finish("preflight", "pass", secs, "; ".join(warn))
    return True, facts


# ---------------------------------------------------------------- outputs
def merge_junit(parts: list[str], dest: str) -> None:
    """One junit.xml holding every pytest step's <testsuite>, each named after its step."""
    root = ET.Element("testsuites")
    for p in parts:
        try:
            tree = ET.parse(p).getroot()
        except (ET.ParseError, OSError):
            continue
        for suite in ([tree] if tree.tag == "testsuite" else list(tree)):
            suite.set("name", os.path.splitext(os.path.basename(p))[0])
            root.append(suite)
    ET.ElementTree(root).write(dest + ".tmp", encoding="utf-8", xml_declaration=True)
    os.replace(dest + ".tmp", dest)


def check_outputs(out: str) -> list[str]:
    """What the device would drop or refuse from ``out``: [] when it all comes back."""
    files, problems = [], []
    for dirpath, _dirs, names in os.walk(out):
        rel = os.path.relpath(dirpath, out)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        for n in names:
            files.append(os.path.normpath(os.path.join(rel, n)))
            if depth > MAX_DEPTH:
                problems.append(f"{files[-1]} is more than {MAX_DEPTH} folders down")
            if not re.fullmatch(r"[A-Za-z0-9._-]+", n):
                problems.append(f"{files[-1]}: a name outside letters, digits, '.', '_', '-'")
            if os.path.getsize(os.path.join(dirpath, n)) > 16 * 2**20:
                problems.append(f"{files[-1]} is over 16 MiB")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files (at most {MAX_FILES} come back): {sorted(files)}")
    if "summary.md" not in files:
        problems.append("no summary.md")
    return problems


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for summary.md, gpu-check.log, junit.xml, bench.tar.gz")
    p.add_argument("--dry-run", action="store_true", help="the CPU form of every step (no GPU needed)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--pytest-args", default="",
                   help="extra pytest arguments for the test steps, split like a shell: -k 'knn and cuda' -x")
    p.add_argument("--limit", action="append", default=[], metavar="STEP=S",
                   help="override a step's limit in seconds (repeatable)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole run (default {BUDGET_S})")
    a = p.parse_args(argv)
    a.steps = [s for s in a.steps.split(",") if s]
    bad = [s for s in a.steps if s not in STEPS]
    if bad:
        p.error(f"unknown steps {bad}; choose from {','.join(STEPS)}")
    try:
        a.pytest_args = shlex.split(a.pytest_args)
    except ValueError as e:
        p.error(f"--pytest-args: {e}")
    a.plan = dict(PLAN)
    for item in a.limit:
        step, _, sec = item.partition("=")
        if step not in PLAN or not re.fullmatch(r"\d+(\.\d+)?", sec):
            p.error(f"--limit {item!r}: need STEP=SECONDS with STEP one of {','.join(PLAN)}")
        a.plan[step] = float(sec)
    total = sum(a.plan[s] for s in a.steps if s in PLAN)
    if total > a.budget:
        p.error(f"the steps' limits sum to {total:.0f} s, over the {a.budget:.0f} s budget")
    return a


def step_env(dry: bool, tmp: str) -> dict[str, str]:
    """The environment of every subprocess: the tree on PYTHONPATH (no install on the device)."""
    paths = [ROOT]
    if dry:
        hide = os.path.join(tmp, "hide-editable")
        os.makedirs(hide, exist_ok=True)
        with open(os.path.join(hide, "sitecustomize.py"), "w") as f:
            f.write(HIDE_EDITABLE)
        paths.append(hide)
    old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in paths]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + old), "PYTHONUNBUFFERED": "1"}
    env.setdefault("LDREG_TEST_SEED", str(random.randrange(2**31)))
    return env


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check.py: error: no CUDA device here; use --dry-run to check the steps on CPU", file=sys.stderr)
        return 2
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    for name in ("summary.md", "gpu-check.log", "junit.xml", "bench.tar.gz"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    tmp = tempfile.mkdtemp(prefix="ldreg-gpu-check-")
    rows = {s: Row(s, a.plan.get(s)) for s in STEPS if s in a.steps}
    c = Check(out, a.dry_run, a.budget, rows, tmp, step_env(a.dry_run, tmp))
    signal.signal(signal.SIGTERM, _interrupted)
    c.write_summary()
    try:
        _run_steps(c, a)
    except KeyboardInterrupt:
        c.stopped = f"interrupted after {time.monotonic() - c.t0:.0f} s"
        for r in c.rows.values():
            if r.status == "running":
                r.status = "killed"
        c.write_summary()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.dry_run:
        problems = check_outputs(out)
        n = sum(len(f) for _, _, f in os.walk(out))
        c.rows["outputs"] = Row("outputs", None, "FAIL" if problems else "pass", 0,
                                "; ".join(problems) or f"{n} files at the top of --out: "
                                + ", ".join(sorted(os.listdir(out))))
        c.write_summary()
    print(open(os.path.join(out, "summary.md")).read(), flush=True)
    return 0 if all(r.status in ("pass", "skip") for r in c.rows.values()) else 1


def _run_steps(c: Check, a: argparse.Namespace) -> None:
    import torch

    py, dry = sys.executable, a.dry_run
    dev = "cpu" if dry else "cuda"
    facts: dict = {}
    if "preflight" in a.steps:
        ok, facts = preflight(c)
        if not ok:
            for r in c.rows.values():
                if r.status == "pending":
                    r.status, r.note = "not run", "preflight failed"
            c.write_summary()
            return
    else:
        facts["cuda_home"], _ = find_cuda_home()
    require = {"LDREG_REQUIRE_EXT": "1"}

    if "build" in a.steps:
        if dry:
            c.say("dry run: the device runs LDREG_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=<cc> "
                  f"{py} setup.py build_ext --inplace; here the extension .venv built must load")
            c.step("build", [py, "-c", _EXT_LOADS], require)
        else:
            major, minor = torch.cuda.get_device_capability()
            env = {**require, "LDREG_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}",
                   "MAX_JOBS": str(os.cpu_count() or 2)}
            if facts.get("cuda_home"):
                env["CUDA_HOME"] = facts["cuda_home"]
            c.step("build", [py, "setup.py", "build_ext", "--inplace"], env)
    if "backends" in a.steps:
        want = "cpu,torch" if dry else "cuda,triton,torch"
        c.step("backends", [py, "-c", _BACKENDS_CHECK, dev, want], require)

    junit_parts: list[str] = []
    test_env = {**require, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # determinism tests on cuBLAS
    for step, select in PYTEST_STEPS.items():
        if step not in a.steps:
            continue
        part = os.path.join(c.tmp, f"{step}.xml")
        cmd = [py, "-m", "pytest", *PYTEST_BASE, f"--junitxml={part}", *select, *a.pytest_args]
        if dry:  # -q, not -v: one test id a line
            cmd = [w for w in cmd if w != "-v"] + ["--collect-only", "-q"]
            c.step(step, cmd, test_env, ok_note=lambda text, rc, s=step: _collected(text, rc, s))
        else:
            c.step(step, cmd, test_env, ok_note=lambda text, rc: ("pass" if rc == 0 else "FAIL",
                                                                   _pytest_result(text, rc)))
        if os.path.exists(part):
            junit_parts.append(part)
            merge_junit(junit_parts, os.path.join(c.out, "junit.xml"))

    work = [py, os.path.join("tools", "sanitize_workload.py"), "--device", dev]
    san = facts.get("sanitizer") or shutil.which("compute-sanitizer")
    # The caching allocator hides out-of-bounds accesses inside its blocks.
    san_env = {**require, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    if "memcheck" in a.steps:
        if dry:
            c.step("memcheck", work + ["--quick"], require, ok_note=_workload_note)
        elif not san:
            c.skip("memcheck", "no compute-sanitizer")
        else:
            c.step("memcheck", [san, "--tool=memcheck", "--error-exitcode=1", *work, "--quick"], san_env,
                   ok_note=_sanitizer_note)
    if "bench" in a.steps:
        bench = os.path.join(c.tmp, "bench")
        shapes = DRY_BENCH_SHAPES if dry else BENCH_SHAPES
        methods = BENCH_METHODS + (["ours-cpu"] if dry else [])
        cmd = [py, "-m", "benchmarks.run", *[x for s in shapes for x in ("--shape", s)],
               "--methods", ",".join(methods), *BENCH_FEW, "--name", "gpu-shapes", "--out-dir", bench,
               "--no-progress"]
        if dry:
            cmd += ["--no-memory"]
        c.step("bench", cmd)
        if os.path.isdir(bench) and os.listdir(bench):
            with tarfile.open(os.path.join(c.out, "bench.tar.gz"), "w:gz") as t:
                t.add(bench, arcname="bench")
    if "racecheck" in a.steps:
        left = c.left()
        limit = min(RACECHECK_MAX_S, left)
        c.rows["racecheck"].limit = max(limit, 0)
        if dry:
            c.skip("racecheck", f"dry run: the same workload as memcheck ({limit:.0f} s would be left)")
        elif not san:
            c.skip("racecheck", "no compute-sanitizer")
        elif limit < RACECHECK_MIN_S:
            c.skip("racecheck", f"only {left:.0f} s of the {c.budget:.0f} s plan left")
        else:
            c.step("racecheck", [san, "--tool=racecheck", "--error-exitcode=1", *work, "--quick", "--cases", "1"],
                   san_env, ok_note=_sanitizer_note)


def _collected(text: str, rc: int, step: str) -> tuple[str, str]:
    """Dry run of a test step: the selection collects tests (CUDA ones for 'tests')."""
    ids = re.findall(r"^tests/\S+::\S+", text, re.M)
    n_cuda = sum("[cuda-" in i for i in ids)
    if rc != 0 or not ids or (step == "tests" and n_cuda == 0):
        return "FAIL", f"collected {len(ids)} tests ({n_cuda} CUDA-parametrised), exit {rc}"
    extra = f", {n_cuda} CUDA-parametrised (skipped here)" if step == "tests" else ""
    return "pass", f"{len(ids)} tests collected{extra}"


def _workload_note(text: str, rc: int) -> str:
    m = re.findall(r"^(\d+) failures$", text, re.M)
    return f"{m[-1]} failures" if m else f"exit {rc}"


def _sanitizer_note(text: str, rc: int) -> tuple[str, str]:
    if "Device not supported" in text:  # seen on a gVisor runtime (device/KINDS.md)
        return "skip", "compute-sanitizer does not support this device here"
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    note = f"{errors[-1]} errors; {_workload_note(text, rc)}" if errors else _workload_note(text, rc)
    return ("pass" if rc == 0 else "FAIL"), note


if __name__ == "__main__":
    sys.exit(main())
