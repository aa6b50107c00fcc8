"""The paper's representation metrics: geometric-mean LID and effective rank.

Both stream over the data in batches, so a held-out set far larger than a training batch
fits in O(batch * k + N * D) memory.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _validate as V
from .api import DEFAULT_EPS, lid


@torch.no_grad()
def per_sample_lid(
    features: Tensor,
    reference: Optional[Tensor] = None,
    k: int = 32,
    *,
    estimator: str = "mle",
    batch_size: int = 1024,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
) -> Tensor:
    """LID of every row of ``features`` against ``reference``, streamed over query batches.

    Args:
        features: (M, D) queries.
        reference: (N, D); ``None`` means ``features`` itself, each row's self excluded.
            A given reference is assumed not to hold the queries (nothing is excluded).
        k: neighbours (the paper reports MLE with k = 32 or 512).
        estimator: "mle" (the paper's metric) or "mom".
        batch_size: queries per call; the reference is never tiled into an M x N matrix.

    Returns:
        (M,) LIDs, float32 (float64 for float64 input).
    """
    V.check_features(features, "features")
    exclude = reference is None
    ref = features if reference is None else reference
    return torch.cat([
        lid(
            features[s : s + batch_size], ref, k, estimator=estimator, eps=eps, exclude_self=exclude,
            self_offset=s if exclude else 0, backend=backend,
        )
        for s in range(0, features.shape[0], batch_size)
    ])


def geometric_mean(lids: Tensor) -> float:
    """exp(mean ln LID), accumulated in float64."""
    return math.exp(float(torch.log(lids.double()).mean()))


@torch.no_grad()
def geometric_mean_lid(
    features: Tensor,
    reference: Optional[Tensor] = None,
    k: int = 32,
    *,
    estimator: str = "mle",
    batch_size: int = 1024,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
) -> float:
    """exp(mean_i ln LID_i) of every row of ``features`` against ``reference``.

    Args:
        features, reference, k, estimator, batch_size, eps, backend: as in
            :func:`per_sample_lid`.

    Returns:
        The geometric mean LID as a Python float.
    """
    return geometric_mean(per_sample_lid(
        features, reference, k, estimator=estimator, batch_size=batch_size, eps=eps, backend=backend))


@torch.no_grad()
def effective_rank(features: Tensor, batch_size: int = 8192) -> float:
    """Effective rank (Roy & Vetterli, 2007) of the features' correlation matrix.

    ``exp(-sum_i p_i ln p_i)`` with ``p = lambda / sum(lambda)`` the normalised eigenvalues
    of the D x D correlation matrix, accumulated in float64 over row batches. Constant
    features (zero variance) contribute a zero eigenvalue instead of NaN.

    Args:
        features: (M, D), M >= 2.

    Returns:
        A float in [1, D] (0.0 if every feature is constant).
    """
    V.check_features(features, "features")
    m, d = features.shape
    if m < 2:
        raise ValueError(f"features needs at least 2 rows for a correlation matrix, got {m}")
    s1 = torch.zeros(d, dtype=torch.float64, device=features.device)
    s2 = torch.zeros(d, d, dtype=torch.float64, device=features.device)
    for s in range(0, m, batch_size):
        f = features[s : s + batch_size].double()
        s1 += f.sum(0)
        s2 += f.t() @ f
    mean = s1 / m
    cov = (s2 - m * torch.outer(mean, mean)) / (m - 1)
    std = cov.diagonal().clamp_min(0).sqrt()
    inv = torch.where(std > 0, 1.0 / std, torch.zeros_like(std))
    corr = cov * inv[:, None] * inv[None, :]
    ev = torch.linalg.eigvalsh(corr).clamp_min(0)
    if float(ev.sum()) == 0.0:
        return 0.0
    p = ev / ev.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))
