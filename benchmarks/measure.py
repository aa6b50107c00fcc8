"""Measuring one method on one shape: time, peak extra memory, accuracy against float64.

- Time: median and 20th/80th percentiles over repeats after a warm-up; ``time.perf_counter``
  on the CPU, CUDA events on a GPU.
- Memory: GPU: ``torch.cuda.max_memory_allocated`` minus what was allocated before the call.
  CPU: torch's CPU allocator keeps no statistics, so a worker process (``python -m
  benchmarks.measure``) measures the growth of peak RSS across one call, resetting the peak
  (VmHWM) through /proc/self/clear_refs between calls. It runs with a fixed glibc mmap
  threshold so that freed blocks leave RSS at once (else a later method would reuse them
  unseen); that setting would distort timing, hence a separate process.
- Accuracy: a float64 oracle (direct differences, full sort) on the first ``rows`` queries:
  index recall@k, max relative MoM-LID error, and max relative gradient error per row.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ldreg_kernels import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_inputs(b: int, n: int, d: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor | None]:
    """Gaussian features x (B, D) requiring grad, and a separate bank (N, D) unless B == N.

    B == N is a batch against itself (``ref=None``: detached, self excluded by index);
    B != N is a memory bank that does not hold the queries.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(b, d, generator=g).to(device).requires_grad_()
    ref = None if b == n else torch.randn(n, d, generator=g).to(device)
    return x, ref


def cpu_jiffies() -> list[int]:
    """All CPUs' time counters from /proc/stat's first line (user, nice, system, idle, iowait,
    irq, softirq, steal, ...); [] where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            return [int(t) for t in f.readline().split()[1:]]
    except OSError:
        return []


def selection_flops(b: int, n: int, d: int) -> float:
    """Flops of the neighbour selection's matmul, 2*B*N*D: the floor's work, and the count
    behind every TFLOP/s the benchmarks report (forward and forward+backward alike)."""
    return 2.0 * b * n * d


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """One call's time in ms (CUDA events on a GPU)."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def time_interleaved(
    fns: dict[object, Callable[[], object]], device: torch.device, *, warmup: int = 1, min_reps: int = 3,
    max_reps: int = 10, max_s: float = 1.0, slow_s: float = 3.0,
) -> dict[object, tuple[float, float, float, int] | Exception]:
    """Median, p20, p80 and repeats of each call's time, the calls timed round by round (one
    of each per round), so that a burst of other load on the machine hits every method alike
    instead of making one method's outlier. Each call repeats until ``max_reps``, or earlier
    once ``min_reps`` are done and it has used ``max_s`` seconds: a 1 ms kernel gets
    ``max_reps``, a 1 s call ``min_reps``. A call slower than ``slow_s`` is timed once (its
    run-to-run noise is small next to its length, and three more would dominate a CPU sweep). Returns key -> (median, p20, p80, repeats) in ms, or the exception a call
    raised (an OOM is a result: that call stops, the others go on)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    ts: dict[object, list[float]] = {key: [] for key in fns}

    def active(key: object) -> bool:
        t = ts[key]
        if t and t[0] > slow_s * 1e3:
            return False
        return len(t) < max_reps and (len(t) < min_reps or sum(t) < max_s * 1e3)

    failed: dict[object, Exception] = {}
    while any(key not in failed and active(key) for key in fns):
        for key, fn in fns.items():
            if key in failed or not active(key):
                continue
            try:
                ts[key].append(_timed_call(fn, device))
            except Exception as e:  # noqa: BLE001 - reported per method by the caller
                failed[key] = e
    out: dict[object, tuple[float, float, float, int] | Exception] = dict(failed)
    for key, t in ts.items():
        if key in failed:
            continue
        q = statistics.quantiles(t, n=5, method="inclusive") if len(t) >= 2 else [t[0]] * 4
        out[key] = (statistics.median(t), q[0], q[3], len(t))
    return out


def describe_failure(e: BaseException) -> str:
    """'OOM' for out-of-memory (CPU or CUDA), else 'error: Type: message' (one line, short)."""
    msg = str(e)
    oom_types = (MemoryError,) + ((torch.cuda.OutOfMemoryError,) if hasattr(torch.cuda, "OutOfMemoryError") else ())
    if isinstance(e, oom_types) or "out of memory" in msg.lower() or "can't allocate memory" in msg:
        return "OOM"
    line = " ".join(msg.split())
    return f"error: {type(e).__name__}: {line}"[:240]


# ---------------------------------------------------------------- accuracy
@dataclass
class Oracle64:
    """The float64 answer for the first ``rows`` queries (the accuracy reference)."""

    idx: Tensor  # (r, k)
    lid: Tensor  # (r,)
    grad: Tensor  # (r, D): d loss / d x for those rows, loss averaged over all B queries


def oracle64(x: Tensor, ref: Tensor | None, k: int, beta: float, rows: int = 256,
             chunk_bytes: float = 2**30) -> Oracle64:
    """float64 kNN, MoM LID and LDReg gradient for the first ``rows`` queries, in row chunks.

    The loss is a mean over all B rows and each row's term depends on that row alone (the
    reference is detached), so the first rows' gradient is exact with the 1/B factor.
    """
    b = x.shape[0]
    r = min(rows, b)
    ref64 = (x if ref is None else ref).detach().double()
    step = max(1, int(chunk_bytes // (ref64.shape[0] * 8 * 3)))  # cdist + sorted values + indices
    idx, lid, grad = [], [], []
    for s in range(0, r, step):
        q = x.detach()[s:min(r, s + step)].double().requires_grad_()
        _, i = reference.knn(q.detach(), ref64, k, exclude_self=ref is None, self_offset=s)
        # Gradient through the k selected distances only (the selection is piecewise constant).
        dist = (q.unsqueeze(1) - ref64[i]).norm(dim=-1)
        lids = reference.lid_mom(dist)
        (g,) = torch.autograd.grad(-beta * torch.log(lids).sum() / b, q)
        idx.append(i)
        lid.append(lids.detach())
        grad.append(g)
    return Oracle64(torch.cat(idx), torch.cat(lid), torch.cat(grad))


def recall_and_lid_err(dist: Tensor, idx: Tensor, o: Oracle64) -> tuple[float, float]:
    """Index recall@k and max relative MoM-LID error of the first rows against the oracle."""
    r = o.idx.shape[0]
    dist, idx = dist[:r].detach(), idx[:r].to(o.idx.device)
    recall = float((idx.unsqueeze(2) == o.idx.unsqueeze(1)).any(2).double().mean())
    lid = reference.lid_mom(dist).double()  # in the method's own precision, then compared
    return recall, float(((lid - o.lid).abs() / o.lid.abs()).max())


def grad_err(g: Tensor | None, idx: Tensor | None, o: Oracle64) -> float:
    """max of |g_i - g64_i| / |g64_i| (Euclidean norms) over the rows whose neighbour set
    equals the oracle's. A row with another set (a float64 near-tie at the k-th neighbour,
    which float32 cannot resolve) has an O(1) different gradient by construction; recall@k
    reports those rows, this number the precision of the rest."""
    if g is None:
        return float("nan")
    r = o.grad.shape[0]
    g = g[:r].double()
    same = torch.ones(r, dtype=torch.bool, device=g.device) if idx is None else \
        (torch.sort(idx[:r].to(o.idx.device), 1).values == torch.sort(o.idx, 1).values).all(1)
    if not bool(same.any()):
        return float("nan")
    den = o.grad.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    return float(((g - o.grad).norm(dim=1) / den)[same].max())


# ---------------------------------------------------------------- memory
def cuda_peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory fn allocates on the GPU beyond what was allocated before, MiB."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1])


def cpu_peak_mib(fn: Callable[[], object]) -> float:
    """Peak RSS growth across fn, MiB (in a worker started by ``cpu_memory``)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    base = _proc_status_kib("VmRSS")
    fn()
    return (_proc_status_kib("VmHWM") - base) / 1024


