import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # run the Triton kernels on CPU tensors (interpreter); before the import below
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ldreg_kernels as L  # noqa: E402
from utils import SESSION_SEED  # noqa: E402


def pytest_report_header(config):
    return [
        f"ldreg test seed: {SESSION_SEED} (reproduce with LDREG_TEST_SEED={SESSION_SEED})",
        f"backends on cpu: {L.available_backends('cpu')}",
    ]


# Backends run in this session: every one that loads on the CPU, plus CUDA ones on a GPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKEND_PARAMS = [
    pytest.param((dev, b), id=f"{dev}-{b}") for dev in DEVICES for b in L.available_backends(dev)
]


@pytest.fixture(params=BACKEND_PARAMS)
def device_backend(request):
    return request.param
