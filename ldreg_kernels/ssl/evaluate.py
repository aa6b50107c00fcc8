"""Evaluation of a frozen encoder: features, linear probe, geometric-mean LID, effective rank.

The LID metric is the paper's: MLE with k = 32 of every held-out image against the
training images (a reference far larger than a batch), through our own kNN op in
O(batch x k) memory; effective rank is Roy & Vetterli's, of the feature correlation matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics import effective_rank, geometric_mean, per_sample_lid


@dataclass
class Evaluation:
    probe_acc: float  # linear-probe top-1 accuracy on the held-out set
    gm_lid: float  # geometric-mean LID (MLE, k) of held-out vs training features
    erank: float  # effective rank of the held-out features
    lids: Tensor  # (M,) per-sample LID of the held-out set, for histograms
    spectrum: Optional[Tensor] = None  # singular values of the centred held-out features, descending


@torch.no_grad()
def extract(encoder: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Encoder features of un-augmented images, in eval mode (running BN statistics)."""
    was_training = encoder.training
    encoder.eval()
    w = next(encoder.parameters())
    out = torch.cat([encoder(images[s : s + batch_size].to(w.device, w.dtype)).float()
                     for s in range(0, len(images), batch_size)])
    encoder.train(was_training)
    return out


def linear_probe(
    train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, num_classes: int,
    *, weight_decay: float = 1e-4, iters: int = 100,
) -> float:
    """Top-1 accuracy of a logistic-regression probe on frozen features.

    Features are standardised with the training statistics; the probe is fitted full-batch
    with L-BFGS (deterministic, no learning rate to tune) in float64.
    """
    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    xtr = ((train_f - mu) / sd).double()
    xte = ((test_f - mu) / sd).double()
    ytr = train_y.to(xtr.device)
    lin = nn.Linear(xtr.shape[1], num_classes).double().to(xtr.device)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(xtr), ytr) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((lin(xte).argmax(1).cpu() == test_y.cpu()).double().mean())


def evaluate(encoder: nn.Module, data, k: int = 32, backend: str = "auto") -> Evaluation:
    """Probe accuracy, geometric-mean LID (MLE, k), effective rank and singular values of ``data.test_x``."""
    ftr = extract(encoder, data.train_x)
    fte = extract(encoder, data.test_x)
    lids = per_sample_lid(fte, ftr, k, backend=backend).cpu()
    return Evaluation(
        probe_acc=linear_probe(ftr, data.train_y, fte, data.test_y, data.num_classes),
        gm_lid=geometric_mean(lids),
        erank=effective_rank(fte),
        lids=lids,
        spectrum=singular_values(fte),
    )


def singular_values(features: Tensor) -> Tensor:
    """Singular values of the centred features, descending, float64 on the CPU: the picture of
    dimensional collapse (Jing et al., 2022) is their log plotted against the index."""
    f = features.double().cpu()
    return torch.linalg.svdvals(f - f.mean(0))
