"""LDReg plus LID monitoring: one kNN search against the official code's three.

    python -m benchmarks.monitor                      # B=1024, N=4096 (a bank), D=256, CPU
    python -m benchmarks.monitor --b 512 --n 512 --reps 5

The official training step computes the MoM k=64 regulariser and logs MLE LID at k=32 and
k=512, each from its own ``cdist`` + ``sort``. ``LDReg(monitor_ks=(32, 512))`` gets all three
from one search at k=512. Timed forward + backward of the regulariser (the monitors need no
gradient), the methods interleaved round by round so that load on a shared machine hits
them alike; the table gives medians and each method's ratio to the official pattern.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import torch
from torch import Tensor

import ldreg_kernels as L
from benchmarks.measure import make_inputs

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _sorted_dist(x: Tensor, ref: Tensor, own: bool) -> Tensor:
    """The official code's distances: full cdist and sort; with ``own`` column 0 (the query)."""
    a, _ = torch.sort(torch.cdist(x, ref, p=2), dim=1)
    return a[:, 1:] if own else a


def official(x: Tensor, ref: Tensor | None, k: int, ks: tuple[int, ...], beta: float) -> Tensor:
    """MoM regulariser at k plus no-grad MLE at each of ``ks``: 1 + len(ks) cdist + sort."""
    own = ref is None
    r = x.detach() if own else ref
    a = _sorted_dist(x, r, own)
    m = a[:, : k - 1].mean(1)
    loss = -beta * torch.log(m / (a[:, k - 1] - m)).mean()
    with torch.no_grad():
        for kk in ks:
            a = _sorted_dist(x, r, own)[:, :kk]
            (-kk / torch.log(a / a[:, -1:]).sum(1)).log().mean().exp().item()
    return loss


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b", type=int, default=1024)
    p.add_argument("--n", type=int, default=4096, help="reference rows (== --b: the batch itself)")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--ks", default="32,512")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=os.path.join(RESULTS, "monitor-cpu.md"))
    a = p.parse_args(argv)
    ks = tuple(int(v) for v in a.ks.split(","))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, ref = make_inputs(a.b, a.n, a.d, dev)
    monitored = L.LDReg(a.k, 0.01, monitor_ks=ks, backend=a.backend)
    plain = L.LDReg(a.k, 0.01, backend=a.backend)

    def separate() -> Tensor:
        loss = plain(x, ref)
        L.lid_stats(x, ref, ks, ("mle",), backend=a.backend).to_dict()
        return loss

    def ours() -> Tensor:
        loss = monitored(x, ref)
        monitored.last_stats.to_dict()
        return loss

    methods: dict[str, Callable[[], Tensor]] = {
        "official: cdist+sort x3": lambda: official(x, ref, a.k, ks, 0.01),
        "ours: LDReg + lid_stats (2 searches)": separate,
        "ours: LDReg(monitor_ks) (1 search)": ours,
        "ours: LDReg, no monitoring": lambda: plain(x, ref),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(a.reps + 1):  # round 0 warms up
        for name, fn in methods.items():
            x.grad = None
            t = time.perf_counter()
            fn().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r:
                times[name].append((time.perf_counter() - t) * 1e3)
    base = statistics.median(times["official: cdist+sort x3"])
    lines = [
        f"# LDReg + LID monitoring: B={a.b}, N={a.n}{' (the batch)' if a.b == a.n else ' (a bank)'}, "
        f"D={a.d}, k={a.k}, monitor MLE at k={','.join(map(str, ks))}",
        "",
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {dev}, backend {a.backend}; "
        f"forward + backward, median of {a.reps} interleaved rounds; `python -m benchmarks.monitor`.",
        "",
        "| method | median ms | p20-p80 ms | speed-up vs official |",
        "|---|---|---|---|",
    ]
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) > 1 else [ts[0]] * 4
        med = statistics.median(ts)
        lines.append(f"| {name} | {med:.1f} | {q[0]:.1f}-{q[3]:.1f} | {base / med:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
