"""What the trainers need from torch.distributed, as no-ops on a single process.

Under ``torchrun``, :func:`init_from_env` starts the process group (NCCL for CUDA, gloo for
the CPU); the trainer then wraps its model in DDP, gathers NT-Xent negatives with exact
gradients, and finds LDReg neighbours in the global batch (``ldreg_kernels.distributed``).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as td
from torch import Tensor, nn


def initialized() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if initialized() else 0


def world_size() -> int:
    return td.get_world_size() if initialized() else 1


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns the device to use."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or initialized():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        td.init_process_group("nccl")
        return f"cuda:{local}"
    td.init_process_group("gloo")
    return device


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around ``model`` under a process group, else ``model`` itself."""
    if not initialized() or world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' rows of ``x``, in rank order, with gradients returned to their owners."""
    from ..distributed import gather_with_grad as gather

    return gather(x)


def global_ref(ref: Tensor) -> tuple[Tensor, int]:
    """The detached reference gathered from every rank, and the row where ours begins."""
    from ..distributed import global_reference

    return global_reference(ref)


def barrier() -> None:
    if initialized() and world_size() > 1:
        td.barrier()
