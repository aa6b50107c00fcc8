"""A small, documented search for a BYOL that learns at the demo's budget (MNIST-5k, 10 epochs).

    python experiments/byol_search.py --stage momentum          # stage 1
    python experiments/byol_search.py --stage lr-wd             # stage 2 (uses stage 1's best)
    python experiments/byol_search.py --stage confirm           # best setting, seeds 0 1 2
    python experiments/byol_search.py --stage momentum-b128     # stage 6: base momentum at the defaults
    python experiments/byol_search.py --stage all --max-runs 4  # at most 4 new runs, then the table

Why these axes: with ~150 steps in all, the target network of BYOL barely moves at the usual
EMA momentum (0.99 -> 1), and the predictor learns at the encoder's rate; the BYOL paper
(Grill et al. 2020, Sec. 3.3 / App. F) and SimSiam (Chen & He 2021, Sec. 4.2, a predictor
with a faster or fixed learning rate) make these the settings that matter at short schedules.
- Stage 1 ("momentum"): base EMA momentum in {0.9, 0.95, 0.99, 0.996}, predictor lr 10x,
  plus today's default (0.99, predictor lr 1x) for reference; seed 0, LDReg off. The probe
  rose monotonically as the momentum fell over that range, so 0.8, 0.5 and 0 were added (a
  target that follows the online network closely; 0 starts as SimSiam's stop-gradient copy).
- Stage 2 ("lr-wd"): stage 1's best momentum, lr in {2e-3, 5e-3} x weight decay in
  {1e-6, 0.1}; seed 0 (lr 2e-3 / wd 1e-6 is stage 1's run). AdamW's decay is decoupled
  (lr x wd per step), so 1e-4 changes nothing in 190 steps (the table's wd=1e-4 run, from a
  first grid, shows it); 0.1 is the scale ViT/DINO-style AdamW recipes use.
- Stage 3 ("confirm"): the best setting over seeds 0, 1, 2.
- Stage 4 ("seeds"): stage 2 picked lr on seed 0 alone, and seeds 1 and 2 fell short (0.919,
  0.900). So lr in {5e-3, 1e-2} (plus weight decay 0.1 at 5e-3) at stage 1's momentum, each
  over seeds 0, 1, 2; best = highest mean probe accuracy over the seeds.
- Stage 5 ("steps"): stage 4's best (0.917) still fell short, with a seed at 0.886. BYOL has
  only 190 steps at batch 256, and its regression target gives a weaker signal per step than
  SimCLR's negatives, so: lr 1e-2 at weight decay 0.1, and batch 128 (380 steps, the same
  images seen) at lr 5e-3 and 1e-2, weight decay 0.1; each over seeds 0, 1, 2. Batch 128 at lr
  5e-3 reached 0.937 +- 0.012 (every seed >= 0.928) and is the default. Its erank (4.0 +- 0.4 of
  128) is no higher than the earlier settings': BYOL's embedding on MNIST stays low-rank at this
  budget; only a slow target (base momentum 0.996, erank 7.4) raised it, at a probe of 0.80.
- Stage 6 ("momentum-b128"): the defaults (batch 128, lr 5e-3, weight decay 0.1, predictor
  10x) keep the probe but not the rank (erank 4.0). Stage 1 ran at 190 steps and lr 2e-3, where
  a slower target cost accuracy; at twice the steps the target may move enough. So base
  momentum in {0, 0.9, 0.99} at the defaults, each over seeds 0, 1, 2 (0 is the default, run
  again here for a side-by-side on this machine).
Best = highest probe accuracy (erank breaks ties). Every run is resumable and skipped once
finished (``--runs``, default runs/byol_search); the table of every finished run is rewritten
to ``experiments/results/<machine>-byol-search.md`` after each call.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ssl_results import cpu_model, final, machine_slug, train_or_load  # noqa: E402

from ldreg_kernels.ssl.methods import METHOD_DEFAULTS  # noqa: E402
from ldreg_kernels.ssl.train import TrainConfig  # noqa: E402

MOMENTA = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 0.996)
LRS, WDS = (2e-3, 5e-3), (1e-6, 0.1)
SEED_GRID = ((5e-3, 1e-6), (1e-2, 1e-6), (5e-3, 0.1))  # stage 4: (lr, weight decay), every seed
STAGE5 = ((1e-2, 0.1, 256), (5e-3, 0.1, 128), (1e-2, 0.1, 128))  # stage 5: (lr, weight decay, batch), every seed
STAGE6 = (0.0, 0.9, 0.99)  # stage 6: base EMA momentum at METHOD_DEFAULTS, every seed
# the defaults before the search (batch named: BYOL's default is now stage 5's 128)
BASE = dict(momentum=0.99, predictor_lr_mult=1.0, lr=2e-3, weight_decay=1e-6, batch_size=256)


def name(s: dict, seed: int) -> str:
    batch = f"-b{s['batch_size']}" if s["batch_size"] != 256 else ""
    return (f"m{s['momentum']:g}-p{s['predictor_lr_mult']:g}-lr{s['lr']:g}-wd{s['weight_decay']:g}{batch}-s{seed}")


def score(run: dict) -> tuple[float, float]:
    return final(run, "probe_acc"), final(run, "erank")


def merge_rows(rows: list[tuple], md: str) -> list[tuple]:
    """``rows`` plus the rows of an earlier ``md`` table whose runs are not on this disk.

    A machine's search file is its whole record; run folders are local, so a later session on
    the same kind of CPU would otherwise rewrite the file with its own runs alone. Tables
    written before the batch column had batch 256.
    """
    if not os.path.exists(md):
        return rows
    have = {r[:6] for r in rows}
    head, old = None, []
    for line in open(md):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| base EMA momentum"):
            head = cells
        elif head and line.startswith("| ") and not line.startswith("|---") and len(cells) == len(head):
            c = dict(zip(head, cells))
            row = (float(c["base EMA momentum"]), float(c["predictor lr x"]), float(c["lr"]),
                   float(c["weight decay"]), int(c.get("batch", 256)), int(c["seed"]), float(c["probe acc"]),
                   float(c["GM-LID"]), float(c["erank"]), float(c["train s"]))
            if row[:6] not in have:
                old.append(row)
    return rows + old


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("momentum", "lr-wd", "confirm", "seeds", "steps", "momentum-b128", "all", "table"), default="all")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="confirm stage seeds")
    p.add_argument("--max-runs", type=int, default=None, help="train at most this many new runs, then write")
    p.add_argument("--runs", default="runs/byol_search")
    p.add_argument("--results", default="experiments/results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    budget = [a.max_runs]
    done: dict[str, dict] = {}

    def run(s: dict, seed: int) -> dict | None:
        out = os.path.join(a.runs, name(s, seed))
        if name(s, seed) in done:
            return done[name(s, seed)]
        fresh = not os.path.exists(os.path.join(out, "summary.json"))
        if fresh and budget[0] is not None and budget[0] <= 0:
            return None
        if fresh:
            print(f"== {out}", flush=True)
            if budget[0] is not None:
                budget[0] -= 1
        cfg = TrainConfig(method="byol", dataset="mnist5k", ldreg=False, epochs=a.epochs, eval_every=a.epochs,
                          seed=seed, device=a.device, **s)
        done[name(s, seed)] = train_or_load(cfg, out)
        return done[name(s, seed)]

    def best(settings: list[dict]) -> dict | None:
        scored = [(score(r), s) for s in settings if (r := run(s, 0)) is not None]
        return max(scored, key=lambda t: t[0])[1] if len(scored) == len(settings) else None

    stage1 = [dict(BASE)] + [dict(BASE, momentum=m, predictor_lr_mult=10.0) for m in MOMENTA]
    b1 = best(stage1) if a.stage in ("momentum", "lr-wd", "confirm", "all") else None
    b2 = None
    if b1 is not None and a.stage in ("lr-wd", "confirm", "all"):
        stage2 = [dict(b1, lr=lr, weight_decay=wd) for lr in LRS for wd in WDS]
        b2 = best(stage2)
    if b2 is not None and a.stage in ("confirm", "all"):
        for seed in a.seeds:
            run(b2, seed)
    def over_seeds(grid: list[dict]) -> tuple[float, dict] | None:
        """Train every setting of ``grid`` on every seed; the best by mean probe accuracy."""
        scored = []
        for s in grid:
            rs = [run(s, seed) for seed in a.seeds]
            if all(rs):
                scored.append((statistics.mean(final(r, "probe_acc") for r in rs), s))
        return max(scored, key=lambda t: t[0]) if len(scored) == len(grid) else None

    # Stage 4 starts from stage 1's answer as recorded in METHOD_DEFAULTS (momentum 0, predictor
    # lr 10x), so it does not retrain stage 1 where its runs are gone (another machine).
    s1 = {key: METHOD_DEFAULTS["byol"][key] for key in ("momentum", "predictor_lr_mult")}
    grid4 = [dict(BASE, **s1, lr=lr, weight_decay=wd) for lr, wd in SEED_GRID]
    grid5 = [dict(BASE, **s1, lr=lr, weight_decay=wd, batch_size=bs) for lr, wd, bs in STAGE5]
    b4 = over_seeds(grid4) if a.stage in ("seeds", "steps", "all") and (a.stage != "all" or b1 is not None) else None
    b5 = over_seeds(grid5) if a.stage in ("steps", "all") and b4 is not None else None
    grid6 = [dict({k: METHOD_DEFAULTS["byol"][k] for k in BASE}, momentum=m) for m in STAGE6]
    b6 = over_seeds(grid6) if a.stage in ("momentum-b128", "all") and (a.stage != "all" or b5 is not None) else None
    # the table: every finished run in --runs
    rows = []
    for d in sorted(os.listdir(a.runs)) if os.path.isdir(a.runs) else []:
        if os.path.exists(os.path.join(a.runs, d, "summary.json")):
            from ldreg_kernels.ssl.runs import load_run

            r = load_run(os.path.join(a.runs, d))
            c = r["config"]
            rows.append((c["momentum"], c["predictor_lr_mult"], c["lr"], c["weight_decay"], c["batch_size"], c["seed"],
                         final(r, "probe_acc"), final(r, "gm_lid"), final(r, "erank"),
                         sum(h["time_s"] for h in r["history"])))
    slug = machine_slug(a.device)
    os.makedirs(a.results, exist_ok=True)
    md = os.path.join(a.results, f"{slug}-byol-search.md")
    rows = merge_rows(rows, md)
    lines = [f"# BYOL search: mnist5k, {a.epochs} epochs, {slug}", "",
             f"{datetime.date.today()}, torch {torch.__version__}, CPU {cpu_model()}. "
             f"Command: `python experiments/byol_search.py --stage all` (see its docstring for the stages).", "",
             "LDReg off; small ResNet (16-32-64-128), batch 256 unless the table says otherwise, AdamW with linear warm-up + cosine; EMA momentum "
             "raised from its base to 1 on a cosine. Held-out metrics (1000 images): linear-probe top-1, "
             "GM-LID (MLE k=32 against the 4000 training images), effective rank (of 128). "
             "Wall time on a shared 2-core machine: not a benchmark.", "",
             "| base EMA momentum | predictor lr x | lr | weight decay | batch | seed | probe acc | GM-LID | erank | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m:g} | {pm:g} | {lr:g} | {wd:g} | {bs} | {s} | {acc:.4f} | {gm:.3f} | {er:.2f} | {t:.0f} |"
              for m, pm, lr, wd, bs, s, acc, gm, er, t in sorted(rows)]
    # Summaries come from the table's rows, so stages whose runs are gone from this disk (an
    # earlier session's) keep theirs.
    by_key = {r[:6]: r for r in rows}

    def row_key(s: dict, seed: int) -> tuple:
        return (s["momentum"], s["predictor_lr_mult"], s["lr"], s["weight_decay"], s["batch_size"], seed)

    def seed0_best(grid: list[dict]) -> dict | None:
        got = [(by_key[row_key(s, 0)][6:9:2], s) for s in grid if row_key(s, 0) in by_key]
        return max(got, key=lambda t: t[0])[1] if len(got) == len(grid) else None

    s1best = seed0_best(stage1)
    s2best = seed0_best([dict(s1best, lr=lr, weight_decay=wd) for lr in LRS for wd in WDS]) if s1best else None
    lines += ["", f"Stage 1 best (seed 0): {s1best}." if s1best else "",
              f"Stage 2 best (seed 0): {s2best}." if s2best else ""]
    for stage, grid in ((3, [s2best] if s2best else []), (4, grid4), (5, grid5), (6, grid6)):
        if not grid or not all(row_key(s, seed) in by_key for s in grid for seed in a.seeds):
            continue
        lines += ["", f"Stage {stage} (mean over seeds " + ", ".join(map(str, a.seeds)) + "):"]
        means = []
        for s in grid:
            rs = [by_key[row_key(s, seed)] for seed in a.seeds]
            accs, eranks = [r[6] for r in rs], [r[8] for r in rs]
            means.append((statistics.mean(accs), s))
            lines.append(f"- momentum {s['momentum']:g}, lr {s['lr']:g}, weight decay {s['weight_decay']:g}, "
                         f"batch {s['batch_size']}: probe {statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f}, "
                         f"erank {statistics.mean(eranks):.2f} ± {statistics.stdev(eranks):.2f} (mean ± std)")
        if len(grid) > 1:
            lines.append(f"Stage {stage} best: {max(means, key=lambda t: t[0])[1]}.")
    lines += ["", f"BYOL defaults now (ldreg_kernels/ssl/methods.py, METHOD_DEFAULTS): {METHOD_DEFAULTS['byol']}."]
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
