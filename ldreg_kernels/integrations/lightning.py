"""A PyTorch Lightning callback that logs the paper's representation metrics on the validation
set every validation epoch: geometric-mean LID and effective rank.

    from ldreg_kernels.integrations.lightning import LIDMonitor

    trainer = pl.Trainer(callbacks=[LIDMonitor(k=32)])   # logs val/lid_mle_k32, val/effective_rank

The features come from ``validation_step``'s return value (a (B, D) tensor, or a dict
holding it under ``feature_key``), or from ``embed(pl_module, batch)`` if given. They are fed
to :class:`ldreg_kernels.integrations.torchmetrics.LIDMetric` batch by batch, computed at the
epoch's end (gathered across processes under DDP, so every rank logs the same numbers), and
reset. The sanity-check validation run is skipped.

Subclasses the ``Callback`` of ``pytorch_lightning`` when it is installed, else of
``lightning.pytorch``. Needs one of them (``pip install 'ldreg-kernels[lightning]'``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

from torch import Tensor

try:
    import pytorch_lightning as pl
except ImportError:
    try:
        import lightning.pytorch as pl  # the unified "lightning" package
    except ImportError as e:  # an optional extra: say how to get it
        raise ImportError(
            "ldreg_kernels.integrations.lightning needs PyTorch Lightning, which is not installed: "
            "pip install 'ldreg-kernels[lightning]' (or pip install pytorch-lightning torchmetrics)"
        ) from e

from ..api import DEFAULT_EPS
from .torchmetrics import LIDMetric

__all__ = ["LIDMonitor"]

Embed = Callable[["pl.LightningModule", Any], Tensor]


class LIDMonitor(pl.Callback):
    """Log geometric-mean LID (and effective rank) of the validation features each epoch.

    Args:
        k: neighbours per LID (the paper reports MLE at k = 32 and 512); the validation set
            (or ``max_samples``) must hold more than ``k`` rows.
        estimator: "mle" (the paper's metric) or "mom".
        embed: ``embed(pl_module, batch) -> (B, D)`` features; default: take them from
            ``validation_step``'s output.
        feature_key: the key of the features when ``validation_step`` returns a dict.
        prefix: prepended to the logged names ``lid_<estimator>_k<k>`` and
            ``effective_rank``.
        with_effective_rank: also log the effective rank.
        max_samples: use at most this many validation rows per process (the first seen).
        dataloader_idx: which validation dataloader to measure.
        batch_size, eps, backend: as in :class:`LIDMetric`.
        prog_bar: show the values in the progress bar.

    Attributes:
        last: the values logged at the last validation epoch, ``{name: float}``.
    """

    def __init__(
        self,
        k: int = 32,
        estimator: str = "mle",
        *,
        embed: Optional[Embed] = None,
        feature_key: str = "features",
        prefix: str = "val/",
        with_effective_rank: bool = True,
        max_samples: Optional[int] = None,
        dataloader_idx: int = 0,
        batch_size: int = 1024,
        eps: float = DEFAULT_EPS,
        backend: str = "auto",
        prog_bar: bool = False,
    ) -> None:
        super().__init__()
        self.metric = LIDMetric(k, estimator, with_effective_rank=with_effective_rank, max_samples=max_samples,
                                batch_size=batch_size, eps=eps, backend=backend)
        self.embed, self.feature_key, self.prefix = embed, feature_key, prefix
        self.dataloader_idx, self.prog_bar = dataloader_idx, prog_bar
        self.lid_name = f"{prefix}lid_{estimator}_k{self.metric.k}"
        self.last: dict[str, float] = {}

    def _features(self, pl_module: "pl.LightningModule", outputs: Any, batch: Any) -> Tensor:
        if self.embed is not None:
            return self.embed(pl_module, batch)
        if isinstance(outputs, Tensor):
            return outputs
        if isinstance(outputs, Mapping) and self.feature_key in outputs:
            return outputs[self.feature_key]
        got = f"a dict with keys {sorted(outputs)}" if isinstance(outputs, Mapping) else type(outputs).__name__
        raise ValueError(
            f"LIDMonitor: validation_step returned {got}; return the (B, D) features, or a dict holding "
            f"them under {self.feature_key!r} (feature_key=), or pass embed=lambda module, batch: features"
        )

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.metric.reset()  # nothing left over from an interrupted epoch

    def on_validation_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or dataloader_idx != self.dataloader_idx:
            return
        self.metric.update(self._features(pl_module, outputs, batch))

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking or not self.metric.update_called:
            return
        values = self.metric.compute()
        self.metric.reset()
        self.last = {self.lid_name: float(values["lid"])}
        if "effective_rank" in values:
            self.last[f"{self.prefix}effective_rank"] = float(values["effective_rank"])
        for name, value in self.last.items():
            # Every rank holds the same value (compute gathered the features): no sync_dist.
            pl_module.log(name, value, prog_bar=self.prog_bar)
