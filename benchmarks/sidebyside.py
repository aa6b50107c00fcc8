"""ours-cpu (or another of our backends, ``--ours``) against the fastest CPU peers (mm+topk,
FAISS) on the CPU sweep's shapes, timed interleaved, for a machine shared with other work.

    python -m benchmarks.sidebyside                       # every --sweep cpu shape, 1 thread, CPU time
    python -m benchmarks.sidebyside --threads 2 --clock wall --shape 2048,2048,128,64
    python -m benchmarks.sidebyside --ours ours-torch --shape 512,512,512,64

The full sweep (benchmarks.run) times one method after another with wall clocks: on a
virtual machine whose host is oversubscribed, a burst of steal time lands on whichever method
runs then. Here every repeat runs each method once, in turn, and the default clock is the
process CPU time with one thread, which steal time and other tenants barely touch; the
minimum over repeats is kept. The steal share of the host's CPU time during the run (from
/proc/stat) is printed with the table. Same methods and loss as the sweep
(benchmarks.providers): the LDReg loss (fwd) and loss + backward (full).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from benchmarks import measure, providers
from benchmarks.run import RESULTS, SWEEPS, device_detail, machine_slug

PEERS = ("mm-topk", "faiss")


def steal_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs from /proc/stat; (0, 0) where there is none."""
    v = measure.cpu_jiffies()
    return (v[7] if len(v) > 7 else 0), sum(v)


def run(shapes, threads: int, clock: str, repeats: int, ours: str = "ours-cpu") -> list[dict]:
    torch.set_num_threads(threads)
    clk = time.process_time if clock == "cpu" else time.perf_counter
    ms = {m.name: m for m in providers.methods(torch.device("cpu"))}
    if ms[ours].unavailable:
        raise SystemExit(f"{ours}: {ms[ours].unavailable}")
    names = [ours] + [p for p in PEERS if ms[p].unavailable is None]
    out = []
    for b, n, d, k in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, d, generator=g)
        ref = None if b == n else torch.randn(n, d, generator=g)
        for nm in names:  # warm-up: first call, library loading, thread pools
            xx = x.clone().requires_grad_(True)
            ms[nm].loss_fn(xx, ref, k).backward()
        best = {(nm, mode): float("inf") for nm in names for mode in ("fwd", "full")}
        for _ in range(repeats):
            for nm in names:
                for mode in ("fwd", "full"):
                    xx = x.clone().requires_grad_(True)
                    t = clk()
                    loss = ms[nm].loss_fn(xx, ref, k)
                    if mode == "full":
                        loss.backward()
                    best[(nm, mode)] = min(best[(nm, mode)], clk() - t)
        for mode in ("fwd", "full"):
            peers = {nm: best[(nm, mode)] * 1e3 for nm in names if nm != ours}
            fastest = min(peers, key=peers.get)
            row = {"B": b, "N": n, "D": d, "k": k, "mode": mode, "ours": best[(ours, mode)] * 1e3,
                   **peers, "fastest": fastest}
            row["ratio"] = peers[fastest] / row["ours"]
            out.append(row)
            print(f"{b},{n},{d},{k} {mode}: ours {row['ours']:.1f} ms, "
                  + ", ".join(f"{p} {v:.1f}" for p, v in peers.items()) + f" -> {row['ratio']:.2f}x", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", default=[], help="B,N,D,k (default: the cpu sweep's shapes)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ours", default="ours-cpu", help="which of our methods (default: %(default)s)")
    p.add_argument("--out", help="markdown file (default: results/<machine>-sidebyside-<threads>t-<clock>.md)")
    a = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shape] or SWEEPS["cpu"]
    load0, (s0, t0) = os.getloadavg(), steal_ticks()
    rows = run(shapes, a.threads, a.clock, a.repeats, a.ours)
    load1, (s1, t1) = os.getloadavg(), steal_ticks()
    steal = (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0
    med = {mode: statistics.median(r["ratio"] for r in rows if r["mode"] == mode) for mode in ("fwd", "full")}
    lines = [f"# {a.ours} vs the fastest CPU peer, side by side ({machine_slug(torch.device('cpu'))})", "",
             f"- command: `python -m benchmarks.sidebyside {' '.join(sys.argv[1:])}`",
             f"- machine: {device_detail(torch.device('cpu'))}",
             f"- {a.threads} thread(s); clock: {'process CPU time' if a.clock == 'cpu' else 'wall'}; min over "
             f"{a.repeats} interleaved repeats; ratio = fastest peer's time / ours (> 1: ours faster)",
             f"- load average (1/5/15 min) before {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}, after "
             f"{load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}; steal time {100 * steal:.0f}% of CPU time during the run",
             f"- median ratio: fwd {med['fwd']:.2f}x, full {med['full']:.2f}x", "",
             "| B | N | D | k | mode | ours ms | mm-topk ms | faiss ms | fastest peer | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['B']} | {r['N']} | {r['D']} | {r['k']} | {r['mode']} | {r['ours']:.1f} | "
                     f"{r.get('mm-topk', float('nan')):.1f} | {r.get('faiss', float('nan')):.1f} | {r['fastest']} | "
                     f"{r['ratio']:.2f}x |")
    stem = "" if a.ours == "ours-cpu" else f"-{a.ours}"
    out = a.out or os.path.join(RESULTS, f"{machine_slug(torch.device('cpu'))}-sidebyside{stem}-{a.threads}t-{a.clock}.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[2:6]))
    print("wrote", out)


if __name__ == "__main__":
    main()
