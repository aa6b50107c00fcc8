"""The training loop: SimCLR or BYOL with LDReg, logging, atomic checkpoints, exact resume.

Determinism: the model is initialised from ``seed``; each epoch's shuffle and augmentation
generators are seeded from ``(seed, epoch, rank)``, and the learning rate and EMA momentum
are functions of the step. So a checkpoint taken at an epoch boundary holds everything a
resumed run needs (weights, optimiser moments, history), and the resumed run repeats the
uninterrupted one step for step.

Files in ``out``: ``log.jsonl`` (one record per epoch, rewritten from the checkpoint on
resume, so a killed epoch leaves no stray line), ``checkpoint.pt`` (replaced atomically
after every epoch), ``summary.json``, ``lids.pt`` (per-sample held-out LID) and ``plot.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..api import lid
from ..estimators import regularizer
from . import dist
from .augment import RECIPES, augment
from .data import ImageSet, get_dataset
from .evaluate import Evaluation, evaluate
from .methods import DEFAULT_BETA, METHODS, StepOutput
from .models import ResNetEncoder

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


class TrainingDiverged(RuntimeError):
    """Non-finite loss or features: training stopped, the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in every checkpoint; resume requires a match)."""

    method: str = "simclr"
    dataset: str = "mnist5k"
    data_root: Optional[str] = None
    ldreg: bool = True
    k: int = 32
    beta: Optional[float] = None  # None: the paper's 0.01 (SimCLR) / 0.005 (BYOL)
    reg: str = "l1"
    estimator: str = "mom"
    warmup_epochs: int = 0  # epochs before the regulariser switches on (official code: 10)
    backend: str = "auto"
    epochs: int = 20
    batch_size: int = 256  # global batch (split across ranks under DDP)
    lr: float = 2e-3
    weight_decay: float = 1e-6
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    temperature: float = 0.5
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    eval_every: int = 1
    eval_k: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.method]
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.widths, self.blocks = tuple(self.widths), tuple(self.blocks)

    @property
    def beta_value(self) -> float:
        return float(self.beta)  # type: ignore[arg-type]


def _channel_stats(x: Tensor) -> tuple[list[float], list[float]]:
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-3).tolist()


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file, fsync, then rename over ``path``.

    A crash or kill at any point leaves either the old file or the new one, never a torn one.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Trainer:
    """One SSL run. ``Trainer(cfg, out).fit()``; ``Trainer.resume(out).fit()`` continues it.

    Args:
        cfg: the run's configuration.
        out: output folder (created), or ``None`` for an in-memory run (tests).
        data: an already loaded data set (else ``cfg.dataset`` is loaded).
        progress: show tqdm bars (rank 0 only).
    """

    def __init__(self, cfg: TrainConfig, out: Optional[str] = None, *, data: Optional[ImageSet] = None,
                 progress: bool = True) -> None:
        self.cfg, self.out, self.progress = cfg, out, progress
        self.rank, self.world = dist.rank(), dist.world_size()
        if cfg.batch_size % (2 * self.world):
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of 2 x world size {self.world}")
        self.device = torch.device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype)
        self.data = data if data is not None else get_dataset(cfg.dataset, cfg.data_root)
        self.recipe = RECIPES[self.data.name]
        n_ref = 2 * cfg.batch_size * (2 if cfg.method == "byol" else 1)
        if cfg.ldreg and not 2 <= cfg.k < n_ref:
            raise ValueError(f"k must be in [2, {n_ref - 1}] for this batch (reference of {n_ref} rows), got {cfg.k}")

        torch.manual_seed(cfg.seed)
        mean, std = _channel_stats(self.data.train_x)
        encoder = ResNetEncoder(self.data.image_shape[0], cfg.widths, cfg.blocks, mean, std)
        extra = {"temperature": cfg.temperature} if cfg.method == "simclr" else {}
        self.model = METHODS[cfg.method](encoder, **extra).to(self.device, self.dtype)
        self.net: nn.Module = dist.wrap(self.model, self.device)
        self.opt = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.epoch, self.step, self.history = 0, 0, []
        self.last_eval: Optional[Evaluation] = None

    # -- schedule -------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return len(self.data.train_x) // self.cfg.batch_size

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    def lr_at(self, step: int) -> float:
        """Linear warm-up over the first epoch (at most 10% of training), then cosine to 0."""
        warm = max(1, min(self.steps_per_epoch, self.total_steps // 10))
        if step < warm:
            return self.cfg.lr * (step + 1) / warm
        return self.cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, self.total_steps - warm)))

    def ldreg_active(self, epoch: int) -> bool:
        return self.cfg.ldreg and epoch >= self.cfg.warmup_epochs

    def _generator(self, epoch: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(((self.cfg.seed * 1_000_003 + epoch) * 8 + stream) * 4096 + self.rank)

    # -- one step -------------------------------------------------------------------------
    def train_step(self, images: Tensor, g: torch.Generator) -> dict[str, float]:
        """One optimiser step on a (local) batch of images; returns the step's log values."""
        cfg = self.cfg
        x = images.to(self.device, self.dtype)
        v1, v2 = augment(x, self.recipe, g), augment(x, self.recipe, g)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        out: StepOutput = self.net(v1, v2, dist.gather_with_grad if self.world > 1 else None, self.rank)
        if not bool(torch.isfinite(out.queries).all()) or not bool(torch.isfinite(out.loss)):
            raise TrainingDiverged(self._diverged_message("features or SSL loss"))
        ref, offset = dist.global_ref(out.ref)
        active = self.ldreg_active(self.epoch)
        with torch.set_grad_enabled(active):
            lids = lid(out.queries if active else out.queries.detach(), ref, cfg.k, estimator=cfg.estimator,
                       exclude_self=True, self_offset=offset, backend=cfg.backend)
        reg = regularizer(lids, cfg.beta_value, cfg.reg) if active else torch.zeros((), device=self.device)
        loss = out.loss + reg
        if not bool(torch.isfinite(loss)):
            raise TrainingDiverged(self._diverged_message("loss"))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if hasattr(self.model, "update_target"):
            self.model.update_target((self.step + 1) / self.total_steps)
        self.step += 1
        return {"loss": float(loss.detach()), "ssl_loss": float(out.loss.detach()), "reg_loss": float(reg.detach()),
                "batch_lid": float(lids.detach().double().log().mean().exp())}

    def _diverged_message(self, what: str) -> str:
        path = os.path.join(self.out, CHECKPOINT) if self.out else None
        kept = (f"the last good checkpoint ({path}, after epoch {self.epoch}) is kept"
                if path and os.path.exists(path) else "no checkpoint was written yet")
        return (f"non-finite {what} at epoch {self.epoch + 1}, step {self.step + 1}: stopping; {kept}. "
                "Lower --lr or --beta, or check the input data")

    # -- epochs ---------------------------------------------------------------------------
    def batches(self, epoch: int):
        """This rank's share of each global batch of the epoch's permutation."""
        perm = torch.randperm(len(self.data.train_x), generator=self._generator(epoch, 0))
        b, local = self.cfg.batch_size, self.cfg.batch_size // self.world
        for s in range(self.steps_per_epoch):
            idx = perm[s * b : (s + 1) * b][self.rank * local : (self.rank + 1) * local]
            yield self.data.train_x[idx]

    def run_epoch(self) -> dict[str, float]:
        """Train one epoch; returns the mean of each step value."""
        from tqdm.auto import tqdm

        self.net.train()
        g = self._generator(self.epoch, 1)
        sums: dict[str, float] = {}
        bar = tqdm(self.batches(self.epoch), total=self.steps_per_epoch, leave=False, dynamic_ncols=True,
                   desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", disable=not self.progress or self.rank != 0)
        for images in bar:
            vals = self.train_step(images, g)
            for key, v in vals.items():
                sums[key] = sums.get(key, 0.0) + v
            bar.set_postfix(loss=f"{vals['loss']:.4f}", lid=f"{vals['batch_lid']:.2f}")
        return {key: v / self.steps_per_epoch for key, v in sums.items()}

    def evaluate(self) -> Evaluation:
        ev = evaluate(self.model.encoder, self.data, self.cfg.eval_k, self.cfg.backend)
        self.last_eval = ev
        return ev

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, evaluating, logging and checkpointing each; returns the summary."""
        t_start = time.perf_counter()
        while self.epoch < self.cfg.epochs:
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"epoch": self.epoch + 1, "step": 0, "ldreg_active": self.ldreg_active(self.epoch)}
            rec.update(self.run_epoch())
            rec["step"], rec["lr"] = self.step, self.lr_at(max(0, self.step - 1))
            self.epoch += 1
            if self.rank == 0 and (self.epoch % self.cfg.eval_every == 0 or self.epoch == self.cfg.epochs):
                ev = self.evaluate()
                rec.update(probe_acc=ev.probe_acc, gm_lid=ev.gm_lid, erank=ev.erank)
            rec["time_s"] = time.perf_counter() - t0
            self.history.append(rec)
            if self.rank == 0:
                self._report(rec)
                self.save()
            dist.barrier()
        summary = self.summary(time.perf_counter() - t_start)
        if self.rank == 0 and self.out:
            self._write_final(summary)
        return summary

    def _report(self, rec: dict[str, Any]) -> None:
        if self.progress:
            from tqdm.auto import tqdm

            ev = (f" probe {rec['probe_acc']:.4f} GM-LID {rec['gm_lid']:.3f} erank {rec['erank']:.2f}"
                  if "probe_acc" in rec else "")
            tqdm.write(f"epoch {rec['epoch']:>3}/{self.cfg.epochs} loss {rec['loss']:.4f} "
                       f"(ssl {rec['ssl_loss']:.4f} reg {rec['reg_loss']:+.4f}) batch LID {rec['batch_lid']:.2f}"
                       f"{ev} [{rec['time_s']:.1f}s]")

    def summary(self, seconds: float = 0.0) -> dict[str, Any]:
        last = next((r for r in reversed(self.history) if "probe_acc" in r), {})
        return {"config": dataclasses.asdict(self.cfg), "epochs_done": self.epoch, "steps": self.step,
                "probe_acc": last.get("probe_acc"), "gm_lid": last.get("gm_lid"), "erank": last.get("erank"),
                "final_loss": self.history[-1]["loss"] if self.history else None, "seconds": seconds}

    # -- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.cfg), "epoch": self.epoch, "step": self.step,
                "history": self.history, "model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def save(self) -> None:
        """Checkpoint (atomically) and rewrite the log from the history it holds."""
        if not self.out:
            return
        os.makedirs(self.out, exist_ok=True)
        atomic_save(self.state_dict(), os.path.join(self.out, CHECKPOINT))
        tmp = os.path.join(self.out, LOG + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)
        os.replace(tmp, os.path.join(self.out, LOG))

    @classmethod
    def resume(cls, out: str, cfg: Optional[TrainConfig] = None, **kw: Any) -> "Trainer":
        """Rebuild a run from ``out/checkpoint.pt``; ``cfg``, if given, must match the saved one."""
        path = os.path.join(out, CHECKPOINT)
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = TrainConfig(**state["config"])
        if cfg is not None:
            diff = {f.name: (getattr(saved, f.name), getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                    if getattr(saved, f.name) != getattr(cfg, f.name) and f.name != "device"}
            if diff:
                raise ValueError("--resume: the checkpoint was written with a different configuration "
                                 + ", ".join(f"{k}={a!r} (checkpoint) vs {b!r} (now)" for k, (a, b) in diff.items()))
            saved.device = cfg.device
        t = cls(saved, out, **kw)
        t.model.load_state_dict(state["model"])
        t.opt.load_state_dict(state["optimizer"])
        t.epoch, t.step, t.history = state["epoch"], state["step"], state["history"]
        return t

    def _write_final(self, summary: dict[str, Any]) -> None:
        from .plot import plot_runs

        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if self.last_eval is None:  # resumed after the last epoch: evaluate the final weights
            self.evaluate()
        torch.save(self.last_eval.lids, os.path.join(self.out, "lids.pt"))
        plot_runs([self.out], os.path.join(self.out, "plot.png"))
