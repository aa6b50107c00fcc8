"""SimCLR and BYOL, each returning its SSL loss and the encoder features LDReg acts on.

Both methods hand the trainer ``(loss, queries, ref)``: ``queries`` are the encoder outputs
of both views (2B x D, with grad); ``ref`` is what their neighbours are found in, detached,
with the queries at rows ``0 .. 2B-1`` (so ``self_offset = 0`` before any gathering):
- SimCLR: the batch itself (both views).
- BYOL: the online features of both views followed by the target network's (the official
  code's reference), 4B x D.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import ResNetEncoder, mlp

Gather = Callable[[Tensor], Tensor]  # (b, d) -> (world * b, d); identity on one process


class StepOutput(NamedTuple):  # a NamedTuple so DDP can walk the output
    loss: Tensor  # the SSL loss, before LDReg
    queries: Tensor  # (2B, D) encoder outputs, with grad
    ref: Tensor  # (N, D) detached reference, queries at rows 0 .. 2B-1


def nt_xent(z1: Tensor, z2: Tensor, temperature: float, gather: Optional[Gather] = None,
            rank: int = 0) -> Tensor:
    """SimCLR's NT-Xent: each view's positive is the other view of the same image.

    With ``gather`` (DDP), negatives come from every rank's batch, and each rank's loss is
    the mean over its own 2B anchors.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    b = z1.shape[0]
    z_all = z if gather is None else gather(z)
    logits = z @ z_all.t() / temperature
    off = 2 * b * rank
    own = torch.arange(2 * b, device=z.device)
    logits[own, own + off] = float("-inf")
    target = own.roll(b) + off
    return F.cross_entropy(logits, target)


class SimCLR(nn.Module):
    """SimCLR (Chen et al., 2020): encoder + MLP projector + NT-Xent."""

    def __init__(self, encoder: ResNetEncoder, proj_hidden: int = 256, proj_dim: int = 64,
                 temperature: float = 0.5) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(encoder.out_dim, proj_hidden, proj_dim)
        self.temperature = temperature

    def forward(self, v1: Tensor, v2: Tensor, gather: Optional[Gather] = None, rank: int = 0) -> StepOutput:
        b = v1.shape[0]
        h = self.encoder(torch.cat([v1, v2]))
        z = self.projector(h)
        loss = nt_xent(z[:b], z[b:], self.temperature, gather, rank)
        return StepOutput(loss, h, h.detach())


class BYOL(nn.Module):
    """BYOL (Grill et al., 2020): online encoder + projector + predictor, EMA target.

    Args:
        base_momentum: EMA momentum at step 0; raised to 1 on a cosine over training
            (``update_target``).
    """

    def __init__(self, encoder: ResNetEncoder, proj_hidden: int = 256, proj_dim: int = 64,
                 base_momentum: float = 0.99) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(encoder.out_dim, proj_hidden, proj_dim)
        self.predictor = mlp(proj_dim, proj_hidden, proj_dim)
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.base_momentum = base_momentum

    @staticmethod
    def _regress(p: Tensor, z: Tensor) -> Tensor:
        return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)

    def forward(self, v1: Tensor, v2: Tensor, gather: Optional[Gather] = None, rank: int = 0) -> StepOutput:
        b = v1.shape[0]
        v = torch.cat([v1, v2])
        h = self.encoder(v)
        p = self.predictor(self.projector(h))
        with torch.no_grad():
            ht = self.target_encoder(v)
            zt = self.target_projector(ht)
        loss = (self._regress(p[:b], zt[b:]) + self._regress(p[b:], zt[:b])).mean()
        return StepOutput(loss, h, torch.cat([h.detach(), ht]))

    @torch.no_grad()
    def update_target(self, progress: float) -> None:
        """EMA step; ``progress`` in [0, 1] is the fraction of training done."""
        tau = 1 - (1 - self.base_momentum) * (math.cos(math.pi * progress) + 1) / 2
        for online, target in ((self.encoder, self.target_encoder), (self.projector, self.target_projector)):
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(tau).add_(po.detach(), alpha=1 - tau)
            for bo, bt in zip(online.buffers(), target.buffers()):
                bt.copy_(bo)


METHODS = {"simclr": SimCLR, "byol": BYOL}
DEFAULT_BETA = {"simclr": 0.01, "byol": 0.005}  # the paper's settings
# Optimiser and BYOL settings per method, used where the configuration leaves them unset.
# BYOL's come from experiments/byol_search.py (MNIST-5k, 10 epochs; table in experiments/results/):
# at a few hundred steps a fast-following target (low base momentum), a 10x predictor learning
# rate, weight decay 0.1 and batch 128 (twice the steps of 256 for the same images) are what let
# it learn; the BYOL paper's 0.99/0.996 suit hundreds of epochs.
METHOD_DEFAULTS = {
    "simclr": {"lr": 2e-3, "weight_decay": 1e-6, "batch_size": 256, "momentum": 0.99, "predictor_lr_mult": 1.0},
    "byol": {"lr": 5e-3, "weight_decay": 0.1, "batch_size": 128, "momentum": 0.0, "predictor_lr_mult": 10.0},
}
