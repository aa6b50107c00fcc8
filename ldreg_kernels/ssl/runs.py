"""A run folder on disk: atomic writes, safe reads, and reading a finished run back.

Below both the trainer (``train.py``, which writes runs) and the plots (``plot.py``, which
read them), so neither imports the other for its files.

Files in a run folder: ``log.jsonl`` (one record per epoch), ``checkpoint.pt``,
``summary.json`` (config and final metrics), ``lids.pt`` (per-sample held-out LID) and
``plot.png``.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Sequence

import torch

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file, fsync, then rename over ``path``.

    A crash or kill at any point leaves either the old file or the new one, never a torn one.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_load(path: str) -> Any:
    """``torch.load(path, weights_only=True)``, with every failure as one ``ValueError`` line.

    ``weights_only=True`` rebuilds only tensors and plain containers, so a crafted file (a
    pickle whose ``__reduce__`` calls a function) is refused before anything in it runs.
    """
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: one line is enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to parse untrusted bytes means the same thing to the user
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if "Weights only load failed" in str(e):
            # torch's first line suggests weights_only=False: the one thing not to do here.
            lines = [ln for ln in lines[1:] if not ln.startswith(("Please file", "Check the documentation"))]
        if lines and "GLOBAL" in lines[0]:  # the pickle names a function or class: refused, never called
            raise ValueError(f"{path} holds objects other than tensors and plain containers "
                             f"({lines[0].rstrip('.')}); they were not loaded or run. ldreg-train never writes "
                             "such a file: it is corrupt or was crafted") from None
        detail = lines[0] if lines else "unexpected end of file"
        raise ValueError(f"{path} is not a readable torch file (truncated or corrupt: "
                         f"{type(e).__name__}: {detail})") from None


def load_run(run_dir: str) -> dict:
    """A run folder's config, per-epoch history and (if written) per-sample held-out LIDs and
    held-out singular values.

    ``lids.pt`` and ``spectrum.pt`` are read with ``weights_only=True`` (:func:`safe_load`): a crafted
    file cannot run code.

    Raises:
        FileNotFoundError: ``run_dir`` holds no ``log.jsonl`` (not an ldreg-train run).
        ValueError: a file of the run is corrupt (one line, naming it).
    """
    log_path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(log_path):
        raise FileNotFoundError(f"{run_dir} is not an ldreg-train run: no log.jsonl")
    cfg_path, lids_path = os.path.join(run_dir, "summary.json"), os.path.join(run_dir, "lids.pt")
    path = log_path
    try:
        with open(log_path) as f:
            history = [json.loads(line) for line in f if line.strip()]
        cfg = {}
        if os.path.exists(cfg_path):
            path = cfg_path
            with open(cfg_path) as f:
                cfg = json.load(f)["config"]
    except (OSError, KeyError, TypeError, ValueError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise ValueError(f"cannot read {path} ({type(e).__name__}: {' '.join(str(e).split())})") from None
    lids = None
    if os.path.exists(lids_path):
        lids = safe_load(lids_path)  # a one-line ValueError naming the file
        if not isinstance(lids, torch.Tensor):
            raise ValueError(f"{lids_path} holds a {type(lids).__name__}, not a tensor of LIDs")
    spectrum = None
    spec_path = os.path.join(run_dir, "spectrum.pt")
    if os.path.exists(spec_path):
        spectrum = safe_load(spec_path)
        if not isinstance(spectrum, torch.Tensor):
            raise ValueError(f"{spec_path} holds a {type(spectrum).__name__}, not a tensor of singular values")
    return {"dir": run_dir, "config": cfg, "history": history, "lids": lids, "spectrum": spectrum}


def run_label(run: dict) -> str:
    """``"<method> LDReg b=<beta> s<seed>"`` from the run's config, else its folder name."""
    cfg = run["config"]
    if not cfg:
        return _folder(run["dir"])
    reg = f"LDReg b={cfg['beta']:g}" if cfg["ldreg"] else "no LDReg"
    return f"{cfg['method']} {reg} s{cfg['seed']}"


def _folder(run_dir: str) -> str:
    return os.path.basename(os.path.normpath(run_dir)) or os.path.normpath(run_dir)


def run_labels(runs: Sequence[dict]) -> list[str]:
    """One distinct label per run, in order: :func:`run_label`, and where runs share it
    (same method, beta and seed: another data set, say), the run folder's name after it;
    its whole path where the folder names coincide too, and a counter where even they do
    (the same folder given twice)."""
    base = [run_label(r) for r in runs]
    labels = []
    for r, b in zip(runs, base):
        if base.count(b) == 1:
            labels.append(b)
            continue
        names = [_folder(o["dir"]) for o, ob in zip(runs, base) if ob == b]
        name = _folder(r["dir"])
        where = name if names.count(name) == 1 else os.path.normpath(r["dir"])
        labels.append(f"{b} ({where})" if where != b else b)
    # Still equal (the same folder twice): the later ones get "#2", "#3", ...
    return [lab if not labels[:i].count(lab) else f"{lab} #{labels[:i].count(lab) + 1}"
            for i, lab in enumerate(labels)]
