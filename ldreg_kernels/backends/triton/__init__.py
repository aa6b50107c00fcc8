"""Triton backend: fused distance + streaming top-k forward, exact re-rank, and kernels for
the backward and the LID epilogue.

Importing this module defines the op ``ldreg::knn_triton`` (schema in ``ops.py``) through
``ops.define_knn_op``, which adds the shared fake kernel, autograd (``ldreg::knn_backward``)
and NaN/Inf check. It imports without a GPU; the kernels then run only under
``TRITON_INTERPRET=1`` (CPU tensors, slow: tests).

The selection precision ("ieee", "tf32", "tf32x3", "bf16") is a module-level setting, since
the op schema is fixed: ``set_precision``, ``selection_precision`` (context manager), or the
environment variable ``LDREG_TRITON_PRECISION`` at import. Returned distances are exact
whatever the setting.
"""

from __future__ import annotations

import triton  # noqa: F401  (ImportError here tells ops.py the backend is unavailable)

from ..ops import define_knn_op
from . import _compat

_compat.apply()

from .knn_bwd import knn_backward
from .knn_fwd import (
    MAX_KP,
    PRECISIONS,
    get_precision,
    knn_forward,
    select_candidates,
    selection_precision,
    set_precision,
)
from .lid_epilogue import lid_from_distances

__all__ = [
    "MAX_KP",
    "PRECISIONS",
    "get_precision",
    "set_precision",
    "selection_precision",
    "knn_forward",
    "select_candidates",
    "knn_backward",
    "lid_from_distances",
    "knn_triton",
]


def _forward(x, ref, k, self_offset, exclude_self):
    return knn_forward(x, ref, k, self_offset, exclude_self)


knn_triton = define_knn_op("triton", _forward)
