"""Benchmark LID / LDReg forward and forward+backward: our backends against every peer.

    python -m benchmarks.run --sweep smoke                 # two tiny shapes, seconds
    python -m benchmarks.run --sweep cpu                   # the reduced CPU sweep (~20 min, 2 quiet cores)
    python -m benchmarks.run --sweep gpu --part 1/3        # the full spec on a GPU, in three calls
    python -m benchmarks.run --shape 2048,65536,128,64 --methods oracle,ours-cpu,floor
    python -m benchmarks.plot benchmarks/results/<machine>.csv   # redraw md + png from the CSV

Methods (benchmarks/providers.py): the oracle (ldreg_kernels.reference), the paper's cdist+sort,
torch.compile of the oracle, mm+topk, FAISS, KeOps, our backends, and the floor (x @ ref.T).
A missing package, an over-budget shape or an out-of-memory run is recorded as a row, never a
crash. Writes <out-dir>/<name>.{csv,json,md,png}; <name> is the machine slug for the cpu and
gpu sweeps, <machine>-<sweep> otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import math
import os
import platform
import shlex
import sys
import time

import torch

from benchmarks import launches, measure, providers, report
# Re-exported: sidebyside and scaling name their results with them.
from benchmarks.machine import cpu_identity, cpu_slug, device_detail, machine_slug  # noqa: F401

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
Shape = tuple[int, int, int, int]  # (B, N, D, k)

# The full spec: B = N sweep, and a memory bank of N rows for B = 4096 queries.
SPEC_BN: list[Shape] = [(n, n, d, k) for n in (1024, 2048, 4096, 8192) for d in (128, 512, 2048) for k in (16, 64, 256)]
SPEC_BANK: list[Shape] = [(4096, n, 256, 64) for n in (16384, 65536, 262144, 1048576)]
# The CPU sweep (2 cores): sized from timed small cases, extrapolated: ~20 min on a quiet machine.
CPU_BN: list[Shape] = [(n, n, d, 64) for n in (1024, 2048, 4096) for d in (128, 512)] + [
    (n, n, 128, k) for n in (1024, 2048, 4096) for k in (16, 256)]
CPU_BANK: list[Shape] = [(1024, n, 256, 64) for n in (16384, 65536, 262144)]
# k=512: the official code tracks LID at k=512 every step (not a spec shape; CPU only).
CPU_LARGE_K: list[Shape] = [(n, n, 128, 512) for n in (1024, 2048)]
# The batches SSL training runs LDReg on (a batch against itself): fixed costs show here.
SSL: list[Shape] = [(n, n, d, k) for n in (256, 512, 1024) for d in (128, 512, 2048) for k in (32, 64)]
SWEEPS: dict[str, list[Shape]] = {
    "gpu": SPEC_BN + SPEC_BANK,
    "cpu": SSL + [s for s in CPU_BN + CPU_LARGE_K + CPU_BANK if s not in SSL],
    "ssl": SSL,
    # make demo: SSL-sized shapes, a few seconds each against the paper and mm+topk.
    "demo": [(256, 256, 128, 32), (512, 512, 512, 64), (1024, 1024, 512, 64)],
    "smoke": [(64, 64, 16, 8), (32, 256, 16, 8)],
}


def cpu_skip_reason(s: Shape) -> str:
    """Why a spec shape is not in the CPU sweep (2 cores; the whole sweep is sized for ~25 min)."""
    b, n, d, k = s
    if b != n:
        return ("memory bank B=4096: the CPU bank sweep uses B=1024 and N <= 262144 (time; at N=1M the oracle's "
                "B x N buffers alone pass --max-bytes)")
    if n == 8192:
        return "B=N=8192: 4x the work of 4096; the direct-difference peers would need minutes per call"
    if d == 2048:
        return "D=2048 above B=N=1024 (the SSL shapes): 4x the work of D=512 for every method"
    return "k in {16, 256} at D=512: k varies only at D=128 (time); k=64 elsewhere"


def skipped_spec(shapes: list[Shape]) -> list[str]:
    """The spec shapes missing from ``shapes``, grouped by reason: '<reason>: (B,N,D,k) ...'."""
    groups: dict[str, list[str]] = {}
    for s in SWEEPS["gpu"]:
        if s not in shapes:
            groups.setdefault(cpu_skip_reason(s), []).append("(" + ",".join(map(str, s)) + ")")
    return [f"{why}: {' '.join(ss)}" for why, ss in groups.items()]


# ---------------------------------------------------------------- versions


def versions() -> dict[str, str]:
    """Versions of everything timed; read from package metadata (importing pykeops is slow)."""
    import ldreg_kernels

    out = {"python": platform.python_version(), "torch": torch.__version__, "ldreg_kernels": ldreg_kernels.__version__}
    wheels = {"triton": ["triton"], "faiss": ["faiss-cpu", "faiss-gpu", "faiss"], "pykeops": ["pykeops"]}
    for name, dists in wheels.items():
        found = [importlib.metadata.version(d) for d in dists if _has_dist(d)]
        out[name] = found[0] if found else "not installed"
    return out


def _has_dist(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# ---------------------------------------------------------------- one shape
def _estimate_bytes(m: providers.Method, s: Shape, mode: str) -> float:
    """Working memory a method would need: its B x N buffers, plus the (B, k, D) gather of the
    index-only peers' autograd path."""
    b, n, d, k = s
    extra = 3 * b * k * d * 4 if (mode == "full" and m.loss is not None and m.kind == "peer") else 0
    return b * n * m.bytes_per_pair + extra


