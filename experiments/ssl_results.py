"""SimCLR and BYOL, each with and without LDReg, over several seeds: the results table + plot.

    python experiments/ssl_results.py --protocol paper --beta-mults 1 10 --epochs 10 --eval-every 2 --seeds 0 1 2

Runs go to ``--runs`` (default ``runs/ssl``, one folder each, resumable: a finished run is
skipped, a killed one continues from its checkpoint), then the table (mean +- std over seeds
of probe accuracy, held-out geometric-mean LID and effective rank, plus the paired
LDReg - baseline differences) and the plot go to ``experiments/results/<machine>-ssl.{md,png}``.
Each LDReg delta is paired by seed and reported with a 95% t-interval; an effect is claimed
only where the interval excludes 0. ``--beta-mults`` trains LDReg at multiples of the paper's
beta per method; ``--max-runs`` bounds the new runs of one call (the rest on the next call).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from benchmarks.machine import device_detail, machine_slug as _machine_slug  # noqa: E402

from ldreg_kernels.ssl.plot import load_run, plot_groups  # noqa: E402
from ldreg_kernels.ssl.methods import DEFAULT_BETA  # noqa: E402
from ldreg_kernels.ssl.train import TrainConfig, Trainer, config_diff  # noqa: E402


def machine_slug(device: str) -> str:
    """cpu-epyc-zen4-2core, gpu-nvidia-h200: the results' file name, as the benchmarks name theirs."""
    return _machine_slug(torch.device(device))


def cpu_model() -> str:
    """The CPU's model name with its family/model numbers and ISA (results name the machine they ran on)."""
    return device_detail(torch.device("cpu"))


def train_or_load(cfg: TrainConfig, out: str) -> dict:
    """Run ``cfg`` into ``out`` unless it already finished there; returns the loaded run."""
    if not os.path.exists(os.path.join(out, "summary.json")):
        if os.path.exists(os.path.join(out, "checkpoint.pt")):
            Trainer.resume(out, cfg).fit()
        else:
            Trainer(cfg, out).fit()
    run = load_run(out)
    # Run folders are named by method, beta and seed only: a finished run from older defaults
    # (another lr, batch, ...) would otherwise be reported as if it had today's settings.
    try:
        saved = TrainConfig(**run["config"])
    except (TypeError, ValueError) as e:  # fields of another version
        raise SystemExit(f"{out} holds a configuration this version cannot read ({e}); "
                         "move it away or pass another --runs") from None
    stale = config_diff(saved, cfg)
    if stale:
        raise SystemExit(f"{out} was trained with other settings ({', '.join(f'{key}: {old!r}, now {new!r}' for key, (old, new) in stale.items())}); "
                         "move it away or pass another --runs")
    return run


def final(run: dict, key: str) -> float:
    return next(r[key] for r in reversed(run["history"]) if key in r)


def mean_sd(xs: list[float], fmt: str) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{format(statistics.mean(xs), fmt)} ± {format(sd, fmt)}"


KEYS = (("probe_acc", "probe acc", ".4f"), ("gm_lid", "GM-LID (MLE k=32)", ".3f"), ("erank", "erank", ".2f"))
# Two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (above: the normal 1.960).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% t-interval of the mean (NaN bounds for one value)."""
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, float("nan"), float("nan")
    t = T975[len(xs) - 2] if len(xs) - 1 <= len(T975) else 1.960
    h = t * statistics.stdev(xs) / len(xs) ** 0.5
    return m, m - h, m + h


def verdict(lo: float, hi: float) -> str:
    if lo != lo or hi != hi:  # NaN: one pair, no interval
        return "no interval (1 pair)"
    if lo > 0:
        return "up"
    if hi < 0:
        return "down"
    return "within noise"


Group = tuple[str, float]  # (method, beta multiple of the paper's; 0 = LDReg off)


