"""tools/gpu_check.py, the one device call on a lent GPU: it fits the device's budget (at most
8 files back, 2 folders deep, one call under 10 minutes) and runs from an uninstalled tree.
Its dry run goes end to end here, so a GPU session does not spend its minutes on a broken
script."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.py")
DEVICE_CALL_S = 600  # one device call's limit (the device tool's README)


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gc = _load()


def _table(summary: str) -> dict[str, dict[str, str]]:
    """summary.md's step table: {step: {column: cell}}."""
    lines = [line for line in summary.splitlines() if line.startswith("|")]
    cols = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(cols, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def _files(out: str) -> list[tuple[str, int]]:
    """(path relative to out, folders down) of every file under out."""
    found = []
    for dirpath, _, names in os.walk(out):
        rel = os.path.relpath(dirpath, out)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        found += [(os.path.normpath(os.path.join(rel, n)), depth) for n in names]
    return found


def test_dry_run_fits_the_device_budget(tmp_path):
    """The whole dry run (every step's CPU form): at most 8 files, none deeper than 2 folders,
    summary.md among them, step limits summing to at most 540 s, every step passed. The
    memcheck step runs tools/sanitize_workload.py as a script with .venv's editable install
    hidden, so it passes only if PYTHONPATH reaches it."""
    out = tmp_path / "gc"
    r = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(out)], capture_output=True, text=True,
                       timeout=900, cwd=tmp_path)
    summary = (out / "summary.md").read_text()
    assert r.returncode == 0, summary + r.stdout[-3000:] + r.stderr[-3000:]
    files = _files(str(out))
    assert len(files) <= 8 and max(d for _, d in files) <= 2, files
    assert sorted(f for f, _ in files) == ["bench.tar.gz", "gpu-check.log", "junit.xml", "summary.md"]
    rows = _table(summary)
    assert list(rows) == [*gc.STEPS, "outputs"]
    assert all(row["status"] in ("pass", "skip") for row in rows.values()), summary
    limits = {s: float(rows[s]["limit s"]) for s in gc.PLAN}
    assert limits == gc.PLAN and sum(limits.values()) <= 540
    assert float(rows["racecheck"]["limit s"]) <= gc.RACECHECK_MAX_S
    assert f"ldreg_kernels from {os.path.join(ROOT, 'ldreg_kernels')}" in summary
    assert int(rows["tests"]["note"].split(", ")[1].split()[0]) > 0  # "<n> CUDA-parametrised (skipped here)"
    assert rows["memcheck"]["note"] == "0 failures"
    log = (out / "gpu-check.log").read_text()
    assert "ModuleNotFoundError" not in log
    with __import__("tarfile").open(out / "bench.tar.gz") as t:
        assert "bench/gpu-shapes.csv" in t.getnames()


def test_plan_fits_one_device_call():
    assert sum(gc.PLAN.values()) <= gc.BUDGET_S <= DEVICE_CALL_S - 60
    assert set(gc.STEPS) == set(gc.PLAN) | {"racecheck"}  # racecheck: only the time left
    assert (gc.MAX_FILES, gc.MAX_DEPTH) == (8, 2)
    assert gc.BENCH_SHAPES == ["1024,4096,2048,64", "4096,4096,2048,64", "1024,4096,2048,512", "4096,1048576,256,64"]


def test_pytest_args_are_split_like_a_shell(tmp_path):
    a = gc.parse_args(["--out", str(tmp_path), "--pytest-args", "-k 'knn and not (lid or loss)' -x"])
    assert a.pytest_args == ["-k", "knn and not (lid or loss)", "-x"]


def test_limits_over_the_budget_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gc.parse_args(["--out", str(tmp_path), "--limit", "build=500"])
    assert e.value.code == 2
    total = sum(gc.PLAN.values()) - gc.PLAN["build"] + 500
    assert f"the steps' limits sum to {total} s, over the 540 s budget" in capsys.readouterr().err
    # ...but a subset of steps may take longer each.
    assert gc.parse_args(["--out", str(tmp_path), "--steps", "build", "--limit", "build=500"]).plan["build"] == 500


def _check(tmp_path, rows: dict) -> "gc.Check":
    out = tmp_path / "out"
    out.mkdir()
    return gc.Check(str(out), False, gc.BUDGET_S, rows, str(tmp_path), gc.step_env(False, str(tmp_path)))