def _predict_s(history: dict, method: str, mode: str, s: Shape) -> float:
    """Seconds one call should take, scaled by B*N*D from the method's last measured shape
    (0 when it has none yet): the --max-call-s guard, so a sweep never waits minutes on a
    peer that the previous size already showed to be hopeless."""
    if (method, mode) not in history:
        return 0.0
    work, sec = history[(method, mode)]
    return sec * s[0] * s[1] * s[2] / work


def run_shape(s: Shape, methods: list[providers.Method], device: torch.device, opts: argparse.Namespace,
              progress=None, history: dict | None = None) -> list[dict]:
    """Rows (one per method and mode) for one shape; failures become statuses.

    ``history`` ((method, mode) -> (B*N*D, seconds) of the last success) carries across
    shapes for the --max-call-s guard.
    """
    history = {} if history is None else history
    b, n, d, k = s
    x, ref = measure.make_inputs(b, n, d, device)
    o = measure.oracle64(x, ref, k, providers.BETA, rows=opts.acc_rows)
    rows: list[dict] = []
    timing = dict(warmup=opts.warmup, min_reps=opts.min_repeats, max_reps=opts.repeats, max_s=opts.max_s,
                  slow_s=opts.slow_s)
    calls: dict[tuple[str, str], object] = {}  # (method, mode) -> the timed call
    by_key: dict[tuple[str, str], tuple[providers.Method, dict]] = {}
    for m in methods:
        if progress is not None:
            progress.set_postfix_str(f"{b},{n},{d},{k} {m.name}")
        m.reset()
        idx = None  # the fwd call's neighbours, to compare gradients on rows with the oracle's set
        for mode in ["fwd"] if m.kind == "floor" else ["fwd", "full"]:
            row = dict(method=m.name, kind=m.kind, mode=mode, B=b, N=n, D=d, k=k, status="ok", ms=math.nan,
                       p20=math.nan, p80=math.nan, reps=0, first_ms=math.nan, recall=math.nan, lid_err=math.nan,
                       grad_err=math.nan, peak_mib=math.nan, aten_calls=math.nan, syncs=math.nan)
            rows.append(row)
            need = _estimate_bytes(m, s, mode)
            if m.unavailable:
                row["status"] = m.unavailable
            elif mode == "full" and not m.autograd:
                row["status"] = "fwd only, no autograd"
            elif device.type == "cpu" and need > opts.max_bytes:
                row["status"] = (f"skipped: would need ~{need / 2**30:.1f} GiB "
                                 f"(> --max-bytes {opts.max_bytes / 2**30:g})")
            elif _predict_s(history, m.name, mode, s) > opts.max_call_s:
                row["status"] = (f"skipped: predicted ~{_predict_s(history, m.name, mode, s):.0f} s per call "
                                 f"(> --max-call-s {opts.max_call_s:g})")
            else:
                try:
                    call, idx = _first_call(m, mode, x, ref, k, o, device, row, idx)
                    calls[(m.name, mode)] = call
                    by_key[(m.name, mode)] = (m, row)
                except Exception as e:  # OOM or a peer's failure is a result, not a crash
                    _failed(row, e, device)
                x.grad = None
        if progress is not None:
            progress.update(1)
    # The methods' calls timed round by round, so a burst of other load hits them alike; those
    # with a thread pool of their own afterwards, one at a time (their spinning threads made
    # the next call in a round bimodal: ours at B=N=256 2.9-10.2 ms against 1.8-2.3 alone).
    if progress is not None:
        progress.set_postfix_str(f"{b},{n},{d},{k} timing {len(calls)} calls interleaved")
    alone = [key for key in calls if by_key[key][0].own_runtime]
    timed = measure.time_interleaved({key: c for key, c in calls.items() if key not in alone}, device, **timing)
    for key in alone:
        timed.update(measure.time_interleaved({key: calls[key]}, device, **timing))
    for key, got in timed.items():
        m, row = by_key[key]
        if isinstance(got, Exception):
            _failed(row, got, device)
            continue
        row["ms"], row["p20"], row["p80"], row["reps"] = got
        history[key] = (b * n * d, row["ms"] / 1e3)
        counts = launches.count(calls[key], warmup=0)  # after the timing: the profiler's cost is not timed
        row["aten_calls"], row["syncs"] = counts.aten, counts.syncs
        if device.type == "cuda":
            row["peak_mib"] = measure.cuda_peak_mib(calls[key], device)
    x.grad = None
    calls.clear()
    for m in methods:
        m.reset()  # free what it cached (the floor's output buffer)
    floor = next((r["ms"] for r in rows if r["kind"] == "floor" and r["status"] == "ok"), math.nan)
    for r in rows:
        r["tflops"] = 2.0 * b * n * d / r["ms"] / 1e9 if r["status"] == "ok" else math.nan
        r["x_floor"] = r["ms"] / floor if r["status"] == "ok" else math.nan
    if opts.memory and device.type == "cpu":
        jobs = [(r["method"], r["mode"]) for r in rows if r["status"] == "ok"]
        if progress is not None:
            progress.set_postfix_str(f"{b},{n},{d},{k} memory")
        mem = measure.cpu_memory(s, jobs)
        for r in rows:
            r["peak_mib"] = mem.get(f"{r['method']}/{r['mode']}", r["peak_mib"])
    return rows


