"""pytest configuration of the microbenchmarks (benchmarks/test_micro.py).

Adds ``--micro-shapes`` (which shape set to parametrise over) and records the torch and
ldreg_kernels versions and the loaded backends in pytest-benchmark's machine info, so that a
``--benchmark-compare`` across two commits shows what changed besides the code.
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--micro-shapes", choices=("full", "smoke"), default=None,
        help="ldreg microbenchmarks: 'full' (the timed shapes) or 'smoke' (tiny shapes, seconds in all). "
        "Default: smoke with --benchmark-disable, else full.",
    )


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-benchmark, which may not be installed
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    import ldreg_kernels as L

    machine_info["ldreg"] = {
        "torch": torch.__version__,
        "ldreg_kernels": L.__version__,
        "threads": torch.get_num_threads(),
        "backends_cpu": L.available_backends("cpu"),
        "backends_cuda": L.available_backends("cuda"),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
