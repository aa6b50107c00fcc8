"""The "cpu" and "cuda" backends: the C++/CUDA extension ``ldreg_kernels._C``.

Its ops ``ldreg::knn_native`` and ``ldreg::knn_backward_native`` (schemas in
``csrc/knn.cpp``, kernels under TORCH_LIBRARY_IMPL(CPU|CUDA) in ``csrc/cpu`` and
``csrc/cuda``) get their fake kernels and autograd registered here, directly: the dispatcher
picks the device's kernel, forward and backward alike, in one trip. Importing this module
raises ImportError with the reason when the extension is missing or built for another CUDA.
"""

from __future__ import annotations

import torch

from .._op import Backend, register_native_op

try:
    from .. import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as e:
    raise ImportError(
        f"the C++ extension ldreg_kernels._C is not built ({e}); reinstall with "
        "pip install --no-build-isolation ."
    ) from e

__all__ = ["BACKENDS", "CUDA_BUILT"]

_built = int(torch.ops.ldreg.compiled_cuda_version())
if _built and torch.version.cuda:
    _major, _minor = (int(v) for v in torch.version.cuda.split(".")[:2])
    if _built // 1000 != _major:
        raise ImportError(
            f"ldreg_kernels._C was compiled for CUDA {_built // 1000}.{_built % 1000 // 10} but torch "
            f"uses CUDA {_major}.{_minor}; rebuild the extension against this torch"
        )
# The extension has CUDA kernels only when it was compiled with nvcc.
CUDA_BUILT = _built != 0

register_native_op("knn_native", "knn_backward_native")


def _load_cuda():
    if not CUDA_BUILT:
        raise RuntimeError("ldreg_kernels._C was built without CUDA kernels (CPU-only torch or LDREG_NO_CUDA=1)")
    return torch.ops.ldreg.knn_native


BACKENDS = (
    Backend("cpu", ("cpu",), lambda: torch.ops.ldreg.knn_native, "knn_backward_native"),
    Backend("cuda", ("cuda",), _load_cuda, "knn_backward_native"),
)
