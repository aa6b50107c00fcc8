"""CPU scaling of the kNN search: ours-cpu against FAISS IndexFlatL2, time vs N and vs threads,
plus the full-size memory bank (B=4096 queries against N=1,048,576 rows) with its extra RSS.

    python -m benchmarks.scaling                      # N 16k..1M at 1 and all threads, and the bank
    python -m benchmarks.scaling --ns 16384,65536 --threads 1 --no-bank    # a quick look

Both methods answer the same question (k nearest rows of a bank that does not hold the
queries, fp32) and are timed on the kNN search alone: ``ldreg_kernels.knn(backend="cpu")``
(exact distances, certified order) and FAISS built and searched per call, as a training step
would. Threads: each count in --threads (default: 1 and os.cpu_count(); nothing assumes 2),
set for torch and FAISS alike. The bank runs each method in a fresh subprocess and reports
the growth of peak RSS (VmHWM, reset through /proc/self/clear_refs after the inputs exist)
across one call. Writes <out-dir>/<machine>-scaling.{csv,md,png}, and redraws the CPU sweep's
report beside it (<machine>.md), which inlines this one.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks import measure, report
from benchmarks.run import RESULTS, device_detail, machine_slug


def _knn_fn(method: str):
    if method == "ours-cpu":
        import ldreg_kernels as L

        return lambda x, ref, k: L.knn(x, ref, k, exclude_self=False, backend="cpu")
    import faiss

    def faiss_knn(x, ref, k):
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatL2(ref.shape[1])
        index.add(ref.numpy())
        return index.search(x.numpy(), k)

    return faiss_knn


def time_call(fn, x, ref, k: int, budget_s: float) -> float:
    """Seconds per call: the minimum over repeats within ``budget_s`` (at least one)."""
    best, spent = float("inf"), 0.0
    while spent < budget_s or best == float("inf"):
        t = time.perf_counter()
        fn(x, ref, k)
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return best


def busy_share(seconds: float = 1.0) -> float:
    """Share of all CPUs' time spent busy over ``seconds`` (/proc/stat; nan elsewhere)."""
    def sample() -> tuple[int, int]:
        v = measure.cpu_jiffies()
        return sum(v) - sum(v[3:5]), sum(v)  # all but idle + iowait
    b0, t0 = sample()
    time.sleep(seconds)
    b1, t1 = sample()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else float("nan")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def bank_child(method: str, b: int, n: int, d: int, k: int, threads: int) -> None:
    """One method on the bank in this (fresh) process: prints a JSON line of ms and extra RSS."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(n, d, generator=g)
    x = torch.randn(b, d, generator=g)
    fn = _knn_fn(method)
    fn(x[:64], ref[:4096], k)  # load the library, spin up the thread pool
    base = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    t = time.perf_counter()
    fn(x, ref, k)
    ms = (time.perf_counter() - t) * 1e3
    extra = (_status_kib("VmHWM") - base) / 1024
    print(json.dumps({"method": method, "ms": ms, "extra_rss_mib": extra, "hwm_reset": reset}), flush=True)


def run_bank(args) -> list[dict]:
    rows = []
    for method in args.methods:
        cmd = [sys.executable, "-m", "benchmarks.scaling", "--bank-child", method,
               "--bank-shape", args.bank_shape, "--bank-threads", str(max(args.threads))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("{")), None)
        if line is None:
            rows.append({"method": method, "error": (out.stderr.strip().splitlines() or ["no output"])[-1]})
        else:
            rows.append(json.loads(line))
        print("bank", rows[-1], flush=True)
    return rows


def run_scaling(args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    nmax = max(args.ns)
    ref_all = torch.randn(nmax, args.d, generator=g)
    x = torch.randn(args.b, args.d, generator=g)
    fns = {m: _knn_fn(m) for m in args.methods}
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n in args.ns:
            ref = ref_all[:n]
            for m, fn in fns.items():
                fn(x[:64], ref, args.k)  # warm-up
            # Interleave the methods repeat by repeat so that load drift hits both alike.
            best = {m: float("inf") for m in fns}
            for _ in range(args.repeats):
                for m, fn in fns.items():
                    best[m] = min(best[m], time_call(fn, x, ref, args.k, 0.0))
            for m in fns:
                rows.append({"threads": threads, "B": args.b, "N": n, "D": args.d, "k": args.k, "method": m,
                             "ms": best[m] * 1e3})
            print(f"threads={threads} N={n}: " + ", ".join(f"{m} {best[m] * 1e3:.1f} ms" for m in fns), flush=True)
    return rows


def write(args, rows: list[dict], bank: list[dict]) -> None:
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"{machine_slug(torch.device('cpu'))}-scaling")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["threads", "B", "N", "D", "k", "method", "ms"])
        w.writeheader()
        w.writerows(rows)
    load = os.getloadavg()
    # Other processes: the CPU share busy just before the run (a load average still holds the
    # last minutes' work, and at the end this run's own threads).
    busy = args.busy_start > 0.1
    lines = [f"# kNN scaling on the CPU: ours-cpu vs FAISS IndexFlatL2 ({machine_slug(torch.device('cpu'))})", "",
             f"- machine: {device_detail(torch.device('cpu'))}; load average (1/5/15 min) at the start "
             + " / ".join(f"{v:.2f}" for v in args.load_start) + ", at the end " + " / ".join(f"{v:.2f}" for v in load)
             + f" (this run's own threads); {args.busy_start:.0%} of the CPUs busy in the second before it"
             + (" (other processes shared these cores: absolute times are noisy, and a thread count above the idle "
                "cores measures the contention, not the code; compare the two methods within one row, timed "
                "interleaved)" if busy else ""),
             f"- kNN search only, fp32, a bank that does not hold the queries; min over {args.repeats} interleaved "
             "repeats; FAISS index built and searched per call", f"- command: `python -m benchmarks.scaling "
             + " ".join(sys.argv[1:]) + "`", ""]
    if rows:
        lines += [f"## Time vs N (B={args.b}, D={args.d}, k={args.k})", "",
                  "| threads | N | ours-cpu ms | faiss ms | faiss / ours |", "|---|---|---|---|---|"]
        by = {(r["threads"], r["N"], r["method"]): r["ms"] for r in rows}
        for t in args.threads:
            for n in args.ns:
                o, f = by.get((t, n, "ours-cpu")), by.get((t, n, "faiss"))
                ratio = f"{f / o:.2f}x" if o and f else "-"
                lines.append(f"| {t} | {n} | {o:.1f} | {f:.1f} | {ratio} |" if o and f else f"| {t} | {n} | {o} | {f} | - |")
        lines += ["", f"![scaling]({os.path.basename(stem)}.png)", ""]
    if bank:
        b, n, d, k = args.bank_shape.split(",")
        lines += [f"## Memory bank B={b}, N={n}, D={d}, k={k} ({max(args.threads)} threads)", "",
                  "| method | ms (one call) | extra peak RSS MiB |", "|---|---|---|"]
        for r in bank:
            if "error" in r:
                lines.append(f"| {r['method']} | failed: {r['error']} | - |")
            else:
                lines.append(f"| {r['method']} | {r['ms']:.0f} | {r['extra_rss_mib']:.1f} |")
        lines.append("")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for t in args.threads:
            for m, style in (("ours-cpu", "-o"), ("faiss", "--s")):
                pts = [(r["N"], r["ms"]) for r in rows if r["threads"] == t and r["method"] == m]
                if pts:
                    ax[0].plot(*zip(*pts), style, label=f"{m}, {t} thread{'s' if t > 1 else ''}")
        ax[0].set(xscale="log", yscale="log", xlabel="N (bank rows)", ylabel="ms per call",
                  title=f"time vs N (B={args.b}, D={args.d}, k={args.k})")
        ax[0].legend(fontsize=8)
        n_big = max(args.ns)
        for m, style in (("ours-cpu", "-o"), ("faiss", "--s")):
            pts = [(r["threads"], r["ms"]) for r in rows if r["N"] == n_big and r["method"] == m]
            if pts:
                ax[1].plot(*zip(*pts), style, label=m)
        ax[1].set(xlabel="threads", ylabel="ms per call", title=f"time vs threads (N={n_big})",
                  xticks=list(args.threads))
        ax[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=110)
    print("wrote", stem + ".{csv,md" + (",png}" if rows else "}"))
    sweep_csv = stem[: -len("-scaling")] + ".csv"
    if os.path.exists(sweep_csv):  # the sweep's report inlines this one: redraw it
        print("updated", report.write_all(sweep_csv)[0])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ns", default="16384,65536,262144,1048576")
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and os.cpu_count())")
    p.add_argument("--b", type=int, default=1024)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", default="ours-cpu,faiss")
    p.add_argument("--no-scaling", dest="scaling", action="store_false")
    p.add_argument("--no-bank", dest="bank", action="store_false")
    p.add_argument("--bank-shape", default="4096,1048576,256,64", help="B,N,D,k of the memory bank")
    p.add_argument("--bank-child", help=argparse.SUPPRESS)
    p.add_argument("--bank-threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=RESULTS)
    args = p.parse_args(argv)
    if args.bank_child:
        b, n, d, k = map(int, args.bank_shape.split(","))
        bank_child(args.bank_child, b, n, d, k, args.bank_threads)
        return
    args.ns = [int(v) for v in args.ns.split(",")]
    cpus = os.cpu_count() or 1
    args.threads = [int(v) for v in args.threads.split(",")] if args.threads else sorted({1, cpus})
    args.methods = args.methods.split(",")
    args.load_start = os.getloadavg()
    args.busy_start = busy_share()
    rows = run_scaling(args) if args.scaling else []
    bank = run_bank(args) if args.bank else []
    write(args, rows, bank)


if __name__ == "__main__":
    main()
