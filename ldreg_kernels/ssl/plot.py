"""Plots of finished runs: LID and effective-rank curves, and the per-sample LID histogram."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .runs import load_run, run_label, run_labels  # noqa: F401  (load_run, run_label: re-exported)


def plot_runs(run_dirs: Sequence[str], out_png: str) -> str:
    """One PNG comparing runs: GM-LID and erank per epoch, histogram of final per-sample LID."""
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

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, runs in groups.items():
        style = "-" if runs[0]["config"].get("ldreg", True) else "--"
        for ax, key in ((axes[0], "gm_lid"), (axes[1], "erank")):
            curves = [{r["epoch"]: r[key] for r in run["history"] if key in r} for run in runs]
            epochs = sorted(set.intersection(*(set(c) for c in curves)))
            vals = torch.tensor([[c[e] for e in epochs] for c in curves], dtype=torch.float64)
            mean = vals.mean(0)
            line = ax.plot(epochs, mean.numpy(), style, marker=".", label=f"{label} (n={len(runs)})")[0]
            if len(runs) > 1:
                sd = vals.std(0)
                ax.fill_between(epochs, (mean - sd).numpy(), (mean + sd).numpy(), color=line.get_color(), alpha=0.15)
        lids = [r["lids"] for r in runs if r["lids"] is not None]
        if lids:
            pooled = torch.cat(lids).double().clamp_min(1e-3)
            axes[2].hist(pooled.log10().numpy(), bins=40, histtype="step", linewidth=1.5, linestyle=style,
                         density=True, label=label)
    axes[0].set(xlabel="epoch", ylabel="geometric-mean LID (MLE k=32, held-out)", title="local intrinsic dimensionality")
    axes[1].set(xlabel="epoch", ylabel="effective rank", title="effective rank (held-out features)")
    axes[2].set(xlabel="log10 LID per held-out sample", ylabel="density", title="per-sample LID at the end")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
