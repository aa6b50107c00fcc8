"""Packaging: what setup.py decides and records, and what the runtime then says.

The cheap parts run here, each in a subprocess on a copy of the tracked files: the sdist's
file list, setup.py's failures (old setuptools, isolated build, compile error) and its build
record, and the messages ``ldreg_kernels`` gives when the extension is missing or built for
another torch. Building and installing the sdist and the wheel into fresh venvs takes minutes
and runs in CI: .ci/dist_check.sh (``make dist-check``).
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import torch

import ldreg_kernels as L
from ldreg_kernels import registry

ROOT = Path(__file__).resolve().parent.parent
REINSTALL = "pip install --no-build-isolation ."
# Sources the sdist must carry whatever setup.py lists (it lists none without torch).
BUILD_FILES = ["setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "CMakeLists.txt"]


def _tracked(*paths):
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *paths], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return sorted(p for p in out.splitlines() if (ROOT / p).is_file())


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A copy of the tracked files (never the checkout: setup.py writes egg-info and records)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    dst = tmp_path_factory.mktemp("tree")
    for p in _tracked("csrc", "ldreg_kernels", *BUILD_FILES):
        (dst / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / p, dst / p)
    return dst


def _env(**overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDREG_")}
    env.update(overrides)
    return env


def _setup(tree, *args, env=None, pythonpath=None):
    env = env or _env()
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "setup.py", *args], cwd=tree, env=env, capture_output=True, text=True)


# torch's own log lines ("W1202 03:24:00.903000 4308 .../cpp_extension.py:183] No CUDA runtime is
# found, using CUDA_HOME='/usr/local'", logged when a CUDA torch is imported on a GPU-less host).
TORCH_LOG_LINE = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def _ours(stderr: str) -> str:
    """stderr without torch's log lines: what setup.py itself said, compared word for word."""
    return "\n".join(line for line in stderr.strip().splitlines() if not TORCH_LOG_LINE.match(line)).strip()


def test_ours_drops_torchs_log_lines_only():
    warning = ("W1202 03:24:00.903000 4308 venv/lib/python3.11/site-packages/torch/utils/cpp_extension.py:183] "
               "No CUDA runtime is found, using CUDA_HOME='/usr/local'")
    assert _ours(f"{warning}\nldreg-kernels: an error\n") == "ldreg-kernels: an error"
    assert _ours("warning: something else\nldreg-kernels: an error") == "warning: something else\nldreg-kernels: an error"


def _fake_module(where: Path, name: str, source: str) -> Path:
    (where / name).mkdir(parents=True, exist_ok=True)
    (where / name / "__init__.py").write_text(source)
    return where


# ---------------------------------------------------------------------------------------------
# Metadata


def test_one_version_from_the_package():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ldreg_kernels.__version__"}
    assert L.__version__ == "0.2.0"


def test_license_is_shipped_and_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT" and meta["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the ldreg-kernels developers\n")
    # torch must not be a build requirement: an isolated build would fetch another torch.
    assert meta["build-system"]["requires"] == ["setuptools>=77"]


