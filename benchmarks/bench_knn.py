"""kNN-LID benchmark: our backends vs the paper's cdist+sort, mm+topk, and the matmul floor.

    python benchmarks/bench_knn.py --quick              # small CPU table (make demo)
    python benchmarks/bench_knn.py --shape 2048,2048,256,64 --device cpu

Each provider computes the per-sample MoM LID ("fwd") or LID -> LDReg loss -> backward
("full"). Times are medians with 20th/80th percentiles over repeats after a warm-up, all
providers measured side by side in one process. Accuracy is against the float64 oracle:
recall@k of the neighbour sets and the max relative LID error. Rows are appended to
benchmarks/results/bench_knn.csv with the device and versions.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ldreg_kernels as L  # noqa: E402
from ldreg_kernels import reference  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> tuple[float, float, float]:
    """(median, p20, p80) wall time of fn in ms."""
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
    return statistics.median(ts), q[0], q[3]


def _self_masked(d: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(d.shape[0], device=d.device)
    return d.index_put((rows, rows), d.new_tensor(float("inf")))


def paper_knn(x, ref, k):
    """The paper's way: full cdist (default mm mode) + full sort, self masked by index."""
    d, i = torch.sort(_self_masked(torch.cdist(x, ref)), dim=1)
    return d[:, :k], i[:, :k]


def mm_topk_knn(x, ref, k):
    """What a user writes next: |r|^2 - 2 x.r by matmul, topk, sqrt; no exact re-rank."""
    s = (ref * ref).sum(1) - 2.0 * x @ ref.t()
    v, i = torch.topk(_self_masked(s), k, dim=1, largest=False)
    d = (v + (x * x).sum(1, keepdim=True)).clamp_min(0).sqrt()
    return d, i


def providers(device: torch.device) -> dict[str, Callable]:
    """name -> knn(x, ref, k) -> (dist, idx); ours go through the public op."""
    out = {"paper cdist+sort": paper_knn, "mm+topk": mm_topk_knn}
    for b in L.available_backends(device):
        if b != "reference":
            out[f"ours:{b}"] = lambda x, ref, k, b=b: L.knn(x, ref, k, backend=b)
    return out