def table(groups: dict[Group, list[dict]]) -> tuple[list[str], dict[Group, dict[str, tuple]]]:
    lines = ["| method | LDReg | seeds | " + " | ".join(k[1] for k in KEYS) + " | train s/run |",
             "|---|---|---|" + "---|" * (len(KEYS) + 1)]
    for (method, mult), runs in groups.items():
        beta = runs[0]["config"]["beta"]
        cells = [mean_sd([final(r, key) for r in runs], fmt) for key, _, fmt in KEYS]
        secs = statistics.mean(sum(h["time_s"] for h in r["history"]) for r in runs)
        lines.append(f"| {method} | {'beta=%g' % beta if mult else 'off'} | {len(runs)} | " + " | ".join(cells)
                     + f" | {secs:.0f} |")
    lines += ["", "Paired by seed, LDReg minus baseline: mean [95% t-interval] over seeds; an effect is claimed "
              "(up / down) only where the interval excludes 0:", "",
              "| method | beta | pairs | " + " | ".join(f"Δ {k[1]}" for k in KEYS) + " |",
              "|---|---|---|" + "---|" * len(KEYS)]
    deltas: dict[Group, dict[str, tuple]] = {}
    for (method, mult), on in groups.items():
        off = {r["config"]["seed"]: r for r in groups.get((method, 0.0), [])}
        pairs = [(r, off[r["config"]["seed"]]) for r in on if r["config"]["seed"] in off]
        if not mult or not pairs:
            continue
        cells, deltas[(method, mult)] = [], {}
        for key, _, fmt in KEYS:
            m, lo, hi = t_interval([final(a, key) - final(b, key) for a, b in pairs])
            deltas[(method, mult)][key] = (m, lo, hi)
            cells.append(f"{format(m, '+' + fmt)} [{format(lo, '+' + fmt)}, {format(hi, '+' + fmt)}] "
                         f"{verdict(lo, hi)}")
        lines.append(f"| {method} | {on[0]['config']['beta']:g} | {len(pairs)} | " + " | ".join(cells) + " |")
    return lines, deltas


