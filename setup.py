"""Build ldreg_kernels and its native extension ``ldreg_kernels._C``.

Build with ``pip install --no-build-isolation .`` (torch installed first), so the extension
compiles against the torch you run with. A plain ``pip install .`` (build isolation) fails at
once with that advice: torch is deliberately not a build requirement, since an isolated build
would download another torch and compile an extension your torch cannot load.

The CPU kernels are always built. The CUDA kernels are added when the installed torch is a
CUDA build and CUDA_HOME (nvcc) is found, or when forced; the decision never asks for a GPU,
so a GPU-less build machine still ships CUDA kernels (DESIGN.md convention 4). A CUDA torch
without a CUDA toolkit builds the CPU kernels only. A CUDA home without the CUDA runtime
library (torch guesses it from the nvcc on PATH, which may be a wrapper script) stops the
build before compiling: "set CUDA_HOME to your CUDA toolkit (found nvcc at ...)".

A compile error fails the build with the compiler's message. Only a missing prerequisite
(no C++ compiler, torch not importable) installs the pure-Python backends instead; the
reason, and the torch the extension was compiled against, go to
``ldreg_kernels/_build_info.json``, which ``ldreg_kernels.backends.native`` reads to say
plainly why the "cpu"/"cuda" backends are missing.

Environment:
    LDREG_FORCE_CUDA=1   build the CUDA kernels even if torch is a CPU build (nvcc required)
    LDREG_NO_CUDA=1      never build them
    LDREG_NO_EXT=1       skip the native extension altogether (pure-Python install)
    LDREG_REQUIRE_EXT=1  fail, rather than install without the extension, when a
                         prerequisite is missing
    TORCH_CUDA_ARCH_LIST e.g. "8.0;9.0" (default here: 8.0;9.0)
    MAX_JOBS             parallel compile jobs (ninja)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import sysconfig

# Checked before setup() reads pyproject.toml: an older setuptools rejects the PEP 639
# `license = "MIT"` / `license-files` with a cryptic "project.license" schema error.
SETUPTOOLS_MIN = 77
try:
    import setuptools
except ImportError:
    sys.exit(f"ldreg-kernels: setuptools>={SETUPTOOLS_MIN} is required to build this package; "
             f"install it: pip install 'setuptools>={SETUPTOOLS_MIN}'")
if int(re.match(r"\d*", setuptools.__version__).group() or 0) < SETUPTOOLS_MIN:
    sys.exit(f"ldreg-kernels: setuptools>={SETUPTOOLS_MIN} is required to build this package "
             f"(pyproject.toml uses PEP 639 license metadata), but setuptools {setuptools.__version__} "
             f"is installed; upgrade it: pip install -U 'setuptools>={SETUPTOOLS_MIN}'")

from setuptools import setup  # noqa: E402
from setuptools.command.build_py import build_py as _build_py  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "ldreg_kernels"
BUILD_INFO = "_build_info.json"
REINSTALL = "pip install --no-build-isolation ."


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _isolated_build_env() -> bool:
    """Whether this interpreter runs in a throwaway build environment: pip's build isolation
    (``pip-build-env-*`` on sys.path) or ``python -m build``'s (a ``build-env-*`` venv)."""
    paths = [sys.prefix, *sys.path]
    return any("pip-build-env-" in p or os.path.basename(p).startswith("build-env-") for p in paths)


# Where a CUDA toolkit keeps its runtime library, relative to CUDA_HOME (torch links the CUDA
# kernels with -L<CUDA_HOME>/lib64 (or lib) -lcudart; conda and the NVIDIA packages put it in
# lib/ or targets/<arch>/lib/).
CUDART_GLOBS = [f"{d}/{n}" for d in ("lib64", "lib", "targets/*/lib", "lib/x64")
                for n in ("libcudart.so", "libcudart.so.*", "libcudart.a", "libcudart.dylib", "cudart.lib")]
