"""ref="global" under torch.distributed: a 2-rank gloo run (torchrun) equals 1 process.

What is compared, exactly (float64, every CPU backend): each rank r holds rows S_r of one
global batch X (N = sum_r B_r rows) and backpropagates w_r * L_r with w_r = B_r / N (what
DDP's gradient averaging does for equal batches: w_r = 1 / world). The 1-process run
computes the per-query LIDs of all of X against X (detached for "global", not detached for
"global_grad"), L_r = regulariser(LIDs of S_r), and backpropagates sum_r w_r * L_r. Then:
per-rank losses, LIDs, kNN distances and indices (global row numbers), and x.grad on each
rank equal the 1-process values on that rank's rows. For "l1" with equal batches
sum_r w_r L_r is also ldreg_loss(X) itself.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch

import ldreg_kernels as L
from dist_worker import BETA, CONFIGS, K, make_batch, rank_slice
from ldreg_kernels.estimators import regularizer

WORLD = 2
BACKENDS = L.available_backends("cpu")
WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")
TIMEOUT_S = 120  # a hang (a collective one rank never joins) fails the test instead of CI


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the worker under torchrun once; the per-rank result dicts."""
    out = tmp_path_factory.mktemp("dist")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
        WORKER, "--out", str(out), "--backends", ",".join(BACKENDS),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the group we started
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s (a hang?):\n{log[-4000:]}")
    assert proc.returncode == 0, f"torchrun failed:\n{log[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-14), f"{what}: max abs diff {(a - b).abs().max():.3e}"


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode", ["global", "global_grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_equal_one_process(ranks, backend, mode, config):
    sizes, est, reg = CONFIGS[config]
    n = sum(sizes)
    X = make_batch(sizes).requires_grad_()
    ref = None if mode == "global" else X
    lids = L.lid(X, ref, K, estimator=est, exclude_self=True, backend=backend)
    losses = [regularizer(lids[rank_slice(sizes, r)], BETA, reg) for r in range(WORLD)]
    total = sum(losses[r] * (sizes[r] / n) for r in range(WORLD))
    (grad,) = torch.autograd.grad(total, X)
    d1, i1 = L.knn(X.detach(), None, K, backend=backend)
    if reg == "l1" and len(set(sizes)) == 1:
        _close(total.detach(), L.ldreg_loss(X, ref, K, BETA, estimator=est, exclude_self=True, backend=backend).detach(), "l1 loss")
    for r in range(WORLD):
        got, s = ranks[r]["results"][backend, mode, config], rank_slice(sizes, r)
        tag = f"rank {r} {backend} {mode} {config}"
        _close(got["loss"], losses[r].detach(), f"{tag}: loss")
        _close(got["module"], losses[r].detach(), f"{tag}: LDReg module loss")
        _close(got["lids"], lids[s].detach(), f"{tag}: LIDs")
        _close(got["grad"], grad[s], f"{tag}: x.grad")
        _close(got["dist"], d1[s], f"{tag}: knn distances")
        assert torch.equal(got["idx"], i1[s]), f"{tag}: knn indices (global rows)"


def test_gather_with_grad_and_global_reference(ranks):
    sizes = CONFIGS["unequal"][0]
    X = make_batch(sizes)
    coef = torch.arange(X.numel(), dtype=X.dtype).reshape(X.shape)
    for r in range(WORLD):
        got, s = ranks[r]["gather"], rank_slice(sizes, r)
        assert torch.equal(got["gathered"], X) and torch.equal(got["ref"], X)
        assert got["off"] == s.start and not got["ref_grad"]
        # rank q backpropagated sum(gathered * coef * (q + 1)): x_r gets the sum over q of its rows.
        _close(got["grad"], coef[s] * sum(q + 1 for q in range(WORLD)), f"rank {r}: gather grad")


MISMATCH = {
    "D": "ValueError: ref='global' needs the same feature dimension D on every rank, got rank 0: 4, rank 1: 5",
    "k": "ValueError: ref='global' needs the same k on every rank, got rank 0: 4, rank 1: 5",
    "dtype": "ValueError: ref='global' needs the same dtype on every rank, got rank 0: torch.float64, rank 1: torch.float32",
    "mode": [f"ValueError: ref={m!r} needs the same ref mode on every rank, got rank 0: 'global', rank 1: 'global_grad'"
             for m in ("global", "global_grad")],  # each rank names its own call
    "gather_D": "ValueError: gather_with_grad needs the same feature dimension D on every rank, got rank 0: 2, rank 1: 3",
    "too_big_k": "ValueError: k=12 exceeds the N - 1 = 11 reference rows left after excluding self",
}
REJECTED = ("ValueError: ref='global': rank(s) [1] rejected their arguments (the error is raised there); "
            "every rank must make the same call with valid arguments")


@pytest.mark.parametrize("case", list(MISMATCH))
def test_mismatch_across_ranks_raises_on_every_rank(ranks, case):
    want = MISMATCH[case] if isinstance(MISMATCH[case], list) else [MISMATCH[case]] * WORLD
    for r in range(WORLD):
        assert ranks[r]["errors"][case] == want[r], f"rank {r}"


def test_invalid_argument_on_one_rank_raises_on_every_rank(ranks):
    assert ranks[1]["errors"]["local"] == "ValueError: k must be >= 2 to estimate LID, got k=1"
    assert ranks[1]["errors"]["offset"] == (
        "ValueError: self_offset must be 0 with ref='global' (this rank's offset in the gathered "
        "batch is computed), got 1"
    )
    assert ranks[0]["errors"]["local"] == REJECTED and ranks[0]["errors"]["offset"] == REJECTED
    # ... and the ranks stay in step: the next collective call still works.
    X = make_batch((6, 6))
    want = L.lid(X, None, K)
    for r in range(WORLD):
        _close(ranks[r]["after_errors"], want[rank_slice((6, 6), r)], f"rank {r}: call after errors")


# ---------------------------------------------------------------- without a process group
def test_global_without_process_group_is_the_batch(device_backend):
    dev, backend = device_backend
    x = make_batch((9,)).to(dev).requires_grad_()
    for fn in (lambda r: L.knn(x, r, 3, exclude_self=True, backend=backend)[0],
               lambda r: L.ldreg_loss(x, r, 3, exclude_self=True, backend=backend)):
        assert torch.equal(fn("global"), fn(None))
        a, b = fn("global_grad"), fn(x)
        assert torch.equal(a, b)
        assert torch.equal(torch.autograd.grad(a.sum(), x)[0], torch.autograd.grad(b.sum(), x)[0])
    assert L.gather_with_grad(x) is x
    ref, off = L.global_reference(x)
    assert off == 0 and torch.equal(ref, x) and not ref.requires_grad
    assert L.global_reference(x, detach=False)[0] is x
