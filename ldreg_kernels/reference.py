"""The oracle: LDReg's kNN and LID exactly as the paper computes them, in plain PyTorch.

Every backend is tested against this module. It materialises the full B x N distance
matrix with direct differences (no ``|x|^2 + |y|^2 - 2xy`` cancellation) and sorts it,
so run it in float64 when precision is in question. It has no ``eps`` guards: it is the
literal formula of the paper and the official code (MoM; the MLE in Amsaleg et al.'s form,
k / sum ln(w / r_j), whose numerator Levina-Bickel's k - 1 would replace), and degenerate
inputs give what that formula gives (inf/NaN), unlike the public API.

Reference: Huang et al., "LDReg: Local Dimensionality Regularized Self-Supervised
Learning", ICLR 2024, arXiv 2401.10474, Algorithm 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "knn",
    "lid_mom",
    "lid_mle",
    "lid",
    "ldreg_regularizer",
    "lid_mom_est",
]


def knn(
    x: Tensor, ref: Tensor, k: int, exclude_self: bool = True, self_offset: int = 0
) -> tuple[Tensor, Tensor]:
    """k nearest rows of ``ref`` for each row of ``x`` by full cdist + stable sort.

    Args:
        x: queries, (B, D).
        ref: reference set, (N, D).
        k: neighbours per query.
        exclude_self: drop reference row ``i + self_offset`` from query ``i``'s candidates
            (by index, so a duplicate of the query is still a valid neighbour).
        self_offset: where the queries sit inside ``ref``.

    Returns:
        (dist, idx), both (B, k), ascending by distance, ties broken by lower index.
    """
    d = torch.cdist(x, ref, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    if exclude_self:
        rows = torch.arange(x.shape[0], device=x.device)
        d = d.index_put((rows, rows + self_offset), d.new_tensor(float("inf")))
    dist, idx = torch.sort(d, dim=1, stable=True)
    return dist[:, :k], idx[:, :k]


def lid_mom(dist: Tensor) -> Tensor:
    """Method-of-moments LID from sorted distances (B, k): m / (w - m), m = mean(r_1..r_{k-1})."""
    w = dist[:, -1]
    m = dist[:, :-1].mean(dim=1)
    return m / (w - m)


def lid_mle(dist: Tensor) -> Tensor:
    """MLE (Amsaleg et al.; the official code's) from sorted distances (B, k):
    -k / sum_j ln(r_j / r_k). Levina-Bickel's has k - 1 in the numerator."""
    k = dist.shape[1]
    return -k / torch.log(dist / dist[:, -1:]).sum(dim=1)


def lid(
    x: Tensor,
    ref: Tensor,
    k: int,
    estimator: str = "mom",
    exclude_self: bool = True,
    self_offset: int = 0,
) -> Tensor:
    """Per-query LID (B,) of ``x`` against ``ref`` with the paper's estimators."""
    dist, _ = knn(x, ref, k, exclude_self, self_offset)
    return {"mom": lid_mom, "mle": lid_mle}[estimator](dist)


def ldreg_regularizer(lids: Tensor, beta: float, reg: str = "l1") -> Tensor:
    """Paper Eq. 1 ("l1": -beta * mean ln LID) or Eq. 3 ("l2": -beta * sqrt(mean (ln LID)^2))."""
    log_lid = torch.log(lids)
    if reg == "l1":
        return -beta * log_lid.mean()
    return -beta * torch.sqrt((log_lid**2).mean())


def lid_mom_est(
    data: Tensor,
    reference: Tensor,
    k: int,
    get_idx: bool = False,
    compute_mode: str = "use_mm_for_euclid_dist_if_necessary",
) -> Tensor | tuple[Tensor, Tensor]:
    """Drop-in for the official repository's ``lid_mom_est``.

    Same semantics as the original: ``k = min(k, b - 2)``, sorted column 0 is dropped as
    the query itself (by position, not by index, so a duplicate row can take its place),
    ``m = mean(a[:, 1:k])`` and ``w = a[:, k]``. Migrate with
    ``ldreg_kernels.lid(data, reference, k, estimator="mom", exclude_self=True)``, which excludes
    self by index.

    Returns:
        LID (B,), or ``(idx, LID)`` with ``get_idx=True`` (idx is the full (B, N) argsort).
    """
    b = data.shape[0]
    k = min(k, b - 2)
    data = torch.flatten(data, start_dim=1)
    reference = torch.flatten(reference, start_dim=1)
    r = torch.cdist(data, reference, p=2, compute_mode=compute_mode)
    a, idx = torch.sort(r, dim=1)
    m = torch.mean(a[:, 1:k], dim=1)
    lids = m / (a[:, k] - m)
    if get_idx:
        return idx, lids
    return lids
