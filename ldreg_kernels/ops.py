"""Custom ops (namespace ``ldreg``), their autograd, and the backend registry.

Every kNN forward backend is a custom op with the same schema::

    ldreg::knn_<backend>(Tensor x, Tensor ref, int k, int self_offset, bool exclude_self)
        -> (Tensor dist, Tensor idx)

and one shared backward op, ``ldreg::knn_backward``, serves them all: the gradient depends
only on (x, ref, idx, dist, grad), not on how the neighbours were found. A new backend
(Triton, C++/CUDA) defines its forward op under this schema and calls
``register_backend``; ``resolve_backend`` is the only place a backend is chosen.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import reference, torch_impl
from ._validate import check_finite

__all__ = ["Backend", "register_backend", "resolve_backend", "available_backends", "BACKENDS"]


# ---------------------------------------------------------------- native extension
def _load_native() -> str | None:
    """Load ldreg_kernels._C (registers ldreg::knn_native / knn_backward_native); the reason if not."""
    try:
        from . import _C  # noqa: F401
    except ImportError as e:
        return f"the C++ extension ldreg_kernels._C is not built ({e}); reinstall with pip install --no-build-isolation ."
    built = int(torch.ops.ldreg.compiled_cuda_version())
    if built and torch.version.cuda:
        major, minor = (int(v) for v in torch.version.cuda.split(".")[:2])
        if built // 1000 != major:
            return (
                f"ldreg_kernels._C was compiled for CUDA {built // 1000}.{built % 1000 // 10} but torch uses "
                f"CUDA {major}.{minor}; rebuild the extension against this torch"
            )
    return None


_NATIVE_ERROR = _load_native()
# Device types whose kernels the extension has (CUDA only when it was built with nvcc).
_NATIVE_DEVICES = () if _NATIVE_ERROR else (("cpu", "cuda") if int(torch.ops.ldreg.compiled_cuda_version()) else ("cpu",))


# ---------------------------------------------------------------- shared backward op
@torch.library.custom_op("ldreg::knn_backward", mutates_args=())
def knn_backward(
    grad_dist: Tensor, x: Tensor, ref: Tensor, idx: Tensor, dist: Tensor, need_ref_grad: bool
) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_ref); grad_ref is an empty (0, D) tensor when not needed.

    Runs the native kernel where the extension has one for the device, else the Triton
    kernel on CUDA, else torch_impl.
    """
    if x.device.type in _NATIVE_DEVICES:
        return torch.ops.ldreg.knn_backward_native(grad_dist, x, ref, idx, dist, need_ref_grad)
    impl = torch_impl.knn_backward
    if x.device.type == "cuda" and _TRITON_ERROR is None:
        from .triton import knn_backward as impl
    gx, gref = impl(grad_dist, x, ref, idx, dist, need_ref_grad)
    if gref is None:
        gref = ref.new_empty((0, ref.shape[1]))
    return gx, gref


@knn_backward.register_fake
def _fake_backward(grad_dist, x, ref, idx, dist, need_ref_grad):
    torch._check(idx.shape == dist.shape and idx.shape == grad_dist.shape)
    torch._check(idx.shape[0] == x.shape[0])
    gref = torch.empty_like(ref) if need_ref_grad else ref.new_empty((0, ref.shape[1]))
    return torch.empty_like(x), gref


def _setup_context(ctx, inputs, output) -> None:
    x, ref, _k, _off, _excl = inputs
    dist, idx = output
    ctx.save_for_backward(x, ref, idx, dist)
    ctx.mark_non_differentiable(idx)


def _backward(ctx, grad_dist: Tensor, _grad_idx: Tensor):
    x, ref, idx, dist = ctx.saved_tensors
    need_x, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_ref):
        return None, None, None, None, None
    gx, gref = torch.ops.ldreg.knn_backward(grad_dist.contiguous(), x, ref, idx, dist, need_ref)
    return (gx if need_x else None), (gref if need_ref else None), None, None, None


def _fake_knn(x: Tensor, ref: Tensor, k: int, self_offset: int, exclude_self: bool):
    torch._check(x.dim() == 2 and ref.dim() == 2 and x.shape[1] == ref.shape[1])
    torch._check(k >= 1)
    dt = torch_impl.compute_dtype(x.dtype)
    return x.new_empty((x.shape[0], k), dtype=dt), x.new_empty((x.shape[0], k), dtype=torch.int64)


