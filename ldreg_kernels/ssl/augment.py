"""Batched image augmentations in plain torch, driven by an explicit ``torch.Generator``.

Every random draw comes from the generator the trainer passes in (seeded from the run's
seed, the epoch and the rank), so a resumed run sees the same views as an uninterrupted one. Geometry is
one affine warp per image (``affine_grid`` + ``grid_sample``), so a batch costs two kernels
whatever its size.

Recipes:
- digits (MNIST-5k, sklearn digits): random resized crop (scale 0.5-1), rotation +-15 deg,
  brightness/contrast jitter, pixel noise. No flips: a mirrored digit is another glyph.
- natural images (CIFAR-10): SimCLR's recipe: random resized crop (0.2-1), horizontal flip,
  colour jitter (0.4, 0.4, 0.4) with p = 0.8, grayscale with p = 0.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Recipe:
    """Augmentation parameters for one kind of image."""

    crop_scale: tuple[float, float]
    max_rotation_deg: float
    hflip: bool
    jitter: float  # brightness/contrast (and saturation for RGB) strength
    jitter_p: float
    gray_p: float
    noise_std: float
    padding_mode: str  # what the warp shows outside the image


DIGITS = Recipe((0.5, 1.0), 15.0, False, 0.4, 1.0, 0.0, 0.05, "zeros")
NATURAL = Recipe((0.2, 1.0), 0.0, True, 0.4, 0.8, 0.2, 0.0, "reflection")

RECIPES = {"mnist5k": DIGITS, "digits": DIGITS, "cifar10": NATURAL}


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _affine(n: int, r: Recipe, g: torch.Generator) -> Tensor:
    """(n, 2, 3) sampling matrices: crop of area ``scale``, aspect 3/4..4/3, rotation, flip."""
    area = _uniform(n, *r.crop_scale, g)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), g)
    sx = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)
    sy = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    tx = _uniform(n, -1.0, 1.0, g) * (1 - sx)
    ty = _uniform(n, -1.0, 1.0, g) * (1 - sy)
    ang = _uniform(n, -1.0, 1.0, g) * math.radians(r.max_rotation_deg)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if r.hflip else torch.ones(n)
    cos, sin = ang.cos(), ang.sin()
    return torch.stack(
        [
            torch.stack([sx * cos * flip, -sy * sin, tx], 1),
            torch.stack([sx * sin * flip, sy * cos, ty], 1),
        ],
        1,
    )


def _gray(x: Tensor) -> Tensor:
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def augment(x: Tensor, recipe: Recipe, g: torch.Generator) -> Tensor:
    """One random view of each image.

    Args:
        x: (B, C, H, W) in [0, 1], C = 1 or 3, on any device.
        recipe: e.g. ``RECIPES["mnist5k"]``.
        g: CPU generator; every random number comes from it.

    Returns:
        (B, C, H, W) views in [0, 1], same device and dtype.
    """
    b, c, dev = x.shape[0], x.shape[1], x.device
    theta = _affine(b, recipe, g).to(dev, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode=recipe.padding_mode, align_corners=False)

    on = (torch.rand(b, generator=g) < recipe.jitter_p).to(dev, x.dtype).view(b, 1, 1, 1)
    j = recipe.jitter
    bright = _uniform(b, 1 - j, 1 + j, g).to(dev, x.dtype).view(b, 1, 1, 1)
    contrast = _uniform(b, 1 - j, 1 + j, g).to(dev, x.dtype).view(b, 1, 1, 1)
    sat = _uniform(b, 1 - j, 1 + j, g).to(dev, x.dtype).view(b, 1, 1, 1)
    jit = out * bright
    mean = jit.mean((1, 2, 3), keepdim=True)
    jit = (jit - mean) * contrast + mean
    if c == 3:
        jit = (jit - _gray(jit)) * sat + _gray(jit)
    out = on * jit + (1 - on) * out

    if c == 3 and recipe.gray_p > 0:
        gray = (torch.rand(b, generator=g) < recipe.gray_p).to(dev, x.dtype).view(b, 1, 1, 1)
        out = gray * _gray(out).expand_as(out) + (1 - gray) * out
    if recipe.noise_std > 0:
        noise = torch.randn(out.shape, generator=g).to(dev, x.dtype)
        out = out + recipe.noise_std * noise
    return out.clamp_(0.0, 1.0)