DEFAULT_CUDA_HOME = "/usr/local/cuda"


def _has_cuda_runtime(home: str) -> bool:
    import glob

    return any(glob.glob(os.path.join(glob.escape(home), g)) for g in CUDART_GLOBS)


def _cuda_home_problem(home: str) -> str | None:
    """Why ``home`` (torch's CUDA_HOME, perhaps guessed from the nvcc on PATH) cannot link the
    CUDA kernels, or None. Checked before compiling: a wrong guess (an nvcc wrapper in
    /usr/local/bin makes torch guess CUDA_HOME=/usr/local) otherwise fails at link time,
    minutes in, with "cannot find -lcudart"."""
    if _has_cuda_runtime(home):
        return None
    nvcc = os.path.join(home, "bin", "nvcc")
    nvcc = nvcc if os.path.exists(nvcc) else (shutil.which("nvcc") or "no nvcc on PATH")
    hint = ""
    if os.path.realpath(home) != os.path.realpath(DEFAULT_CUDA_HOME) and _has_cuda_runtime(DEFAULT_CUDA_HOME):
        hint = f"; {DEFAULT_CUDA_HOME} holds one: CUDA_HOME={DEFAULT_CUDA_HOME}"
    return (f"ldreg-kernels: CUDA_HOME={home} holds no CUDA runtime library (libcudart in lib64/, lib/ or "
            f"targets/*/lib/), so the CUDA kernels could not be linked; set CUDA_HOME to your CUDA toolkit "
            f"(found nvcc at {nvcc}{hint}), or set LDREG_NO_CUDA=1 to build the CPU kernels only.")


def _missing_compiler() -> str | None:
    """Why no C++ extension can be compiled here (torch's cpp_extension compiles with $CXX or
    c++ and links with Python's LDSHARED), or None."""
    for what, cmd in (
        ("C++ compiler", os.environ.get("CXX") or "c++"),
        ("linker", os.environ.get("LDSHARED") or sysconfig.get_config_var("LDSHARED") or ""),
    ):
        words = shlex.split(cmd)
        if words and shutil.which(words[0]) is None:
            return (f"no {what} was found at build time ({words[0]!r} is not on PATH); install one "
                    "(e.g. g++) or point CXX at it")
    return None


class Plan:
    """What this build will do, decided before setup() runs, without a GPU.

    ``info`` becomes ldreg_kernels/_build_info.json. ``fatal``, when set, is raised by the
    build commands (not here: building an sdist needs neither torch nor a compiler).
    """

    def __init__(self):
        self.info = {"extension": False, "reason": "", "torch": None, "cuda_kernels": False, "cuda_reason": ""}
        self.fatal: str | None = None
        self.ext_modules: list = []
        self.build_ext = None

    def skip(self, reason: str) -> "Plan":
        self.info["reason"] = reason
        if _flag("LDREG_REQUIRE_EXT") and not self.fatal:
            self.fatal = f"ldreg-kernels: LDREG_REQUIRE_EXT=1 but the C++ extension cannot be built: {reason}"
        return self


