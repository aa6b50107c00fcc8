"""The training loop: SimCLR or BYOL with LDReg, logging, atomic checkpoints, exact resume.

Determinism: the model is initialised from ``seed``; each epoch's shuffle and augmentation
generators are seeded from ``(seed, epoch, rank)``, and the learning rate and EMA momentum
are functions of the step. So a checkpoint taken at an epoch boundary holds everything a
resumed run needs (weights, optimiser moments, history), and the resumed run repeats the
uninterrupted one step for step.

Files in ``out``: ``log.jsonl`` (one record per epoch, rewritten from the checkpoint on
resume, so a killed epoch leaves no stray line), ``checkpoint.pt`` (replaced atomically
after every epoch), ``summary.json``, ``lids.pt`` (per-sample held-out LID), ``spectrum.pt`` (singular values of
the held-out features) and ``plot.png``.

Checkpoint safety: a checkpoint holds only tensors and plain containers (dicts, lists,
tuples, str, int, float, bool, None): the config as a dict, no RNG state (every generator
is re-seeded from the config), so it is read back with ``torch.load(weights_only=True)``.
A crafted file cannot run code on ``--resume``; it fails with :class:`CheckpointError`.

Protocols (``protocol``): ``"custom"`` takes every setting as given (unset: k = 32, no
warm-up, no monitors); ``"paper"`` fills the unset ones as the LDReg paper and its official
code do: the regulariser switches on after 10% of the epochs (official: 10 of 100), beta is
the paper's per method (0.01 SimCLR, 0.005 BYOL), k is the paper's for the batch size
(:func:`paper_k`), and the MLE LID of the batch at k = 32 and k = 512 is logged every step
(``monitor_ks``), as the official code logs it. A value given explicitly always wins.

BYOL's reference set holds the target network's features of the same views, so each query's
own target twin sits in it (at distance 0 at step 0, when target = online); it is excluded
from that query's neighbours, as its own row is, so the LID measures the neighbourhood, not
the EMA lag.

Mixed precision (``amp``): ``"bf16"`` or ``"fp16"`` runs the forward passes and the LDReg
term under ``torch.autocast`` (fp16: CUDA only, with a ``GradScaler``); the weights, the
optimiser and the evaluation stay in float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

import warnings

from ..api import DEFAULT_EPS, knn, lid
from ..estimators import lid_from_distances, regularizer
from ..registry import BACKENDS, LOAD_ERRORS, available_backends
from . import dist
from .augment import RECIPES, augment
from .data import ImageSet, get_dataset
from .evaluate import Evaluation, evaluate
from .methods import DEFAULT_BETA, METHOD_DEFAULTS, METHODS, StepOutput
from .models import ResNetEncoder
from .runs import CHECKPOINT, LOG, atomic_save, safe_load  # noqa: F401  (re-exported)



AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Seeds feed torch.Generator.manual_seed through _generator's mixing, which must stay < 2**64.
MAX_SEED = 2**29


PROTOCOLS = ("custom", "paper")
PAPER_MONITOR_KS = (32, 512)  # the official code logs the MLE LID at these k every step


def paper_k(batch_size: int) -> int:
    """The paper's k for a batch size: 16 at batch <= 512, 32 at <= 1024, 64 above (DESIGN.md)."""
    return 16 if batch_size <= 512 else 32 if batch_size <= 1024 else 64


class TrainingDiverged(RuntimeError):
    """Non-finite loss or features: training stopped, the last good checkpoint is kept."""


class ConfigError(ValueError):
    """The configuration is invalid, or cannot run on this machine or data set (the CLI's exit 2).

    ``field`` names the offending :class:`TrainConfig` field (``None`` if several), so the CLI
    can name the option; ``reason`` is the message without it.
    """

    def __init__(self, reason: str, field: Optional[str] = None) -> None:
        super().__init__(f"{field} {reason}" if field else reason)
        self.reason, self.field = reason, field


