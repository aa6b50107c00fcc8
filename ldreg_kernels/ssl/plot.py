"""Plots of finished runs: LID, effective-rank and probe curves, the per-sample LID histogram,
the singular-value spectrum of the held-out embeddings, and the per-step LID monitors."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .runs import load_run, run_label, run_labels  # noqa: F401  (load_run, run_label: re-exported)


SPECTRUM_FLOOR = 1e-6  # dead channels give exact zeros: drawn at this floor, not at -inf


def plot_runs(run_dirs: Sequence[str], out_png: str) -> str:
    """One PNG comparing runs: GM-LID, erank and probe accuracy per epoch, histogram of final
    per-sample LID, held-out singular-value spectrum, per-step LID monitors (if logged)."""
    runs = [load_run(d) for d in run_dirs]
    return plot_groups({label: [r] for label, r in zip(run_labels(runs), runs)}, out_png)


def plot_groups(groups: dict[str, list[dict]], out_png: str, title: str = "") -> str:
    """Like :func:`plot_runs`, one line per group: the mean over its runs (seeds), a band of
    +-1 std, and the group's per-sample LIDs pooled into one histogram."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib, which is not installed: pip install matplotlib "
                          "(or pip install 'ldreg-kernels[ssl]')") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monitor_keys = sorted({k for runs in groups.values() for run in runs for rec in run["history"] for k in rec
                           if k.startswith("steps_lid_k")}, key=lambda k: int(k.rsplit("k", 1)[1]))
    fig, grid = plt.subplots(2, 3, figsize=(15, 8.4))
    axes = grid.ravel()
    for label, runs in groups.items():
        style = "-" if runs[0]["config"].get("ldreg", True) else "--"
        color = None
        for ax, key in ((axes[0], "gm_lid"), (axes[1], "erank"), (axes[3], "probe_acc")):
            curves = [{r["epoch"]: r[key] for r in run["history"] if key in r} for run in runs]
            epochs = sorted(set.intersection(*(set(c) for c in curves)))
            if not epochs:
                continue
            vals = torch.tensor([[c[e] for e in epochs] for c in curves], dtype=torch.float64)
            mean = vals.mean(0)
            line = ax.plot(epochs, mean.numpy(), style, marker=".", color=color, label=f"{label} (n={len(runs)})")[0]
            color = line.get_color()
            if len(runs) > 1:
                sd = vals.std(0)
                ax.fill_between(epochs, (mean - sd).numpy(), (mean + sd).numpy(), color=color, alpha=0.15)
        lids = [r["lids"] for r in runs if r["lids"] is not None]
        if lids:
            pooled = torch.cat(lids).double().clamp_min(1e-3)
            axes[2].hist(pooled.log10().numpy(), bins=40, histtype="step", linewidth=1.5, linestyle=style,
                         density=True, color=color, label=label)
        spectra = [r["spectrum"] for r in runs if r.get("spectrum") is not None]
        if spectra:  # the mean over seeds of each run's spectrum normalised to its largest value
            n = min(len(sv) for sv in spectra)
            sv = torch.stack([sv[:n].double() / sv[0].double().clamp_min(1e-300) for sv in spectra]).mean(0)
            axes[4].semilogy(range(1, n + 1), sv.clamp_min(SPECTRUM_FLOOR).numpy(), style, color=color, label=label)
        for j, key in enumerate(monitor_keys):  # per-step batch LID: first run of the group
            steps = [v for rec in runs[0]["history"] for v in rec.get(key, [])]
            if steps:
                axes[5].plot(range(1, len(steps) + 1), steps, style if j == 0 else ":", color=color, linewidth=1,
                             label=f"{label}, k={key.rsplit('k', 1)[1]}")
    axes[0].set(xlabel="epoch", ylabel="geometric-mean LID (MLE k=32, held-out)", title="local intrinsic dimensionality")
    axes[1].set(xlabel="epoch", ylabel="effective rank", title="effective rank (held-out features)")
    axes[2].set(xlabel="log10 LID per held-out sample", ylabel="density", title="per-sample LID at the end")
    axes[3].set(xlabel="epoch", ylabel="linear-probe top-1", title="probe accuracy (held-out)")
    axes[4].set(xlabel="singular value index (sorted)", ylabel="singular value / largest (log)",
                title=f"spectrum of the held-out embeddings (< {SPECTRUM_FLOOR:g} drawn at it)")
    axes[5].set(xlabel="training step", ylabel="batch GM-LID (MLE)",
                title="LID monitors per step" + ("" if monitor_keys else " (none logged)"))
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in (axes[0], axes[2], axes[4], axes[5]):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
