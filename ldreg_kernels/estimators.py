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

from . import _budget
from ._validate import check_eps_for


def lid_from_distances(dist: Tensor, estimator: str = "mom", eps: float = 1e-12) -> Tensor:
    """LID per row from ascending kNN distances.

    One op (``ldreg::lid_from_distances``) whose gradient is written out so that it stays
    finite at every scale the forward accepts: autograd's own chain of the same formulas
    squared w (``d(m / w)/dw = -m / w**2``), which overflowed float32 below w ~ 1e-19
    (Inf at feature scale 1e-20, NaN at 1e-25).

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
    if _native(dist) and not torch.compiler.is_compiling():
        return _NativeLid.apply(dist, estimator, float(eps))  # the op's ~100 us of Python dispatch, skipped
    return _lid_op(dist, estimator, float(eps))


def _scale(dist: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(w, positive, ws): each row's k-th distance, w > 0, and w where positive else 1.

    Everything is taken relative to w first: a floor eps * w would underflow (fp32 at
    w < 1e-26), but r / w is scale-free bit for bit. w == 0 only when every distance is 0;
    a unit stand-in keeps the divisions (and their gradients) finite there."""
    w = dist[:, -1]
    positive = w > 0
    return w, positive, torch.where(positive, w, torch.ones_like(w))


def _mom_ratios(dist: Tensor, w: Tensor, ws: Tensor) -> tuple[Tensor, Tensor]:
    """(m / w, (w - m) / w), m the mean of the first k - 1 distances; w - m before the
    division (1 - m / w would lose the digits of a near-equidistant row). 1 / (k - 1) goes
    in as a Scalar argument: a Python number in an expression is one more aten call."""
    m = torch.add(torch.zeros_like(w), dist[:, :-1].sum(dim=1), alpha=1.0 / (dist.shape[1] - 1))
    return m / ws, (w - m).div_(ws)


_NATIVE: list[bool] = []


def _native(dist: Tensor) -> bool:
    """Whether the C++ twin of these formulas (csrc/cpu/lid_cpu.cpp: one call instead of
    some 20 small aten calls forward and 30 backward) takes ``dist``: CPU tensors, when the
    extension is built, except inside ``_budget.plan_as("cuda")``, which counts the calls a
    GPU step makes (the torch formulas). Asked once; the extension loads with
    ``import ldreg_kernels``."""
    if _budget.planned_device() not in (None, "cpu"):
        return False
    if not _NATIVE:
        _NATIVE.append(hasattr(torch.ops.ldreg, "lid_native"))
        if _NATIVE[0]:  # shapes for torch.compile, which traces the backward with fake tensors
            torch.library.register_fake("ldreg::lid_native")(lambda dist, estimator, eps: dist.new_empty(dist.shape[:1]))
            torch.library.register_fake("ldreg::lid_backward_native")(
                lambda grad, dist, lid, estimator, eps: torch.empty_like(dist))
    return _NATIVE[0] and dist.device.type == "cpu"


@torch.library.custom_op("ldreg::lid_from_distances", mutates_args=())
def _lid_op(dist: Tensor, estimator: str, eps: float) -> Tensor:
    if _native(dist):
        return torch.ops.ldreg.lid_native(dist, estimator, eps)
    return _lid_formulas(dist, estimator, eps)


def _lid_formulas(dist: Tensor, estimator: str, eps: float) -> Tensor:
    """The estimators in torch ops (every device; the C++ twin mirrors them)."""
    w, positive, ws = _scale(dist)
    if estimator == "mom":
        rho, gam = _mom_ratios(dist, w, ws)
        return rho.clamp_min(eps) / gam.clamp_min_(eps)
    # ln of the ratio, not ln r - ln w: the difference of two logs of the data's scale loses
    # |ln scale| x ulp per term, so the fp32 LID error grew ~10x at scales 1e-6 or 1e6.
    r = (dist / ws.unsqueeze(1)).clamp_min_(eps)
    r = torch.where(positive.unsqueeze(1), r, torch.ones_like(r))
    return torch.log(r).sum(dim=1).neg_().clamp_min_(eps).reciprocal_().mul_(dist.shape[1])