class CheckpointError(ValueError):
    """A checkpoint cannot be read (corrupt, foreign, unsafe) or does not fit this run."""


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in every checkpoint; resume requires a match)."""

    method: str = "simclr"
    dataset: str = "mnist5k"
    data_root: Optional[str] = None
    ldreg: bool = True
    k: Optional[int] = None  # None: 32 ("custom"), paper_k(batch_size) ("paper")
    beta: Optional[float] = None  # None: the paper's 0.01 (SimCLR) / 0.005 (BYOL)
    reg: str = "l1"
    estimator: str = "mom"
    # epochs before the regulariser switches on; None: 0 ("custom"), 10% of epochs ("paper"; official 10 of 100)
    warmup_epochs: Optional[int] = None
    protocol: str = "custom"
    monitor_ks: Optional[tuple[int, ...]] = None  # MLE LID of the batch logged every step; None: () / (32, 512)
    # BYOL: base EMA momentum of the target (cosine to 1 over training), and the predictor's
    # learning rate as a multiple of lr. None: the method's (methods.METHOD_DEFAULTS)
    momentum: Optional[float] = None
    predictor_lr_mult: Optional[float] = None
    backend: str = "auto"
    epochs: int = 20
    # global batch (split across ranks under DDP); None: the method's (methods.METHOD_DEFAULTS): 256 SimCLR, 128 BYOL
    batch_size: Optional[int] = None
    lr: Optional[float] = None  # None: the method's: 2e-3 SimCLR, 5e-3 BYOL
    weight_decay: Optional[float] = None  # None: the method's: 1e-6 SimCLR, 0.1 BYOL
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    temperature: float = 0.5
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    eval_every: int = 1
    eval_k: int = 32
    amp: str = "off"  # "bf16" / "fp16": autocast for the training forward and LDReg

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"must be one of {sorted(METHODS)}, got {self.method!r}", "method")
        for name, value in METHOD_DEFAULTS[self.method].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"must be one of {list(PROTOCOLS)}, got {self.protocol!r}", "protocol")
        paper = self.protocol == "paper"
        if self.k is None:
            self.k = paper_k(self.batch_size) if paper else 32
        if self.warmup_epochs is None:
            self.warmup_epochs = round(0.1 * self.epochs) if paper else 0
        if self.monitor_ks is None:
            self.monitor_ks = PAPER_MONITOR_KS if paper else ()
        self.monitor_ks = tuple(int(m) for m in self.monitor_ks)
        if any(m < 2 for m in self.monitor_ks):
            raise ConfigError(f"must all be >= 2, got {self.monitor_ks}", "monitor_ks")
        if not 0 <= float(self.momentum) < 1:
            raise ConfigError(f"must be in [0, 1), got {self.momentum!r}", "momentum")
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.method]
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"must be 'float32' or 'float64', got {self.dtype!r}", "dtype")
        if self.amp not in ("off", *AMP_DTYPES):
            raise ConfigError(f"must be one of ['off', 'bf16', 'fp16'], got {self.amp!r}", "amp")
        if self.amp != "off" and self.dtype != "float32":
            raise ConfigError(f"{self.amp!r} needs dtype 'float32' (autocast lowers float32), got {self.dtype!r}",
                              "amp")
        for name in ("epochs", "batch_size", "eval_every", "eval_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", name)
        if self.warmup_epochs < 0:
            raise ConfigError(f"must be >= 0, got {self.warmup_epochs}", "warmup_epochs")
        if self.k < 2:
            raise ConfigError(f"must be >= 2, got {self.k}", "k")
        # A negative beta would reward collapse: it minimises LID instead of raising it.
        for name, positive in (("beta", False), ("lr", True), ("weight_decay", False), ("temperature", True),
                               ("predictor_lr_mult", True)):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0 or (positive and v == 0):
                raise ConfigError(f"must be a finite number {'>' if positive else '>='} 0, got {v!r}", name)
        if not 0 <= self.seed < MAX_SEED:
            raise ConfigError(f"must be in [0, {MAX_SEED}), got {self.seed}", "seed")
        self.widths, self.blocks = tuple(self.widths), tuple(self.blocks)
        if not self.widths or len(self.widths) != len(self.blocks) or min(self.widths + self.blocks) < 1:
            raise ConfigError(f"widths and blocks need one entry >= 1 per stage, got widths={self.widths}, "
                              f"blocks={self.blocks}")

    @property
    def beta_value(self) -> float:
        return float(self.beta)  # type: ignore[arg-type]


def config_diff(saved: TrainConfig, now: TrainConfig, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """The fields where two configurations differ, as {name: (saved, now)}; a sequence read back
    from JSON (a list) equals the same tuple."""
    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {f.name: (getattr(saved, f.name), getattr(now, f.name)) for f in dataclasses.fields(now)
            if f.name not in ignore and plain(getattr(saved, f.name)) != plain(getattr(now, f.name))}


def check_runtime(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` unless ``cfg.device``, ``cfg.backend`` and ``cfg.amp`` work here.

    Cheap (loads no data, builds no model), so the CLI calls it before anything else.
    """
    try:
        dev = torch.device(cfg.device)
    except RuntimeError:
        raise ConfigError(f"{cfg.device!r} is not a torch device (use cpu, cuda or cuda:N)", "device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"{cfg.device!r}: {why}; use cpu", "device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{cfg.device!r}: only {torch.cuda.device_count()} CUDA GPU(s) visible", "device")
    elif dev.type != "cpu":
        raise ConfigError(f"{cfg.device!r}: the trainer runs on cpu or cuda", "device")
    if cfg.backend != "auto" and cfg.backend not in available_backends(dev):
        b = BACKENDS.get(cfg.backend)
        if b is None:
            why = f"unknown backend; choose 'auto' or one of {sorted(BACKENDS)}"
        elif dev.type not in b.devices:
            why = f"it runs on {', '.join(b.devices)} tensors, not {dev.type}"
            if cfg.backend == "triton" and dev.type == "cpu":
                why += " (Triton runs on the CPU only under TRITON_INTERPRET=1, slowly)"
        else:
            why = f"it did not load: {LOAD_ERRORS.get(cfg.backend, 'unknown reason')}"
        raise ConfigError(f"{cfg.backend!r} cannot run on {dev.type}: {why}; "
                          f"available here: {', '.join(available_backends(dev))} (or auto)", "backend")
    if cfg.amp == "fp16" and dev.type != "cuda":
        raise ConfigError("'fp16' needs a CUDA device (fp16 autocast with a GradScaler); use bf16 on the CPU", "amp")
    if cfg.amp == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"'bf16': the GPU of {cfg.device!r} does not support bfloat16; use fp16", "amp")


