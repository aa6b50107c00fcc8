"""LID estimators and the LDReg regulariser on sorted kNN distances, with eps guards.

These are the formulas of ``reference.py`` with the degenerate cases made finite, so that
no backend silently returns NaN. Every backend feeds its exact distances through these
functions (or, for a fused epilogue, must reproduce them), so degenerate outcomes are the
same everywhere:

- MoM: ``LID = max(m, eps) / max(w - m, eps)``. All neighbours equidistant (``w == m``)
  gives ``m / eps`` (large, finite); all neighbours at distance 0 gives 1.
- MLE: ``LID = k / max(-sum_j ln(max(r_j, eps) / max(w, eps)), eps)``. Equidistant
  neighbours give ``k / eps``; zero distances are floored at ``eps``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lid_from_distances(dist: Tensor, estimator: str = "mom", eps: float = 1e-12) -> Tensor:
    """LID per row from ascending kNN distances.

    Args:
        dist: (B, k) sorted ascending, k >= 2.
        estimator: "mom" (method of moments, the paper's Algorithm 1) or "mle".
        eps: floor on denominators and distances; see the module docstring.

    Returns:
        (B,) LID, finite and >= eps for finite input; float32 for half/bfloat16 input.
    """
    if dist.dtype in (torch.float16, torch.bfloat16):
        dist = dist.float()
    w = dist[:, -1]
    if estimator == "mom":
        m = dist[:, :-1].mean(dim=1)
        return m.clamp_min(eps) / (w - m).clamp_min(eps)
    k = dist.shape[1]
    # ln of the ratio, not ln r - ln w: the difference of two logs of the data's scale loses
    # |ln scale| x ulp per term, so the fp32 LID error grew ~10x at scales 1e-6 or 1e6.
    log_ratio = torch.log(dist.clamp_min(eps) / w.clamp_min(eps).unsqueeze(1))
    return k / (-log_ratio.sum(dim=1)).clamp_min(eps)


def regularizer(lids: Tensor, beta: float, reg: str = "l1") -> Tensor:
    """LDReg loss term from per-sample LIDs (B,): paper Eq. 1 ("l1") or Eq. 3 ("l2").

    "l1": ``-beta * mean_i ln LID_i``; "l2": ``-beta * sqrt(mean_i (ln LID_i)^2)``.
    """
    log_lid = torch.log(lids)
    if reg == "l1":
        return -beta * log_lid.mean()
    # sqrt'(0) is inf; the floor keeps the gradient finite when every ln LID is 0.
    return -beta * torch.sqrt((log_lid**2).mean().clamp_min(torch.finfo(log_lid.dtype).tiny))