def define_knn_op(name: str, impl: Callable[..., tuple[Tensor, Tensor]], device_types=None):
    """Define ``ldreg::knn_<name>`` from ``impl`` with the shared fake, autograd and finite check."""

    def forward(x: Tensor, ref: Tensor, k: int, self_offset: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
        check_finite(x, "x")
        check_finite(ref, "ref")
        return impl(x.contiguous(), ref.contiguous(), k, self_offset, exclude_self)

    op = torch.library.custom_op(f"ldreg::knn_{name}", forward, mutates_args=(), device_types=device_types)
    op.register_fake(_fake_knn)
    op.register_autograd(_backward, setup_context=_setup_context)
    return op


knn_torch = define_knn_op("torch", torch_impl.knn_forward)


def _native_knn(x: Tensor, ref: Tensor, k: int, self_offset: int, exclude_self: bool):
    return torch.ops.ldreg.knn_native(x, ref, k, self_offset, exclude_self)


knn_cpu = define_knn_op("cpu", _native_knn, device_types="cpu")
knn_cuda = define_knn_op("cuda", _native_knn, device_types="cuda")
if _NATIVE_ERROR is None:  # fake kernels let opcheck and FakeTensor mode see the raw native ops too
    torch.library.register_fake("ldreg::knn_native")(_fake_knn)
    torch.library.register_fake("ldreg::knn_backward_native")(_fake_backward)


def _reference_knn(x: Tensor, ref: Tensor, k: int, self_offset: int, exclude_self: bool):
    """The oracle's cdist + sort as a backend; distances in the compute dtype."""
    ct = torch_impl.compute_dtype(x.dtype)
    dist, idx = reference.knn(x.to(ct), ref.to(ct), k, exclude_self, self_offset)
    return dist.contiguous(), idx.contiguous()


knn_reference = define_knn_op("reference", _reference_knn)


# ---------------------------------------------------------------- backend registry
@dataclass(frozen=True)
class Backend:
    """A named kNN forward implementation.

    Attributes:
        name: the ``backend=`` string.
        devices: device types it runs on ("cpu", "cuda").
        load: returns the forward op (schema above); raises ImportError/RuntimeError with
            the reason when the backend cannot run here.
    """

    name: str
    devices: tuple[str, ...]
    load: Callable[[], Callable[..., tuple[Tensor, Tensor]]]


BACKENDS: dict[str, Backend] = {}
# "auto" tries these in order, per device type; the first that loads wins.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_warned: set[str] = set()


def register_backend(backend: Backend) -> None:
    """Add or replace a backend in the registry."""
    BACKENDS[backend.name] = backend


register_backend(Backend("reference", ("cpu", "cuda", "mps", "xpu"), lambda: torch.ops.ldreg.knn_reference))
register_backend(Backend("torch", ("cpu", "cuda", "mps", "xpu"), lambda: torch.ops.ldreg.knn_torch))


def _import_triton_backend() -> str | None:
    """Import the Triton backend now (it defines ldreg::knn_triton); the reason if it fails."""
    try:
        from . import triton as _triton  # noqa: F401
    except Exception as e:  # triton missing, or too old: the other backends still work
        return f"{type(e).__name__}: {e}"
    return None


_TRITON_ERROR = _import_triton_backend()


def _load_triton():
    if _TRITON_ERROR is not None:
        raise ImportError(_TRITON_ERROR)
    return torch.ops.ldreg.knn_triton


def _native_loader(name: str):
    def load():
        if _NATIVE_ERROR is not None:
            raise ImportError(_NATIVE_ERROR)
        if name not in _NATIVE_DEVICES:
            raise RuntimeError("ldreg_kernels._C was built without CUDA kernels (CPU-only torch or LDREG_NO_CUDA=1)")
        return getattr(torch.ops.ldreg, f"knn_{name}")

    return load


register_backend(Backend("cpu", ("cpu",), _native_loader("cpu")))
register_backend(Backend("cuda", ("cuda",), _native_loader("cuda")))


# Under TRITON_INTERPRET=1 the Triton kernels run on CPU tensors (slow: tests only).
register_backend(
    Backend("triton", ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",), _load_triton)
)


def _try_load(backend: Backend):
    try:
        return backend.load(), None
    except (ImportError, RuntimeError, OSError) as e:
        return None, str(e)


def resolve_backend(name: str, device: torch.device) -> Callable[..., tuple[Tensor, Tensor]]:
    """The forward op for ``backend=name`` on ``device``.

    "auto" picks the first loadable backend of the device's preference list and quietly
    falls back (warning once) when a preferred one fails to load; a backend named
    explicitly that cannot run raises with the reason.
    """
    if name == "auto":
        for cand in _AUTO_ORDER.get(device.type, ("torch",)):
            b = BACKENDS.get(cand)
            if b is None or device.type not in b.devices:
                continue
            op, why = _try_load(b)
            if op is not None:
                return op
            if cand not in _warned:
                _warned.add(cand)
                warnings.warn(f"ldreg_kernels: backend {cand!r} unavailable ({why}); falling back", stacklevel=3)
        return torch.ops.ldreg.knn_torch
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    b = BACKENDS[name]
    if device.type not in b.devices:
        raise RuntimeError(f"backend {name!r} runs on {list(b.devices)}, not on {device.type} tensors")
    op, why = _try_load(b)
    if op is None:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    return op


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends that load and run on ``device``."""
    dev = torch.device(device)
    return [n for n, b in BACKENDS.items() if dev.type in b.devices and _try_load(b)[0] is not None]
