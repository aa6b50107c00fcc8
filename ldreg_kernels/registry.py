"""Which kNN backends loaded here (and why not), and which one ``backend=`` picks.

The "reference" and "torch" backends always load. The optional ones ("cpu"/"cuda" from the
C++ extension, "triton") are imported here; ImportError is caught, and its message is kept
in ``LOAD_ERRORS`` as the reason an explicit request gets. So is the ValueError of a bad
optional setting read at import (``LDREG_TRITON_PRECISION``): ``import ldreg_kernels`` never
fails because of one, and the other backends stay usable. Any other error in their code
propagates.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
from torch import Tensor

from ._op import Backend
from .backends import reference as _reference
from .backends import torch as _torch

__all__ = [
    "Backend", "BACKENDS", "LOAD_ERRORS", "register_backend", "resolve_backend", "available_backends", "device_usable",
]

BACKENDS: dict[str, Backend] = {}
# Optional backend name -> why it did not load.
LOAD_ERRORS: dict[str, str] = {}
# "auto" tries these in order, per device type; the first that loads wins.
# On CUDA tensors "auto" picks torch until the GPU suite (make gpu-check) has passed on a
# real card: the cuda and triton kernels have only been compiled ahead of time and run under
# the Triton interpreter, so they are opt-in (backend="cuda"/"triton") until then.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("torch",), "cpu": ("cpu", "torch")}
_warned: set[str] = set()


def register_backend(backend: Backend) -> None:
    """Add or replace a backend in the registry."""
    BACKENDS[backend.name] = backend


def _unavailable(reason: str) -> Callable[[], None]:
    def load():
        raise ImportError(reason)

    return load


for _b in _reference.BACKENDS + _torch.BACKENDS:
    register_backend(_b)

try:
    from .backends import native as _native
except ImportError as e:
    for _name, _devs in (("cpu", ("cpu",)), ("cuda", ("cuda",))):
        LOAD_ERRORS[_name] = str(e)
        register_backend(Backend(_name, _devs, _unavailable(str(e))))
else:
    for _b in _native.BACKENDS:
        register_backend(_b)

try:
    from .backends import triton as _triton
except (ImportError, ValueError) as e:  # ValueError: a bad LDREG_TRITON_PRECISION
    _why = f"{type(e).__name__}: {e}"
    LOAD_ERRORS["triton"] = _why
    _devs = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
    register_backend(Backend("triton", _devs, _unavailable(_why)))
else:
    for _b in _triton.BACKENDS:
        register_backend(_b)


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
        for cand in AUTO_ORDER.get(device.type, ("torch",)):
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
        hint = ""
        if name == "triton" and device.type == "cpu":
            hint = " (Triton runs on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before " \
                   "importing ldreg_kernels; slow, for tests)"
        raise RuntimeError(f"backend {name!r} runs on {list(b.devices)}, not on {device.type} tensors{hint}")
    op, why = _try_load(b)
    if op is None:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    return op


def device_usable(device: str | torch.device) -> bool:
    """Whether tensors of ``device``'s type can exist in this process: "cpu" always, any other
    type ("cuda", ...) when ``torch.<type>.is_available()`` says so."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return True
    is_available = getattr(getattr(torch, dev.type, None), "is_available", None)
    return bool(is_available()) if callable(is_available) else False


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends that load here and can run on ``device`` now.

    A backend is listed when it runs on ``device``'s type, loads (its library and compiled
    kernels are present), and that device type is usable in this process. So on a CPU-only
    torch, or a machine without a GPU, ``available_backends("cuda")`` is empty: no backend can
    run on a "cuda" tensor there, although "triton" and "torch" would on a GPU. The device
    index is ignored.
    """
    dev = torch.device(device)
    if not device_usable(dev):
        return []
    return [n for n, b in BACKENDS.items() if dev.type in b.devices and _try_load(b)[0] is not None]
