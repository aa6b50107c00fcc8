"""ldreg-kernels: fused, exact, differentiable kNN / LID / LDReg for PyTorch.

Public API:
    knn, lid, ldreg_loss   functions (see ``ldreg_kernels.api``)
    lid_stats, ldreg_loss_with_stats   LID at several k / estimators from one kNN search
    LDReg                  nn.Module
    FeatureQueue           FIFO memory bank of past features, a large ``ref``
    gather_with_grad, global_reference   torch.distributed helpers (``ref="global"``)
    effective_rank, geometric_mean_lid   metrics
    available_backends     which ``backend=`` values run on a device
    reference              the paper's algorithm, the float64 oracle
"""

from . import reference
from .api import LidStats, knn, ldreg_loss, ldreg_loss_with_stats, lid, lid_stats
from .distributed import gather_with_grad, global_reference
from .metrics import effective_rank, geometric_mean_lid
from .nn import LDReg
from .registry import available_backends
from .queue import FeatureQueue

__version__ = "0.2.0"

__all__ = [
    "knn",
    "lid",
    "ldreg_loss",
    "lid_stats",
    "ldreg_loss_with_stats",
    "LidStats",
    "LDReg",
    "FeatureQueue",
    "gather_with_grad",
    "global_reference",
    "effective_rank",
    "geometric_mean_lid",
    "available_backends",
    "reference",
    "__version__",
]
