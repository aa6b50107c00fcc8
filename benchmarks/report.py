"""Results on disk: the CSV of raw rows, the Markdown report and the PNG plot.

Everything here reads rows (dicts, as in the CSV) and a small ``meta`` dict (the JSON beside
the CSV: command, versions, skipped shapes, method notes), so ``python -m benchmarks.plot
results.csv`` redraws the table and plot without re-running anything.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable

FIELDS = [
    "machine", "device", "torch", "date", "threads", "method", "kind", "mode", "B", "N", "D", "k",
    "status", "ms", "p20", "p80", "reps", "first_ms", "tflops", "x_floor", "recall", "lid_err",
    "grad_err", "peak_mib", "aten_calls", "syncs",
]
_INT = {"B", "N", "D", "k", "reps", "threads"}
_FLOAT = {"ms", "p20", "p80", "first_ms", "tflops", "x_floor", "recall", "lid_err", "grad_err", "aten_calls", "syncs"}


# ---------------------------------------------------------------- CSV + meta
def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_csv(path: str) -> list[dict]:
    """Rows with numbers parsed back (peak_mib stays a string when it holds a failure)."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for key in _INT:
                r[key] = int(r[key]) if r.get(key) not in (None, "") else 0
            for key in _FLOAT:
                r[key] = float(r[key]) if r.get(key) not in (None, "") else math.nan
            out.append(r)
    return out


def meta_path(csv_path: str) -> str:
    return os.path.splitext(csv_path)[0] + ".json"


def write_meta(csv_path: str, meta: dict) -> None:
    with open(meta_path(csv_path), "w") as f:
        json.dump(meta, f, indent=1)


def read_meta(csv_path: str) -> dict:
    p = meta_path(csv_path)
    if not os.path.exists(p):
        return {}
    with open(p) as f:
        return json.load(f)


# ---------------------------------------------------------------- Markdown
def _ok(r: dict | None) -> bool:
    return r is not None and r["status"] == "ok" and not math.isnan(r["ms"])


def _get(r: dict | None, key: str) -> float:
    """r[key] for a successful row, else NaN."""
    return r.get(key, math.nan) if _ok(r) else math.nan  # CSVs from before a column have none


def _shape(r: dict) -> tuple[int, int, int, int]:
    return (r["B"], r["N"], r["D"], r["k"])


def _ms(r: dict | None) -> str:
    if r is None:
        return "-"
    if not _ok(r):
        return r["status"]
    if r.get("reps", 0) >= 2 and not math.isnan(r["p20"]):
        return f"{r['ms']:.4g} ({r['p20']:.4g}-{r['p80']:.4g})"
    return f"{r['ms']:.4g}"


def _num(v: object, fmt: str) -> str:
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return v or "-"
    return "-" if v is None or math.isnan(v) else format(v, fmt)


def headline(rows: list[dict]) -> list[dict]:
    """Per (shape, mode): our fastest backend, and its speed-up over the oracle, the fastest
    peer and the floor (>1 means ours is faster)."""
    by: dict = {}
    for r in rows:
        by.setdefault((_shape(r), r["mode"]), []).append(r)
    out = []
    for (shape, mode), rs in by.items():
        ours = [r for r in rs if r["kind"] == "ours" and _ok(r)]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["ms"])
        peers = [r for r in rs if r["kind"] == "peer" and _ok(r)]
        peer = min(peers, key=lambda r: r["ms"]) if peers else None
        oracle = next((r for r in rs if r["kind"] == "oracle"), None)
        floor = next((r for r in rows if r["kind"] == "floor" and _shape(r) == shape and _ok(r)), None)
        out.append(dict(shape=shape, mode=mode, ours=best, peer=peer, oracle=oracle, floor=floor))
    return out


def _ratio(other: dict | None, ours: dict) -> str:
    if not _ok(other):
        return "-" if other is None else other["status"]
    return f"{other['ms'] / ours['ms']:.2f}x"


def scaling_section(stem: str) -> list[str]:
    """The scaling report beside this one (``<stem>-scaling.md``, python -m benchmarks.scaling),
    inlined under one heading: its time-vs-N and threads table, plot and the full-size bank."""
    path = stem + "-scaling.md"
    if not os.path.exists(path):
        return []
    with open(path) as f:
        body = f.read().splitlines()[1:]  # its own title
    lines = [f"## Scaling with N and threads, and the full-size memory bank "
             f"([{os.path.basename(path)}]({os.path.basename(path)}))"]
    lines += ["#" + line if line.startswith("## ") else line for line in body]
    return lines + [""]


