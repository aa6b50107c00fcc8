"""``ldreg-train`` fails early and in one line; checkpoints are safe to load; ``--amp``.

Every bad argument, folder, package, data file or checkpoint below is refused before the
first training step, with one ``ldreg-train: error: ...`` line and exit status 1 (bad input)
or 2 (bad arguments); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from ldreg_kernels import available_backends
from ldreg_kernels.ssl import plot as P
from ldreg_kernels.ssl import train as T
from ldreg_kernels.ssl.cli import main as cli
from ldreg_kernels.ssl.data import digits
from ldreg_kernels.ssl.models import ResNetEncoder
from utils import generator

TINY = ["--dataset", "digits", "--widths", "8", "--blocks", "1", "--batch-size", "128", "--k", "8",
        "--no-progress", "--device", "cpu"]


class Evil:
    """Unpickling this calls os.mkdir(marker): what a crafted checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def err_line(capsys) -> str:
    """The single line the CLI wrote to stderr."""
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err[:-1]


def n_train_digits() -> int:
    return len(digits().train_x)


# -- bad arguments: exit 2, nothing created -----------------------------------------------
HELP = " (see ldreg-train simclr --help)"
BAD_ARGS = [
    (["--threads", "0"], "argument --threads: must be an integer >= 1, got '0'" + HELP),
    (["--threads", "-1"], "argument --threads: must be an integer >= 1, got '-1'" + HELP),
    (["--beta", "-0.01"], "argument --beta: must be a finite number >= 0, got -0.01"),
    (["--beta", "nan"], "argument --beta: must be a finite number >= 0, got nan"),
    (["--warmup-epochs", "-1"], "argument --warmup-epochs: must be >= 0, got -1"),
    (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["--eval-every", "0"], "argument --eval-every: must be >= 1, got 0"),
    (["--k", "1"], "argument --k: must be >= 2, got 1"),
    (["--k", "300"], "argument --k: must be in [2, 255] for this batch (reference of 256 rows, less the query's own), got 300"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0, got 0.0"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (["--weight-decay=-1e-4"], "argument --weight-decay: must be a finite number >= 0, got -0.0001"),
    (["--seed", "-1"], "argument --seed: must be in [0, 536870912), got -1"),
    (["--seed", str(2**40)], f"argument --seed: must be in [0, 536870912), got {2**40}"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--batch-size", "7"], "argument --batch-size: 7 must be a multiple of 2 x world size 1"),
    (["--widths", "8,16", "--blocks", "1"],
     "widths and blocks need one entry >= 1 per stage, got widths=(8, 16), blocks=(1,)"),
    (["--widths", "8,x"], "argument --widths: expected comma-separated integers such as 16,32,64, got '8,x'" + HELP),
    (["--device", "gpu"], "argument --device: 'gpu' is not a torch device (use cpu, cuda or cuda:N)"),
    (["--amp", "fp16"], "argument --amp: 'fp16' needs a CUDA device (fp16 autocast with a GradScaler); "
                        "use bf16 on the CPU"),
    (["--amp", "fp32"], "argument --amp: invalid choice: 'fp32' (choose from 'off', 'bf16', 'fp16')" + HELP),
]


@pytest.mark.parametrize("extra, message", BAD_ARGS, ids=[" ".join(c[0]) for c in BAD_ARGS])
def test_bad_arguments_exit_2_in_one_line_before_anything(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert cli(["simclr", *TINY, *extra, "--out", str(out)]) == 2
    line = err_line(capsys)
    if "invalid choice" in message and sys.version_info >= (3, 12):  # argparse quotes choices differently
        message = message.split(" (choose")[0]
        assert line.startswith(f"ldreg-train: error: {message}"), line
    else:
        assert line == f"ldreg-train: error: {message}"
    assert not out.exists()


def test_batch_larger_than_the_training_set_is_refused_before_a_step(tmp_path, capsys):
    # It used to run 0 steps, fail with KeyError: 'loss' and leave a checkpoint behind.
    out = tmp_path / "run"
    n = n_train_digits()
    assert cli(["simclr", *TINY, "--batch-size", "2000", "--out", str(out)]) == 2
    assert err_line(capsys) == (f"ldreg-train: error: argument --batch-size: 2000 is larger than the digits training "
                                f"set ({n} images): no step would run; use a batch size <= {n}")
    assert not out.exists()  # the folder check created it; a run that never started removes it


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable GPU")
def test_cuda_device_without_cuda(tmp_path, capsys):
    assert cli(["simclr", *TINY, "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
    assert err_line(capsys) == f"ldreg-train: error: argument --device: 'cuda': {why}; use cpu"


def _run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldreg_kernels.ssl.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_triton_on_cpu_without_the_interpreter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = _run_cli(["simclr", *TINY, "--backend", "triton", "--out", str(tmp_path / "run")], env)
    here = [b for b in available_backends("cpu") if b != "triton"]
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (
        "ldreg-train: error: argument --backend: 'triton' cannot run on cpu: it runs on cuda tensors, not cpu "
        "(Triton runs on the CPU only under TRITON_INTERPRET=1, slowly); "
        f"available here: {', '.join(here)} (or auto)\n")
    assert not (tmp_path / "run").exists()


# -- bad input: exit 1 --------------------------------------------------------------------
def test_out_that_is_a_file_or_cannot_be_created(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("mine")
    assert cli(["simclr", *TINY, "--out", str(f)]) == 1
    assert err_line(capsys) == f"ldreg-train: error: --out {f} exists and is not a folder"
    assert cli(["simclr", *TINY, "--out", str(f / "sub")]) == 1
    assert err_line(capsys) == f"ldreg-train: error: --out {f / 'sub'} is not writable: Not a directory"
    assert f.read_text() == "mine"


def test_out_holding_foreign_files_is_never_written_into(tmp_path, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "log.jsonl").write_text("their log\n")
    assert cli(["simclr", *TINY, "--out", str(out)]) == 1
    assert err_line(capsys) == (f"ldreg-train: error: --out {out} is not empty and holds no ldreg-train checkpoint "
                                "(2 entries, e.g. 'log.jsonl'): refusing to write into it; "
                                "choose a new or empty folder")
    assert sorted(os.listdir(out)) == ["log.jsonl", "notes.txt"] and (out / "log.jsonl").read_text() == "their log\n"


def test_compare_with_a_folder_that_is_not_a_run(tmp_path, capsys):
    out, other = tmp_path / "run", tmp_path / "other"
    assert cli(["simclr", *TINY, "--compare", str(other), "--out", str(out)]) == 1
    assert err_line(capsys) == f"ldreg-train: error: --compare {other}: not an ldreg-train run (no log.jsonl)"
    assert not out.exists()


@pytest.mark.parametrize("blocked, message", [
    (["matplotlib"], "matplotlib (the plot): pip install matplotlib"),
    (["tqdm", "sklearn"], "tqdm (progress), scikit-learn (the digits data): pip install tqdm scikit-learn"),
])
def test_missing_optional_packages_are_named_before_training(tmp_path, capsys, monkeypatch, blocked, message):
    for m in blocked:
        monkeypatch.setitem(sys.modules, m, None)  # makes "import m" raise ImportError
    out = tmp_path / "run"
    assert cli(["simclr", *TINY, "--out", str(out)]) == 1
    assert err_line(capsys) == (f"ldreg-train: error: missing package(s) this run needs: {message} "
                                "(or pip install 'ldreg-kernels[ssl]')")
    assert not out.exists()


def _fake_cifar(root, n: int = 8) -> str:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": g.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(n))}, f)
    return str(folder)


def test_truncated_cifar_batch(tmp_path, capsys):
    folder = _fake_cifar(tmp_path / "data")
    path = os.path.join(folder, "data_batch_3")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    out = tmp_path / "run"
    assert cli(["simclr", *TINY, "--dataset", "cifar10", "--data-root", str(tmp_path / "data"), "--batch-size", "8",
                "--k", "4", "--out", str(out)]) == 1
    assert err_line(capsys) == (f"ldreg-train: error: CIFAR-10 batch {path} is unreadable (UnpicklingError: pickle "
                                "data was truncated): truncated, corrupt or not the python version; fetch it again")
    assert not out.exists()


def test_crafted_cifar_batch_runs_no_code(tmp_path, capsys):
    folder = _fake_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({"data": Evil(str(marker)), "labels": [0]}, f)
    assert cli(["simclr", *TINY, "--dataset", "cifar10", "--data-root", str(tmp_path / "data"), "--batch-size", "8",
                "--k", "4", "--out", str(tmp_path / "run")]) == 1
    line = err_line(capsys)
    assert re.fullmatch(r"ldreg-train: error: CIFAR-10 batch .*test_batch is unreadable \(UnpicklingError: refusing "
                        r"to load posix\.mkdir: not a numpy array\): truncated, corrupt or not the python version; "
                        r"fetch it again", line), line
    assert not marker.exists()


# -- checkpoints ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    """A real checkpoint of a bf16 run, after two steps (what the trainer saves after an epoch)."""
    out = tmp_path_factory.mktemp("ckpt")
    t = T.Trainer(T.TrainConfig(dataset="digits", widths=(8,), blocks=(1,), batch_size=128, k=8, epochs=2,
                                amp="bf16"), str(out), progress=False)
    g = t._generator(0, 1)
    t.history = [{"epoch": 1, **t.train_step(next(t.batches(0)), g)}]
    t.train_step(next(t.batches(0)), g)
    t.epoch = 1
    t.save()
    return (out / "checkpoint.pt").read_bytes()


def test_checkpoints_hold_only_plain_data(tmp_path, checkpoint_bytes):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(checkpoint_bytes)
    state = torch.load(path, weights_only=True)  # raises if anything but tensors and plain containers is inside
    assert state["config"]["amp"] == "bf16" and state["epoch"] == 1 and state["scaler"] == {}
    resumed = T.Trainer.resume(str(tmp_path), progress=False)  # --amp comes back from the checkpoint
    assert resumed.cfg.amp == "bf16" and resumed.step == state["step"] == 2
    del state["config"]["amp"], state["scaler"]  # a checkpoint written before --amp existed
    torch.save(state, path)
    assert T.Trainer.resume(str(tmp_path), progress=False).cfg.amp == "off"


CKPT_ARGS = ["--amp", "bf16", "--epochs", "2", "--resume"]


def _write_checkpoint(out, payload) -> str:
    out.mkdir(exist_ok=True)
    path = out / "checkpoint.pt"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    return str(path)


def test_crafted_checkpoint_runs_no_code_and_says_so(tmp_path, capsys, checkpoint_bytes):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    state = torch.load(_write_checkpoint(out, checkpoint_bytes), weights_only=True)
    state["model"] = Evil(str(marker))  # a valid checkpoint with one poisoned entry
    path = _write_checkpoint(out, state)
    assert cli(["simclr", *TINY, *CKPT_ARGS, "--out", str(out)]) == 1
    line = err_line(capsys)
    assert re.fullmatch(
        rf"ldreg-train: error: --resume: {re.escape(path)} holds objects other than tensors and plain containers "
        r"\([^()]*mkdir[^()]*\); they were not loaded or run\. ldreg-train never writes such a file: it is "
        r"corrupt or was crafted; delete it or choose another --out", line), line
    assert not marker.exists()
    # The same file read by a fresh process: exit 1, one line on stderr, no code run.
    r = _run_cli(["simclr", *TINY, *CKPT_ARGS, "--out", str(out)])
    assert (r.returncode, r.stdout, r.stderr) == (1, "", line + "\n")
    assert not marker.exists()
    # A bare pickle (not torch's zip format) takes the legacy path: refused all the same.
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        with open(path, "wb") as f:
            pickle.dump({"config": {}, "model": Evil(str(marker))}, f, protocol=protocol)
        assert cli(["simclr", *TINY, *CKPT_ARGS, "--out", str(out)]) == 1
        assert err_line(capsys).startswith(f"ldreg-train: error: --resume: {path} ")
        assert not marker.exists()


def test_corrupt_and_foreign_checkpoints(tmp_path, capsys, checkpoint_bytes):
    out = tmp_path / "run"
    for payload, why in [
        (checkpoint_bytes[: len(checkpoint_bytes) // 2], r"is not a readable torch file \(truncated or corrupt: "
                                                         r"RuntimeError: PytorchStreamReader failed .*\)"),
        (b"", r"is not a readable torch file \(truncated or corrupt: EOFError: unexpected end of file\)"),
        (b"not a zip", r"is not a readable torch file \(truncated or corrupt: UnpicklingError: .*\)"),
        ({"weights": torch.zeros(3)}, r"is not an ldreg-train checkpoint \('config' is missing or not a dict\)"),
        ([1, 2], r"is not an ldreg-train checkpoint \(it holds a list, not a dict\)"),
    ]:
        path = _write_checkpoint(out, payload)
        assert cli(["simclr", *TINY, *CKPT_ARGS, "--out", str(out)]) == 1
        line = err_line(capsys)
        assert re.fullmatch(rf"ldreg-train: error: --resume: {re.escape(path)} {why}(; delete it or choose another "
                            r"--out)?", line), line


def test_checkpoint_that_does_not_fit(tmp_path, capsys, checkpoint_bytes):
    out = tmp_path / "run"
    state = torch.load(_write_checkpoint(out, checkpoint_bytes), weights_only=True)
    state["config"]["colour"] = "red"
    path = _write_checkpoint(out, state)
    assert cli(["simclr", *TINY, *CKPT_ARGS, "--out", str(out)]) == 1
    assert err_line(capsys) == (f"ldreg-train: error: --resume: {path} holds a configuration this version cannot use: "
                                "TrainConfig.__init__() got an unexpected keyword argument 'colour'")
    del state["config"]["colour"]
    state["model"]["encoder.stem.0.weight"] = torch.zeros(3)
    _write_checkpoint(out, state)
    assert cli(["simclr", *TINY, *CKPT_ARGS, "--out", str(out)]) == 1
    assert err_line(capsys).startswith(f"ldreg-train: error: --resume: the weights in {path} do not fit the model "
                                       "its config describes: Error(s) in loading state_dict")
    _write_checkpoint(out, checkpoint_bytes)  # the amp setting is part of the run: a resume must repeat it
    assert cli(["simclr", *TINY, "--epochs", "2", "--resume", "--out", str(out)]) == 1
    assert err_line(capsys) == ("ldreg-train: error: --resume: the checkpoint was written with a different "
                                "configuration amp='bf16' (checkpoint) vs 'off' (now)")


def test_debug_shows_the_traceback(tmp_path, capsys):
    out = tmp_path / "run"
    _write_checkpoint(out, b"not a zip")
    with pytest.raises(T.CheckpointError, match="is not a readable torch file"):
        cli(["simclr", *TINY, *CKPT_ARGS, "--out", str(out), "--debug"])
    with pytest.raises(T.ConfigError, match="must be >= 0, got -1"):
        cli(["simclr", *TINY, "--warmup-epochs", "-1", "--out", str(out), "--debug"])


def test_interrupt_is_one_line(tmp_path, capsys, monkeypatch):
    """Before the first checkpoint it says so, and the folder the run created is gone
    (issue #24: it said "the last checkpoint is kept (continue with --resume)", and
    --resume then failed); after one, the checkpoint is kept."""
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(T.Trainer, "fit", interrupted)
    out = tmp_path / "run"
    assert cli(["simclr", *TINY, "--out", str(out)]) == 130
    assert err_line(capsys) == "ldreg-train: error: interrupted before the first checkpoint: nothing saved yet"
    assert not out.exists()

    def interrupted_after_a_checkpoint(self):
        with open(os.path.join(self.out, T.CHECKPOINT), "wb"):
            pass
        raise KeyboardInterrupt

    monkeypatch.setattr(T.Trainer, "fit", interrupted_after_a_checkpoint)
    assert cli(["simclr", *TINY, "--out", str(out)]) == 130
    assert err_line(capsys) == ("ldreg-train: error: interrupted; the last checkpoint is kept "
                                "(continue with --resume)")
    assert os.listdir(out) == [T.CHECKPOINT]


def _fake_run(path, dataset: str, gm_lid: float, lids) -> None:
    path.mkdir(parents=True)
    (path / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "gm_lid": gm_lid + e, "erank": 2.0 + e}) + "\n"
                                            for e in (1, 2)))
    cfg = {"method": "simclr", "dataset": dataset, "ldreg": True, "beta": 0.01, "seed": 0}
    (path / "summary.json").write_text(json.dumps({"config": cfg}))
    torch.save(lids, path / "lids.pt")


def test_plot_keeps_every_run_and_tells_equal_configs_apart(tmp_path, capsys, monkeypatch):
    """Two runs with the same method, beta and seed (another data set) were drawn as one
    series: the first was dropped without a word (issue #24). Each run is drawn, labelled
    with its folder where the configs coincide."""
    g = generator("plot-runs")
    a, b, c = tmp_path / "mnist" / "run", tmp_path / "digits", tmp_path / "cifar" / "run"
    _fake_run(a, "mnist5k", 3.0, torch.rand(50, generator=g) * 10 + 1)
    _fake_run(b, "digits", 5.0, torch.rand(40, generator=g) * 10 + 1)
    drawn = {}
    plot_groups = P.plot_groups

    def spy(groups, out_png, title=""):
        drawn.update(groups)
        return plot_groups(groups, out_png, title)

    monkeypatch.setattr(P, "plot_groups", spy)
    png = tmp_path / "cmp.png"
    assert cli(["plot", str(a), str(b), "--out", str(png)]) == 0
    assert capsys.readouterr().out == f"{png}\n" and png.stat().st_size > 0
    assert list(drawn) == ["simclr LDReg b=0.01 s0 (run)", "simclr LDReg b=0.01 s0 (digits)"]
    assert [r["dir"] for (r,) in drawn.values()] == [str(a), str(b)]
    assert [r["config"]["dataset"] for (r,) in drawn.values()] == ["mnist5k", "digits"]
    # Folder names equal too: the path tells them apart; a label of its own stays as it is.
    _fake_run(c, "cifar10", 7.0, torch.rand(30, generator=g) * 10 + 1)
    runs = [P.load_run(str(d)) for d in (a, c, b)]
    runs[2]["config"] = {**runs[2]["config"], "seed": 1}
    assert P.run_labels(runs) == [f"simclr LDReg b=0.01 s0 ({a})", f"simclr LDReg b=0.01 s0 ({c})",
                                  "simclr LDReg b=0.01 s1"]
    assert P.run_labels([runs[0], runs[0]]) == [f"simclr LDReg b=0.01 s0 ({a})", f"simclr LDReg b=0.01 s0 ({a}) #2"]


def test_plot_and_train_do_not_import_each_other():
    """Issue #25: plot.py imported train.py's safe_load and train.py plot.py's plot_runs. The
    run files live in runs.py, below both; no module of the package imports one that
    imports it back (function-level imports included)."""
    import ast
    import pathlib

    import ldreg_kernels

    root = pathlib.Path(ldreg_kernels.__file__).parent
    graph = {}
    for f in root.rglob("*.py"):
        mod = ".".join(("ldreg_kernels", *f.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                target = f"{base}.{node.module}" if node.module else base
                deps.add(target)
                deps.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ldreg_kernels"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("ldreg_kernels"))
        graph[mod] = deps
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    ssl = sorted(m for m in graph if m.startswith("ldreg_kernels.ssl."))
    assert "ldreg_kernels.ssl.runs" in ssl
    assert graph["ldreg_kernels.ssl.runs"] == set()
    for m in ssl:
        for d in graph[m]:
            assert m not in _reachable(graph, d), f"import cycle: {m} -> {d} -> ... -> {m}"


def _reachable(graph: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def test_plot_refuses_crafted_lids_and_non_runs(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    run.mkdir()
    (run / "log.jsonl").write_text('{"epoch": 1, "gm_lid": 3.0, "erank": 2.0}\n')
    torch.save(Evil(str(marker)), run / "lids.pt")
    assert cli(["plot", str(run), "--out", str(tmp_path / "p.png")]) == 1
    assert f"ldreg-train: error: {run / 'lids.pt'} holds objects other than tensors" in err_line(capsys)
    assert not marker.exists()
    assert cli(["plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "p.png")]) == 1
    assert err_line(capsys) == f"ldreg-train: error: {tmp_path / 'nothing'} is not an ldreg-train run: no log.jsonl"


# -- mixed precision --------------------------------------------------------------------------
def test_amp_bf16_trains_under_autocast_on_cpu_with_the_default_backend(monkeypatch):
    seen = []
    forward = ResNetEncoder.forward

    def spy(self, x):
        h = forward(self, x)
        if self.training:
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), h.dtype))
        return h

    monkeypatch.setattr(ResNetEncoder, "forward", spy)
    cfg = T.TrainConfig(dataset="digits", widths=(8,), blocks=(1,), batch_size=128, k=8, epochs=1, amp="bf16")
    t = T.Trainer(cfg, None, progress=False)
    before = [p.detach().clone() for p in t.model.parameters()]
    g = t._generator(0, 1)
    vals = [t.train_step(images, g) for _, images in zip(range(3), t.batches(0))]
    assert all(on and dt == torch.bfloat16 for on, dt, _ in seen) and len(seen) == 3
    assert all(np.isfinite(v["loss"]) and v["reg_loss"] < 0 and v["batch_lid"] > 1 for v in vals)
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # the weights stay float32
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def test_cli_amp_runs_and_is_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()  # an empty folder is a valid --out
    assert cli(["byol", *TINY, "--amp", "--epochs", "1", "--out", str(out)]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["config"]["amp"] == "bf16" and state["step"] == n_train_digits() // 128
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "lids.pt", "log.jsonl", "plot.png", "spectrum.pt", "summary.json"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a GradScaler needs CUDA")
def test_amp_fp16_on_cuda_scales_and_checkpoints_the_scaler(tmp_path):
    cfg = T.TrainConfig(dataset="digits", widths=(8,), blocks=(1,), batch_size=128, k=8, epochs=2, amp="fp16",
                        device="cuda")
    t = T.Trainer(cfg, str(tmp_path), progress=False)
    g = t._generator(0, 1)
    vals = [t.train_step(images, g) for _, images in zip(range(4), t.batches(0))]
    assert all(np.isfinite(v["loss"]) for v in vals)
    t.save()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0
    assert T.Trainer.resume(str(tmp_path), progress=False).scaler.get_scale() == t.scaler.get_scale()
