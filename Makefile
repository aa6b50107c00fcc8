# Two entry points on a fresh machine: `make demo` (main job) and `make test` (tests).
# Both create .venv and install what they need first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch 2.13.0's CPU wheel is on local disk on the dev/CI machines; triton runs the kernels
# under TRITON_INTERPRET=1 there.
# pytest-benchmark, torchmetrics and Lightning: the microbenchmarks and the integrations' tests.
DEPS := torch==2.13.0 triton==3.6.0 numpy pytest hypothesis mlxtend tqdm matplotlib ninja "setuptools>=77" wheel \
        pytest-benchmark==5.3.1 torchmetrics==1.9.0 pytorch-lightning==2.6.6

.PHONY: venv test demo bench ctest nvcc-check clean

# lightly without its dependencies: it requires torchvision, whose install would replace this torch
# (no torchvision loads beside torch 2.13.0+cpu); the parts examples/lightly_ldreg.py uses need none.
$(STAMP): pyproject.toml setup.py Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(DEPS)
	$(BIN)/pip install -q --no-deps lightly==1.6.0
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m ldreg_kernels.demo
	$(BIN)/python -m benchmarks.run --sweep demo --methods paper,mm-topk,ours-cpu,floor --out-dir runs/demo/bench --no-progress

# Compile the CUDA sources with nvcc alone (sm_80 + sm_90), so CUDA syntax/type errors fail CI
# without a GPU. The CPU torch wheel lacks c10/cuda's generated cmake header, hence
# -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE (it only defines a Windows export macro).
NVCC ?= $(or $(CUDA_HOME),/usr/local/cuda)/bin/nvcc
nvcc-check: $(STAMP)
	@mkdir -p build
	$(NVCC) -std=c++20 -O3 --expt-relaxed-constexpr -DLDREG_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
	  -D__CUDA_NO_HALF_OPERATORS__ -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	  -Icsrc $$($(BIN)/python -c 'import sysconfig, torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths() + [sysconfig.get_paths()["include"]]))') \
	  -c csrc/cuda/knn_cuda.cu -o build/nvcc-check.o

# The C++ build (CMakeLists.txt) and its ctest executable, against the venv's libtorch.
ctest: $(STAMP)
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch;print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure

# Build the sdist and the wheel, install each into a fresh venv, check the cpu backend works
# (.ci/dist_check.sh; a few minutes: two extension builds, two torch installs).
.PHONY: dist-check
dist-check:
	PY=$(PY) .ci/dist_check.sh

# What every GPU user does, without a GPU (.ci/cuda_build_check.sh): in a venv of its own (not
# .venv, which keeps the CPU torch) torch 2.14.1, the CUDA 13.0 build from local disk; the
# package installed with `pip install --no-build-isolation` and CUDA kernels (CUDA_HOME, default
# /usr/local/cuda); ldreg::knn_native / knn_backward_native checked for CUDA kernels; then the
# packaging, native, knn and autograd tests against that install. The venv (5.5 GB) and the
# build tree are cached in ~/.cache/ldreg_kernels/cuda-build-check (CUDA_CHECK_CACHE), so a
# fresh clone on the same machine recompiles only sources whose content changed.
CUDA_TORCH ?= torch==2.14.1
.PHONY: cuda-build-check
cuda-build-check:
	PY=$(PY) TORCH_SPEC=$(CUDA_TORCH) .ci/cuda_build_check.sh

# The peers (FAISS, KeOps) are only needed here, not by the tests.
BENCH_DEPS := faiss-cpu pykeops
bench: $(STAMP)
	$(BIN)/pip install -q $(BENCH_DEPS)
	$(BIN)/python -m benchmarks.run --sweep cpu

clean:
	rm -rf $(VENV) build dist *.egg-info ldreg_kernels/_C*.so

# One device call on a lent GPU (tools/gpu_check.py): preflight, build for this card, the CUDA
# tests CI cannot run, memcheck, shapes A-D; every step under its limit, 540 s in all; at most
# 4 files in GPU_CHECK_OUT (summary.md, gpu-check.log, junit.xml, bench.tar.gz). The device
# machine has no venv, no pip and no install: its own python3, the tree on PYTHONPATH.
# `make gpu-check-dry` runs every step's CPU form here (tests/test_gpu_check.py runs it too).
GPU_CHECK_OUT ?= $(or $(OUT),runs/gpu-check)
gpu-check:
	python3 tools/gpu_check.py --out $(GPU_CHECK_OUT)

gpu-check-dry: $(STAMP)
	$(BIN)/python tools/gpu_check.py --out runs/gpu-check-dry --dry-run

.PHONY: gpu-check gpu-check-dry

# Compile every Triton config the dispatcher launches and csrc/cuda for sm_80/sm_90 with
# ptxas -v, no GPU needed; fail on shared memory over the card's limit, spills over budget,
# or a CUDA launch missing the >48 KiB opt-in (tools/gpu_aot.py). Cached under
# ~/.cache/ldreg_kernels/gpu_aot. GPU_AOT_FLAGS=--all: ptxas for every precision.
GPU_AOT_FLAGS ?=
gpu-aot: $(STAMP)
	$(BIN)/python tools/gpu_aot.py $(GPU_AOT_FLAGS)
.PHONY: gpu-aot

# pytest-benchmark microbenchmarks (benchmarks/test_micro.py), ~2 min on 2 CPU cores.
# MICROBENCH_ARGS=--benchmark-autosave saves a run; MICROBENCH_ARGS=--benchmark-compare compares with the last saved one.
MICROBENCH_ARGS ?=
microbench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-only $(MICROBENCH_ARGS)
# Every microbenchmark once, on tiny shapes (CI; ~10 s). --benchmark-only cannot be combined with --benchmark-disable.
microbench-smoke: $(STAMP)
	$(BIN)/python -m pytest -q benchmarks --benchmark-disable
.PHONY: microbench microbench-smoke