def _channel_stats(x: Tensor) -> tuple[list[float], list[float]]:
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-3).tolist()


_CHECKPOINT_FIELDS = {"config": dict, "epoch": int, "step": int, "history": list, "model": dict, "optimizer": dict}


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a trainer checkpoint with :func:`safe_load`, or raise :class:`CheckpointError` saying why not."""
    try:
        state = safe_load(path)
    except ValueError as e:
        raise CheckpointError(f"--resume: {e}; delete it or choose another --out") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"--resume: {path} is not an ldreg-train checkpoint (it holds a "
                              f"{type(state).__name__}, not a dict)")
    for key, typ in _CHECKPOINT_FIELDS.items():
        if not isinstance(state.get(key), typ):
            raise CheckpointError(f"--resume: {path} is not an ldreg-train checkpoint ({key!r} is missing or not "
                                  f"a {typ.__name__})")
    return state


class Trainer:
    """One SSL run. ``Trainer(cfg, out).fit()``; ``Trainer.resume(out).fit()`` continues it.

    Args:
        cfg: the run's configuration.
        out: output folder (created), or ``None`` for an in-memory run (tests).
        data: an already loaded data set (else ``cfg.dataset`` is loaded).
        progress: report progress (rank 0 only): on a terminal, tqdm bars and a line per epoch;
            on any other stream (a CI log, a pipe, ``| tee``), the line per epoch alone, with no
            carriage-return frames.
        stream: where progress goes (default ``sys.stderr``, looked up when the run starts).
    """

    def __init__(self, cfg: TrainConfig, out: Optional[str] = None, *, data: Optional[ImageSet] = None,
                 progress: bool = True, stream: Optional[Any] = None) -> None:
        self.cfg, self.out, self.progress, self._stream = cfg, out, progress, stream
        self.rank, self.world = dist.rank(), dist.world_size()
        check_runtime(cfg)
        if cfg.batch_size % (2 * self.world):
            raise ConfigError(f"{cfg.batch_size} must be a multiple of 2 x world size {self.world}", "batch_size")
        # Rows a query can have as neighbours: the reference less its own row (and BYOL's twin).
        n_ref = 2 * cfg.batch_size * (2 if cfg.method == "byol" else 1)
        n_cand = n_ref - (2 if cfg.method == "byol" else 1)
        if not 2 <= cfg.k <= n_cand:  # the batch LID is logged even with LDReg off
            raise ConfigError(f"must be in [2, {n_cand}] for this batch (reference of {n_ref} rows, less the "
                              f"query's own{' and its target twin' if cfg.method == 'byol' else ''}), got {cfg.k}",
                              "k")
        self.monitor_ks = tuple(m for m in cfg.monitor_ks if m <= n_cand)
        skipped = [m for m in cfg.monitor_ks if m > n_cand]
        if skipped and dist.rank() == 0:
            warnings.warn(f"monitor_ks {skipped} skipped: the batch reference has only {n_cand} candidate "
                          f"neighbours per query (batch {cfg.batch_size}, {cfg.method}); raise the batch size "
                          "to monitor them", stacklevel=2)
        self.device = torch.device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype)
        self.data = data if data is not None else get_dataset(cfg.dataset, cfg.data_root)
        n_train = len(self.data.train_x)
        if cfg.batch_size > n_train:  # 0 steps per epoch: nothing would train
            raise ConfigError(f"{cfg.batch_size} is larger than the {self.data.name} training set "
                              f"({n_train} images): no step would run; use a batch size <= {n_train}", "batch_size")
        self.recipe = RECIPES[self.data.name]

        torch.manual_seed(cfg.seed)
        mean, std = _channel_stats(self.data.train_x)
        encoder = ResNetEncoder(self.data.image_shape[0], cfg.widths, cfg.blocks, mean, std)
        extra = {"temperature": cfg.temperature} if cfg.method == "simclr" else {"base_momentum": cfg.momentum}
        self.model = METHODS[cfg.method](encoder, **extra).to(self.device, self.dtype)
        self.net: nn.Module = dist.wrap(self.model, self.device)
        head = getattr(self.model, "predictor", None)
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in head_ids], "lr_mult": 1.0}]
        if head_ids:  # BYOL's predictor: its own learning rate (the BYOL/SimSiam practice of a faster head)
            groups.append({"params": [p for p in params if id(p) in head_ids], "lr_mult": cfg.predictor_lr_mult})
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # Loss scaling keeps small fp16 gradients from flushing to zero; bf16 has float32's range.
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
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
            group["lr"] = self.lr_at(self.step) * group.get("lr_mult", 1.0)
        active = self.ldreg_active(self.epoch)
        # The LID runs inside autocast too, as in the official AMP configs: the kNN ops
        # themselves keep the distances they select and return in float32.
        with torch.autocast(self.device.type, dtype=AMP_DTYPES.get(cfg.amp), enabled=cfg.amp != "off"):
            out: StepOutput = self.net(v1, v2, dist.gather_with_grad if self.world > 1 else None, self.rank)
            if not bool(torch.isfinite(out.queries).all()) or not bool(torch.isfinite(out.loss)):
                raise TrainingDiverged(self._diverged_message("features or SSL loss"))
            ref, offset = dist.global_ref(out.ref)
            with torch.set_grad_enabled(active):
                lids = self.batch_lid(out.queries if active else out.queries.detach(), ref, offset, cfg.k,
                                      cfg.estimator)
            reg = regularizer(lids, cfg.beta_value, cfg.reg) if active else torch.zeros((), device=self.device)
            with torch.no_grad():
                monitors = {f"lid_k{m}": float(self.batch_lid(out.queries.detach(), ref, offset, m, "mle")
                                               .double().log().mean().exp()) for m in self.monitor_ks}
        loss = out.loss + reg
        if not bool(torch.isfinite(loss)):
            raise TrainingDiverged(self._diverged_message("loss"))
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.opt.step()
        else:  # fp16: skips the step (and lowers the scale) when scaled gradients overflow
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        if hasattr(self.model, "update_target"):
            self.model.update_target((self.step + 1) / self.total_steps)
        self.step += 1
        return {"loss": float(loss.detach()), "ssl_loss": float(out.loss.detach()), "reg_loss": float(reg.detach()),
                "batch_lid": float(lids.detach().double().log().mean().exp()), **monitors}

    def batch_lid(self, q: Tensor, ref: Tensor, offset: int, k: int, estimator: str) -> Tensor:
        """LID of each query against the batch reference: its own row excluded, and for BYOL also
        its target twin (row ``offset + 2B + i`` of the reference for query ``i`` of 2B)."""
        if self.cfg.method != "byol":
            return lid(q, ref, k, estimator=estimator, exclude_self=True, self_offset=offset, backend=self.cfg.backend)
        d, idx = knn(q, ref, k + 1, exclude_self=True, self_offset=offset, backend=self.cfg.backend)
        twin = offset + q.shape[0] + torch.arange(q.shape[0], device=idx.device)
        drop = idx == twin[:, None]
        drop[:, -1] |= ~drop.any(1)  # twin not among the k + 1: drop the farthest instead
        keep = torch.sort(drop.to(torch.uint8), dim=1, stable=True).indices[:, :k]  # order kept
        return lid_from_distances(d.gather(1, keep), estimator, DEFAULT_EPS)

    def _diverged_message(self, what: str) -> str:
        path = os.path.join(self.out, CHECKPOINT) if self.out else None
        kept = (f"the last good checkpoint ({path}, after epoch {self.epoch}) is kept"
                if path and os.path.exists(path) else "no checkpoint was written yet")
        return (f"non-finite {what} at epoch {self.epoch + 1}, step {self.step + 1}: stopping; {kept}. "
                "Lower --lr or --beta, or check the input data")

    # -- progress -------------------------------------------------------------------------
    @property
    def stream(self) -> Any:
        return self._stream if self._stream is not None else sys.stderr

    def bars(self) -> bool:
        """tqdm bars only on a terminal: elsewhere each refresh would be one more line of log."""
        isatty = getattr(self.stream, "isatty", None)
        try:
            tty = bool(isatty()) if callable(isatty) else False
        except (ValueError, OSError):  # a closed stream
            tty = False
        return self.progress and self.rank == 0 and tty

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
        per_step: dict[str, list[float]] = {f"lid_k{m}": [] for m in self.monitor_ks}
        bar = tqdm(self.batches(self.epoch), total=self.steps_per_epoch, leave=False, dynamic_ncols=True,
                   desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", disable=not self.bars(), file=self.stream)
        for images in bar:
            vals = self.train_step(images, g)
            for key, v in vals.items():
                sums[key] = sums.get(key, 0.0) + v
                if key in per_step:
                    per_step[key].append(v)
            bar.set_postfix(loss=f"{vals['loss']:.4f}", lid=f"{vals['batch_lid']:.2f}")
        rec = {key: v / self.steps_per_epoch for key, v in sums.items()}
        rec.update({f"steps_{key}": v for key, v in per_step.items()})  # every step's value, for the plot
        return rec

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
        if not self.progress:
            return
        ev = (f" probe {rec['probe_acc']:.4f} GM-LID {rec['gm_lid']:.3f} erank {rec['erank']:.2f}"
              if "probe_acc" in rec else "")
        line = (f"epoch {rec['epoch']:>3}/{self.cfg.epochs} loss {rec['loss']:.4f} "
                f"(ssl {rec['ssl_loss']:.4f} reg {rec['reg_loss']:+.4f}) batch LID {rec['batch_lid']:.2f}"
                + "".join(f" LID@{m} {rec[f'lid_k{m}']:.2f}" for m in self.monitor_ks if f"lid_k{m}" in rec)
                + f"{ev} [{rec['time_s']:.1f}s]")
        if self.bars():
            from tqdm.auto import tqdm

            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def summary(self, seconds: float = 0.0) -> dict[str, Any]:
        last = next((r for r in reversed(self.history) if "probe_acc" in r), {})
        return {"config": dataclasses.asdict(self.cfg), "epochs_done": self.epoch, "steps": self.step,
                "probe_acc": last.get("probe_acc"), "gm_lid": last.get("gm_lid"), "erank": last.get("erank"),
                "final_loss": self.history[-1]["loss"] if self.history else None, "seconds": seconds}

    # -- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: tensors and plain containers only, so ``weights_only=True`` reads it."""
        return {"config": dataclasses.asdict(self.cfg), "epoch": self.epoch, "step": self.step,
                "history": self.history, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

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
        state = load_checkpoint(path)
        try:
            saved = TrainConfig(**state["config"])
        except (TypeError, ValueError) as e:  # unknown fields (another version) or invalid values
            raise CheckpointError(f"--resume: {path} holds a configuration this version cannot use: {e}") from None
        if cfg is not None:
            diff = config_diff(saved, cfg, ignore=("device",))
            if diff:
                raise CheckpointError(
                    "--resume: the checkpoint was written with a different configuration "
                    + ", ".join(f"{k}={a!r} (checkpoint) vs {b!r} (now)" for k, (a, b) in diff.items()))
            saved.device = cfg.device
        t = cls(saved, out, **kw)
        try:
            t.model.load_state_dict(state["model"])
            t.opt.load_state_dict(state["optimizer"])
            if t.scaler is not None and state.get("scaler"):
                t.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            why = " ".join(str(e).split())
            raise CheckpointError(f"--resume: the weights in {path} do not fit the model its config describes: "
                                  f"{why}") from None
        t.epoch, t.step, t.history = state["epoch"], state["step"], state["history"]
        return t

    def _write_final(self, summary: dict[str, Any]) -> None:
        from .plot import plot_runs

        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if self.last_eval is None:  # resumed after the last epoch: evaluate the final weights
            self.evaluate()
        torch.save(self.last_eval.lids, os.path.join(self.out, "lids.pt"))
        torch.save(self.last_eval.spectrum, os.path.join(self.out, "spectrum.pt"))
        plot_runs([self.out], os.path.join(self.out, "plot.png"))
