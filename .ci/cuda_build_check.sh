#!/usr/bin/env bash
# cuda-build-check: what every GPU user does, on a machine without a GPU. In a venv of its own
# (never .venv, which keeps the CPU torch), the CUDA build of torch (TORCH_SPEC, on local disk);
# the package installed into it with `pip install --no-build-isolation` and CUDA kernels
# (CUDA_HOME set, as the README says); a check that ldreg::knn_native and
# ldreg::knn_backward_native have kernels registered under the CUDA dispatch key; then the
# packaging, native, knn and autograd tests against that installed copy.
#
#   .ci/cuda_build_check.sh      (or: make cuda-build-check)
#   TORCH_SPEC=torch==2.14.1 CUDA_HOME=/usr/local/cuda CUDA_CHECK_CACHE=/scratch/x .ci/cuda_build_check.sh
#
# Cached between runs on one machine, fresh clones (CI) included, in CUDA_CHECK_CACHE (default
# ~/.cache/ldreg_kernels/cuda-build-check, beside gpu-aot's cache): the venv (5.5 GB: torch +
# the nvidia wheels; remade only when TORCH_SPEC changes) and the build tree src/ (a copy of the
# sources in which only files whose content changed are rewritten, so ninja recompiles only
# those, whatever the clone's mtimes). Cold: ~1 min venv, ~3-4 min build for sm_80 + sm_90 on
# 2 cores, ~3 min tests; warm and unchanged: ~15 s install + the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
CACHE=${CUDA_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ldreg_kernels/cuda-build-check}
CV=${CUDA_VENV:-$CACHE/venv}
SRC=$CACHE/src
RUN=$CACHE/run  # an empty cwd: the tests must import the install, not the checkout
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9  # one run at a time uses the cache
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export LDREG_REQUIRE_EXT=1  # a build that quietly leaves out the extension is an error
export MAX_JOBS=${MAX_JOBS:-2}
TESTS=${CUDA_BUILD_TESTS:-tests/test_packaging.py tests/test_native.py tests/test_knn.py tests/test_autograd.py}
# The Triton kernels under the interpreter are make test's (with the pinned Triton); here they
# would triple the time and say nothing about the CUDA build.
PYTEST_K=${CUDA_BUILD_PYTEST_K:-not triton}

step() { printf '\n== cuda-build-check [%ss]: %s\n' "$SECONDS" "$*"; }
fail() { echo "cuda-build-check: FAILED: $*" >&2; exit 1; }

STAMP=$CV/.installed-$(echo "$TORCH_SPEC" | tr -c 'A-Za-z0-9.=\n' _)
if [ ! -e "$STAMP" ]; then
    step "fresh venv $CV with $TORCH_SPEC (the CUDA build, from local disk; ~5.5 GB)"
    df -h "$ROOT" | tail -1
    rm -rf "$CV"
    "$PY" -m venv "$CV"
    # --no-compile: no .pyc for the 5 GB of wheels (half the install time)
    "$CV/bin/python" -m pip install -q --no-compile "$TORCH_SPEC" numpy pytest hypothesis ninja "setuptools>=77" wheel
    touch "$STAMP"
else
    step "reusing $CV ($TORCH_SPEC)"
fi
"$CV/bin/python" - <<'EOF'
import torch
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")
EOF
[ -e "$CUDA_HOME/bin/nvcc" ] || fail "no nvcc at CUDA_HOME=$CUDA_HOME/bin/nvcc"

step "sources to $SRC (only files whose content changed are rewritten: ninja rebuilds only those)"
mkdir -p "$SRC"
git ls-files -co --exclude-standard csrc ldreg_kernels setup.py pyproject.toml MANIFEST.in README.md LICENSE \
    CMakeLists.txt | sort >"$CACHE/files.new"
changed=0
while IFS= read -r f; do
    if ! cmp -s "$f" "$SRC/$f"; then
        mkdir -p "$SRC/$(dirname "$f")" && cp "$f" "$SRC/$f" && changed=$((changed + 1))
    fi
done <"$CACHE/files.new"
# Files gone from the tree go from the copy too (a stale module would be installed).
if [ -e "$CACHE/files.old" ]; then
    comm -23 "$CACHE/files.old" "$CACHE/files.new" | while IFS= read -r f; do rm -f "$SRC/$f"; done
fi
mv "$CACHE/files.new" "$CACHE/files.old"
# build/temp.* (ninja's objects) stays; build/lib* is redone, so a removed module is not packed.
rm -rf "$SRC"/*.egg-info "$SRC"/build/lib* "$SRC"/build/bdist*
echo "$changed of $(wc -l <"$CACHE/files.old") files changed since the last run"

step "pip install --no-build-isolation (CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0 by default})"
t0=$SECONDS
"$CV/bin/python" -m pip install --no-build-isolation --no-deps --no-index "$SRC" >"$CACHE/build-install.log" 2>&1 \
    || { tail -60 "$CACHE/build-install.log"; fail "pip install"; }
echo "installed in $((SECONDS - t0)) s"

step "ldreg::knn_native and ldreg::knn_backward_native have CUDA kernels"
mkdir -p "$RUN"
(cd "$RUN" && "$CV/bin/python" - <<'EOF'
import json
import os
import sys

import torch

import ldreg_kernels as L
from ldreg_kernels.backends import native

assert L.__file__.startswith(sys.prefix + os.sep), f"imported the checkout, not the install: {L.__file__}"
info = json.load(open(os.path.join(os.path.dirname(L.__file__), "_build_info.json")))
assert info["cuda_kernels"] and info["torch"] == torch.__version__, info
assert native.CUDA_BUILT, "ldreg_kernels._C reports no CUDA kernels"
for op in ("ldreg::knn_native", "ldreg::knn_backward_native"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op} has no {key} kernel"
print(f"ok: {L.__file__}; CUDA {int(torch.ops.ldreg.compiled_cuda_version())} kernels registered for "
      f"knn_native and knn_backward_native; backends on cpu {L.available_backends('cpu')}")
EOF
) || fail "CUDA kernels not registered"

step "tests against the installed copy: $TESTS (-k '$PYTEST_K')"
# From an empty cwd, so ldreg_kernels is the install (tests/ itself holds no package).
args=()
for t in $TESTS; do args+=("$ROOT/$t"); done
(cd "$RUN" && "$CV/bin/python" -m pytest -q -p no:cacheprovider -k "$PYTEST_K" --durations=5 "${args[@]}")

step "passed"
