"""``LDReg``: the regulariser as an ``nn.Module``."""

from __future__ import annotations

from typing import Iterable, Optional

from torch import Tensor, nn

from . import _validate as V
from .api import DEFAULT_EPS, LidStats, RefLike, _check_stats_args, ldreg_loss, ldreg_loss_with_stats
from .registry import BACKENDS


class LDReg(nn.Module):
    """Local Dimensionality Regularisation (Huang et al., ICLR 2024, arXiv 2401.10474).

    Adds ``-beta * mean ln LID`` ("l1") or ``-beta * sqrt(mean (ln LID)^2)`` ("l2") of the
    features' local intrinsic dimensionality, estimated from each sample's k nearest
    neighbours in the reference set (default: the batch itself, detached, self excluded).

    Args:
        k: neighbours per sample (paper: 64; 16/32 at batch 512/1024). k >= 2.
        beta: strength (paper: 0.01 SimCLR, 0.005 BYOL).
        reg: "l1" or "l2".
        estimator: "mom" (paper) or "mle".
        eps: relative floor in (0, 1) that keeps degenerate neighbourhoods finite; at
            least 2**-63 (~1.08e-19) for float32/half features, 2**-511 for float64,
            checked at each call, where the dtype is known (see :func:`ldreg_kernels.lid`).
        backend: "auto" or a name from ``ldreg_kernels.available_backends()``.
        monitor_ks: LID monitoring, as the official code logs every step (MLE at k=32 and
            512): each forward also computes the LIDs at these k from the same kNN search
            (one search at max(k, max(monitor_ks)); the backward still costs a k search's)
            and keeps them, detached, in ``last_stats`` (:class:`ldreg_kernels.LidStats`;
            ``last_stats.to_dict()`` gives floats for a logger). Empty: no monitoring.
        monitor_estimators: estimators for the monitor ("mle", "mom").

    Shape:
        forward(x: (B, D), ref: (N, D), None, "global" or "global_grad") -> scalar.

    Example:
        >>> reg = LDReg(k=32, beta=0.01)
        >>> loss = ssl_loss + reg(encoder_output)
        >>> loss = ssl_loss + reg(encoder_output, ref="global")  # under DDP: the global batch
        >>> loss = ssl_loss + reg(encoder_output, ref=queue.features(), exclude_self=False)
        >>> reg = LDReg(k=64, beta=0.01, monitor_ks=(32, 512))
        >>> loss = ssl_loss + reg(encoder_output); log(reg.last_stats.to_dict())
    """

    def __init__(
        self,
        k: int = 64,
        beta: float = 0.01,
        reg: str = "l1",
        estimator: str = "mom",
        eps: float = DEFAULT_EPS,
        backend: str = "auto",
        monitor_ks: Iterable[int] = (),
        monitor_estimators: Iterable[str] = ("mle",),
    ) -> None:
        super().__init__()
        if isinstance(monitor_ks, (tuple, list)) and not monitor_ks:
            monitor_ks = ()  # no monitoring
        else:
            monitor_ks, monitor_estimators = _check_stats_args(monitor_ks, monitor_estimators)
        self.monitor_ks, self.monitor_estimators = monitor_ks, tuple(monitor_estimators)
        self.last_stats: Optional[LidStats] = None
        k, beta, eps = V.as_int(k, "k"), V.as_real(beta, "beta"), V.as_real(eps, "eps")
        V.check_lid_args(k, estimator, eps)
        V.check_reg_args(beta, reg)
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
        self.k, self.beta, self.reg = k, beta, reg
        self.estimator, self.eps, self.backend = estimator, eps, backend

    def forward(
        self, x: Tensor, ref: RefLike = None, self_offset: int = 0, exclude_self: Optional[bool] = None
    ) -> Tensor:
        """The regulariser for features ``x`` (B, D) against ``ref``.

        Args:
            x: features, (B, D).
            ref: (N, D) tensor; None (default: ``x`` detached); ``"global"`` (under
                torch.distributed, every rank's batch gathered, detached) or
                ``"global_grad"`` (gathered with gradient to the owning rank); see
                :func:`ldreg_kernels.knn`.
            self_offset: row of ``ref`` holding ``x[0]`` (a tensor ``ref`` that holds the
                queries, with ``exclude_self=True``).
            exclude_self: default: True for ``ref`` None or "global", False for a tensor
                (a memory bank such as :class:`ldreg_kernels.FeatureQueue`); pass True for
                a tensor that holds the queries.
        """
        common = dict(reg=self.reg, estimator=self.estimator, eps=self.eps, exclude_self=exclude_self,
                      self_offset=self_offset, backend=self.backend)
        if not self.monitor_ks:
            return ldreg_loss(x, ref, self.k, self.beta, **common)
        loss, self.last_stats = ldreg_loss_with_stats(
            x, ref, self.k, self.beta, ks=self.monitor_ks, estimators=self.monitor_estimators, **common
        )
        return loss

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, beta={self.beta}, reg={self.reg!r}, estimator={self.estimator!r}, "
            f"backend={self.backend!r}" + (f", monitor_ks={self.monitor_ks}" if self.monitor_ks else "")
        )