def conclusions(groups: dict[Group, list[dict]], deltas: dict[Group, dict[str, tuple]]) -> list[str]:
    """One sentence per (method, beta): did LDReg raise LID and erank without lowering accuracy?"""
    out = []
    for (method, mult), d in deltas.items():
        beta = groups[(method, mult)][0]["config"]["beta"]
        lid_v, er_v, acc_v = (verdict(*d[k][1:]) for k in ("gm_lid", "erank", "probe_acc"))
        if acc_v.startswith("no interval"):
            out.append(f"- {method}, beta={beta:g}: one seed pair only, no claim (GM-LID {d['gm_lid'][0]:+.2f}, "
                       f"erank {d['erank'][0]:+.2f}, probe {d['probe_acc'][0]:+.4f}).")
            continue
        raised = lid_v == "up" and er_v == "up"
        acc = {"down": "but lowered probe accuracy", "up": "and raised probe accuracy",
               "within noise": "without a probe-accuracy change outside noise"}[acc_v]
        if raised:
            out.append(f"- {method}, beta={beta:g}: LDReg raised GM-LID ({d['gm_lid'][0]:+.2f}) and erank "
                       f"({d['erank'][0]:+.2f}) {acc} ({d['probe_acc'][0]:+.4f}).")
        else:
            out.append(f"- {method}, beta={beta:g}: no claim for both LID and erank (GM-LID {lid_v}, erank "
                       f"{er_v}); probe accuracy {acc_v} ({d['probe_acc'][0]:+.4f}).")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["simclr", "byol"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--protocol", choices=("custom", "paper"), default="paper",
                   help="paper: warm-up 10%% of epochs, the paper's k for the batch and beta per method, "
                        "LID monitors at k=32,512 (ldreg-train --protocol)")
    p.add_argument("--beta-mults", nargs="+", type=float, default=[1.0, 10.0],
                   help="LDReg runs at these multiples of the paper's beta (0.01 SimCLR, 0.005 BYOL)")
    p.add_argument("--k", type=int, default=None, help="training k (default: the protocol's)")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-runs", type=int, default=None,
                   help="train at most this many new runs, then write the table of what is finished")
    p.add_argument("--runs", default="runs/ssl")
    p.add_argument("--results", default="experiments/results")
    a = p.parse_args(argv)

    def cfg(method: str, mult: float, seed: int) -> TrainConfig:
        c = TrainConfig(method=method, dataset=a.dataset, ldreg=mult > 0, k=a.k, epochs=a.epochs,
                        eval_every=a.eval_every, seed=seed, device=a.device, protocol=a.protocol)
        if mult > 0:
            c.beta = DEFAULT_BETA[method] * mult
        return c

    budget = a.max_runs
    groups: dict[Group, list[dict]] = {}
    left = 0
    # Seed-major order: a call cut short by --max-runs leaves whole pairs for every setting.
    for seed in a.seeds:
        for method in a.methods:
            for mult in [0.0, *a.beta_mults]:
                tag = "base" if not mult else f"ldreg-x{mult:g}"
                out = os.path.join(a.runs, f"{a.dataset}-{a.protocol}-{a.epochs}ep-{method}-{tag}-s{seed}")
                if not os.path.exists(os.path.join(out, "summary.json")):
                    if budget is not None and budget <= 0:
                        left += 1
                        continue
                    budget = None if budget is None else budget - 1
                    print(f"== {out}", flush=True)
                groups.setdefault((method, mult), []).append(train_or_load(cfg(method, mult, seed), out))
    groups = {g: groups[g] for g in sorted(groups, key=lambda g: (a.methods.index(g[0]), g[1]))}

    slug = machine_slug(a.device)
    os.makedirs(a.results, exist_ok=True)
    png = os.path.join(a.results, f"{slug}-ssl.png")
    labels = {(m, x): f"{m} {'+ LDReg b=%g' % runs[0]['config']['beta'] if x else 'baseline'}"
              for (m, x), runs in groups.items()}
    plot_groups({labels[g]: runs for g, runs in groups.items()}, png,
                title=f"{a.dataset}, {a.epochs} epochs, seeds finished "
                      f"{sorted({r['config']['seed'] for rs in groups.values() for r in rs})} of {a.seeds}, "
                      f"protocol {a.protocol}; held-out metrics "
                      "(bands: ±1 std over seeds; spectrum: mean over seeds; monitors: seed "
                      f"{a.seeds[0]})")
    cmd = "python experiments/ssl_results.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows, deltas = table(groups)
    some = next(iter(groups.values()))[0]["config"]
    # Each method its own optimiser settings (methods.METHOD_DEFAULTS): name every one, not the first.
    lrs = ", ".join(sorted({f"{rs[0]['config']['method']} {rs[0]['config']['lr']:g} "
                            f"({rs[0]['config']['weight_decay']:g})" for rs in groups.values()}))
    batches = ", ".join(sorted({f"{rs[0]['config']['method']} {rs[0]['config']['batch_size']}"
                                for rs in groups.values()}))
    ks = ", ".join(sorted({f"{rs[0]['config']['method']} {rs[0]['config']['k']}" for rs in groups.values()}))
    lines = [f"# SSL results: {a.dataset}, {slug}", "",
             f"{datetime.date.today()}, torch {torch.__version__}, device {a.device}, CPU {cpu_model()}. "
             f"Command: `{cmd}`", "",
             f"Each run: {a.epochs} epochs, batch per method: {batches}, small ResNet (16-32-64-128, 128-d encoder "
             f"output), AdamW with warm-up + cosine, lr (weight decay) per method: {lrs}. Protocol `{a.protocol}`: LDReg on the encoder "
             f"output, k per method: {ks}, reg l1, MoM estimator, switched on after {some['warmup_epochs']} warm-up "
             "epoch(s); reference = the batch (SimCLR: both views; BYOL: online + target views, each query's own "
             "target twin excluded). BYOL: base EMA momentum "
             f"{TrainConfig(method='byol').momentum:g}, predictor lr x{TrainConfig(method='byol').predictor_lr_mult:g} "
             "(experiments/byol_search.py). Metrics on the held-out 1000 images: linear-probe top-1 (L-BFGS "
             "logistic regression on frozen features), geometric-mean LID (MLE, k=32) against the 4000 training "
             "images, effective rank (of 128). 'train s/run' is wall time on a shared machine: not a benchmark.", "",
             *rows, "", "What the intervals support:", "", *conclusions(groups, deltas), ""]
    if left:
        lines += [f"**Incomplete:** {left} run(s) of this command are not finished yet; rerun it to complete.", ""]
    lines += [f"![curves, spectrum and monitors]({os.path.basename(png)})", "",
              "Figure: held-out GM-LID, erank and probe accuracy per epoch; per-sample LID at the end; the "
              "singular-value spectrum of the held-out embeddings (sorted, normalised to the largest, log scale: "
              "a faster fall is a more collapsed embedding); the batch MLE LID at the monitored k every step.", ""]
    md = os.path.join(a.results, f"{slug}-ssl.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
