"""Argument checks shared by the public API and every backend.

Shape, dtype and device checks are static, so they run in the Python wrapper (and under
torch.compile without graph breaks). The NaN/Inf check reads the data, so it runs inside
the custom ops' eager implementations (``_host.range_scale``, ``range_scale`` in C++).
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

ESTIMATORS = ("mom", "mle")
REGS = ("l1", "l2")


def as_int(v: object, name: str) -> int:
    """``v`` as a Python int: anything with ``__index__`` (numpy and 0-d integer tensor
    scalars included) except bool, else TypeError naming ``name``."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got bool")
    if isinstance(v, int):  # the common case first: plain isinstance checks trace under torch.compile
        return int(v)
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None


def as_real(v: object, name: str) -> float:
    """``v`` as a Python float: an int or float, a numpy scalar, or a one-element real
    tensor (read once, a device sync on GPU), except bool, else TypeError naming ``name``.
    Finiteness is the caller's check.

    Written with ``isinstance`` and ``float()`` only: torch.compile cannot trace
    ``hasattr`` on an arbitrary object (``Unsupported hasattr call``), and plain ints and
    floats, the arguments a compiled call passes, take the first branch.
    """
    if isinstance(v, (bool, str, bytes, complex)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, Tensor):
        if v.numel() != 1 or v.is_complex() or v.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
        if v.requires_grad:
            raise TypeError(f"{name} must not require grad (it is read as a number)")
        return float(v.item())
    try:  # numpy scalars and anything else with __float__ (or __index__)
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}") from None


def check_features(t: object, name: str) -> None:
    """A 2-D, non-empty, dense floating-point tensor, else TypeError/ValueError naming ``name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; pass {name}.to_dense()")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), "
            f"got {t.dtype}"
        )
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")


def check_pair(x: Tensor, ref: Tensor) -> None:
    """x and ref agree in feature dim, device and dtype."""
    if x.shape[1] != ref.shape[1]:
        raise ValueError(
            f"x and ref must have the same feature dimension: x has D={x.shape[1]}, "
            f"ref has D={ref.shape[1]}"
        )
    if x.device != ref.device:
        raise ValueError(f"x and ref must be on the same device: x on {x.device}, ref on {ref.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"x and ref must have the same dtype: x is {x.dtype}, ref is {ref.dtype}")


def check_global_ref(ref: str) -> None:
    """A string ``ref`` names a gathered global batch."""
    if ref not in ("global", "global_grad"):
        raise ValueError(f"ref must be a tensor, None, 'global' or 'global_grad', got {ref!r}")


def check_global_args(k: object, self_offset: object, ref: str) -> None:
    """k is an int; self_offset is left at 0 (the rank's offset in the gathered batch is computed)."""
    as_int(k, "k")
    if as_int(self_offset, "self_offset") != 0:
        raise ValueError(
            f"self_offset must be 0 with ref={ref!r} (this rank's offset in the gathered batch is "
            f"computed), got {self_offset!r}"
        )


def resolve_exclude_self(exclude_self: object, ref: object, self_offset: object) -> bool:
    """The default ``exclude_self``: True when ``ref`` holds the queries (None, "global").

    A ``self_offset`` without exclusion is refused rather than ignored: before 0.2.0 a tensor
    ``ref`` excluded by default, and code that passed an offset relied on it.
    """
    if exclude_self is None:
        exclude_self = ref is None or isinstance(ref, str)
        if not exclude_self and self_offset != 0:
            raise ValueError(
                f"self_offset={self_offset!r} needs exclude_self=True: with a tensor ref, exclude_self "
                "defaults to False since 0.2.0 (a memory bank does not hold the queries)"
            )
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool or None, got {type(exclude_self).__name__}")
    return exclude_self


def check_k(k: int, n_ref: int, n_query: int, exclude_self: bool, self_offset: int) -> None:
    """k in [1, N - 1] with self excluded (else [1, N]); queries fit inside ref at self_offset.
    ``k`` and ``self_offset`` are ints already (:func:`as_int`)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if exclude_self:
        if self_offset < 0 or self_offset + n_query > n_ref:
            raise ValueError(
                f"self_offset={self_offset} puts the {n_query} queries outside ref's {n_ref} rows "
                f"(need 0 <= self_offset <= N - B = {n_ref - n_query}); pass exclude_self=False "
                "if ref does not contain the queries"
            )
        if k > n_ref - 1:
            raise ValueError(
                f"k={k} exceeds the N - 1 = {n_ref - 1} reference rows left after excluding self"
            )
    elif k > n_ref:
        raise ValueError(f"k={k} exceeds the N = {n_ref} reference rows")


def check_lid_args(k: int, estimator: object, eps: float) -> None:
    """An estimator name, k >= 2 (one neighbour gives no LID), and 0 < eps < 1 (``eps`` is
    a fraction of each row's k-th distance; see ``ldreg_kernels.estimators``).
    ``k`` and ``eps`` are numbers already (:func:`as_int`, :func:`as_real`)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if k < 2:
        raise ValueError(f"k must be >= 2 to estimate LID, got k={k}")
    if not 0 < eps < 1:
        raise ValueError(
            f"eps must be in (0, 1), a fraction of each row's k-th neighbour distance, got {eps!r}"
        )


def check_reg_args(beta: float, reg: object) -> None:
    """A finite beta (a number already, :func:`as_real`) and a regulariser name."""
    # A comparison, not math.isfinite: under torch.compile(dynamic=True) a module's float
    # attribute can arrive as a SymFloat, which math.isfinite cannot trace. NaN fails it too.
    if not abs(beta) < math.inf:
        raise ValueError(f"beta must be finite, got {beta!r}")
    if reg not in REGS:
        raise ValueError(f"reg must be one of {REGS}, got {reg!r}")
