"""Argument checks shared by the public API and every backend.

Shape, dtype and device checks are static, so they run in the Python wrapper (and under
torch.compile without graph breaks). The NaN/Inf check reads the data, so it runs inside
the custom ops' eager implementations (``_host.range_scale``, ``range_scale`` in C++).
"""

from __future__ import annotations

import math
import operator
from typing import Optional

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


# The smallest eps the estimators keep finite, per compute dtype: the square root of the
# dtype's smallest normal number (2**-63 ~ 1.08e-19 in float32, 2**-511 ~ 1.49e-154 in
# float64). Then the floored values (eps itself, 1 / eps, k / eps) are normal numbers and
# the largest intermediate of the gradient, 1 / eps**2 (the derivative of 1 / s at the
# floor), is at most 1 / tiny: forward and gradient stay finite for every neighbourhood of
# rows at a representable scale. Below it, float32 gave Inf, -Inf, NaN or LID 0 (issue #24).
EPS_MIN = {torch.float32: 2.0**-63, torch.float64: 2.0**-511}
# (exact, round value just above it) for the error message
_EPS_MIN_TEXT = {torch.float32: ("2**-63 (about 1.084e-19)", "1.1e-19"),
                 torch.float64: ("2**-511 (about 1.492e-154)", "1.5e-154")}


def floating_dtype(x: object) -> Optional[torch.dtype]:
    """``x``'s dtype if it is a floating-point tensor, else None (:func:`check_features`
    refuses it); what :func:`check_lid_args` takes as ``dtype``."""
    return x.dtype if isinstance(x, Tensor) and x.is_floating_point() else None


def check_lid_args(k: int, estimator: object, eps: float, dtype: Optional[torch.dtype] = None) -> None:
    """An estimator name, k >= 2 (one neighbour gives no LID), and 0 < eps < 1 (``eps`` is
    a fraction of each row's k-th distance; see ``ldreg_kernels.estimators``); with the
    features' ``dtype`` known, also eps >= the ``EPS_MIN`` of the dtype LID is computed in
    (float64 for float64, else float32: half and bfloat16 are computed in float32).
    ``k`` and ``eps`` are numbers already (:func:`as_int`, :func:`as_real`)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if k < 2:
        raise ValueError(f"k must be >= 2 to estimate LID, got k={k}")
    if not 0 < eps < 1:
        raise ValueError(
            f"eps must be in (0, 1), a fraction of each row's k-th neighbour distance, got {eps!r}"
        )
    if dtype is not None:
        check_eps_for(eps, dtype)


def check_eps_for(eps: float, dtype: torch.dtype) -> None:
    """eps >= ``EPS_MIN`` of the dtype LID is computed in for features of ``dtype``
    (float64 for float64, else float32), else ValueError."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    if eps < EPS_MIN[ct]:
        name = str(ct).replace("torch.", "")
        via = "" if dtype in (torch.float32, torch.float64) else f" ({str(dtype).replace('torch.', '')} is computed in float32)"
        alt = "" if ct == torch.float64 else f", or float64 features (eps >= {_EPS_MIN_TEXT[torch.float64][1]})"
        raise ValueError(
            f"eps={eps!r} is below {_EPS_MIN_TEXT[ct][0]}, the smallest eps whose LID and gradient stay finite in "
            f"{name}{via}: pass eps >= {_EPS_MIN_TEXT[ct][1]}{alt}"
        )


def check_reg_args(beta: float, reg: object) -> None:
    """A finite beta (a number already, :func:`as_real`) and a regulariser name."""
    # A comparison, not math.isfinite: under torch.compile(dynamic=True) a module's float
    # attribute can arrive as a SymFloat, which math.isfinite cannot trace. NaN fails it too.
    if not abs(beta) < math.inf:
        raise ValueError(f"beta must be finite, got {beta!r}")
    if reg not in REGS:
        raise ValueError(f"reg must be one of {REGS}, got {reg!r}")