def make_inputs(b: int, n: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(b, d, generator=g).to(device)
    ref = x if b == n else torch.randn(n, d, generator=g).to(device)
    if b != n:
        ref[:b] = x  # queries sit at the front of ref, self excluded at offset 0
    return x, ref


def peak_extra_mb(provider: str, b: int, n: int, d: int, k: int, device: torch.device) -> float:
    """Peak memory one forward call adds on top of its inputs, in MiB.

    GPU: torch.cuda.max_memory_allocated. CPU: the torch CPU allocator keeps no statistics,
    so a fresh process measures the growth of its peak RSS (VmHWM) across one call.
    """
    if device.type == "cuda":
        x, ref = make_inputs(b, n, d, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        providers(device)[provider](x, ref, k)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # VmHWM (peak RSS of this address space), not ru_maxrss: ru_maxrss survives exec, so a
    # child of a big parent would start at the parent's peak.
    code = (
        "import sys, torch; sys.path.insert(0, {root!r}); from benchmarks import bench_knn as B; "
        "hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]); "
        "x, ref = B.make_inputs({b}, {n}, {d}, torch.device('cpu')); f = B.providers(torch.device('cpu'))[{p!r}]; "
        "f(x[:2], ref[:64], 2); base = hwm(); f(x, ref, {k}); print((hwm() - base) / 1024)"
    ).format(root=os.path.join(os.path.dirname(__file__), ".."), b=b, n=n, d=d, k=k, p=provider)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


def run_shape(b: int, n: int, d: int, k: int, device: torch.device, repeats: int, modes: list[str],
              memory: bool = False) -> list[dict]:
    x, ref = make_inputs(b, n, d, device)
    d64, i64 = reference.knn(x.double(), ref.double(), k)
    lid64 = reference.lid_mom(d64)
    rows = []
    flops = 2.0 * b * n * d
    floor_ms = timeit(lambda: x @ ref.t(), device, repeats)[0]
    for name, fn in providers(device).items():
        dist, idx = fn(x, ref, k)
        recall = float((idx.unsqueeze(2) == i64.unsqueeze(1)).any(2).float().mean())
        mem = peak_extra_mb(name, b, n, d, k, device) if memory else float("nan")
        lid_err = float(((reference.lid_mom(dist.double()) - lid64).abs() / lid64).max())
        for mode in modes:
            if mode == "fwd":
                call = lambda: reference.lid_mom(fn(x, ref, k)[0])  # noqa: E731
            else:
                xr = x.clone().requires_grad_()

                def call(xr=xr, fn=fn):
                    dd = fn(xr, xr.detach() if b == n else ref, k)[0]
                    (-torch.log(reference.lid_mom(dd)).mean()).backward()
                    xr.grad = None
            med, p20, p80 = timeit(call, device, repeats)
            rows.append(dict(
                provider=name, mode=mode, B=b, N=n, D=d, k=k, ms=med, p20=p20, p80=p80,
                tflops=flops / med / 1e9, x_floor=med / floor_ms, recall=recall, max_rel_lid_err=lid_err,
                peak_extra_mb=mem if mode == "fwd" else float("nan"),
            ))
    rows.append(dict(provider="floor: x @ ref.T", mode="fwd", B=b, N=n, D=d, k=k, ms=floor_ms, p20=float("nan"),
                     p80=float("nan"), tflops=flops / floor_ms / 1e9, x_floor=1.0, recall=float("nan"),
                     max_rel_lid_err=float("nan"), peak_extra_mb=float("nan")))
    return rows


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def to_markdown(rows: list[dict]) -> str:
    head = ("| provider | mode | B | N | D | k | ms (p20-p80) | TFLOP/s | x floor | vs paper | recall@k | "
            "max rel LID err | peak extra MiB (fwd) |")
    lines = [head, "|" + "---|" * 13]
    paper = {(r["mode"], r["B"], r["N"], r["D"], r["k"]): r["ms"] for r in rows if r["provider"] == "paper cdist+sort"}
    for r in rows:
        base = paper.get((r["mode"], r["B"], r["N"], r["D"], r["k"]))
        speed = f"{base / r['ms']:.2f}x" if base else "-"
        lines.append(
            f"| {r['provider']} | {r['mode']} | {r['B']} | {r['N']} | {r['D']} | {r['k']} | "
            f"{r['ms']:.1f} ({r['p20']:.1f}-{r['p80']:.1f}) | {r['tflops']:.3f} | {r['x_floor']:.1f} | {speed} | "
            f"{r['recall']:.4f} | {r['max_rel_lid_err']:.1e} | {r['peak_extra_mb']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", help="B,N,D,k (repeatable)")
    p.add_argument("--quick", action="store_true", help="two small CPU shapes, few repeats")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--modes", default="fwd,full")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--memory", action="store_true", help="also measure peak extra memory of each forward")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the paper's requirement for its cdist
    shapes = [tuple(map(int, s.split(","))) for s in args.shape] if args.shape else (
        [(1024, 1024, 128, 32), (2048, 2048, 256, 64)] if args.quick else [(2048, 2048, 256, 64), (2048, 16384, 128, 64)]
    )
    repeats = args.repeats or (5 if args.quick else 10)
    rows = []
    for b, n, d, k in shapes:
        rows += run_shape(b, n, d, k, device, repeats, args.modes.split(","), args.memory)
    meta = dict(machine=machine_name(device), torch=torch.__version__, threads=torch.get_num_threads())
    print(f"# kNN-LID benchmark on {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads")
    print(to_markdown(rows))
    if not args.no_csv:
        os.makedirs(RESULTS, exist_ok=True)
        path = os.path.join(RESULTS, "bench_knn.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(meta) + list(rows[0]))
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({**meta, **r})
    return rows


if __name__ == "__main__":
    main()
