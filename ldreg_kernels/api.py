"""Public functions: knn, lid, ldreg_loss.

Each validates its arguments (clear TypeError/ValueError naming the argument), resolves the
backend once (``registry.resolve_backend``) and calls the backend's custom op, so the same code
path serves eager mode and torch.compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional, Union

import torch
import torch.distributed as tdist
from torch import Tensor

from . import _validate as V
from .distributed import resolve_global_ref
from ._op import backward_of
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


class _Call(NamedTuple):
    """A validated kNN call: the op and its arguments (``ref`` resolved to a tensor)."""

    op: Callable[..., tuple[Tensor, Tensor]]
    ref: Tensor
    k: int
    self_offset: int
    exclude_self: bool


def _prepare(
    x: Tensor, ref: RefLike, k: object, exclude_self: Optional[bool], self_offset: object, backend: str,
    *checks: Callable[[], None],
) -> _Call:
    """Validate a kNN call (``checks`` run with the local ones, inside a global ref's
    metadata exchange) and resolve its reference and backend."""
    k, self_offset = V.as_int(k, "k"), V.as_int(self_offset, "self_offset")
    exclude_self = V.resolve_exclude_self(exclude_self, ref, self_offset)
    if isinstance(ref, str):  # the checks run inside the ranks' metadata exchange
        ref, self_offset = _global_ref(x, ref, k, self_offset, backend, *checks)
    else:
        for c in checks:
            c()
    V.check_features(x, "x")
    if ref is None:
        ref = x.detach()
    else:
        V.check_features(ref, "ref")
        V.check_pair(x, ref)
    V.check_k(k, ref.shape[0], x.shape[0], exclude_self, self_offset)
    return _Call(resolve_backend(backend, x.device), ref, k, self_offset, exclude_self)


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
    call = _prepare(x, ref, k, exclude_self, self_offset, backend)
    return call.op(x, call.ref, call.k, call.self_offset, call.exclude_self)


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
            (Amsaleg et al.'s form, as the official code: ``-k / sum_j ln(r_j / w)``;
            Levina-Bickel's has k - 1 in the numerator).
        eps: relative floor, in (0, 1), that keeps degenerate neighbourhoods finite
            (equidistant or zero distances): a fraction of each row's k-th distance, so
            LID stays scale-free; see ``ldreg_kernels.estimators``. At least 2**-63
            (~1.08e-19) for float32, float16 and bfloat16 features, 2**-511 (~1.49e-154)
            for float64: a smaller one raises ValueError (LID or its gradient would leave
            the dtype's range).

    Returns:
        (B,) LID, float32 (float64 for float64 input), differentiable like :func:`knn`.
    """
    k, self_offset, eps = V.as_int(k, "k"), V.as_int(self_offset, "self_offset"), V.as_real(eps, "eps")
    exclude_self = V.resolve_exclude_self(exclude_self, ref, self_offset)
    if isinstance(ref, str):
        ref, self_offset = _global_ref(
            x, ref, k, self_offset, backend, lambda: V.check_lid_args(k, estimator, eps, V.floating_dtype(x))
        )
    V.check_lid_args(k, estimator, eps, V.floating_dtype(x))
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
            lambda: V.check_lid_args(k, estimator, eps, V.floating_dtype(x)), lambda: V.check_reg_args(beta, reg),
        )
    V.check_reg_args(beta, reg)
    lids = lid(
        x, ref, k, estimator=estimator, eps=eps, exclude_self=exclude_self,
        self_offset=self_offset, backend=backend,
    )
    return regularizer(lids, float(beta), reg)


@dataclass(frozen=True)
class LidStats:
    """Per-sample LIDs from one kNN search, keyed ``(estimator, k)``; detached.

    ``gm()`` gives their geometric means as 0-d tensors (no device sync); ``to_dict()`` gives
    floats named like ``"lid_mle_k32"`` for a logger (one sync for all of them).
    """

    lids: dict[tuple[str, int], Tensor]

    def gm(self) -> dict[tuple[str, int], Tensor]:
        """exp(mean ln LID) per key, accumulated in float64."""
        return {key: torch.log(v.double()).mean().exp() for key, v in self.lids.items()}

    def to_dict(self, prefix: str = "lid") -> dict[str, float]:
        """``{f"{prefix}_{estimator}_k{k}": geometric mean}`` as Python floats."""
        gm = self.gm()
        if not gm:
            return {}
        values = torch.stack(list(gm.values())).tolist()
        return {f"{prefix}_{est}_k{k}": v for (est, k), v in zip(gm, values)}


def _check_stats_args(ks: object, estimators: object) -> tuple[tuple[int, ...], tuple[str, ...]]:
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
        raise TypeError(f"ks must be a sequence of ints, got {type(ks).__name__}")
    ks = tuple(sorted({V.as_int(k, "ks[i]") for k in ks}))
    if isinstance(estimators, str) or not isinstance(estimators, Iterable):
        raise TypeError(f"estimators must be a sequence of estimator names, got {type(estimators).__name__}")
    estimators = tuple(dict.fromkeys(estimators))
    if not ks or not estimators:
        raise ValueError("ks and estimators must each name at least one value")
    for est in estimators:
        if est not in V.ESTIMATORS:
            raise ValueError(f"estimators must be drawn from {V.ESTIMATORS}, got {est!r}")
    if ks[0] < 2:
        raise ValueError(f"every k in ks must be >= 2 to estimate LID, got {ks[0]}")
    return ks, estimators