@_lid_op.register_fake
def _(dist: Tensor, estimator: str, eps: float) -> Tensor:
    torch._check(dist.dim() == 2 and dist.shape[1] >= 2)
    return dist.new_empty(dist.shape[:1])


def _lid_setup(ctx, inputs, output) -> None:
    dist, ctx.estimator, ctx.eps = inputs
    ctx.save_for_backward(dist, output)


def _lid_backward(ctx, g: Tensor):
    """The gradient of the formulas above, clamps included (a clamped term passes none, as
    clamp_min's own gradient at the floor). Each factor is a ratio r / w or a derivative
    with respect to one (bounded by 1 / eps**2, see the module docstring), and is divided
    by w once, last: nothing squares w, so nothing overflows before the data's scale is
    applied. Masks compare tensor to tensor and apply with ``where`` (a Python scalar or a
    bool cast in an expression is one more aten call, a dispatcher trip on a GPU)."""
    dist, lid = ctx.saved_tensors
    if _native(dist) and not torch.is_grad_enabled():  # create_graph=True needs the torch ops
        return torch.ops.ldreg.lid_backward_native(g, dist, lid, ctx.estimator, ctx.eps), None, None
    eps, k = ctx.eps, dist.shape[1]
    w, positive, ws = _scale(dist)
    zero = torch.zeros_like(g)
    # Functional (no out=, no in-place): under create_graph=True autograd records these too.
    if ctx.estimator == "mom":
        rho, gam = _mom_ratios(dist, w, ws)
        a, c = rho.clamp_min(eps), gam.clamp_min(eps)
        ga = torch.where(a == rho, g / c, zero)  # dL/d(m / w)
        gc = torch.where(c == gam, g * lid / c, zero)  # -dL/d((w - m) / w)
        gws = torch.where(positive, torch.addcmul(ga * rho, gc, gam, value=-1), zero)  # -w dL/dws
        gm = (ga + gc) / ws / (k - 1)
        gw = (gc + gws) / ws
        return torch.cat([gm.unsqueeze(1).expand(-1, k - 1), gw.neg().unsqueeze(1)], dim=1), None, None
    r = dist / ws.unsqueeze(1)
    rc = r.clamp_min(eps)
    live = (rc == r) & positive.unsqueeze(1)  # terms r_j / w above the floor
    s = torch.where(positive.unsqueeze(1), rc, torch.ones_like(r)).log().sum(dim=1).neg()
    sc = s.clamp_min(eps)
    gsw = torch.where(sc == s, g * lid / sc, zero) / ws  # -dL/ds, over w
    grad = torch.where(live, gsw.unsqueeze(1) / rc, torch.zeros_like(r))
    last = grad[:, -1] - gsw * live.sum(dim=1)
    return torch.cat([grad[:, :-1], last.unsqueeze(1)], dim=1), None, None


_lid_op.register_autograd(_lid_backward, setup_context=_lid_setup)


class _NativeLid(torch.autograd.Function):
    """``_lid_op`` in eager mode on CPU: the same forward and backward without the custom
    op's Python dispatch, which cost more than the native formulas themselves at B=256."""

    @staticmethod
    def forward(ctx, dist: Tensor, estimator: str, eps: float) -> Tensor:
        lid = torch.ops.ldreg.lid_native(dist, estimator, eps)
        _lid_setup(ctx, (dist, estimator, eps), lid)
        return lid

    @staticmethod
    def backward(ctx, g: Tensor):
        return _lid_backward(ctx, g)


def regularizer(lids: Tensor, beta: float, reg: str = "l1") -> Tensor:
    """LDReg loss term from per-sample LIDs (B,): paper Eq. 1 ("l1") or Eq. 3 ("l2").

    "l1": ``-beta * mean_i ln LID_i``; "l2": ``-beta * sqrt(mean_i (ln LID_i)^2)``.
    """
    log_lid = torch.log(lids)
    if reg == "l1":
        return -beta * log_lid.mean()
    # sqrt'(0) is inf; the floor keeps the gradient finite when every ln LID is 0.
    return -beta * torch.sqrt((log_lid**2).mean().clamp_min(torch.finfo(log_lid.dtype).tiny))