def _failed(row: dict, e: BaseException, device: torch.device) -> None:
    row["status"] = measure.describe_failure(e)
    row["ms"] = math.nan
    gc.collect()  # drop what the failed call left in the traceback's frames
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_call(m: providers.Method, mode: str, x: torch.Tensor, ref: torch.Tensor | None, k: int,
                o: measure.Oracle64, device: torch.device, row: dict,
                idx: torch.Tensor | None) -> tuple[object, torch.Tensor | None]:
    """The untimed first call (compiles, lazy init) with its time and accuracy in ``row``.
    Returns the call to time and the neighbour indices (fwd), else ``idx`` passed through."""
    if m.kind == "floor":
        call = lambda: m.knn(x, ref, k)  # noqa: E731
    elif mode == "fwd":
        call = lambda: m.loss_fn(x, ref, k)  # noqa: E731
    else:
        def call() -> None:
            x.grad = None
            m.loss_fn(x, ref, k).backward()
    t = time.perf_counter()
    if m.kind == "floor":
        call()
    elif mode == "fwd":
        # kNN on the timed path's inputs (x requires grad, so torch.compile builds the same
        # graph), giving the accuracy numbers.
        dist, idx = m.knn(x, ref, k)
        row["recall"], row["lid_err"] = measure.recall_and_lid_err(dist, idx, o)
        idx = idx[: o.idx.shape[0]].detach()
        del dist
    else:
        call()
        row["grad_err"] = measure.grad_err(x.grad, idx, o)
    measure.sync(device)
    row["first_ms"] = (time.perf_counter() - t) * 1e3
    return call, idx


def _memory_note(device: torch.device, on: bool) -> str:
    if device.type == "cuda":
        return "GPU: torch.cuda.max_memory_allocated minus the allocation before the call"
    return "CPU: peak-RSS (VmHWM) growth across one call, in a worker process" if on else "not measured"


