"""The "cpu" and "cuda" backends: the C++/CUDA extension ``ldreg_kernels._C``.

Its ops ``ldreg::knn_native`` and ``ldreg::knn_backward_native`` (schemas in
``csrc/knn.cpp``, kernels under TORCH_LIBRARY_IMPL(CPU|CUDA) in ``csrc/cpu`` and
``csrc/cuda``) get their fake kernels and autograd registered here, directly: the dispatcher
picks the device's kernel, forward and backward alike, in one trip.

Importing this module raises ImportError with a plain reason when the extension cannot be
used: setup.py skipped it (no compiler, torch not importable at build time, LDREG_NO_EXT=1;
its reason is in ``ldreg_kernels/_build_info.json``), it was compiled against another torch
than the one running (the library is then not even loaded: a C++ ABI mismatch can crash), it
is missing, it fails to load, or it was built for another CUDA.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os

import torch

from .._op import Backend, register_native_op

REINSTALL = "pip install --no-build-isolation ."
_PACKAGE = __name__.rsplit(".", 2)[0]
BUILD_INFO_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_build_info.json")


def build_info(path: str = BUILD_INFO_PATH) -> dict | None:
    """What setup.py recorded about the extension build (see setup.py), or None when there is
    no record (an extension built before the record existed, or by CMake)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ImportError(f"the C++ extension's build record {path} is unreadable ({e}); reinstall with {REINSTALL}")


def unusable_reason(info: dict | None, running_torch: str) -> str | None:
    """Why the extension must not be loaded according to the build record, or None."""
    if info is None:
        return None
    if not info.get("extension"):
        return f"the C++ extension was not built: {info.get('reason') or 'no reason recorded'}; reinstall with {REINSTALL}"
    if info.get("torch") and info["torch"] != running_torch:
        return (f"the C++ extension was built against torch {info['torch']} but torch {running_torch} is "
                f"running; rebuild it: {REINSTALL}")
    return None


BUILD_INFO = build_info()
_why = unusable_reason(BUILD_INFO, torch.__version__)
if _why is None and importlib.util.find_spec(f"{_PACKAGE}._C") is None:
    _why = f"the C++ extension was not built: no compiled {_PACKAGE}._C module was found; reinstall with {REINSTALL}"
if _why is not None:
    raise ImportError(_why)
try:
    importlib.import_module(f"{_PACKAGE}._C")  # loading the library registers the ops
except ImportError as e:
    raise ImportError(f"the C++ extension {_PACKAGE}._C failed to load ({e}); rebuild it against this torch: "
                      f"{REINSTALL}") from e

__all__ = ["BACKENDS", "BUILD_INFO", "CUDA_BUILT", "build_info", "unusable_reason"]

_built = int(torch.ops.ldreg.compiled_cuda_version())
if _built and torch.version.cuda:
    _major, _minor = (int(v) for v in torch.version.cuda.split(".")[:2])
    if _built // 1000 != _major:
        raise ImportError(
            f"ldreg_kernels._C was compiled for CUDA {_built // 1000}.{_built % 1000 // 10} but torch "
            f"uses CUDA {_major}.{_minor}; rebuild it against this torch: {REINSTALL}"
        )
# The extension has CUDA kernels only when it was compiled with nvcc.
CUDA_BUILT = _built != 0

register_native_op("knn_native", "knn_backward_native")


def _load_cuda():
    if not CUDA_BUILT:
        why = (BUILD_INFO or {}).get("cuda_reason") or "CPU-only torch or LDREG_NO_CUDA=1"
        raise RuntimeError(f"ldreg_kernels._C was built without CUDA kernels ({why})")
    return torch.ops.ldreg.knn_native


BACKENDS = (
    Backend("cpu", ("cpu",), lambda: torch.ops.ldreg.knn_native, "knn_backward_native"),
    Backend("cuda", ("cuda",), _load_cuda, "knn_backward_native"),
)
