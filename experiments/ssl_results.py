"""SimCLR and BYOL, each with and without LDReg, over several seeds: the results table + plot.

    python experiments/ssl_results.py --epochs 15 --seeds 0 1 2

Runs go to ``--runs`` (default ``runs/ssl``, one folder each, resumable: a finished run is
skipped, a killed one continues from its checkpoint), then the table (mean +- std over seeds
of probe accuracy, held-out geometric-mean LID and effective rank, plus the paired
LDReg - baseline differences) and the plot go to ``experiments/results/<machine>-ssl.{md,png}``.
``--betas`` adds a one-seed SimCLR sweep of the regulariser strength.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys

import torch

from ldreg_kernels.ssl.plot import load_run, plot_groups
from ldreg_kernels.ssl.train import TrainConfig, Trainer


def machine_slug(device: str) -> str:
    if device.startswith("cuda"):
        return "gpu-" + torch.cuda.get_device_name().lower().replace(" ", "-")
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def train_or_load(cfg: TrainConfig, out: str) -> dict:
    """Run ``cfg`` into ``out`` unless it already finished there; returns the loaded run."""
    if not os.path.exists(os.path.join(out, "summary.json")):
        if os.path.exists(os.path.join(out, "checkpoint.pt")):
            Trainer.resume(out, cfg).fit()
        else:
            Trainer(cfg, out).fit()
    return load_run(out)


def final(run: dict, key: str) -> float:
    return next(r[key] for r in reversed(run["history"]) if key in r)


def mean_sd(xs: list[float], fmt: str) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{format(statistics.mean(xs), fmt)} ± {format(sd, fmt)}"


KEYS = (("probe_acc", "probe acc", ".4f"), ("gm_lid", "GM-LID (MLE k=32)", ".3f"), ("erank", "erank", ".2f"))


def table(groups: dict[tuple[str, bool], list[dict]]) -> list[str]:
    lines = ["| method | LDReg | seeds | " + " | ".join(k[1] for k in KEYS) + " | train s/run |",
             "|---|---|---|" + "---|" * (len(KEYS) + 1)]
    for (method, use), runs in groups.items():
        beta = runs[0]["config"]["beta"]
        cells = [mean_sd([final(r, key) for r in runs], fmt) for key, _, fmt in KEYS]
        secs = statistics.mean(sum(h["time_s"] for h in r["history"]) for r in runs)
        lines.append(f"| {method} | {'beta=%g' % beta if use else 'off'} | {len(runs)} | " + " | ".join(cells)
                     + f" | {secs:.0f} |")
    lines += ["", "Paired by seed, LDReg minus baseline (mean ± std over seeds):", "",
              "| method | " + " | ".join(f"Δ {k[1]}" for k in KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    for method in dict.fromkeys(m for m, _ in groups):
        on, off = groups.get((method, True), []), groups.get((method, False), [])
        if on and off:
            cells = [mean_sd([final(a, key) - final(b, key) for a, b in zip(on, off)], "+" + fmt)
                     for key, _, fmt in KEYS]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["simclr", "byol"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--eval-every", type=int, default=3)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--betas", nargs="*", type=float, default=[], help="extra one-seed SimCLR beta sweep")
    p.add_argument("--runs", default="runs/ssl")
    p.add_argument("--results", default="experiments/results")
    a = p.parse_args(argv)

    def cfg(method: str, use: bool, seed: int, beta: float | None = None) -> TrainConfig:
        return TrainConfig(method=method, dataset=a.dataset, ldreg=use, k=a.k, beta=beta, epochs=a.epochs,
                           eval_every=a.eval_every, seed=seed, device=a.device)

    groups: dict[tuple[str, bool], list[dict]] = {}
    for method in a.methods:
        for use in (False, True):
            for seed in a.seeds:
                out = os.path.join(a.runs, f"{a.dataset}-{method}-{'ldreg' if use else 'base'}-s{seed}")
                print(f"== {out}", flush=True)
                groups.setdefault((method, use), []).append(train_or_load(cfg(method, use, seed), out))
    sweep = {}
    for beta in a.betas:
        out = os.path.join(a.runs, f"{a.dataset}-simclr-beta{beta:g}-s{a.seeds[0]}")
        print(f"== {out}", flush=True)
        sweep[beta] = train_or_load(cfg("simclr", True, a.seeds[0], beta), out)

    slug = machine_slug(a.device)
    os.makedirs(a.results, exist_ok=True)
    png = os.path.join(a.results, f"{slug}-ssl.png")
    labels = {(m, u): f"{m} {'+ LDReg' if u else 'baseline'}" for m, u in groups}
    plot_groups({labels[g]: runs for g, runs in groups.items()}, png,
                title=f"{a.dataset}, {a.epochs} epochs, seeds {a.seeds}, k={a.k}; held-out metrics")
    cmd = "python experiments/ssl_results.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"# SSL results: {a.dataset}, {slug}", "",
             f"{datetime.date.today()}, torch {torch.__version__}, device {a.device}. Command: `{cmd}`", "",
             f"Each run: {a.epochs} epochs, batch 256, small ResNet (16-32-64-128, 128-d encoder output), "
             f"AdamW lr 2e-3 cosine; LDReg on the encoder output, k={a.k}, reg l1, MoM estimator, reference = "
             "the batch (SimCLR: both views; BYOL: online + target views), no warm-up. Metrics on the "
             "held-out 1000 images: linear-probe top-1 (L-BFGS logistic regression on frozen features), "
             "geometric-mean LID (MLE, k=32) against the 4000 training images, effective rank. "
             "'train s/run' is wall time on a shared machine (runs overlapped other jobs): not a benchmark.", "",
             *table(groups), "", f"![curves]({os.path.basename(png)})", ""]
    if sweep:
        lines += ["One-seed SimCLR sweep of beta (seed %d):" % a.seeds[0], "",
                  "| beta | " + " | ".join(k[1] for k in KEYS) + " |", "|---|" + "---|" * len(KEYS)]
        lines += [f"| {b:g} | " + " | ".join(format(final(r, key), fmt) for key, _, fmt in KEYS) + " |"
                  for b, r in sweep.items()]
    md = os.path.join(a.results, f"{slug}-ssl.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
