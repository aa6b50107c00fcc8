"""``torchrun --nproc_per_node=2 ... ldreg-train``: DDP on gloo, LDReg against the global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

TINY = ["--dataset", "digits", "--widths", "8", "--blocks", "1", "--batch-size", "128", "--k", "8",
        "--no-progress", "--device", "cpu", "--threads", "1", "--epochs", "2", "--eval-every", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_torchrun_two_ranks_trains_and_only_rank0_writes(tmp_path, method):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "ldreg_kernels.ssl.cli", method, *TINY, "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # rank 0 alone reports
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    # The global batch of 128 is split 64 + 64; steps count global batches.
    assert [rec["step"] for rec in log] == [1437 // 128, 2 * (1437 // 128)]
    assert all(rec["reg_loss"] < 0 for rec in log)
    assert 0.3 < summaries[0]["probe_acc"] <= 1 and summaries[0]["gm_lid"] > 1
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"])  # loadable without DDP
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "lids.pt", "log.jsonl", "plot.png", "spectrum.pt", "summary.json"]