def test_a_step_past_its_limit_is_killed_with_its_children_and_recorded(tmp_path):
    c = _check(tmp_path, {"tests": gc.Row("tests", 2)})
    pid_file = tmp_path / "grandchild.pid"
    child = (
        "import os, subprocess, sys, time\n"
        f"print(open({os.path.join(c.out, 'summary.md')!r}).read(), flush=True)\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "print('tests/test_knn.py::test_lid_matches_oracle[cuda-cuda] PASSED', flush=True)\n"
        "print('tests/test_knn.py::test_k_equals_n_minus_one[cuda-triton] ', flush=True)\n"
        "time.sleep(60)\n"
    )
    t = time.monotonic()
    assert c.step("tests", [sys.executable, "-c", child]) is False
    assert time.monotonic() - t < 30
    row = _table(open(os.path.join(c.out, "summary.md")).read())["tests"]
    assert (row["status"], row["limit s"]) == ("TIMEOUT", "2")
    assert row["note"] == "hit its 2 s limit; last test: tests/test_knn.py::test_k_equals_n_minus_one[cuda-triton]"
    log = open(c.log).read()
    assert "| tests | running |" in log  # the summary said so while it ran
    assert "killed at its 2 s limit" in log
    pid = int(pid_file.read_text())
    for _ in range(50):  # the grandchild went with the group
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {pid} outlived the step")


def test_every_subprocess_gets_the_tree_on_pythonpath(tmp_path):
    env = gc.step_env(True, str(tmp_path))
    assert env["PYTHONPATH"].split(os.pathsep)[0] == ROOT
    # From another cwd, with the editable install hidden (the dry run's sitecustomize).
    r = subprocess.run([sys.executable, "-c", "import ldreg_kernels; print(ldreg_kernels.__file__)"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.stdout.strip() == os.path.join(ROOT, "ldreg_kernels", "__init__.py"), r.stderr
    hidden = {**env, "PYTHONPATH": os.pathsep.join(p for p in env["PYTHONPATH"].split(os.pathsep) if p != ROOT)}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "sanitize_workload.py"), "--device", "cpu"],
                       cwd=tmp_path, env=hidden, capture_output=True, text=True)
    # Without the tree on PYTHONPATH the script does not find the package: what the device saw.
    assert r.returncode == 1 and "ModuleNotFoundError: No module named 'ldreg_kernels'" in r.stderr


def test_a_missing_prerequisite_stops_the_run_with_one_line(tmp_path):
    fake = tmp_path / "old" / "setuptools"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "75.3.0"\n')
    out = tmp_path / "gc"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "old")}
    r = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(out), "--steps", "preflight,backends,tests"],
                       capture_output=True, text=True, timeout=300, env=env)
    summary = (out / "summary.md").read_text()
    assert r.returncode == 1, summary
    stop = "missing prerequisite: setuptools >= 77 (found 75.3.0; setup.py refuses older ones)"
    assert [line for line in summary.splitlines() if line.startswith("**Stopped")] == [f"**Stopped: {stop}**"]
    rows = _table(summary)
    assert rows["preflight"]["status"] == "FAIL"
    assert [(rows[s]["status"], rows[s]["note"]) for s in ("backends", "tests")] == [("not run", "preflight failed")] * 2


def test_outputs_the_device_would_drop_are_named(tmp_path):
    for i in range(8):
        (tmp_path / f"f{i}.log").write_text("x")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.csv").write_text("x")
    problems = gc.check_outputs(str(tmp_path))
    assert problems[0] == f"{os.path.join('a', 'b', 'c', 'deep.csv')} is more than 2 folders down"
    assert problems[1].startswith("9 files (at most 8 come back): ")
    assert problems[2:] == ["no summary.md"]
    (tmp_path / "summary.md").write_text("x")
    os.remove(tmp_path / "a" / "b" / "c" / "deep.csv")
    os.remove(tmp_path / "f7.log")
    assert gc.check_outputs(str(tmp_path)) == []