def cpu_memory(shape: tuple[int, int, int, int], jobs: list[tuple[str, str]], timeout: float = 1800) -> dict:
    """Peak extra MiB of each (method, mode) job on one shape, measured in a worker process.

    Returns {"method/mode": MiB or a failure string}. A worker that dies (e.g. killed for
    memory) or times out blames the job it was on; the jobs after it are marked unmeasured.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, "-m", "benchmarks.measure", json.dumps({"shape": shape, "jobs": jobs})]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        stdout, why = out.stdout, ("OOM" if out.returncode in (-9, 137) else f"error: worker exit {out.returncode}")
    except subprocess.TimeoutExpired as e:
        partial = e.stdout or ""
        stdout = partial.decode() if isinstance(partial, bytes) else partial
        why = "error: memory worker timed out"
    res: dict = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            res.update(json.loads(line))
    for m, mode in jobs:  # results come in job order: the first missing one is where it died
        key = f"{m}/{mode}"
        if key not in res:
            res[key] = why
            why = f"not measured (the memory worker died on {key})"
    return res


def _worker(spec: dict) -> None:
    """Memory worker: warm each method up on a small slice (its lazy init, KeOps' compile),
    or on the full shape for torch.compile (else a recompile would be measured), then
    measure one call per mode. Prints one JSON line per job so a crash keeps earlier ones."""
    from benchmarks import providers

    b, n, d, k = spec["shape"]
    device = torch.device("cpu")
    x, ref = make_inputs(b, n, d, device)
    by_name = {m.name: m for m in providers.methods(device)}
    small = min(n, max(2 * k + 2, 64))  # enough rows for k neighbours, few enough to be free
    for name, mode in spec["jobs"]:
        m = by_name[name]

        def call(x: Tensor = x, ref: Tensor | None = ref, m=m, mode=mode) -> None:
            if m.kind == "floor":
                m.knn(x, ref, k)
            elif mode == "fwd":
                m.loss_fn(x, ref, k)
            else:
                x.grad = None
                m.loss_fn(x, ref, k).backward()
                x.grad = None

        try:
            if name == "oracle-compiled":
                call()
            else:
                xs = x.detach()[: min(b, small)].clone().requires_grad_()
                call(xs, None if ref is None else ref[:small])
            val: object = round(cpu_peak_mib(call), 1)
        except Exception as e:  # a failure is a result, not a crash
            val = describe_failure(e)
        print(json.dumps({f"{name}/{mode}": val}), flush=True)


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
