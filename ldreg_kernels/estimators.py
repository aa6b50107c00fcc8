"""LID estimators and the LDReg regulariser on sorted kNN distances, with eps guards.

These are the formulas of ``reference.py`` with the degenerate cases made finite, so that
no backend silently returns NaN. Every backend feeds its exact distances through these
functions, so degenerate outcomes are the same everywhere.

The guards are relative to each row's own scale, its k-th distance w, because LID is
scale-free: ``lid(c * x) == lid(x)`` for any c > 0 that the dtype can represent, down to
the degenerate cases (an absolute floor made features at scale 1e-12 give LID 1 with zero
gradient).

- MoM: ``LID = max(m / w, eps) / max((w - m) / w, eps)``. All neighbours equidistant
  (``w == m``) gives ``1 / eps`` (large, finite); k - 1 duplicates of the query (``m == 0``)
  give ``eps``; all neighbours at distance 0 (``w == 0``) give 1.
- MLE: ``LID = k / max(-sum_j ln(max(r_j / w, eps)), eps)``. Equidistant neighbours give
  ``k / eps``; a duplicate at distance 0 counts as ``eps w``; ``w == 0`` gives ``k / eps``.

The range of eps: ``EPS_MIN[dtype] <= eps < 1`` (``ldreg_kernels._validate``), the floor
being the square root of the compute dtype's smallest normal number: 2**-63 (~1.08e-19) in
float32, which half and bfloat16 input is computed in, and 2**-511 (~1.49e-154) in float64.
From it up, eps, 1 / eps and k / eps are normal numbers, LID >= eps > 0 (MoM) and
>= 1 / -ln(eps) (MLE), and the gradient's largest intermediate, 1 / eps**2 (the derivative
of 1 / s at the floor), is at most 1 / tiny: LID, loss and gradient are finite for every
neighbourhood. A smaller eps raises ValueError (float32 gave Inf, -Inf, NaN or LID 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_eps_for


def lid_from_distances(dist: Tensor, estimator: str = "mom", eps: float = 1e-12) -> Tensor:
    """LID per row from ascending kNN distances.

    Args:
        dist: (B, k) sorted ascending, k >= 2.
        estimator: "mom" (method of moments, the paper's Algorithm 1) or "mle".
        eps: relative floor, a fraction of each row's k-th distance, in
            [EPS_MIN[dtype], 1); see the module docstring.

    Returns:
        (B,) LID, finite and positive for finite input; float32 for half/bfloat16 input.
    """
    if dist.dtype in (torch.float16, torch.bfloat16):
        dist = dist.float()
    check_eps_for(eps, dist.dtype)  # the public functions check it before the search already
    w = dist[:, -1]
    # Everything is taken relative to w first: a floor eps * w would underflow (fp32 at
    # w < 1e-26), but r / w is scale-free bit for bit. w == 0 only when every distance is
    # 0; a unit stand-in keeps the divisions (and their gradients) finite there.
    positive = w > 0
    ws = torch.where(positive, w, torch.ones((), dtype=w.dtype, device=w.device)).unsqueeze(1)
    if estimator == "mom":
        m = dist[:, :-1].mean(dim=1, keepdim=True)
        return (m / ws).clamp_min(eps).squeeze(1) / ((dist[:, -1:] - m) / ws).clamp_min(eps).squeeze(1)
    k = dist.shape[1]
    # ln of the ratio, not ln r - ln w: the difference of two logs of the data's scale loses
    # |ln scale| x ulp per term, so the fp32 LID error grew ~10x at scales 1e-6 or 1e6.
    ratio = torch.where(positive.unsqueeze(1), (dist / ws).clamp_min(eps), torch.ones((), dtype=dist.dtype, device=dist.device))
    return k / (-torch.log(ratio).sum(dim=1)).clamp_min(eps)


def regularizer(lids: Tensor, beta: float, reg: str = "l1") -> Tensor:
    """LDReg loss term from per-sample LIDs (B,): paper Eq. 1 ("l1") or Eq. 3 ("l2").

    "l1": ``-beta * mean_i ln LID_i``; "l2": ``-beta * sqrt(mean_i (ln LID_i)^2)``.
    """
    log_lid = torch.log(lids)
    if reg == "l1":
        return -beta * log_lid.mean()
    # sqrt'(0) is inf; the floor keeps the gradient finite when every ln LID is 0.
    return -beta * torch.sqrt((log_lid**2).mean().clamp_min(torch.finfo(log_lid.dtype).tiny))
