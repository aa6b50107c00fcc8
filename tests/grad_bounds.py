"""A componentwise bound on the difference of two implementations of the kNN backward.

Both backends compute the same terms t_ij = c_ij (x_i - ref_j)_d, c_ij = g_ij / r_ij, and
sum them, grad_x_i over the k neighbours of row i, grad_ref_j over the queries that have j
as a neighbour, in different orders (Triton blocks, atomics, index_add_). In the working
precision (unit eps: 2^-23 for fp32, 2^-52 for fp64), each implementation's term is within
3 eps |t| of the exact one (the division up to 2 ulp: GPUs divide approximately; the
subtraction and the product half an ulp each; an FMA only removes a rounding), and a sum
of m terms in any order is within (m - 1) eps/2 sum|t| of the exact sum of its rounded
terms (Higham, ch. 4; eps rather than eps/2 covers truncating adders). So each result is
within (m + 3) eps S of the exact gradient, S = sum |t| over its terms (computed here in
float64), and two results are within 2 (m + 3) eps S of each other. Half-precision outputs
are each rounded once more, by at most 2^-9 (bf16) / 2^-12 (fp16) of their value.

This is first order (the dropped terms are O(m^2 eps^2) S: negligible at these sizes),
not bitwise, and scales with the sizes and the dtype instead of a fixed rtol/atol.
"""

from __future__ import annotations

import torch

from ldreg_kernels import _host

_OUT_UNIT = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}


def grad_bounds(gd, x, ref, idx, dist) -> tuple[torch.Tensor, torch.Tensor]:
    """(bound for grad_x (B, D), bound for grad_ref (N, D)) on |impl_a - impl_b|, before the
    output cast (see :func:`assert_grad_close`)."""
    eps = torch.finfo(_host.compute_dtype(x.dtype)).eps
    x64, r64 = x.double().cpu(), ref.double().cpu()
    idx, d64 = idx.cpu(), dist.double().cpu()
    c = torch.where(d64 > 0, gd.double().cpu() / torch.where(d64 > 0, d64, 1.0), 0.0)
    t = (c.unsqueeze(2) * (x64.unsqueeze(1) - r64[idx])).abs()  # (B, k, D) |terms|
    k = idx.shape[1]
    s_ref = torch.zeros_like(r64).index_add_(0, idx.reshape(-1), t.reshape(-1, x.shape[1]))
    m_ref = torch.bincount(idx.reshape(-1), minlength=ref.shape[0]).unsqueeze(1).double()  # terms per ref row
    return 2 * (k + 3) * eps * t.sum(1), 2 * (m_ref + 3) * eps * s_ref


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str = "grad") -> None:
    """|got - want| <= bound componentwise, plus one output rounding each for half dtypes."""
    got64, want64 = got.double().cpu(), want.double().cpu()
    tol = bound + _OUT_UNIT.get(got.dtype, 0.0) * (got64.abs() + want64.abs())
    err = (got64 - want64).abs()
    bad = err > tol
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} components differ by more than the rounding bound; "
        f"worst excess {float((err - tol).max()):.3g} (err {float(err[bad].max()):.3g})"
    )
