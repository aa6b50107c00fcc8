#!/usr/bin/env bash
# Wheels of the GPU peers for the device machine (no network, no pip index there), into the
# git-ignored .whl/ that a device call carries (at most 64 MiB a call). Run here, from the
# repository root:   bash tools/fetch_gpu_wheels.sh
# On the device:      python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#                     export PYTHONPATH=/tmp/site
#
# What fits (measured 2026-11-25, PyPI, CPython 3.12, manylinux x86_64):
#   pykeops 2.3 + keopscore 2.3   ~0.3 MB, pure Python (sdists built into wheels here); they
#                                 compile their kernels with the device's nvcc at first use and
#                                 need numpy + pybind11, which the device image has.
# What does not fit, and why:
#   faiss-gpu 1.15.1              135 MB on its own.
#   faiss-gpu-cu12 1.14.1         48 MB, but it links the CUDA 12 runtime and cuBLAS 12
#                                 (nvidia-cublas-cu12 alone is 581 MB); the device has CUDA 13.
#   cuvs-cu13 26.10               1.6 MB, but it needs libcuvs-cu13 (241 MB).
# The GPU benchmark therefore compares against KeOps, mm + topk, the paper's cdist + sort and
# the bare matmul; FAISS GPU and cuVS are recorded as "not installable on the device".
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
mkdir -p .whl
python3 -m pip wheel -q --no-deps -w .whl pykeops==2.3 keopscore==2.3
for w in .whl/*.whl; do
  python3 - "$w" "$PYVER" <<'PY'
import sys, zipfile
name, pyver = sys.argv[1], sys.argv[2]
tag = name.rsplit("/", 1)[-1].split("-")[-3:]
assert tag[0] in ("py3", "py2.py3") and tag[2].endswith("any.whl"), f"{name}: not pure Python; rebuild for cp{pyver.replace('.', '')}"
PY
done
du -ch .whl/*.whl | tail -1
ls -l .whl
