"""How big the chunked temporaries of the torch-level paths may be, per device.

The torch backend, the Triton host code and the exhaustive redo process query rows in chunks
so that no temporary outgrows a budget. A budget that fits a 2-core CPU's cache is wrong on a
GPU: there every aten call is a kernel launch of several microseconds, so a chunk of a few
rows turns one LDReg step into thousands of launches. So:

- CUDA: one fraction of the memory the device can still hand out (free memory plus the
  caching allocator's unused blocks), with a floor. At the paper's shapes (B <= 4096,
  N = 4096, D = 2048, k <= 512) that is one chunk, or a few when training holds most of the
  memory.
- CPU: temporaries sized to the caches. Measured on a 2-core AMD EPYC (family 25, model
  17, AVX2; one thread), the exact re-rank's gathered rows at B=1024, N=4096, D=2048, 80
  candidates: 1M-element chunks
  110 ms, 4M 124 ms, 16M 206 ms, the whole 168M at once 612 ms (page faults and DRAM
  traffic); at B=N=512, D=512: 11, 16, 59 and 91 ms. A CPU call costs a microsecond or two,
  so the ~5000 calls of the first shape cost less than the cache misses one big chunk would.

:func:`budget` is the one place that decides. It takes the free memory as an argument, and
:func:`plan_as` makes it answer for another device, so a test on a machine without a GPU can
plan for one, and count the calls a GPU step makes. The module constants are read at call
time (tests shrink them to force many chunks).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["Budget", "budget", "chunk_rows", "plan_as", "planned_device"]

# CPU, in elements of the compute dtype. A score tile (query rows x reference columns): 2M fp32
# = 8 MiB (1M was as fast at B=N=4096 on a 2-core EPYC). Gathered neighbour rows
# (rows x m x D): 1M = 4 MiB, the fastest measured (module docstring).
CPU_SCORE_ELEMS = 1 << 21
CPU_GATHER_ELEMS = 1 << 20
# The exhaustive redo holds (rows x (k + cols)) distances, keys and sort buffers, ~28 bytes an
# element: 128K elements keep it near 3.5 MiB on the host.
CPU_EXHAUSTIVE_ELEMS = 1 << 17

# CUDA: this fraction of the memory still available, never less than the floor.
GPU_FRACTION = 1 / 8
GPU_FLOOR_BYTES = 256 << 20
# Bytes per element each phase holds at its peak: a score tile and topk's workspace (fp32,
# ~3 copies); one gathered fp32 buffer reused in place (plus slack); the exhaustive redo's 28.
_SCORE_BYTES, _GATHER_BYTES, _EXHAUSTIVE_BYTES = 12, 8, 28


@dataclass(frozen=True)
class Budget:
    """Element budgets (compute-dtype elements) for one device.

    Attributes:
        score: one score tile, query rows x reference columns.
        gather: one chunk of gathered neighbour rows, rows x m x D.
        exhaustive: one block of the exhaustive redo, rows x (k + columns).
    """

    score: int
    gather: int
    exhaustive: int


def available_bytes(device: torch.device) -> int:
    """Memory a CUDA device can still hand out: free device memory plus the caching
    allocator's reserved but unused blocks (a driver query, not a stream sync)."""
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(0, int(cached))


_override: tuple[str, int | None] | None = None


@contextlib.contextmanager
def plan_as(device_type: str, free_bytes: int | None = None):
    """Within the block, :func:`budget` plans every device as ``device_type`` with
    ``free_bytes`` available: e.g. ``plan_as("cuda", 100 << 30)`` on a CPU runs the exact
    call sequence of a GPU step, to count it (the LID estimators too take their torch
    formulas, not the CPU's native twin)."""
    global _override
    old, _override = _override, (device_type, free_bytes)
    try:
        yield
    finally:
        _override = old


def planned_device() -> str | None:
    """The device type :func:`plan_as` is planning for, or None outside it."""
    return None if _override is None else _override[0]


def budget(device: torch.device | str, free_bytes: int | None = None) -> Budget:
    """The element budgets for temporaries on ``device``.

    Args:
        device: where the temporaries live ("cpu", "cuda", "cuda:1", a torch.device).
        free_bytes: memory still available there (CUDA and other accelerators); default:
            asked of the device (:func:`available_bytes`). Pass it to plan for a GPU
            without one.
    """
    device = torch.device(device)
    if _override is not None:
        device, free_bytes = torch.device(_override[0]), _override[1]
    if device.type == "cpu":
        return Budget(CPU_SCORE_ELEMS, CPU_GATHER_ELEMS, CPU_EXHAUSTIVE_ELEMS)
    if free_bytes is None:
        free_bytes = available_bytes(device) if device.type == "cuda" else GPU_FLOOR_BYTES * 8
    total = max(GPU_FLOOR_BYTES, int(free_bytes * GPU_FRACTION))
    return Budget(total // _SCORE_BYTES, total // _GATHER_BYTES, total // _EXHAUSTIVE_BYTES)


def chunk_rows(n_rows: int, elems_per_row: int, limit: int) -> int:
    """Rows per chunk so that chunk * elems_per_row stays under ``limit`` elements (at
    least one row)."""
    return max(1, min(n_rows, limit // max(1, elems_per_row)))