def markdown(rows: list[dict], meta: dict, extra: list[str] | None = None) -> str:
    """The report: context, headline ratios, ``extra`` sections, skipped shapes, the full
    table, the legend."""
    m0 = rows[0] if rows else {}
    lines = [
        f"# kNN / LID / LDReg benchmark: {m0.get('machine', '?')}",
        "",
        f"- machine: {meta.get('device_detail', m0.get('device', '?'))}, {m0.get('threads', '?')} threads",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta.get('versions', {}).items())}",
        f"- date: {m0.get('date', '?')}",
        f"- command: `{meta.get('command', '?')}`",
        "- fwd: the LDReg loss (paper Eq. 1, -beta * mean ln LID, MoM LID) of x (B, D) requiring grad; "
        "full: fwd + backward. B == N: the batch against itself (self excluded by index); "
        "B != N: a separate memory bank of N rows. fp32, TF32 off.",
        "- time: median over repeats after a warm-up (p20-p80 in brackets), ms, the methods interleaved "
        "round by round (on the CPU FAISS and KeOps, which bring their own thread pools, each on its own "
        "afterwards); "
        "TFLOP/s and x floor count 2*B*N*D flops against the bare matmul x @ ref.T.",
        f"- accuracy: float64 oracle on the first {meta.get('acc_rows', 256)} queries: index recall@k, "
        "max relative error of the MoM LID, max relative error of a row's gradient (norm) over the rows "
        "whose neighbour set is the oracle's. A recall just below 1 (one neighbour in thousands) is a "
        "float64 near-tie at the k-th neighbour that float32 distances cannot order; such a swap moves the "
        "LID by about the tie's gap, and that row's gradient by O(1).",
        "- peak extra memory: " + meta.get("memory_note", "-"),
        "- aten calls (syncs): every aten:: event of one call in torch.profiler, nested ones included, "
        "and the host syncs among them (benchmarks/launches.py): on a GPU each is a launch or a "
        "dispatcher trip of several microseconds.",
        "",
    ]
    heads = headline(rows)
    if heads:
        lines += [
            "## Our best backend per shape",
            "",
            "Speed-ups (the other's time / ours; >1: ours is faster) over the oracle and the fastest "
            "peer in that mode; x floor: our time in units of one bare matmul x @ ref.T.",
            "",
            "| B | N | D | k | mode | ours | ms | vs oracle | fastest peer | vs fastest peer | x floor |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for h in sorted(heads, key=lambda h: (h["shape"][0] != h["shape"][1], h["shape"], h["mode"] != "fwd")):
            o, p = h["ours"], h["peer"]
            lines.append(
                f"| {' | '.join(map(str, h['shape']))} | {h['mode']} | {o['method']} | {o['ms']:.4g} | "
                f"{_ratio(h['oracle'], o)} | {p['method'] if p else '-'} | {_ratio(p, o)} | "
                f"{_num(o['ms'] / h['floor']['ms'] if h['floor'] else math.nan, '.2f')} |"
            )
        lines.append("")
    lines += extra or []
    if meta.get("caveats"):  # added to the JSON by hand after a run: what the numbers cannot show
        lines += ["## Caveats", ""] + [f"- {c}" for c in meta["caveats"]] + [""]
    if meta.get("skipped_shapes"):
        lines += ["## Spec shapes not in this sweep", ""]
        lines += [f"- {s}" for s in meta["skipped_shapes"]] + [""]
    lines += [
        "## All results",
        "",
        "| B | N | D | k | method | fwd ms | full ms | fwd TFLOP/s | fwd x floor | recall@k | "
        "LID err | grad err | peak MiB fwd / full | first call ms | aten calls (syncs) fwd / full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pairs: dict = {}
    for r in rows:
        pairs.setdefault((_shape(r), r["method"]), {})[r["mode"]] = r
    for (shape, method), modes in pairs.items():
        f, u = modes.get("fwd"), modes.get("full")
        acc = f if _ok(f) else u  # accuracy comes from the fwd call; full-only rows have none
        lines.append(
            f"| {' | '.join(map(str, shape))} | {method} | {_ms(f)} | {_ms(u)} | "
            f"{_num(_get(f, 'tflops'), '.3f')} | {_num(_get(f, 'x_floor'), '.2f')} | "
            f"{_num(_get(acc, 'recall'), '.4f')} | {_num(_get(acc, 'lid_err'), '.1e')} | "
            f"{_num(_get(u, 'grad_err'), '.1e')} | "
            f"{_num(f['peak_mib'] if f else math.nan, '.1f')} / {_num(u['peak_mib'] if u else math.nan, '.1f')} | "
            f"{_num(f['first_ms'] if f else math.nan, '.4g')} | {_calls(f)} / {_calls(u)} |"
        )
    if meta.get("notes"):
        lines += ["", "## Methods", ""] + [f"- `{k}`: {v}" for k, v in meta["notes"].items()]
    return "\n".join(lines) + "\n"


def _calls(r: dict | None) -> str:
    n, s = _get(r, "aten_calls"), _get(r, "syncs")
    return "-" if math.isnan(n) else f"{n:.0f} ({s:.0f})"


# ---------------------------------------------------------------- plot
def _panels(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """One panel per sweep family: B == N per D (at k = 64, else the commonest k), and each
    memory-bank B per D; a family with one N only still gets a panel (a single point)."""
    fam: dict = {}
    for r in rows:
        key = ("B=N", r["D"]) if r["B"] == r["N"] else (f"B={r['B']}", r["D"])
        fam.setdefault(key, []).append(r)
    out = []
    for (name, d), rs in sorted(fam.items(), key=lambda kv: (kv[0][0] != "B=N", kv[0][0], kv[0][1])):
        ks = sorted({r["k"] for r in rs}, key=lambda k: (k != 64, -sum(r["k"] == k for r in rs)))
        out.append((f"{name}, D={d}, k={ks[0]}", [r for r in rs if r["k"] == ks[0]]))
    return out


def plot(rows: list[dict], path: str, title: str = "") -> None:
    """time vs N, log-log, one line per method; rows: fwd, full; the floor dashed in both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(rows)
    modes = ["fwd", "full"]
    fig, axes = plt.subplots(len(modes), max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 7),
                             squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    kinds = {r["method"]: r["kind"] for r in rows}
    # Fixed colours for the known methods, so plots of different machines read alike.
    known = ["oracle", "paper", "oracle-compiled", "mm-topk", "faiss", "keops", "ours-torch", "ours-cpu",
             "ours-triton", "ours-cuda"]
    colors = {m: f"C{known.index(m) if m in known else (len(known) + i) % 10}" for i, m in enumerate(methods)}
    for j, (label, rs) in enumerate(panels):
        for i, mode in enumerate(modes):
            ax = axes[i][j]
            for m in methods:
                want = "fwd" if m == "floor" else mode  # the floor is one matmul in both rows
                pts = sorted((r["N"], r["ms"]) for r in rs if r["method"] == m and r["mode"] == want and _ok(r))
                if not pts:
                    continue
                style = dict(ls="--", color="k", marker="x", lw=1.2) if m == "floor" else dict(
                    color=colors[m], marker="o", lw=2.4 if kinds[m] == "ours" else 1.2)  # ours drawn thick
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, ms=4, **style)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{mode}: {label}", fontsize=9)
            ax.set_xlabel("N (reference rows)")
            ax.set_ylabel("ms")
            ax.grid(True, which="both", alpha=0.3)
    handles: dict = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(6, len(handles)),
               fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(csv_path: str, rows: Iterable[dict] | None = None, meta: dict | None = None) -> tuple[str, str]:
    """(Re)write the .md and .png beside ``csv_path`` from its rows and meta."""
    rows = list(rows) if rows is not None else read_csv(csv_path)
    meta = meta if meta is not None else read_meta(csv_path)
    stem = os.path.splitext(csv_path)[0]
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows, meta, scaling_section(stem)))
    title = f"{rows[0]['machine']}, torch {rows[0]['torch']}, {rows[0]['date']}" if rows else ""
    try:
        plot(rows, stem + ".png", title)
    except ImportError as e:  # a machine without matplotlib (the GPU box has no pip): plot elsewhere
        print(f"no plot ({e}); draw it where matplotlib is: python -m benchmarks.plot {csv_path}")
    return stem + ".md", stem + ".png"