def _plan() -> Plan:
    plan = Plan()
    if _flag("LDREG_NO_EXT"):  # an explicit choice, even under LDREG_REQUIRE_EXT=1
        plan.info["reason"] = "LDREG_NO_EXT=1 was set at build time"
        return plan
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError as e:
        if _isolated_build_env():
            plan.fatal = (
                "ldreg-kernels: torch is not importable in this isolated build environment. The C++ "
                "extension must be compiled against the torch you run with, so torch is not a build "
                "requirement. Install torch first, then build without isolation:\n"
                f"    {REINSTALL}\n"
                "(python -m build: add --no-isolation; or set LDREG_NO_EXT=1 to install without the C++ extension)"
            )
        return plan.skip(f"torch was not importable at build time ({e}); install torch first")
    plan.info["torch"] = torch.__version__
    missing = _missing_compiler()
    if missing:
        return plan.skip(missing)

    if _flag("LDREG_NO_CUDA"):
        with_cuda, why_not = False, "LDREG_NO_CUDA=1 was set at build time"
    elif _flag("LDREG_FORCE_CUDA"):
        with_cuda, why_not = True, ""
        if ce.CUDA_HOME is None:
            plan.fatal = "ldreg-kernels: LDREG_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)."
    elif torch.version.cuda is None:
        with_cuda, why_not = False, f"torch {torch.__version__} is a CPU build"
    elif ce.CUDA_HOME is None:
        with_cuda, why_not = False, (
            f"torch {torch.__version__} is a CUDA {torch.version.cuda} build but no CUDA toolkit (nvcc) was "
            "found at build time; install it, set CUDA_HOME, and rebuild"
        )
    else:
        with_cuda, why_not = True, ""
    if with_cuda and ce.CUDA_HOME is not None and not plan.fatal:
        plan.fatal = _cuda_home_problem(ce.CUDA_HOME)
    plan.info.update(extension=True, cuda_kernels=with_cuda, cuda_reason=why_not)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    sources = ["csrc/knn.cpp", "csrc/cpu/knn_cpu.cpp", "csrc/cpu/lid_cpu.cpp"]
    # -fopenmp: at::parallel_for is header code that is serial without it. The C++ standard
    # is left to torch's cpp_extension, which picks the one its headers need.
    cxx = ["-O3", "-fopenmp", "-DLDREG_WITH_PYTHON"]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    ext_cls = ce.CppExtension
    if with_cuda:
        sources.append("csrc/cuda/knn_cuda.cu")
        cxx.append("-DLDREG_WITH_CUDA")
        nvcc.append("-DLDREG_WITH_CUDA")
        ext_cls = ce.CUDAExtension
    plan.ext_modules = [ext_cls(
        f"{PACKAGE}._C",
        sources,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
    )]
    plan.build_ext = ce.BuildExtension
    return plan


def _write_build_info(directory: str, info: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, BUILD_INFO), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")


def _cmdclass(plan: Plan) -> dict:
    def check():
        if plan.fatal:
            sys.exit(plan.fatal)

    class BuildPy(_build_py):
        """Also writes _build_info.json into the built package (into the source tree for an
        editable install), so a skipped extension is reported at import with its reason."""

        def run(self):
            check()
            if not plan.info["extension"]:
                print(f"ldreg-kernels: not building the C++ extension: {plan.info['reason']}", file=sys.stderr)
            super().run()
            where = os.path.join(HERE, PACKAGE) if self.editable_mode else os.path.join(self.build_lib, PACKAGE)
            _write_build_info(where, plan.info)

    cmds = {"build_py": BuildPy}
    if plan.build_ext is not None:

        class BuildExt(plan.build_ext):
            def run(self):
                check()
                kinds = "CPU + CUDA" if plan.info["cuda_kernels"] else f"CPU only: {plan.info['cuda_reason']}"
                print(f"ldreg-kernels: building {PACKAGE}._C against torch {plan.info['torch']} ({kinds})",
                      file=sys.stderr)
                try:
                    super().run()
                except Exception:
                    print(f"\nldreg-kernels: compiling {PACKAGE}._C failed; the compiler's message is above. "
                          "To install without the C++ extension set LDREG_NO_EXT=1; to skip only the CUDA "
                          "kernels set LDREG_NO_CUDA=1.\n", file=sys.stderr)
                    raise
                # Beside the built _C: build/lib for a wheel, the source tree for --inplace.
                _write_build_info(os.path.dirname(self.get_ext_fullpath(f"{PACKAGE}._C")), plan.info)

        cmds["build_ext"] = BuildExt.with_options(use_ninja=True)
    return cmds


_PLAN = _plan()
setup(ext_modules=_PLAN.ext_modules, cmdclass=_cmdclass(_PLAN))
