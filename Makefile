# Two entry points on a fresh machine: `make demo` (main job) and `make test` (tests).
# Both create .venv and install what they need first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch 2.13.0's CPU wheel is on local disk on the dev/CI machines; triton runs the kernels
# under TRITON_INTERPRET=1 there.
DEPS := torch==2.13.0 triton==3.6.0 numpy pytest hypothesis mlxtend tqdm matplotlib ninja setuptools wheel

.PHONY: venv test demo bench clean

$(STAMP): pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(DEPS)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m ldreg_kernels.demo
	$(BIN)/python benchmarks/bench_knn.py --quick --no-csv

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_knn.py

clean:
	rm -rf $(VENV) build dist *.egg-info
