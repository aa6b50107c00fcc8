"""The "triton" backend: fused distance + streaming top-k forward, exact re-rank, and a
Triton backward.

Importing this module defines ``ldreg::knn_triton`` and ``ldreg::knn_backward_triton``
through ``ldreg_kernels._op`` (fake kernels, NaN/Inf check, autograd running the Triton
backward). It imports without a GPU; the kernels then run only under ``TRITON_INTERPRET=1``
(CPU tensors, slow: tests). ImportError means Triton is missing or too old.

The selection precision ("ieee", "tf32", "tf32x3", "bf16") is a module-level setting, since
the op schema is fixed: ``set_precision``, ``selection_precision`` (context manager), or the
environment variable ``LDREG_TRITON_PRECISION`` at import. Returned distances are exact
whatever the setting.
"""

from __future__ import annotations

import os

import torch

import triton  # noqa: F401  (ImportError: the registry records the backend as unavailable)

from ..._op import Backend, define_backward_op, define_knn_op
from . import _compat

_compat.apply()

from . import knn_bwd, knn_fwd, rerank  # noqa: E402
from .knn_fwd import (  # noqa: E402
    MAX_CANDIDATES,
    MAX_KP,
    PRECISIONS,
    get_precision,
    select_candidates,
    selection_precision,
    set_precision,
)

__all__ = [
    "MAX_CANDIDATES",
    "MAX_KP",
    "PRECISIONS",
    "get_precision",
    "set_precision",
    "selection_precision",
    "select_candidates",
    "BACKENDS",
]

# Module attributes looked up per call, so a test can wrap them to prove which kernel ran.
knn_backward_triton = define_backward_op("triton", lambda *a: knn_bwd.knn_backward(*a))
# checks_input: knn_forward reads the NaN/Inf check and fp32's range window (float64 input
# is selected in fp32) at its one host sync.
knn_triton = define_knn_op(
    "triton", lambda x, ref, k, off, excl: knn_fwd.knn_forward(x, ref, k, off, excl), knn_backward_triton,
    checks_input=True,
)

# Under TRITON_INTERPRET=1 the kernels run on CPU tensors (slow: tests only).
_DEVICES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
BACKENDS = (Backend("triton", _DEVICES, lambda: torch.ops.ldreg.knn_triton, "knn_backward_triton"),)
