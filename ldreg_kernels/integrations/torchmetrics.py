"""The paper's representation metrics as a ``torchmetrics.Metric``: geometric-mean LID and
effective rank of a held-out set's features, fed batch by batch.

    from ldreg_kernels.integrations.torchmetrics import LIDMetric

    metric = LIDMetric(k=32)                 # MLE at k=32, as the paper reports
    for images, _ in val_loader:
        metric.update(encoder(images))       # (B, D) features; detached, kept
    metric.compute()                         # {"lid": tensor, "effective_rank": tensor}
    metric.reset()

The numbers are :func:`ldreg_kernels.geometric_mean_lid` (every row's LID against the whole
set, itself excluded) and :func:`ldreg_kernels.effective_rank` of the concatenated features,
so the metric keeps the features it is given (N x D; cap it with ``max_samples``) and runs
the kNN in query batches at ``compute``. Under torch.distributed, ``compute`` gathers every
process's features first (torchmetrics' "cat" reduction), so all ranks see one set.

Needs ``torchmetrics`` (``pip install torchmetrics``, or ``pip install 'ldreg-kernels[lightning]'``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

try:
    from torchmetrics import Metric
    from torchmetrics.utilities.data import dim_zero_cat
except ImportError as e:  # an optional extra: say how to get it
    raise ImportError(
        "ldreg_kernels.integrations.torchmetrics needs the 'torchmetrics' package, which is not installed: "
        "pip install torchmetrics (or pip install 'ldreg-kernels[lightning]')"
    ) from e

from .. import _validate as V
from ..api import DEFAULT_EPS
from ..metrics import effective_rank, geometric_mean_lid

__all__ = ["LIDMetric"]


class LIDMetric(Metric):
    """Geometric-mean LID and effective rank of all the features seen since the last reset.

    Args:
        k: neighbours per LID (the paper reports MLE at k = 32 and 512). ``compute`` needs
            more than ``k`` rows in all (each row's self is excluded).
        estimator: "mle" (the paper's metric) or "mom".
        with_effective_rank: also return the effective rank (Roy & Vetterli) of the
            features' correlation matrix.
        max_samples: keep at most this many rows per process (the first seen), bounding
            memory (N x D) and the kNN's O(N^2 D) work; None keeps every row.
        batch_size: queries per kNN call in ``compute``.
        eps: relative floor of degenerate neighbourhoods, as in :func:`ldreg_kernels.lid`.
        backend: ldreg_kernels backend, "auto" by default.
        **kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``, ``compute_on_cpu``,
            ``dist_sync_fn``, ...).

    Raises:
        ValueError, TypeError: bad arguments (here), bad features (``update``), or too few
            rows for ``k`` (``compute``).
    """

    is_differentiable = False
    higher_is_better: Optional[bool] = None  # a diagnostic: collapse lowers it, but higher is not "better"
    full_state_update = False

    features: list[Tensor]

    def __init__(
        self,
        k: int = 32,
        estimator: str = "mle",
        *,
        with_effective_rank: bool = True,
        max_samples: Optional[int] = None,
        batch_size: int = 1024,
        eps: float = DEFAULT_EPS,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.k, self.eps = V.as_int(k, "k"), V.as_real(eps, "eps")
        V.check_lid_args(self.k, estimator, self.eps)
        if max_samples is not None and V.as_int(max_samples, "max_samples") <= self.k:
            raise ValueError(f"max_samples must exceed k={self.k} (each row needs k other rows), got {max_samples}")
        if V.as_int(batch_size, "batch_size") < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.estimator, self.with_effective_rank = estimator, bool(with_effective_rank)
        self.max_samples, self.batch_size, self.backend = max_samples, batch_size, backend
        self.add_state("features", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor) -> None:  # type: ignore[override]
        """Add a batch of features (B, D); kept detached. float16/bfloat16 (autocast output)
        are kept as float32, so that the metric does not depend on the training precision."""
        V.check_features(features, "features")
        f = features.detach()
        if f.dtype not in (torch.float32, torch.float64):
            f = f.float()
        if self.max_samples is not None:
            room = self.max_samples - sum(t.shape[0] for t in self.features)
            if room <= 0:
                return
            f = f[:room]
        self.features.append(f)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """``{"lid": geometric-mean LID, "effective_rank": ...}`` (float32 scalars) of every
        row seen (after gathering across processes)."""
        if not self.features:
            raise ValueError("LIDMetric.compute() before any update(): no features to measure")
        feats = dim_zero_cat(self.features)
        n = feats.shape[0]
        if n <= self.k:
            raise ValueError(f"LIDMetric: {n} rows seen, but k={self.k} needs at least {self.k + 1} "
                             "(lower k or feed more validation data)")
        out = {"lid": torch.tensor(geometric_mean_lid(
            feats, k=self.k, estimator=self.estimator, batch_size=self.batch_size, eps=self.eps,
            backend=self.backend))}
        if self.with_effective_rank:
            out["effective_rank"] = torch.tensor(effective_rank(feats))
        return out
