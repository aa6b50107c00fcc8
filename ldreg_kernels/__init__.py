"""ldreg-kernels: fused, exact, differentiable kNN / LID / LDReg for PyTorch.

Public API:
    knn, lid, ldreg_loss   functions (see ``ldreg_kernels.api``)
    LDReg                  nn.Module
    effective_rank, geometric_mean_lid   metrics
    available_backends     which ``backend=`` values run on a device
    reference              the paper's algorithm, the float64 oracle
"""

from . import reference
from .api import knn, ldreg_loss, lid
from .metrics import effective_rank, geometric_mean_lid
from .nn import LDReg
from .ops import available_backends

__version__ = "0.1.0"

__all__ = [
    "knn",
    "lid",
    "ldreg_loss",
    "LDReg",
    "effective_rank",
    "geometric_mean_lid",
    "available_backends",
    "reference",
    "__version__",
]
