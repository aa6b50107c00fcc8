"""``FeatureQueue``: a FIFO memory bank of past features, as in MoCo, for use as ``ref``.

A reference set far larger than the batch gives each sample a denser neighbourhood for its
LID estimate. The queue never holds the current queries, so call::

    loss = ssl_loss + ldreg_loss(x, ref=queue.features(), exclude_self=False)
    loss.backward()
    queue.enqueue(x)   # after backward: the next step's reference

``features()`` is a view of the storage, and the backward reads it: enqueueing before the
backward makes autograd raise ("modified by an inplace operation") rather than silently
use the new rows. Enqueue after the backward (or pass ``features().clone()``).

The fused backends ("torch", "cpu", "triton", "cuda") never form the B x N distance matrix:
a step against a queue of N rows needs O(N x D + B x k) memory plus fixed-size work tiles
(tests/test_memory_bank.py measures it), where the reference backend needs ~4 x B x N x 4 bytes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class FeatureQueue:
    """Fixed-size FIFO of detached feature rows in one preallocated (size, dim) buffer.

    Rows are written in a ring: once full, each new row overwrites the oldest. ``features()``
    returns the filled rows in buffer order (a view, no copy), which is all a kNN reference
    needs; ``features(ordered=True)`` gives them oldest first.

    Args:
        size: capacity in rows, >= 1.
        dim: feature dimension D, >= 1.
        dtype: storage dtype (floating point); enqueued features must match it.
        device: storage device; enqueued features must be on it.

    Example:
        >>> queue = FeatureQueue(65536, 128)
        >>> reg = ldreg_loss(h, ref=queue.features(), exclude_self=False) if len(queue) >= 64 else 0
        >>> (ssl_loss + reg).backward()
        >>> queue.enqueue(h)
    """

    def __init__(
        self, size: int, dim: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> None:
        for name, v in (("size", size), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.size, self.dim = size, dim
        self.buffer = torch.zeros(size, dim, dtype=dtype, device=device)
        self._ptr = 0  # next row to write (the oldest row once full)
        self._filled = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def __len__(self) -> int:
        return self._filled

    @property
    def is_full(self) -> bool:
        return self._filled == self.size

    def __repr__(self) -> str:
        return (
            f"FeatureQueue(size={self.size}, dim={self.dim}, dtype={self.dtype}, device={self.device}, "
            f"filled={self._filled})"
        )

    def _check(self, t: Tensor, name: str) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape (n, {self.dim}) for this queue, got {tuple(t.shape)}")
        if t.dtype != self.dtype:
            raise TypeError(f"{name} must have the queue's dtype {self.dtype}, got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"{name} must be on the queue's device {self.device}, got {t.device}")

    @torch.no_grad()
    def enqueue(self, feats: Tensor) -> None:
        """Append rows (detached; the queue holds no graph), overwriting the oldest once full.

        Args:
            feats: (n, dim), the queue's dtype and device. With n > size only the newest
                ``size`` rows (the last ones) are kept.
        """
        self._check(feats, "feats")
        n = feats.shape[0]
        if n >= self.size:
            self.buffer.copy_(feats[n - self.size :])
            self._ptr, self._filled = 0, self.size
            return
        first = min(n, self.size - self._ptr)  # rows up to the end of the buffer, then wrap
        self.buffer[self._ptr : self._ptr + first] = feats[:first]
        self.buffer[: n - first] = feats[first:]
        self._ptr = (self._ptr + n) % self.size
        self._filled = min(self._filled + n, self.size)

    def features(self, ordered: bool = False) -> Tensor:
        """The filled rows, (len(self), dim).

        Args:
            ordered: False (default): buffer order, a view of the storage without a copy
                (overwritten by later ``enqueue`` calls: enqueue after the backward).
                True: oldest first, a copy once the ring has wrapped.
        """
        if not ordered or not self.is_full or self._ptr == 0:
            return self.buffer[: self._filled]
        return torch.cat([self.buffer[self._ptr :], self.buffer[: self._ptr]])

    def clear(self) -> None:
        """Forget every row (the storage is kept)."""
        self._ptr = self._filled = 0

    def state_dict(self) -> dict[str, Any]:
        """Storage and ring position, for a training checkpoint (``torch.save``-able)."""
        return {"buffer": self.buffer, "ptr": self._ptr, "filled": self._filled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the storage may come from another device.

        Raises:
            KeyError: a key is missing. ValueError/TypeError: the saved buffer's shape or
            dtype differs from this queue's, or the ring position is out of range.
        """
        buf, ptr, filled = state["buffer"], int(state["ptr"]), int(state["filled"])
        if not isinstance(buf, Tensor) or tuple(buf.shape) != (self.size, self.dim):
            got = tuple(buf.shape) if isinstance(buf, Tensor) else type(buf).__name__
            raise ValueError(f"saved queue buffer must have shape ({self.size}, {self.dim}), got {got}")
        if buf.dtype != self.dtype:
            raise TypeError(f"saved queue buffer must have the queue's dtype {self.dtype}, got {buf.dtype}")
        if not (0 <= filled <= self.size and 0 <= ptr < self.size and (filled == self.size or ptr == filled)):
            raise ValueError(f"saved queue position is inconsistent: ptr={ptr}, filled={filled}, size={self.size}")
        self.buffer.copy_(buf)
        self._ptr, self._filled = ptr, filled
