"""Redraw a benchmark's Markdown table and PNG plot from its CSV, without re-running.

    python -m benchmarks.plot benchmarks/results/cpu-2core-x86_64.csv
    python -m benchmarks.plot part1.csv part2.csv --out benchmarks/results/gpu-nvidia-h100.csv

Writes <stem>.md and <stem>.png beside each CSV (the <stem>.json beside it, if present,
supplies the command, versions and skipped shapes). With --out, the CSVs (e.g. the parts of a
sweep split with --part) are merged into one CSV first, and that one is drawn.
"""

from __future__ import annotations

import argparse
import os
import shutil

from benchmarks import report


def merge(paths: list[str], out: str) -> None:
    """Concatenate the CSVs' rows (a later file's row replaces an earlier one for the same
    method, mode and shape) into ``out``; the first JSON's meta, with every command."""
    rows: dict = {}
    for path in paths:
        for r in report.read_csv(path):
            rows[(r["method"], r["mode"], r["B"], r["N"], r["D"], r["k"])] = r
    metas = [report.read_meta(p) for p in paths]
    meta = dict(metas[0])
    meta["command"] = " ; ".join(m.get("command", "?") for m in metas)
    report.write_csv(out, list(rows.values()))
    report.write_meta(out, meta)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", help="CSV written by python -m benchmarks.run")
    p.add_argument("--out", help="merge the CSVs into this one and draw it")
    args = p.parse_args(argv)
    if args.out:
        if len(args.csv) == 1 and args.csv[0] != args.out:
            shutil.copy(args.csv[0], args.out)
            if os.path.exists(report.meta_path(args.csv[0])):
                shutil.copy(report.meta_path(args.csv[0]), report.meta_path(args.out))
        else:
            merge(args.csv, args.out)
    for path in [args.out] if args.out else args.csv:
        print(*report.write_all(path))


if __name__ == "__main__":
    main()
