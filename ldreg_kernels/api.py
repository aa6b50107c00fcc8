"""Public functions: knn, lid, ldreg_loss.

Each validates its arguments (clear TypeError/ValueError naming the argument), resolves the
backend once (``ops.resolve_backend``) and calls the backend's custom op, so the same code
path serves eager mode and torch.compile.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import _validate as V
from .estimators import lid_from_distances, regularizer
from .ops import resolve_backend

DEFAULT_EPS = 1e-12


def knn(
    x: Tensor,
    ref: Optional[Tensor] = None,
    k: int = 64,
    *,
    exclude_self: bool = True,
    self_offset: int = 0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """k nearest neighbours of each row of ``x`` among the rows of ``ref`` (Euclidean).

    Args:
        x: queries, (B, D), floating point.
        ref: reference set, (N, D), same dtype and device. ``None`` means ``x.detach()``.
        k: neighbours per query; 1 <= k <= N - 1 with ``exclude_self`` (else <= N).
        exclude_self: drop reference row ``i + self_offset`` for query ``i``, by index:
            a duplicate of the query stays a valid neighbour at distance 0. Pass False when
            ``ref`` does not contain the queries (e.g. a memory bank).
        self_offset: row of ``ref`` holding query 0 (a gathered global batch: rank * B).
        backend: "auto", "reference", "torch", or a compiled backend; see
            ``available_backends()``.

    Returns:
        ``(dist, idx)``, each (B, k), ascending, ties to the lower index. ``dist`` holds
        exact distances (direct differences) in float32 (float64 for float64 input) and is
        differentiable to ``x``, and to ``ref`` when it requires grad; ``idx`` is int64.

    Raises:
        TypeError, ValueError: bad arguments, or NaN/Inf in ``x`` or ``ref``.
    """
    V.check_features(x, "x")
    if ref is None:
        ref = x.detach()
    else:
        V.check_features(ref, "ref")
        V.check_pair(x, ref)
    V.check_k(k, ref.shape[0], x.shape[0], exclude_self, self_offset)
    op = resolve_backend(backend, x.device)
    return op(x, ref, k, self_offset, bool(exclude_self))


def lid(
    x: Tensor,
    ref: Optional[Tensor] = None,
    k: int = 64,
    *,
    estimator: str = "mom",
    eps: float = DEFAULT_EPS,
    exclude_self: bool = True,
    self_offset: int = 0,
    backend: str = "auto",
) -> Tensor:
    """Local intrinsic dimensionality of each row of ``x`` from its k nearest neighbours.

    Args:
        x, ref, k, exclude_self, self_offset, backend: as in :func:`knn`; k >= 2.
        estimator: "mom" (method of moments, the paper's Algorithm 1:
            ``m / (w - m)``, m the mean of the first k-1 distances, w the k-th) or "mle"
            (Levina-Bickel: ``-k / sum_j ln(r_j / w)``).
        eps: floor that keeps degenerate neighbourhoods finite (equidistant or zero
            distances); see ``ldreg_kernels.estimators``.

    Returns:
        (B,) LID, float32 (float64 for float64 input), differentiable like :func:`knn`.
    """
    V.check_lid_args(k, estimator, eps)
    dist, _ = knn(x, ref, k, exclude_self=exclude_self, self_offset=self_offset, backend=backend)
    return lid_from_distances(dist, estimator, eps)


def ldreg_loss(
    x: Tensor,
    ref: Optional[Tensor] = None,
    k: int = 64,
    beta: float = 0.01,
    *,
    reg: str = "l1",
    estimator: str = "mom",
    eps: float = DEFAULT_EPS,
    exclude_self: bool = True,
    self_offset: int = 0,
    backend: str = "auto",
) -> Tensor:
    """The LDReg regulariser, to be added to an SSL loss.

    "l1" (paper Eq. 1): ``-beta * mean_i ln LID_i``; "l2" (Eq. 3):
    ``-beta * sqrt(mean_i (ln LID_i)^2)``. Minimising it raises the LIDs.
    Published settings: k=64, beta=0.01 (SimCLR) / 0.005 (BYOL), on the encoder output.

    Args:
        x, ref, k, estimator, eps, exclude_self, self_offset, backend: as in :func:`lid`.
        beta: regularisation strength.
        reg: "l1" or "l2".

    Returns:
        Scalar tensor (float32, float64 for float64 input).
    """
    V.check_reg_args(beta, reg)
    lids = lid(
        x, ref, k, estimator=estimator, eps=eps, exclude_self=exclude_self,
        self_offset=self_offset, backend=backend,
    )
    return regularizer(lids, float(beta), reg)
