"""A small forward + backward of every compiled backend, for compute-sanitizer.

    compute-sanitizer --tool=memcheck --error-exitcode=1 python3 tools/sanitize_workload.py
    python tools/sanitize_workload.py --device cpu      # the same calls on CPU (dry run)
    ... sanitize_workload.py --quick [--cases 1]        # what tools/gpu_check.py runs: a few
                                                        # cases of the compiled kernels only

Run it from the repo root with the tree on PYTHONPATH where the package is not installed
(tools/gpu_check.py sets it for every subprocess).

Shapes are small (the sanitizer slows kernels 10-100x) but cross the kernels' tile edges
(B, N not multiples of the block sizes), use every dtype, both self-exclusion modes, a
separate reference that needs its gradient, and k in several buckets. Each result is
compared with the reference backend, so the run also fails on a wrong answer, not only on a
memory error. Exit status 0 when everything matched.
"""

from __future__ import annotations

import argparse
import sys

import torch

import ldreg_kernels as L

QUICK_CASES = (0, 1, 4)  # fp32 self / separate ref (tile edges, k=17), bf16
CASES = [  # (B, N, D, k, dtype)
    (37, 37, 5, 4, torch.float32),
    (70, 133, 33, 17, torch.float32),
    (65, 200, 64, 64, torch.float64),
    (120, 300, 48, 100, torch.float32),
    (40, 90, 16, 8, torch.bfloat16),
    (40, 90, 16, 8, torch.float16),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", default=None, help="comma-separated (default: every one on the device but "
                   "the reference; with --quick, only the compiled kernels: cpu, cuda, triton)")
    p.add_argument("--quick", action="store_true", help=f"cases {QUICK_CASES} only (under a sanitizer's 10-100x)")
    p.add_argument("--cases", default=None, help=f"comma-separated indices into the {len(CASES)} cases")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    names = [b for b in L.available_backends(dev) if b != "reference" and (not a.quick or b != "torch")]
    if a.backends:
        names = a.backends.split(",")
    picked = [int(i) for i in a.cases.split(",")] if a.cases else (QUICK_CASES if a.quick else range(len(CASES)))
    if not names:
        print(f"no backend to run on {dev}: {L.available_backends(dev)}")
        return 1
    g = torch.Generator().manual_seed(0)
    failures = 0
    for b, n, d, k, dtype in (CASES[i] for i in picked):
        x = torch.randn(b, d, generator=g).to(dev, dtype)
        ref = torch.randn(n, d, generator=g).to(dev, dtype)
        for own in (True, False):
            args = (x, None if own else ref, k)
            want_d, _ = L.knn(*args, backend="reference")
            for name in names:
                xg = x.clone().requires_grad_()
                rg = None if own else ref.clone().requires_grad_()
                dist, idx = L.knn(xg, rg, k, backend=name)
                dist.sum().backward()
                torch.cuda.synchronize() if dev.type == "cuda" else None
                err = ((dist - want_d).abs() / want_d[:, -1:].clamp_min(1e-30)).max().item()
                ok = err < 1e-4 and torch.isfinite(xg.grad).all() and (rg is None or torch.isfinite(rg.grad).all())
                failures += not ok
                print(f"{name:6s} B={b} N={n if not own else b} D={d} k={k} {str(dtype)[6:]:8s} "
                      f"{'self' if own else 'ref '}: max rel err {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
