"""Worker for tests/test_distributed.py, run as ``torchrun --nproc_per_node=2 dist_worker.py``.

Each rank takes its slice of one deterministic global batch, runs knn / lid / ldreg_loss /
LDReg with ref="global" and "global_grad" on gloo, backpropagates its loss scaled by
B_r / N (DDP's averaging, generalised to unequal batches), and saves what it got to
``<out>/rank<r>.pt``. The test process compares with a 1-process run over the whole batch.
It then provokes mismatched arguments across ranks and records the error each rank raised.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch

D, K, BETA = 5, 4, 0.7
# (per-rank batch sizes, estimator, reg): equal batches, and unequal ones.
CONFIGS = {"equal": ((6, 6), "mom", "l1"), "unequal": ((5, 8), "mle", "l2")}


def make_batch(sizes: tuple[int, ...], d: int = D, seed: int = 0) -> torch.Tensor:
    """The global batch (sum(sizes), d), float64, with a duplicated row across ranks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64)
    x[-1] = x[0]  # a row of rank 0 duplicated on the last rank: excluded by index, not value
    return x


def rank_slice(sizes: tuple[int, ...], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as e:  # recorded for the test to assert on
        return f"{type(e).__name__}: {e}"
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--backends", required=True)
    args = p.parse_args()
    import torch.distributed as dist

    import ldreg_kernels as L

    # A short timeout: a collective that one rank never joins fails here instead of hanging.
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    res: dict = {"world": world, "results": {}, "errors": {}}

    for backend in args.backends.split(","):
        for mode in ("global", "global_grad"):
            for name, (sizes, est, reg) in CONFIGS.items():
                full = make_batch(sizes)
                x = full[rank_slice(sizes, rank)].clone().requires_grad_()
                loss = L.ldreg_loss(x, mode, K, BETA, reg=reg, estimator=est, backend=backend)
                (loss * (sizes[rank] / sum(sizes))).backward()
                lids = L.lid(x.detach(), mode, K, estimator=est, backend=backend)
                d, i = L.knn(x.detach(), mode, K, backend=backend)
                module = L.LDReg(K, BETA, reg=reg, estimator=est, backend=backend)(x.detach(), ref=mode)
                res["results"][backend, mode, name] = dict(
                    loss=loss.detach(), grad=x.grad, lids=lids, dist=d, idx=i, module=module.detach()
                )

    # gather_with_grad and global_reference directly, unequal batches.
    sizes = CONFIGS["unequal"][0]
    full = make_batch(sizes)
    x = full[rank_slice(sizes, rank)].clone().requires_grad_()
    gathered = L.gather_with_grad(x)
    coef = torch.arange(gathered.numel(), dtype=gathered.dtype).reshape(gathered.shape) * (rank + 1)
    (gathered * coef).sum().backward()
    ref, off = L.global_reference(x)
    res["gather"] = dict(gathered=gathered.detach(), grad=x.grad, ref=ref, off=off, ref_grad=ref.requires_grad)

    # Arguments that disagree across ranks: every rank must raise, none may hang.
    x = make_batch((6, 6))[rank_slice((6, 6), rank)]
    errs = res["errors"]
    errs["D"] = _error(lambda: L.ldreg_loss(torch.randn(6, 4 + rank, dtype=torch.float64), "global", K))
    errs["k"] = _error(lambda: L.lid(x, "global", K + rank))
    errs["dtype"] = _error(lambda: L.knn(x if rank == 0 else x.float(), "global", K))
    errs["mode"] = _error(lambda: L.LDReg(K)(x, ref=("global", "global_grad")[rank]))
    errs["local"] = _error(lambda: L.lid(x, "global", 1 if rank == 1 else 2))  # k=1 is invalid for LID
    errs["offset"] = _error(lambda: L.knn(x, "global", K, self_offset=rank))
    errs["too_big_k"] = _error(lambda: L.knn(x, "global", 12))  # N - 1 = 11 after excluding self
    errs["gather_D"] = _error(lambda: L.gather_with_grad(torch.randn(3, 2 + rank)))
    # The ranks are still in step: a valid collective call after all of the above works.
    res["after_errors"] = L.lid(x, "global", K)
    dist.barrier()
    torch.save(res, os.path.join(args.out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
