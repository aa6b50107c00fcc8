"""``python -m ldreg_kernels.demo``: a short SimCLR run on MNIST-5k, without LDReg and at two betas.

Trains the small ResNet three times from one seed (the bundled real digits, CPU friendly):
without LDReg, with the paper's beta = 0.01 and with beta = 0.1, at which the effect is
plain to see. Prints the held-out linear-probe accuracy, geometric-mean LID (MLE, k=32) and
effective rank of each, with the change against the baseline, checks that every available
backend gives the held-out LID the float64 oracle gives, and writes the comparison plot. ``make demo`` runs it, then the quick benchmark table.
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
    p.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.1],
                   help="LDReg strengths to train beside the baseline (the paper's 0.01, and a larger one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    args = p.parse_args(argv)

    results = {}
    t_all = time.perf_counter()
    for beta in [None, *args.betas]:
        name = "baseline" if beta is None else f"ldreg-b{beta:g}"
        out = os.path.join(args.out, name)
        cfg = TrainConfig(method="simclr", dataset="mnist5k", ldreg=beta is not None, k=args.k,
                          beta=beta if beta is not None else 0.01, epochs=args.epochs, eval_every=args.epochs,
                          seed=args.seed)
        print(f"== SimCLR {'+ LDReg (k=%d, beta=%g)' % (args.k, beta) if beta is not None else 'without LDReg'}: "
              f"MNIST-5k, {args.epochs} epochs, seed {args.seed} -> {out}", flush=True)
        if os.path.exists(os.path.join(out, "checkpoint.pt")):
            trainer = Trainer.resume(out, cfg)  # a finished demo re-prints; a killed one continues
        else:
            trainer = Trainer(cfg, out)
        results[name] = (trainer.fit(), trainer)

    base = results["baseline"][0]
    print(f"\n{'run':<14} {'probe acc':>10} {'GM-LID (MLE k=32)':>18} {'erank':>8} {'train s':>8}   vs baseline")
    for name, (s, _) in results.items():
        delta = "" if name == "baseline" else (
            f"   GM-LID {s['gm_lid'] - base['gm_lid']:+.2f}, erank {s['erank'] - base['erank']:+.2f}, "
            f"probe {s['probe_acc'] - base['probe_acc']:+.4f}")
        print(f"{name:<14} {s['probe_acc']:>10.4f} {s['gm_lid']:>18.3f} {s['erank']:>8.2f} {s['seconds']:>8.1f}{delta}")
    print("(one seed: a demonstration; experiments/results/ has paired multi-seed deltas with 95% intervals)")
    print(f"training: {time.perf_counter() - t_all:.0f} s")

    # The same held-out LID from every backend, against the float64 oracle.
    trainer = results[list(results)[-1]][1]
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
