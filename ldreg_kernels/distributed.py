"""Global-batch reference under torch.distributed: gather with exact gradients.

The paper computes LID against the global batch gathered across ranks. ``ref="global"`` in
:func:`ldreg_kernels.knn` / ``lid`` / ``ldreg_loss`` / ``LDReg`` matches this rank's rows
against the rows of every rank (self excluded at this rank's offset); ``ref="global_grad"``
also lets the gradient through the reference flow back to the rank that owns each row.

Every call is collective: each rank must make it, in the same order, with the same D, k,
dtype and mode. Before moving any data the ranks exchange a small int64 metadata row, so a
mismatch (or a rank whose own arguments are invalid) raises ``ValueError`` on every rank
instead of hanging in a collective that the peers never join. Per-rank batch sizes may
differ. Works with gloo (CPU) and NCCL (CUDA); no backend-specific calls on the data.

Without an initialised process group (or with world size 1) ``"global"`` is ``ref=None``
(the batch itself, detached) and ``"global_grad"`` is ``ref=x`` (not detached).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _validate as V

__all__ = ["GLOBAL_REFS", "is_distributed", "gather_with_grad", "global_reference"]

# ref= strings: the gathered batch, detached ("global") or carrying gradient ("global_grad").
GLOBAL_REFS = ("global", "global_grad")
_MODE = {"global": 1, "global_grad": 2}
_DTYPE_CODE = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}


def is_distributed() -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _meta_device(x: object) -> torch.device:
    # NCCL moves CUDA tensors only; every other backend (gloo, "cpu:gloo,cuda:nccl") takes CPU ones.
    if dist.get_backend() != "nccl":
        return torch.device("cpu")
    if isinstance(x, Tensor) and x.is_cuda:
        return x.device
    return torch.device("cuda", torch.cuda.current_device())


def _describe(col: int, value: int) -> str:
    if col == 4:
        return str(_CODE_DTYPE.get(value, "non-float"))
    if col == 5:
        return {1: "'global'", 2: "'global_grad'"}.get(value, str(value))
    return str(value)


_COLUMNS = ((2, "feature dimension D"), (3, "k"), (4, "dtype"), (5, "ref mode"))


def _exchange(x: Tensor, k: int, mode: int, check: Callable[[], None], what: str) -> list[int]:
    """All-gather [failed, B, D, k, dtype, mode] and check the ranks agree; the per-rank B.

    ``check`` runs this rank's own argument checks. Its error is raised only after the
    exchange, so that the peers learn of it and raise too rather than wait forever.
    ``what`` names the call in the error messages.
    """
    err: Optional[BaseException] = None
    try:
        check()
        row = [0, x.shape[0], x.shape[1], k, _DTYPE_CODE.get(x.dtype, 0), mode]
    except Exception as e:  # re-raised below, after the peers have been told
        err, row = e, [1, -1, -1, -1, -1, mode]
    t = torch.tensor(row, dtype=torch.int64, device=_meta_device(x))
    rows = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, t)
    table = torch.stack(rows).tolist()
    if err is not None:
        raise err
    failed = [r for r, row in enumerate(table) if row[0]]
    if failed:
        raise ValueError(
            f"{what}: rank(s) {failed} rejected their arguments (the error is raised there); "
            "every rank must make the same call with valid arguments"
        )
    for col, name in _COLUMNS:
        vals = [row[col] for row in table]
        if len(set(vals)) > 1:
            shown = ", ".join(f"rank {r}: {_describe(col, v)}" for r, v in enumerate(vals))
            raise ValueError(f"{what} needs the same {name} on every rank, got {shown}")
    return [row[1] for row in table]


def _all_gather_rows(x: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate every rank's rows (rank order); unequal row counts are padded for the collective."""
    m = max(sizes)
    xp = x.contiguous()
    if xp.shape[0] < m:
        xp = torch.cat([xp, xp.new_zeros(m - xp.shape[0], xp.shape[1])])
    bufs = [torch.empty_like(xp) for _ in sizes]
    dist.all_gather(bufs, xp)
    return torch.cat([b[:s] for b, s in zip(bufs, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the gradient over ranks and keeps this rank's rows.

    Rank r's loss L_r sees every rank's rows through the gathered tensor, so
    d(sum_r L_r)/dx_q = sum_r dL_r/dgathered[rows of q]: an all-reduce, then a slice
    (VICReg's FullGatherLayer, generalised to unequal batches).
    """

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        return _all_gather_rows(x, list(sizes))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()  # all_reduce is in place; the incoming buffer may be shared
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        rank = dist.get_rank()
        start = sum(ctx.sizes[:rank])
        return grad[start : start + ctx.sizes[rank]], None


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` (B_r, D) from every rank into (sum_r B_r, D), differentiably.

    The backward all-reduces (sums) the incoming gradient and returns this rank's rows, so
    the gradient reaching ``x`` on rank r is d(sum over ranks of the losses)/dx_r. DDP then
    averages parameter gradients over ranks, which is the gradient of the mean loss. Every
    rank must run the backward (it is a collective). Identity when not distributed.

    Args:
        x: (B_r, D) floating point; B_r may differ across ranks, D and dtype may not.

    Returns:
        (sum_r B_r, D), rank 0's rows first.

    Raises:
        ValueError: on every rank, when the ranks disagree on D or dtype.
    """
    if not is_distributed():
        return x
    sizes = _exchange(x, -1, _MODE["global_grad"], lambda: V.check_features(x, "x"), "gather_with_grad")
    return _GatherWithGrad.apply(x, tuple(sizes))


def _gather(x: Tensor, ref: str, k: int, check: Callable[[], None], what: str) -> tuple[Tensor, int]:
    sizes = _exchange(x, k, _MODE[ref], check, what)
    offset = sum(sizes[: dist.get_rank()])
    if ref == "global":
        return _all_gather_rows(x.detach(), sizes), offset
    return _GatherWithGrad.apply(x, tuple(sizes)), offset


def global_reference(x: Tensor, detach: bool = True, *, k: int = -1) -> tuple[Tensor, int]:
    """The global batch as a reference set, and where this rank's rows sit in it.

    Args:
        x: this rank's features, (B_r, D).
        detach: gather without gradient (default, like ``ref=None``); False gathers with
            :func:`gather_with_grad`.
        k: if given, also checked to be equal on every rank.

    Returns:
        ``(ref, self_offset)``: ref is (sum_r B_r, D), rank 0's rows first; ``self_offset``
        is the number of rows on lower ranks. Not distributed: ``(x.detach() or x, 0)``.

    Raises:
        ValueError: on every rank, when the ranks disagree on D, dtype, k or ``detach``.
    """
    if not is_distributed():
        return (x.detach() if detach else x), 0
    return _gather(x, "global" if detach else "global_grad", k, lambda: V.check_features(x, "x"), "global_reference")


def resolve_global_ref(
    x: Tensor, ref: str, k: int, check: Callable[[], None]
) -> tuple[Optional[Tensor], int]:
    """``(ref, self_offset)`` for ``ref="global"|"global_grad"``, as the public API uses it.

    ``check`` holds the caller's local argument checks; under torch.distributed they run
    inside the metadata exchange so that a bad argument on one rank raises on all ranks.
    Not distributed: ``(None, 0)`` for "global" (the API's detached self-reference) and
    ``(x, 0)`` for "global_grad".
    """
    if not is_distributed():
        check()
        return (None if ref == "global" else x), 0
    return _gather(x, ref, k, check, f"ref={ref!r}")
