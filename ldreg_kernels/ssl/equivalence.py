"""Drop-in check: the same seeded training run with the paper's reference op and a fast one.

``python -m ldreg_kernels.ssl.equivalence --steps 200`` trains a small SimCLR (or BYOL) with
LDReg on the sklearn digits twice from one seed, once per backend, and reports the largest
relative difference of the per-step loss curves and of the final held-out geometric-mean LID.
The test suite runs the same function for 20 steps.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from .data import get_dataset
from ..metrics import geometric_mean, per_sample_lid
from .evaluate import extract
from .train import TrainConfig, Trainer


def loss_curve(backend: str, steps: int, *, method: str = "simclr", seed: int = 0,
               dtype: str = "float32") -> dict:
    """Per-step total losses and the final held-out GM-LID of a small seeded run.

    The batch LID uses ``backend``; the held-out metric always uses the float64-exact
    "reference" op, so only the training path differs between two calls.
    """
    data = get_dataset("digits")
    cfg = TrainConfig(method=method, dataset="digits", k=16, batch_size=64, widths=(8, 16, 32), blocks=(1, 1, 1),
                      epochs=max(1, -(-steps // (len(data.train_x) // 64))), backend=backend, seed=seed,
                      dtype=dtype, lr=1e-3, beta=0.05)
    t = Trainer(cfg, None, data=data, progress=False)
    losses, lids = [], []
    while t.step < steps:
        g = t._generator(t.epoch, 1)
        for images in t.batches(t.epoch):
            vals = t.train_step(images, g)
            losses.append(vals["loss"])
            lids.append(vals["batch_lid"])
            if t.step == steps:
                break
        t.epoch += 1
    feats_te, feats_tr = extract(t.model.encoder, data.test_x), extract(t.model.encoder, data.train_x)
    gm = geometric_mean(per_sample_lid(feats_te.double(), feats_tr.double(), 32, backend="reference"))
    return {"loss": losses, "batch_lid": lids, "gm_lid": gm}


def max_rel_diff(a: Sequence[float], b: Sequence[float]) -> float:
    """Largest |a - b| / |b| over paired values."""
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(((ta - tb).abs() / tb.abs().clamp_min(1e-30)).max())


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--method", choices=("simclr", "byol"), default="simclr")
    p.add_argument("--backend", default="auto", help="the fast backend to compare with 'reference'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="float64 (default) isolates the op; float32 training amplifies rounding")
    p.add_argument("--tol", type=float, default=1e-4)
    a = p.parse_args(argv)
    ref = loss_curve("reference", a.steps, method=a.method, seed=a.seed, dtype=a.dtype)
    fast = loss_curve(a.backend, a.steps, method=a.method, seed=a.seed, dtype=a.dtype)
    dl, dg = max_rel_diff(fast["loss"], ref["loss"]), abs(fast["gm_lid"] - ref["gm_lid"]) / ref["gm_lid"]
    print(f"{a.method} {a.steps} steps {a.dtype}, reference vs {a.backend}: loss curve max rel diff {dl:.2e}, "
          f"final GM-LID {ref['gm_lid']:.5f} vs {fast['gm_lid']:.5f} (rel {dg:.2e}), "
          f"loss {ref['loss'][0]:.4f} -> {ref['loss'][-1]:.4f}")
    ok = dl <= a.tol and dg <= a.tol
    print("PASS" if ok else f"FAIL (tolerance {a.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