def test_sdist_carries_every_source(tree, tmp_path):
    # LDREG_NO_EXT=1 lists no extension sources, as a build without torch (python -m build,
    # isolated) does: MANIFEST.in alone must bring them in.
    r = _setup(tree, "-q", "sdist", "-d", str(tmp_path), env=_env(LDREG_NO_EXT="1"))
    assert r.returncode == 0, r.stderr
    (sdist,) = tmp_path.glob("ldreg_kernels-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
        pkg_info = t.extractfile(f"ldreg_kernels-{L.__version__}/PKG-INFO").read().decode()
    want = set(_tracked("csrc", "ldreg_kernels", *BUILD_FILES))
    assert {"csrc/knn.h", "csrc/cuda/knn_cuda.cu", "csrc/cpu/knn_cpu.cpp", "CMakeLists.txt", "LICENSE"} <= want
    assert sorted(want - names) == []
    assert [n for n in names if re.search(r"\.(so|o|pyc)$|_build_info\.json$", n)] == []
    assert f"\nVersion: {L.__version__}\n" in pkg_info
    assert "\nLicense-Expression: MIT\n" in pkg_info and "\nLicense-File: LICENSE\n" in pkg_info


# ---------------------------------------------------------------------------------------------
# setup.py: fail early and plainly, or skip with a recorded reason


def test_old_setuptools_fails_with_clear_message(tree, tmp_path):
    fake = _fake_module(tmp_path, "setuptools", '__version__ = "75.3.0"\n')
    r = _setup(tree, "--version", pythonpath=fake)
    assert r.returncode == 1
    assert _ours(r.stderr) == (
        "ldreg-kernels: setuptools>=77 is required to build this package (pyproject.toml uses PEP 639 license "
        "metadata), but setuptools 75.3.0 is installed; upgrade it: pip install -U 'setuptools>=77'"
    )


NO_TORCH = "raise ImportError(\"No module named 'torch'\")\n"


def test_isolated_build_fails_fast_but_sdist_works(tree, tmp_path):
    # An isolated build environment (pip's is named pip-build-env-*) that has no torch.
    env_dir = _fake_module(tmp_path / "pip-build-env-test", "torch", NO_TORCH)
    r = _setup(tree, "build_py", "--build-lib", str(tmp_path / "lib"), pythonpath=env_dir)
    assert r.returncode == 1
    assert _ours(r.stderr) == (
        "ldreg-kernels: torch is not importable in this isolated build environment. The C++ extension must be "
        "compiled against the torch you run with, so torch is not a build requirement. Install torch first, "
        "then build without isolation:\n"
        f"    {REINSTALL}\n"
        "(python -m build: add --no-isolation; or set LDREG_NO_EXT=1 to install without the C++ extension)"
    )
    assert not (tmp_path / "lib").exists()
    r = _setup(tree, "-q", "sdist", "-d", str(tmp_path / "dist"), pythonpath=env_dir)
    assert r.returncode == 0, r.stderr


def _build_record(tree, tmp_path, env, pythonpath=None):
    r = _setup(tree, "build_py", "--build-lib", str(tmp_path / "lib"), env=env, pythonpath=pythonpath)
    assert r.returncode == 0, r.stderr
    return json.loads((tmp_path / "lib" / "ldreg_kernels" / "_build_info.json").read_text()), r.stderr


def test_missing_compiler_skips_the_extension_with_its_reason(tree, tmp_path):
    info, err = _build_record(tree, tmp_path, _env(CXX="/nonexistent/c++"))
    reason = ("no C++ compiler was found at build time ('/nonexistent/c++' is not on PATH); install one "
              "(e.g. g++) or point CXX at it")
    assert info == {"extension": False, "reason": reason, "torch": torch.__version__, "cuda_kernels": False,
                    "cuda_reason": ""}
    assert f"ldreg-kernels: not building the C++ extension: {reason}" in err
    # ...and with LDREG_REQUIRE_EXT=1 (CI) the same is an error.
    r = _setup(tree, "build_py", "--build-lib", str(tmp_path / "lib2"),
               env=_env(CXX="/nonexistent/c++", LDREG_REQUIRE_EXT="1"))
    assert r.returncode == 1
    assert _ours(r.stderr) == f"ldreg-kernels: LDREG_REQUIRE_EXT=1 but the C++ extension cannot be built: {reason}"


def test_torch_missing_outside_isolation_skips_with_its_reason(tree, tmp_path):
    info, _ = _build_record(tree, tmp_path, _env(), pythonpath=_fake_module(tmp_path / "site", "torch", NO_TORCH))
    assert info == {
        "extension": False,
        "reason": "torch was not importable at build time (No module named 'torch'); install torch first",
        "torch": None, "cuda_kernels": False, "cuda_reason": "",
    }


def test_planned_extension_records_the_torch_it_compiles_against(tree, tmp_path):
    if shutil.which(os.environ.get("CXX") or "c++") is None:
        pytest.skip("no C++ compiler here")
    info, _ = _build_record(tree, tmp_path, _env(LDREG_NO_CUDA="1"))
    assert info == {"extension": True, "reason": "", "torch": torch.__version__, "cuda_kernels": False,
                    "cuda_reason": "LDREG_NO_CUDA=1 was set at build time"}


def test_cuda_torch_without_toolkit_builds_cpu_kernels_only(tree, tmp_path):
    if shutil.which(os.environ.get("CXX") or "c++") is None:
        pytest.skip("no C++ compiler here")
    # Make this torch look like a CUDA build on a machine without a CUDA toolkit.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import torch, torch.utils.cpp_extension as ce\ntorch.version.cuda = '12.8'\nce.CUDA_HOME = None\n")
    info, _ = _build_record(tree, tmp_path, _env(), pythonpath=site)
    why = (f"torch {torch.__version__} is a CUDA 12.8 build but no CUDA toolkit (nvcc) was found at build time; "
           "install it, set CUDA_HOME, and rebuild")
    assert info == {"extension": True, "reason": "", "torch": torch.__version__, "cuda_kernels": False,
                    "cuda_reason": why}


# A CUDA torch (this one, or a CPU torch made to look like one) whose CUDA home is guessed from
# the nvcc on PATH: torch takes <dir of nvcc>/.. as CUDA_HOME.
LOOKS_LIKE_CUDA_TORCH = (
    "import torch, torch.utils.cpp_extension as ce\n"
    "if torch.version.cuda is None:\n    torch.version.cuda = '13.0'\n"
    "ce.CUDA_HOME = ce._find_cuda_home()\n"
)


def _fake_cuda_home(tmp_path, runtime: str | None) -> tuple[Path, dict]:
    """A directory with a bin/nvcc that is not a toolkit (a wrapper's home), and ``runtime``
    (a path inside it) as an empty file, if given; and the environment that makes torch guess it."""
    home = tmp_path / "fakecuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'fake nvcc: not a compiler' >&2\nexit 1\n")
    nvcc.chmod(0o755)
    if runtime:
        (home / runtime).parent.mkdir(parents=True, exist_ok=True)
        (home / runtime).write_text("")
    site = tmp_path / "cuda-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(LOOKS_LIKE_CUDA_TORCH)
    env = {k: v for k, v in _env().items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = os.pathsep.join([str(home / "bin"), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return home, env


def _no_runtime_message(home: Path) -> str:
    default = "/usr/local/cuda"
    hint = ""
    if any(glob.glob(f"{default}/{d}/libcudart.so*") for d in ("lib64", "lib", "targets/*/lib")):
        hint = f"; {default} holds one: CUDA_HOME={default}"
    return (f"ldreg-kernels: CUDA_HOME={home} holds no CUDA runtime library (libcudart in lib64/, lib/ or "
            f"targets/*/lib/), so the CUDA kernels could not be linked; set CUDA_HOME to your CUDA toolkit "
            f"(found nvcc at {home / 'bin' / 'nvcc'}{hint}), or set LDREG_NO_CUDA=1 to build the CPU kernels only.")


def test_cuda_home_without_the_runtime_stops_pip_install_before_compiling(tree, tmp_path):
    """The README's plain install against a CUDA torch, with the nvcc on PATH a wrapper outside
    the toolkit: it used to fail at link time ("cannot find -lcudart") minutes in."""
    if shutil.which(os.environ.get("CXX") or "c++") is None:
        pytest.skip("no C++ compiler here")
    home, env = _fake_cuda_home(tmp_path, runtime=None)
    src = tmp_path / "src"
    shutil.copytree(tree, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                        "--target", str(tmp_path / "site"), str(src)],
                       env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert _no_runtime_message(home) in out, out[-3000:]
    assert "ldreg-kernels: building ldreg_kernels._C" not in out  # stopped before build_ext began
    assert not (tmp_path / "site" / "ldreg_kernels").exists()
    # setup.py directly: the same message, alone, and nothing built.
    r = _setup(src, "build_ext", "-b", str(tmp_path / "lib"), "-t", str(tmp_path / "tmp"), env=env)
    assert r.returncode == 1 and _ours(r.stderr) == _no_runtime_message(home)
    assert not (tmp_path / "lib").exists() and not (tmp_path / "tmp").exists()


@pytest.mark.parametrize("runtime", ["lib64/libcudart.so", "lib/libcudart.so.13", "targets/x86_64-linux/lib/libcudart.so"])
def test_cuda_home_with_the_runtime_plans_the_cuda_kernels(tree, tmp_path, runtime):
    if shutil.which(os.environ.get("CXX") or "c++") is None:
        pytest.skip("no C++ compiler here")
    _, env = _fake_cuda_home(tmp_path, runtime=runtime)
    info, _ = _build_record(tree, tmp_path, env)
    assert info == {"extension": True, "reason": "", "torch": torch.__version__, "cuda_kernels": True,
                    "cuda_reason": ""}


def test_compile_error_fails_the_build_with_the_compilers_message(tree, tmp_path):
    if shutil.which(os.environ.get("CXX") or "c++") is None:
        pytest.skip("no C++ compiler here")
    broken = tmp_path / "broken"
    shutil.copytree(tree, broken)
    for src in ("csrc/knn.cpp", "csrc/cpu/knn_cpu.cpp"):  # a fatal error on line 1: no slow compile
        p = broken / src
        p.write_text('#include "ldreg_test_deliberately_missing.h"\n' + p.read_text())
    r = _setup(broken, "build_ext", "-b", str(tmp_path / "lib"), "-t", str(tmp_path / "tmp"),
               env=_env(LDREG_NO_CUDA="1", MAX_JOBS="2"))
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "ldreg_test_deliberately_missing.h: No such file or directory" in out
    assert ("ldreg-kernels: compiling ldreg_kernels._C failed; the compiler's message is above. To install "
            "without the C++ extension set LDREG_NO_EXT=1; to skip only the CUDA kernels set LDREG_NO_CUDA=1.") in out
    assert not list((tmp_path / "lib").rglob("_build_info.json"))


# ---------------------------------------------------------------------------------------------
# Runtime: what ldreg_kernels says when the extension cannot be used

PROBE = r"""
import json, sys, warnings
# A development venv's editable install adds a finder that would find the checkout's _C.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
import torch
import ldreg_kernels as L
from ldreg_kernels import registry
x = torch.randn(12, 3)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    L.knn(x, k=2)
    L.knn(x, k=2)
try:
    L.knn(x, k=2, backend="cpu")
    explicit = None
except RuntimeError as e:
    explicit = str(e)
print(json.dumps({"errors": registry.LOAD_ERRORS, "warnings": [str(m.message) for m in w],
                  "explicit": explicit, "cpu": L.available_backends("cpu"), "file": L.__file__,
                  "cuda_why": registry._try_load(registry.BACKENDS["cuda"])[1]}))
"""


def _probe(tmp_path, record=None, with_ext=False):
    """Import a copy of the package, with ``record`` as its _build_info.json, in a subprocess."""
    pkg = tmp_path / "site" / "ldreg_kernels"
    shutil.copytree(ROOT / "ldreg_kernels", pkg, ignore=shutil.ignore_patterns(
        "__pycache__", "_build_info.json", *(() if with_ext else ("_C*.so", "_C*.pyd"))))
    if record is not None:
        (pkg / "_build_info.json").write_text(json.dumps(record))
    env = _env(PYTHONPATH=str(tmp_path / "site"))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["file"] == str(pkg / "__init__.py")  # the copy, not the checkout
    return out


def _assert_reported(out, why):
    assert out["errors"]["cpu"] == why and out["errors"]["cuda"] == why
    assert "circular import" not in why
    assert out["warnings"] == [f"ldreg_kernels: backend 'cpu' unavailable ({why}); falling back"]  # once
    assert out["explicit"] == f"backend 'cpu' is not available: {why}"
    assert "cpu" not in out["cpu"] and "torch" in out["cpu"]


def test_skipped_extension_says_why_and_how_to_fix(tmp_path):
    reason = "no C++ compiler was found at build time ('c++' is not on PATH); install one (e.g. g++) or point CXX at it"
    out = _probe(tmp_path, {"extension": False, "reason": reason, "torch": torch.__version__,
                            "cuda_kernels": False, "cuda_reason": ""})
    _assert_reported(out, f"the C++ extension was not built: {reason}; reinstall with {REINSTALL}")


def test_missing_extension_without_record_is_not_blamed_on_a_circular_import(tmp_path):
    out = _probe(tmp_path)
    _assert_reported(out, "the C++ extension was not built: no compiled ldreg_kernels._C module was found; "
                          f"reinstall with {REINSTALL}")


def test_extension_built_for_another_torch_is_not_loaded(tmp_path):
    out = _probe(tmp_path, {"extension": True, "reason": "", "torch": "2.4.0", "cuda_kernels": False,
                            "cuda_reason": "torch 2.4.0 is a CPU build"}, with_ext=True)
    _assert_reported(out, f"the C++ extension was built against torch 2.4.0 but torch {torch.__version__} is "
                          f"running; rebuild it: {REINSTALL}")


@pytest.mark.skipif("cpu" not in L.available_backends("cpu"), reason="C++ extension not built")
def test_matching_record_loads_and_names_why_cuda_kernels_are_absent(tmp_path):
    from ldreg_kernels.backends import native

    if native.CUDA_BUILT:
        pytest.skip("this extension has CUDA kernels")
    why = f"torch {torch.__version__} is a CPU build"
    out = _probe(tmp_path, {"extension": True, "reason": "", "torch": torch.__version__, "cuda_kernels": False,
                            "cuda_reason": why}, with_ext=True)
    assert out["errors"] == {} and out["warnings"] == [] and out["explicit"] is None and "cpu" in out["cpu"]
    assert out["cuda_why"] == f"ldreg_kernels._C was built without CUDA kernels ({why})"


# ---------------------------------------------------------------------------------------------
# available_backends: only what can run on the device here


def test_no_backend_is_available_for_an_unusable_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert L.available_backends("cuda") == []
    assert L.available_backends("cuda:1") == []
    assert L.available_backends("meta") == []
    assert "torch" in L.available_backends("cpu")


def test_triton_interpreter_is_not_listed_for_cuda_on_cpu_torch(monkeypatch):
    # The reproducer: under TRITON_INTERPRET=1 "triton" runs on CPU tensors and declares "cuda"
    # too; without a usable GPU it must not be listed for "cuda".
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    triton = registry.BACKENDS["triton"]
    assert "cuda" in triton.devices
    assert "triton" not in L.available_backends("cuda")


def test_usable_device_lists_backends_that_load_for_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    listed = L.available_backends("cuda")
    expected = [n for n, b in registry.BACKENDS.items() if "cuda" in b.devices and registry._try_load(b)[0] is not None]
    assert listed == expected and "torch" in listed and "reference" in listed
