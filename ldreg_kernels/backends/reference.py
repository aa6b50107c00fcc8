"""The "reference" backend: the oracle's cdist + full sort (``ldreg_kernels.reference``) as
an op. Its backward is the torch backend's (the oracle defines no backward of its own;
autograd through cdist would differ at zero distances)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._host import compute_dtype
from .._op import Backend, define_knn_op
from .torch import _DEVICES, knn_backward_torch

__all__ = ["BACKENDS"]


def _forward(x: Tensor, ref: Tensor, k: int, self_offset: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
    """The oracle's cdist + sort, distances in the compute dtype."""
    ct = compute_dtype(x.dtype)
    dist, idx = reference.knn(x.to(ct), ref.to(ct), k, exclude_self, self_offset)
    return dist.contiguous(), idx.contiguous()


knn_reference = define_knn_op("reference", _forward, knn_backward_torch)

BACKENDS = (Backend("reference", _DEVICES, lambda: torch.ops.ldreg.knn_reference, "knn_backward_torch"),)
