import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

# A private compile cache: torch's AOTAutograd cache keys a compiled graph on its forward, not
# on a custom op's registered backward, so a cache left by another version of this package
# could replay that version's backward.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ldreg-inductor-"))

if not torch.cuda.is_available():  # run the Triton kernels on CPU tensors (interpreter); before the import below
    os.environ.setdefault("TRITON_INTERPRET", "1")
# cuBLAS refuses deterministic mode (test_deterministic.py on CUDA) without a fixed workspace;
# read when its first handle is made, so any time before the first CUDA matmul.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import ldreg_kernels as L  # noqa: E402
from ldreg_kernels import registry  # noqa: E402
from utils import SESSION_SEED  # noqa: E402

# An uninstalled tree (the GPU machine builds with `setup.py build_ext --inplace` and installs
# nothing): the subprocesses tests start (torchrun workers, CLIs, probes) must import the same
# ldreg_kernels as this process, so its parent goes on their PYTHONPATH.
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(L.__file__)))
if _PKG_PARENT == os.path.dirname(os.path.dirname(os.path.abspath(__file__))):  # imported from this checkout
    _pp = os.environ.get("PYTHONPATH", "")
    if _PKG_PARENT not in _pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join([_PKG_PARENT] + ([_pp] if _pp else []))

# With LDREG_REQUIRE_EXT=1 (CI) a backend that should load here and does not is a failure,
# not a skip: a broken extension or Triton import must not leave CI green with fewer tests.
# (Triton runs on CPU tensors only under its interpreter, which a GPU session does not set.)
REQUIRED = {
    "cpu": ["cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []),
    "cuda": ["cuda", "triton"] if torch.cuda.is_available() else [],
}


def pytest_report_header(config):
    return [
        f"ldreg test seed: {SESSION_SEED} (reproduce with LDREG_TEST_SEED={SESSION_SEED})",
        f"backends on cpu: {L.available_backends('cpu')}; not loaded: {registry.LOAD_ERRORS or 'none'}",
    ]


def pytest_sessionstart(session):
    if os.environ.get("LDREG_REQUIRE_EXT") != "1":
        return
    missing = {f"{dev}:{b}": registry.LOAD_ERRORS.get(b, "loaded but unavailable")
               for dev, names in REQUIRED.items() for b in names if b not in L.available_backends(dev)}
    if missing:
        raise pytest.UsageError(f"LDREG_REQUIRE_EXT=1 but these backends did not load: {missing}")


# Backends run in this session: every one that loads on the CPU, and on CUDA every one that
# loads there. Without a GPU the CUDA parametrisation is still collected, skipped, so a dry run
# (tools/gpu_check.py --dry-run) can check that a GPU session will run it.
CUDA_BACKENDS = ("reference", "torch", "cuda", "triton")
BACKEND_PARAMS = [pytest.param(("cpu", b), id=f"cpu-{b}") for b in L.available_backends("cpu")]
if torch.cuda.is_available():
    BACKEND_PARAMS += [pytest.param(("cuda", b), id=f"cuda-{b}") for b in L.available_backends("cuda")]
else:
    BACKEND_PARAMS += [
        pytest.param(("cuda", b), id=f"cuda-{b}", marks=pytest.mark.skip(reason="no CUDA device"))
        for b in CUDA_BACKENDS
    ]


@pytest.fixture(params=BACKEND_PARAMS)
def device_backend(request):
    return request.param