# ---------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", choices=sorted(SWEEPS), help="a named shape preset")
    p.add_argument("--shape", action="append", default=[], help="B,N,D,k (repeatable; B == N: batch vs itself)")
    p.add_argument("--part", help="I/N: run only the I-th of N contiguous slices of the shapes (a sweep split "
                   "over several calls; merge with python -m benchmarks.plot a.csv b.csv --out all.csv)")
    p.add_argument("--methods", help="comma-separated method names (default: all); see --list")
    p.add_argument("--list", action="store_true", help="list the methods and whether they run here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=None, help="max timed repeats (default 10 CPU, 50 GPU)")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--max-s", type=float, default=None, help="stop repeating after this many seconds "
                   "once --min-repeats are done (default 1 CPU, 0.5 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls on top of the untimed first call "
                   "(default 0 CPU, 3 GPU)")
    p.add_argument("--slow-s", type=float, default=3.0, help="a call slower than this is timed once (default 3)")
    p.add_argument("--max-call-s", type=float, default=20.0, help="skip a method on a shape where its last "
                   "measured time, scaled by B*N*D, predicts more seconds per call than this (default 20)")
    p.add_argument("--max-bytes", type=float, default=8.0, help="CPU: skip a method whose B x N buffers would "
                   "need more than this many GiB (default 8)")
    p.add_argument("--acc-rows", type=int, default=256, help="queries checked against the float64 oracle")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak-memory measurement")
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("--name", help="output file stem (default: machine slug, plus -<sweep> unless cpu/gpu)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not args.sweep and not args.shape and not args.list:
        p.error("give --sweep or --shape (or --list)")
    cpu = args.device == "cpu"
    args.repeats = args.repeats or (10 if cpu else 50)
    args.max_s = args.max_s if args.max_s is not None else (1.0 if cpu else 0.5)
    args.warmup = args.warmup if args.warmup is not None else (0 if cpu else 3)
    args.max_bytes = args.max_bytes * 2**30
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the sweep; write <name>.{csv,json,md,png}; return the rows."""
    args = parse_args(argv)
    # The paper's requirement for its cdist, and a fair floor: fp32 matmuls, no TF32 (restored
    # afterwards, for callers in the same process such as the smoke test).
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _main(args, argv)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _main(args: argparse.Namespace, argv: list[str] | None) -> list[dict]:
    device = torch.device(args.device)
    all_methods = providers.methods(device)
    if args.list:
        for m in all_methods:
            print(f"{m.name:16s} {m.unavailable or 'available'}: {m.note}")
        return []
    methods = all_methods
    if args.methods:
        want = args.methods.split(",")
        unknown = set(want) - {m.name for m in all_methods} - {"ours-triton", "ours-cuda"}
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {[m.name for m in all_methods]}")
        methods = [m for m in all_methods if m.name in want]
    shapes = list(SWEEPS.get(args.sweep, [])) + [tuple(int(v) for v in s.split(",")) for s in args.shape]
    if args.part:
        i, parts = (int(v) for v in args.part.split("/"))
        if not 1 <= i <= parts:
            raise SystemExit(f"--part {args.part}: need 1 <= I <= N")
        shapes = shapes[(i - 1) * len(shapes) // parts : i * len(shapes) // parts]
    for b, n, _, k in shapes:
        if k >= n - (b == n) or k < 2:
            raise SystemExit(f"shape {b},{n},_,{k}: need 2 <= k <= N - 1 (B == N excludes self)")
    machine = machine_slug(device)
    name = args.name or (machine if args.sweep in ("cpu", "gpu") and not args.shape else
                         f"{machine}-{args.sweep or 'custom'}")
    if args.part and not args.name:
        name += "-part" + args.part.replace("/", "of")
    os.makedirs(args.out_dir, exist_ok=True)
    csv_path = os.path.join(args.out_dir, name + ".csv")
    meta_row = dict(machine=machine, device=device_detail(device), torch=torch.__version__,
                    date=datetime.date.today().isoformat(), threads=torch.get_num_threads())
    skipped = skipped_spec(SWEEPS["cpu"]) if args.sweep == "cpu" else []
    meta = dict(
        command="python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv),
        device_detail=meta_row["device"], versions=versions(), acc_rows=args.acc_rows, skipped_shapes=skipped,
        notes={m.name: (m.note + (f" ({m.unavailable})" if m.unavailable else "")) for m in methods},
        memory_note=_memory_note(device, args.memory),
    )
    rows: list[dict] = []
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(shapes) * len(methods), disable=args.no_progress, file=sys.stderr, unit="method")
    except ImportError:  # tqdm is optional: no bar
        bar = None
    report.write_meta(csv_path, meta)
    history: dict = {}
    for s in shapes:
        rows += [{**meta_row, **r} for r in run_shape(s, methods, device, args, bar, history)]
        report.write_csv(csv_path, rows)  # after every shape: a long sweep that dies keeps its rows
    if bar is not None:
        bar.close()
    md, png = report.write_all(csv_path)
    with open(md) as f:  # the headline table on stdout; the full table is in the file
        text = f.read()
    if "## Our best" in text:
        print(text[text.find("## Our best"):text.find("\n## ", text.find("## Our best") + 1)].strip())
    print(f"wrote {csv_path}, {md}, {png}")
    return rows


if __name__ == "__main__":
    main()