def test_junit_parts_merge_into_one_file(tmp_path):
    for step, case in (("tests", "test_a"), ("fuzz", "test_b")):
        (tmp_path / f"{step}.xml").write_text(
            f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="1">'
            f'<testcase classname="t" name="{case}"/></testsuite></testsuites>')
    dest = tmp_path / "junit.xml"
    gc.merge_junit([str(tmp_path / "tests.xml"), str(tmp_path / "fuzz.xml"), str(tmp_path / "absent.xml")], str(dest))
    import xml.etree.ElementTree as ET

    root = ET.parse(dest).getroot()
    assert [(s.get("name"), [c.get("name") for c in s]) for s in root] == [("tests", ["test_a"]), ("fuzz", ["test_b"])]


def test_sanitizer_that_refuses_the_device_is_a_skip_not_a_failure():
    assert gc._sanitizer_note("========= Error: Device not supported\n", 1) == (
        "skip", "compute-sanitizer does not support this device here")
    assert gc._sanitizer_note("0 failures\n========= ERROR SUMMARY: 0 errors\n", 0) == ("pass", "0 errors; 0 failures")
    assert gc._sanitizer_note("1 failures\n========= ERROR SUMMARY: 3 errors\n", 1) == ("FAIL", "3 errors; 1 failures")


def test_refuses_to_run_for_real_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    r = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA device here; use --dry-run" in r.stderr


def test_device_preflight_stops_without_a_gpu_in_one_line(tmp_path):
    """The device form of preflight, here: no CUDA torch, no GPU, so it stops the run."""
    c = _check(tmp_path, {s: gc.Row(s, gc.PLAN.get(s)) for s in gc.STEPS})
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    ok, _ = gc.preflight(c)
    summary = open(os.path.join(c.out, "summary.md")).read()
    assert not ok
    why = "a visible GPU (torch.cuda.is_available() is False)"
    if torch.version.cuda is None:
        why = f"a CUDA build of torch (torch {torch.__version__} is a CPU build); " + why
    assert f"**Stopped: missing prerequisite: {why}**" in summary.splitlines()
    assert _table(summary)["preflight"]["status"] == "FAIL"


def test_device_steps_run_the_gpu_commands(tmp_path, monkeypatch):
    """What the steps would run on the device (recorded, not run): this card's arch only, the
    CUDA test selections with -v, the sanitizer with the caching allocator off, shapes A-D."""
    import torch

    c = _check(tmp_path, {s: gc.Row(s, gc.PLAN.get(s)) for s in gc.STEPS})
    ran: list[tuple[str, list[str], dict]] = []
    monkeypatch.setattr(gc.Check, "step", lambda self, step, cmd, env=None, ok_note=None: ran.append((step, cmd, env or {})) or True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    real_which = gc.shutil.which
    monkeypatch.setattr(gc.shutil, "which", lambda n: "/opt/cs/compute-sanitizer" if n == "compute-sanitizer" else real_which(n))
    steps = [s for s in gc.STEPS if s != "preflight"]
    a = gc.parse_args(["--out", c.out, "--steps", ",".join(steps), "--pytest-args", "-k 'knn or lid'"])
    gc._run_steps(c, a)
    by = {step: (cmd, env) for step, cmd, env in ran}
    assert list(by) == steps
    cmd, env = by["build"]
    assert cmd[1:] == ["setup.py", "build_ext", "--inplace"]
    assert (env["TORCH_CUDA_ARCH_LIST"], env["LDREG_FORCE_CUDA"], env["LDREG_REQUIRE_EXT"]) == ("9.0", "1", "1")
    for step in ("tests", "triton", "fuzz"):
        cmd, env = by[step]
        assert cmd[1:3] == ["-m", "pytest"] and "-v" in cmd and "--collect-only" not in cmd
        assert cmd[-2:] == ["-k", "knn or lid"]  # --pytest-args, shlex-split, last
        assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "cuda- or amp_fp16_on_cuda" in by["tests"][0]
    for step in ("memcheck", "racecheck"):
        cmd, env = by[step]
        assert cmd[0] == "/opt/cs/compute-sanitizer" and cmd[1] == f"--tool={step}" and "--quick" in cmd
        assert env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
    cmd, _ = by["bench"]
    assert [cmd[i + 1] for i, w in enumerate(cmd) if w == "--shape"] == gc.BENCH_SHAPES
    assert cmd[cmd.index("--methods") + 1] == ",".join(gc.BENCH_METHODS)
    assert c.env["PYTHONPATH"].split(os.pathsep)[0] == ROOT
