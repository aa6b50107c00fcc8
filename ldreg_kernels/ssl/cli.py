"""``ldreg-train``: SimCLR / BYOL with LDReg on real data, from the command line.

    ldreg-train simclr --dataset mnist5k --ldreg --k 32 --beta 0.01 --epochs 20 --seed 0 --out runs/a
    ldreg-train simclr ... --out runs/a --resume      # continue a killed run exactly
    ldreg-train plot runs/a runs/b --out cmp.png      # compare finished runs
    torchrun --nproc_per_node=2 -m ldreg_kernels.ssl.cli simclr ...   # DDP, global-batch LDReg

Exit status: 0 done, 1 bad input or missing data (one-line message), 2 bad arguments,
3 training diverged (non-finite loss; the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import torch

from ..registry import BACKENDS
from . import dist
from .data import DATASETS
from .train import TrainConfig, Trainer, TrainingDiverged


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(","))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldreg-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = TrainConfig()
    for method in ("simclr", "byol"):
        s = sub.add_parser(method, help=f"train {method.upper()} (+ LDReg)")
        s.add_argument("--dataset", choices=sorted(DATASETS), default=d.dataset)
        s.add_argument("--data-root", default=None, help="folder with cifar-10-batches-py/ (cifar10 only)")
        s.add_argument("--ldreg", action=argparse.BooleanOptionalAction, default=True,
                       help="add the LDReg regulariser on the encoder output (default: on)")
        s.add_argument("--k", type=int, default=d.k, help="neighbours for the training LID")
        s.add_argument("--beta", type=float, default=None, help="strength (default: 0.01 SimCLR, 0.005 BYOL)")
        s.add_argument("--reg", choices=("l1", "l2"), default=d.reg)
        s.add_argument("--estimator", choices=("mom", "mle"), default=d.estimator)
        s.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs,
                       help="epochs before LDReg switches on (official code: 10)")
        s.add_argument("--backend", choices=["auto", *sorted(BACKENDS)], default=d.backend)
        s.add_argument("--epochs", type=int, default=d.epochs)
        s.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (images)")
        s.add_argument("--lr", type=float, default=d.lr)
        s.add_argument("--weight-decay", type=float, default=d.weight_decay)
        s.add_argument("--widths", type=_ints, default=d.widths, help="encoder channels per stage, e.g. 16,32,64,128")
        s.add_argument("--blocks", type=_ints, default=d.blocks, help="basic blocks per stage, e.g. 1,1,1,1")
        s.add_argument("--seed", type=int, default=d.seed)
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--eval-every", type=int, default=d.eval_every, help="epochs between evaluations")
        s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        s.add_argument("--out", required=True, help="output folder (log, checkpoint, plot)")
        s.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
        s.add_argument("--compare", nargs="*", default=[], metavar="RUN_DIR",
                       help="finished runs to draw in this run's plot (e.g. the --no-ldreg baseline)")
        s.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    pl = sub.add_parser("plot", help="plot finished runs into one PNG")
    pl.add_argument("runs", nargs="+")
    pl.add_argument("--out", required=True)
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        method=a.command, dataset=a.dataset, data_root=a.data_root, ldreg=a.ldreg, k=a.k, beta=a.beta,
        reg=a.reg, estimator=a.estimator, warmup_epochs=a.warmup_epochs, backend=a.backend, epochs=a.epochs,
        batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, widths=a.widths, blocks=a.blocks,
        seed=a.seed, device=a.device, eval_every=a.eval_every,
    )


def run(a: argparse.Namespace) -> dict:
    """Train (or resume) the run the parsed arguments describe; returns its summary."""
    if a.threads:
        torch.set_num_threads(a.threads)
    a.device = dist.init_from_env(a.device)
    cfg = config_from_args(a)
    progress = not a.no_progress
    if a.resume:
        trainer = Trainer.resume(a.out, cfg, progress=progress)
    else:
        if os.path.exists(os.path.join(a.out, "checkpoint.pt")):
            raise ValueError(f"{a.out} already holds a run: pass --resume to continue it, or choose another --out")
        trainer = Trainer(cfg, a.out, progress=progress)
    summary = trainer.fit()
    if dist.rank() == 0:
        if a.compare:
            from .plot import plot_runs

            plot_runs([a.out, *a.compare], os.path.join(a.out, "plot.png"))
        print(json.dumps({k: summary[k] for k in ("probe_acc", "gm_lid", "erank", "final_loss", "seconds")}))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parser().parse_args(argv)
    try:
        if a.command == "plot":
            from .plot import plot_runs

            print(plot_runs(a.runs, a.out))
            return 0
        run(a)
        return 0
    except TrainingDiverged as e:
        print(f"ldreg-train: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, ImportError, TypeError) as e:
        print(f"ldreg-train: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