def _stats(dist: Tensor, ks: Iterable[int], estimators: Iterable[str], eps: float) -> LidStats:
    """LIDs from the first k columns of one ascending (B, K) distance matrix, for each k <= K:
    the k nearest are the first k columns of the K nearest, ties included."""
    dist = dist.detach()
    return LidStats({(est, k): lid_from_distances(dist[:, :k], est, eps)
                     for est in estimators for k in ks if k <= dist.shape[1]})


@torch.no_grad()
def lid_stats(
    x: Tensor,
    ref: RefLike = None,
    ks: Iterable[int] = (32, 512),
    estimators: Iterable[str] = ("mle", "mom"),
    *,
    eps: float = DEFAULT_EPS,
    exclude_self: Optional[bool] = None,
    self_offset: int = 0,
    backend: str = "auto",
) -> LidStats:
    """LID of each row of ``x`` at several k and estimators, from one kNN search at max(ks).

    The official LDReg code tracks MLE LID at k=32 and k=512 on every step with a full
    ``cdist`` + ``sort`` each; this costs one kNN. Equal to separate :func:`lid` calls (the
    same exact distances). No gradient.

    Args:
        x, ref, exclude_self, self_offset, backend, eps: as in :func:`lid`.
        ks: neighbour counts, each >= 2 and within the reference (max(ks) <= N - 1 with
            self excluded, else <= N).
        estimators: names from ("mom", "mle").

    Returns:
        :class:`LidStats` with a (B,) tensor per (estimator, k).
    """
    ks, estimators = _check_stats_args(ks, estimators)
    eps = V.as_real(eps, "eps")
    call = _prepare(x, ref, ks[-1], exclude_self, self_offset, backend,
                    lambda: V.check_lid_args(ks[0], estimators[0], eps, V.floating_dtype(x)))
    dist, _ = call.op(x, call.ref, call.k, call.self_offset, call.exclude_self)
    return _stats(dist, ks, estimators, eps)


class _FirstColumns(torch.autograd.Function):
    """The first k columns of a kNN computed without grad, differentiable through the
    backend's own backward op on those k columns only (not all K)."""

    @staticmethod
    def forward(ctx, x: Tensor, ref: Tensor, dist: Tensor, idx: Tensor, backward) -> Tensor:
        ctx.backward = backward
        ctx.save_for_backward(x, ref, idx, dist)
        return dist.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, ref, idx, dist = ctx.saved_tensors
        need_x, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gref = ctx.backward(grad.contiguous(), x, ref, idx, dist, need_ref)
        return (gx if need_x else None), (gref if need_ref else None), None, None, None


def ldreg_loss_with_stats(
    x: Tensor,
    ref: RefLike = None,
    k: int = 64,
    beta: float = 0.01,
    *,
    ks: Iterable[int] = (32, 512),
    estimators: Iterable[str] = ("mle",),
    reg: str = "l1",
    estimator: str = "mom",
    eps: float = DEFAULT_EPS,
    exclude_self: Optional[bool] = None,
    self_offset: int = 0,
    backend: str = "auto",
) -> tuple[Tensor, LidStats]:
    """:func:`ldreg_loss` plus LID monitoring at ``ks`` from the same kNN search.

    One search at K = max(k, max(ks)). The loss's gradient flows through the first k
    columns only, by the backend's backward op, so the backward costs what a k search's
    does. A k in ``ks`` that the reference cannot supply (a small last batch) is left out of
    that call's stats rather than failing the training step.

    Returns:
        (loss, :class:`LidStats`); the stats are detached.
    """
    ks, estimators = _check_stats_args(ks, estimators)
    k, beta, eps = V.as_int(k, "k"), V.as_real(beta, "beta"), V.as_real(eps, "eps")
    # The LID and loss arguments are checked by _prepare, inside the metadata exchange for a
    # global ref: a check that raised here on one rank would leave the others in a collective.
    excl = V.resolve_exclude_self(exclude_self, ref, V.as_int(self_offset, "self_offset"))
    if isinstance(ref, str):  # the gathered batch: every rank's B is the same (checked)
        n_ref = x.shape[0] * (tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1)
    else:
        n_ref = x.shape[0] if ref is None else ref.shape[0]
    big = max([k] + [m for m in ks if m <= n_ref - int(excl)])
    call = _prepare(x, ref, big, exclude_self, self_offset, backend,
                    lambda: V.check_lid_args(k, estimator, eps, V.floating_dtype(x)), lambda: V.check_reg_args(beta, reg))
    args = (x, call.ref, call.k, call.self_offset, call.exclude_self)
    if big == k or not torch.is_grad_enabled():
        dist, _ = call.op(*args)
        dk = dist[:, :k]
    else:
        with torch.no_grad():
            dist, idx = call.op(*args)
        dk = _FirstColumns.apply(x, call.ref, dist[:, :k].contiguous(), idx[:, :k].contiguous(), backward_of(call.op))
    loss = regularizer(lid_from_distances(dk, estimator, eps), beta, reg)
    return loss, _stats(dist, ks, estimators, eps)
