"""``python -m ldreg_kernels.demo``: a short SimCLR run on MNIST-5k, with and without LDReg.

Trains the small ResNet twice from one seed (the bundled real digits, CPU friendly), prints
the held-out linear-probe accuracy, geometric-mean LID (MLE, k=32) and effective rank of
each, checks that every available backend gives the held-out LID the float64 oracle gives,
and writes the comparison plot. ``make demo`` runs it, then the quick benchmark table.
"""

from __future__ import annotations

import argparse
import os
import time

from . import available_backends, reference
from .metrics import geometric_mean, per_sample_lid
from .ssl.evaluate import extract
from .ssl.plot import plot_runs
from .ssl.train import TrainConfig, Trainer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    args = p.parse_args(argv)

    results = {}
    for use in (False, True):
        name = "ldreg" if use else "baseline"
        out = os.path.join(args.out, name)
        cfg = TrainConfig(method="simclr", dataset="mnist5k", ldreg=use, k=args.k, beta=args.beta,
                          epochs=args.epochs, eval_every=args.epochs, seed=args.seed)
        print(f"== SimCLR {'+ LDReg (k=%d, beta=%g)' % (args.k, args.beta) if use else 'without LDReg'}: "
              f"MNIST-5k, {args.epochs} epochs, seed {args.seed} -> {out}")
        if os.path.exists(os.path.join(out, "checkpoint.pt")):
            trainer = Trainer.resume(out, cfg)  # a finished demo re-prints; a killed one continues
        else:
            trainer = Trainer(cfg, out)
        results[name] = (trainer.fit(), trainer)

    print(f"\n{'run':<10} {'probe acc':>10} {'GM-LID (MLE k=32)':>18} {'erank':>8} {'train s':>8}")
    for name, (s, _) in results.items():
        print(f"{name:<10} {s['probe_acc']:>10.4f} {s['gm_lid']:>18.3f} {s['erank']:>8.2f} {s['seconds']:>8.1f}")

    # The same held-out LID from every backend, against the float64 oracle.
    trainer = results["ldreg"][1]
    ftr, fte = extract(trainer.model.encoder, trainer.data.train_x), extract(trainer.model.encoder, trainer.data.test_x)
    oracle = geometric_mean(reference.lid(fte.double(), ftr.double(), 32, "mle", exclude_self=False))
    print(f"\nheld-out GM-LID of the LDReg run, {tuple(fte.shape)} vs {tuple(ftr.shape)}: float64 oracle {oracle:.6f}")
    for backend in available_backends("cpu"):
        t = time.perf_counter()
        gm = geometric_mean(per_sample_lid(fte, ftr, 32, backend=backend))
        print(f"  {backend:<10} {gm:.6f}  rel err {abs(gm - oracle) / oracle:.1e}  {time.perf_counter() - t:.2f}s")
    png = plot_runs([os.path.join(args.out, n) for n in results], os.path.join(args.out, "plot.png"))
    print(f"\nplot: {png}")


if __name__ == "__main__":
    main()
