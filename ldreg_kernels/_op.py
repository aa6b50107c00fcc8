"""The op framework every kNN backend plugs into: one schema, fake kernels, autograd.

Every backend provides a forward op and a backward op (namespace ``ldreg``)::

    knn_<name>(Tensor x, Tensor ref, int k, int self_offset, bool exclude_self)
        -> (Tensor dist, Tensor idx)
    knn_backward_<name>(Tensor grad_dist, Tensor x, Tensor ref, Tensor idx, Tensor dist,
        bool need_ref_grad) -> (Tensor grad_x, Tensor grad_ref)

The forward's autograd calls *its own backend's* backward op, so ``backend="triton"`` runs
the Triton backward and ``backend="torch"`` the torch one. Python backends define both ops
with :func:`define_knn_op`; the C++ ops (declared in ``csrc/knn.cpp``) get the same fake and
autograd registered directly by :func:`register_native_op`, so a call makes one dispatcher
trip. This module imports no backend: backends import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ._host import compute_dtype, in_range, range_scale, run_in_range, top_scale

__all__ = ["Backend", "define_knn_op", "define_backward_op", "register_native_op", "backward_of"]

# Forward op qualified name -> the backward op its autograd calls.
_BACKWARD_OF: dict[str, Callable] = {}

KnnImpl = Callable[[Tensor, Tensor, int, int, bool], "tuple[Tensor, Tensor]"]
BackwardImpl = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, bool], "tuple[Tensor, Tensor | None]"]


@dataclass(frozen=True)
class Backend:
    """A named kNN implementation, as the registry sees it.

    Attributes:
        name: the ``backend=`` string.
        devices: device types it runs on ("cpu", "cuda").
        load: returns the forward op (schema above); raises ImportError/RuntimeError with
            the reason when the backend cannot run here.
        backward: name of the backward op its autograd runs (``torch.ops.ldreg.<backward>``).
    """

    name: str
    devices: tuple[str, ...]
    load: Callable[[], Callable[..., "tuple[Tensor, Tensor]"]]
    backward: str = ""


def fake_knn(x: Tensor, ref: Tensor, k: int, self_offset: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
    torch._check(x.dim() == 2 and ref.dim() == 2 and x.shape[1] == ref.shape[1])
    torch._check(k >= 1)
    dt = compute_dtype(x.dtype)
    return x.new_empty((x.shape[0], k), dtype=dt), x.new_empty((x.shape[0], k), dtype=torch.int64)


def fake_backward(
    grad_dist: Tensor, x: Tensor, ref: Tensor, idx: Tensor, dist: Tensor, need_ref_grad: bool
) -> tuple[Tensor, Tensor]:
    torch._check(idx.shape == dist.shape and idx.shape == grad_dist.shape)
    torch._check(idx.shape[0] == x.shape[0])
    gref = torch.empty_like(ref) if need_ref_grad else ref.new_empty((0, ref.shape[1]))
    return torch.empty_like(x), gref


def _no_autocast(op) -> None:
    """Under autocast, run ``op`` with autocast off on float32 (float64 stays float64).

    Autocast would otherwise reach the matmuls inside the op and select in bf16/fp16,
    outside what the backend's certificate assumes (and hand the C++ kernels tensors of a
    dtype they did not dispatch on). The selection precision stays the backend's choice;
    half and bfloat16 features are computed in float32 in any case.
    """
    for device_type in ("cpu", "cuda"):
        if hasattr(torch.library, "register_autocast"):
            torch.library.register_autocast(op, device_type, torch.float32)
        else:  # torch < 2.7
            _register_autocast_fallback(op, device_type)


_FALLBACK_LIBS: dict[str, "torch.library.Library"] = {}


def _register_autocast_fallback(op, device_type: str) -> None:
    """What ``torch.library.register_autocast(op, device_type, torch.float32)`` does (torch
    2.7+), for torch 2.4-2.6: a kernel under the Autocast key that casts floating inputs of
    reduced precision to float32 and calls the op again with autocast excluded."""
    name = op if isinstance(op, str) else f"{op._namespace}::{op._name}"
    ns, opname = name.split("::")
    lib = _FALLBACK_LIBS.setdefault(ns, torch.library.Library(ns, "FRAGMENT"))
    key = "AutocastCPU" if device_type == "cpu" else "AutocastCUDA"
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    target = op if not isinstance(op, str) else None

    def cast(v):
        if isinstance(v, Tensor) and v.is_floating_point() and v.dtype in (torch.float16, torch.bfloat16):
            return v.float()
        return v

    def kernel(_keyset, *args):
        fn = target if target is not None else getattr(getattr(torch.ops, ns), opname)
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return fn(*(cast(a) for a in args))

    lib.impl(opname, kernel, key, with_keyset=True)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "ldreg_kernels: double backward through the kNN ops (create_graph=True, e.g. a "
        "gradient penalty) is not implemented; the first backward is exact"
    )


def _forbid_double_backward(op) -> None:
    """A clear error, rather than torch's "no autograd formula", if a graph built with
    create_graph=True is differentiated through a backward op."""
    torch.library.register_autograd(op, _no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _setup_context(ctx, inputs, output) -> None:
    x, ref, _k, _off, _excl = inputs
    dist, idx = output
    ctx.save_for_backward(x, ref, idx, dist)
    ctx.mark_non_differentiable(idx)


def _autograd(backward_op) -> Callable:
    """The forward op's backward: calls ``backward_op`` only for the inputs that need it."""

    def backward(ctx, grad_dist: Tensor, _grad_idx: Tensor):
        x, ref, idx, dist = ctx.saved_tensors
        need_x, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_ref):
            return None, None, None, None, None
        gx, gref = backward_op(grad_dist.contiguous(), x, ref, idx, dist, need_ref)
        return (gx if need_x else None), (gref if need_ref else None), None, None, None

    return backward


