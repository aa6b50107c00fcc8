"""ldreg-kernels: fused, exact, differentiable kNN / LID / LDReg for PyTorch.

Public API:
    knn, lid, ldreg_loss   functions (see ``ldreg_kernels.api``)
    LDReg                  nn.Module
    FeatureQueue           FIFO memory bank of past features, a large ``ref``
    gather_with_grad, global_reference   torch.distributed helpers (``ref="global"``)
    effective_rank, geometric_mean_lid   metrics
    available_backends     which ``backend=`` values run on a device
    reference              the paper's algorithm, the float64 oracle
"""

from . import reference
from .api import knn, ldreg_loss, lid
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
