"""Public functions: knn, lid, ldreg_loss.

Each validates its arguments (clear TypeError/ValueError naming the argument), resolves the
backend once (``registry.resolve_backend``) and calls the backend's custom op, so the same code
path serves eager mode and torch.compile.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

from torch import Tensor

from . import _validate as V
from .distributed import resolve_global_ref
from .estimators import lid_from_distances, regularizer
from .registry import resolve_backend

DEFAULT_EPS = 1e-12

# A reference set: a tensor, None (the batch itself, detached), or "global" / "global_grad"
# (the batch gathered from every rank under torch.distributed; see ldreg_kernels.distributed).
RefLike = Union[Tensor, str, None]


def _global_ref(
    x: Tensor, ref: str, k: int, self_offset: int, backend: str, *checks: Callable[[], None]
) -> tuple[Optional[Tensor], int]:
    """Resolve ref="global"/"global_grad" to (tensor or None, self_offset).

    The local checks run inside the ranks' metadata exchange, so that an argument one rank
    rejects raises on every rank instead of leaving the others waiting in a collective.
    """
    V.check_global_ref(ref)

    def check() -> None:
        V.check_features(x, "x")
        V.check_global_args(k, self_offset, ref)
        for c in checks:
            c()
        resolve_backend(backend, x.device)

    return resolve_global_ref(x, ref, k, check)


def knn(
    x: Tensor,
    ref: RefLike = None,
    k: int = 64,
    *,
    exclude_self: Optional[bool] = None,
    self_offset: int = 0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """k nearest neighbours of each row of ``x`` among the rows of ``ref`` (Euclidean).

    Args:
        x: queries, (B, D), floating point.
        ref: reference set, (N, D), same dtype and device. ``None`` means ``x.detach()``.
            ``"global"``: under torch.distributed, the batches of all ranks gathered
            (detached; self excluded at this rank's offset; indices are rows of the
            gathered batch); ``"global_grad"``: the same, with gradient flowing back
            through the gather to the rank owning each row. Collective: every rank must
            call it with the same D, k and dtype (else ValueError on every rank). Without
            a process group they mean ``None`` and ``x`` (not detached).
        k: neighbours per query; 1 <= k <= N - 1 with ``exclude_self`` (else <= N). Any
            integer with ``__index__`` (a numpy or 0-d tensor integer) is accepted.
        exclude_self: drop reference row ``i + self_offset`` for query ``i``, by index:
            a duplicate of the query stays a valid neighbour at distance 0. Default
            (None): True when ``ref`` is None or "global"/"global_grad" (the reference
            holds the queries), False for a tensor ``ref`` such as a memory bank. (Before
            0.2.0 it was always True, which silently dropped bank row i for query i.)
        self_offset: row of ``ref`` holding query 0 (a gathered global batch: rank * B);
            only with ``exclude_self=True``.
        backend: "auto", "reference", "torch", or a compiled backend; see
            ``available_backends()``.

    Returns:
        ``(dist, idx)``, each (B, k), ascending, ties to the lower index. ``dist`` holds
        exact distances (direct differences) in float32 (float64 for float64 input) and is
        differentiable to ``x``, and to ``ref`` when it requires grad; ``idx`` is int64.

    Raises:
        TypeError, ValueError: bad arguments, or NaN/Inf in ``x`` or ``ref``.
    """
    k, self_offset = V.as_int(k, "k"), V.as_int(self_offset, "self_offset")
    exclude_self = V.resolve_exclude_self(exclude_self, ref, self_offset)
    if isinstance(ref, str):
        ref, self_offset = _global_ref(x, ref, k, self_offset, backend)
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
    ref: RefLike = None,
    k: int = 64,
    *,
    estimator: str = "mom",
    eps: float = DEFAULT_EPS,
    exclude_self: Optional[bool] = None,
    self_offset: int = 0,
    backend: str = "auto",
) -> Tensor:
    """Local intrinsic dimensionality of each row of ``x`` from its k nearest neighbours.

    Args:
        x, ref, k, exclude_self, self_offset, backend: as in :func:`knn`; k >= 2.
        estimator: "mom" (method of moments, the paper's Algorithm 1:
            ``m / (w - m)``, m the mean of the first k-1 distances, w the k-th) or "mle"
            (Levina-Bickel: ``-k / sum_j ln(r_j / w)``).
        eps: relative floor, in (0, 1), that keeps degenerate neighbourhoods finite
            (equidistant or zero distances): a fraction of each row's k-th distance, so
            LID stays scale-free; see ``ldreg_kernels.estimators``.

    Returns:
        (B,) LID, float32 (float64 for float64 input), differentiable like :func:`knn`.
    """
    k, self_offset, eps = V.as_int(k, "k"), V.as_int(self_offset, "self_offset"), V.as_real(eps, "eps")
    exclude_self = V.resolve_exclude_self(exclude_self, ref, self_offset)
    if isinstance(ref, str):
        ref, self_offset = _global_ref(
            x, ref, k, self_offset, backend, lambda: V.check_lid_args(k, estimator, eps)
        )
    V.check_lid_args(k, estimator, eps)
    dist, _ = knn(x, ref, k, exclude_self=exclude_self, self_offset=self_offset, backend=backend)
    return lid_from_distances(dist, estimator, eps)


def ldreg_loss(
    x: Tensor,
    ref: RefLike = None,
    k: int = 64,
    beta: float = 0.01,
    *,
    reg: str = "l1",
    estimator: str = "mom",
    eps: float = DEFAULT_EPS,
    exclude_self: Optional[bool] = None,
    self_offset: int = 0,
    backend: str = "auto",
) -> Tensor:
    """The LDReg regulariser, to be added to an SSL loss.

    "l1" (paper Eq. 1): ``-beta * mean_i ln LID_i``; "l2" (Eq. 3):
    ``-beta * sqrt(mean_i (ln LID_i)^2)``. Minimising it raises the LIDs.
    Published settings: k=64, beta=0.01 (SimCLR) / 0.005 (BYOL), on the encoder output.

    With ``ref="global"`` each rank's loss averages over its own queries against the
    gathered global batch; DDP's gradient averaging then gives exactly the single-process
    gradient over the concatenated batch ("l1", equal per-rank batches). With
    ``ref="global_grad"`` the gradient also flows through the gathered reference (every
    rank must run the backward: it all-reduces).

    Args:
        x, ref, k, estimator, eps, exclude_self, self_offset, backend: as in :func:`lid`.
        beta: regularisation strength.
        reg: "l1" or "l2".

    Returns:
        Scalar tensor (float32, float64 for float64 input).
    """
    k, self_offset = V.as_int(k, "k"), V.as_int(self_offset, "self_offset")
    eps, beta = V.as_real(eps, "eps"), V.as_real(beta, "beta")
    exclude_self = V.resolve_exclude_self(exclude_self, ref, self_offset)
    if isinstance(ref, str):
        ref, self_offset = _global_ref(
            x, ref, k, self_offset, backend,
            lambda: V.check_lid_args(k, estimator, eps), lambda: V.check_reg_args(beta, reg),
        )
    V.check_reg_args(beta, reg)
    lids = lid(
        x, ref, k, estimator=estimator, eps=eps, exclude_self=exclude_self,
        self_offset=self_offset, backend=backend,
    )
    return regularizer(lids, float(beta), reg)
