"""Build ldreg_kernels and its native extension ``ldreg_kernels._C``.

The CPU kernels are always built. The CUDA kernels are added when the installed torch is a
CUDA build and CUDA_HOME (nvcc) is found, or when forced; the decision never asks for a GPU,
so a GPU-less build machine still ships CUDA kernels (DESIGN.md convention 4).

Environment:
    LDREG_FORCE_CUDA=1   build the CUDA kernels even if torch is a CPU build (nvcc required)
    LDREG_NO_CUDA=1      never build them
    LDREG_NO_EXT=1       skip the native extension altogether (pure-Python install)
    TORCH_CUDA_ARCH_LIST e.g. "8.0;9.0" (default here: 8.0;9.0)
    MAX_JOBS             parallel compile jobs (ninja)

Build with ``pip install --no-build-isolation .`` so the extension compiles against the
torch you run with. A missing compiler prints a message and installs the pure-Python
backends instead of failing.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _ext_modules():
    if _flag("LDREG_NO_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        print("ldreg-kernels: torch is not importable at build time; building without the native "
              "extension (use pip install --no-build-isolation).", file=sys.stderr)
        return [], {}

    with_cuda = not _flag("LDREG_NO_CUDA") and (
        _flag("LDREG_FORCE_CUDA") or (torch.version.cuda is not None and ce.CUDA_HOME is not None)
    )
    if with_cuda and ce.CUDA_HOME is None:
        sys.exit("ldreg-kernels: LDREG_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME).")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    sources = ["csrc/knn.cpp", "csrc/cpu/knn_cpu.cpp"]
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
    ext = ext_cls(
        "ldreg_kernels._C",
        sources,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    print(f"ldreg-kernels: building ldreg_kernels._C ({'CPU + CUDA' if with_cuda else 'CPU only'})", file=sys.stderr)
    return [ext], {"build_ext": _safe_build_ext(ce.BuildExtension)}


def _safe_build_ext(base):
    """``base`` (torch's BuildExtension, with ninja) that reports a missing or failing
    compiler clearly and lets the install go on with the pure-Python backends."""

    class Build(base):
        def run(self):
            try:
                super().run()
            except Exception as e:
                if _flag("LDREG_REQUIRE_EXT"):
                    raise
                print(
                    "\nldreg-kernels: the native extension could not be built "
                    f"({type(e).__name__}: {e}).\nThe 'reference', 'torch' and 'triton' backends still "
                    "work; set LDREG_REQUIRE_EXT=1 to make this an error.\n",
                    file=sys.stderr,
                )

    return Build.with_options(use_ninja=True)


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
