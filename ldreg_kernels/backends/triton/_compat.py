"""Compatibility shim for the Triton interpreter (TRITON_INTERPRET=1) with NumPy >= 2.4.

The interpreter stores kernel scalars as 1-element NumPy arrays and implements
``tensor.__index__`` as ``int(array)``; NumPy 2.4 made ``int()`` of an ndim > 0 array a
TypeError, so ``for i in range(0, N, BLOCK)`` with a runtime ``N`` fails under the
interpreter. This wraps the interpreter's tensor patching to index through ``.item()``.
It is applied only under the interpreter, only when the bug is present, and only changes
that one attribute for the duration of a kernel call (the interpreter's own patch scope
restores it).
"""

from __future__ import annotations

import os

import numpy as np


def _needs_fix() -> bool:
    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def apply() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" or not _needs_fix():
        return
    try:
        from triton.runtime import interpreter as _interp
    except ImportError:
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_ldreg_fixed", False):
        return

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    _patch_lang_tensor._ldreg_fixed = True
    _interp._patch_lang_tensor = _patch_lang_tensor