def define_backward_op(name: str, impl: BackwardImpl, device_types=None):
    """Define ``ldreg::knn_backward_<name>`` from ``impl`` (which returns None for an unneeded
    grad_ref; the op returns an empty (0, D) tensor instead)."""

    def backward(
        grad_dist: Tensor, x: Tensor, ref: Tensor, idx: Tensor, dist: Tensor, need_ref_grad: bool
    ) -> tuple[Tensor, Tensor]:
        gx, gref = impl(grad_dist, x, ref, idx, dist, need_ref_grad)
        return gx, ref.new_empty((0, ref.shape[1])) if gref is None else gref

    op = torch.library.custom_op(f"ldreg::knn_backward_{name}", backward, mutates_args=(), device_types=device_types)
    op.register_fake(fake_backward)
    _no_autocast(op)
    _forbid_double_backward(op)
    return op


def define_knn_op(
    name: str, impl: KnnImpl, backward_op, device_types=None, checks_input: bool = False,
):
    """Define ``ldreg::knn_<name>`` from ``impl``, with the NaN/Inf check and range scaling
    (``_host.range_scale``, in the compute dtype's window; ``_host.in_range`` and
    ``_host.run_in_range`` for batches whose distances the first run could not hold), the fake kernel, the autocast rule and an autograd
    that runs ``backward_op`` (this backend's own backward).

    ``checks_input``: ``impl`` does the NaN/Inf check and range scaling itself (so that it
    can read them at the same host sync as its own results); it gets contiguous inputs."""

    def forward(x: Tensor, ref: Tensor, k: int, self_offset: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
        if checks_input:
            return impl(x.contiguous(), ref.contiguous(), k, self_offset, exclude_self)
        ct = compute_dtype(x.dtype)
        scale, max_abs = range_scale(x, ref, ct)
        if scale == 1.0:
            dist, idx = impl(x.contiguous(), ref.contiguous(), k, self_offset, exclude_self)
            if in_range(x, ref, dist, idx, ct):
                return dist, idx
            scale = top_scale(max_abs, ct, x.shape[1])
        return run_in_range(lambda xs, rs: impl(xs.contiguous(), rs.contiguous(), k, self_offset, exclude_self),
                            x, ref, scale, max_abs, ct)

    op = torch.library.custom_op(f"ldreg::knn_{name}", forward, mutates_args=(), device_types=device_types)
    op.register_fake(fake_knn)
    op.register_autograd(_autograd(backward_op), setup_context=_setup_context)
    _no_autocast(op)
    _BACKWARD_OF[f"ldreg::knn_{name}"] = backward_op
    return op


def register_native_op(forward: str, backward: str) -> None:
    """Fake kernels, autocast rule and autograd for C++ ops declared with the schemas above
    (the C++ kernels check NaN/Inf and scale the range themselves)."""
    torch.library.register_fake(f"ldreg::{forward}")(fake_knn)
    torch.library.register_fake(f"ldreg::{backward}")(fake_backward)
    _no_autocast(f"ldreg::{forward}")
    _no_autocast(f"ldreg::{backward}")
    _forbid_double_backward(f"ldreg::{backward}")
    torch.library.register_autograd(
        f"ldreg::{forward}", _autograd(getattr(torch.ops.ldreg, backward)), setup_context=_setup_context
    )
    _BACKWARD_OF[f"ldreg::{forward}"] = getattr(torch.ops.ldreg, backward)


def backward_of(op) -> Callable:
    """The backward op that ``op``'s autograd runs (its backend's own)."""
    return _BACKWARD_OF[op._qualified_op_name]
