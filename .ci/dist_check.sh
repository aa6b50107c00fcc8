#!/usr/bin/env bash
# dist-check: build the sdist and the wheel as a release would, install each into a fresh venv
# (a new `python -m venv`, never --system-site-packages; torch from the local disk), and check
# that the "cpu" backend loads and a small knn runs on the installed copy. Also checks that the
# wrong ways to build fail at once with advice: a default (isolated) pip install, and a
# setuptools older than 77. Two extension builds and two torch installs: 2-3 minutes on 2 cores.
#
#   .ci/dist_check.sh            (or: make dist-check)
#   PY=python3.12 TORCH_SPEC=torch==2.13.0 DIST_CHECK_TMP=/scratch .ci/dist_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# Two venvs with torch are ~2 GB of small files: on a tmpfs when one has room (deleting them
# from the disk here, ext4 mounted with discard, took a minute), else in $TMPDIR.
BASE=${DIST_CHECK_TMP:-${TMPDIR:-/tmp}}
if [ -z "${DIST_CHECK_TMP:-}" ] && [ -w /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR == 2 {print $4}')" -gt 4000000 ]; then
    BASE=/dev/shm
fi
WORK=$(mktemp -d "$BASE/ldreg-dist-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
DIST=$WORK/dist
# A build that would quietly leave out the extension is an error here.
export LDREG_REQUIRE_EXT=1
# No wheel cache: every install below must use what this run built.
export PIP_NO_CACHE_DIR=1

step() { printf '\n== dist-check [%ss]: %s\n' "$SECONDS" "$*"; }
fail() { echo "dist-check: FAILED: $*" >&2; exit 1; }

install_torch() {  # install_torch VENV: what a user installs first (no .pyc: saves half the time)
    "$1/bin/pip" install -q --no-compile "$TORCH_SPEC" numpy
}

# expect_failure LOG MESSAGE CMD...: CMD must fail and its output must contain MESSAGE.
expect_failure() {
    local log=$1 msg=$2
    shift 2
    if "$@" >"$log" 2>&1; then
        cat "$log"
        fail "expected '$*' to fail"
    fi
    grep -qF -- "$msg" "$log" || { cat "$log"; fail "'$*' failed without saying: $msg"; }
    echo "failed as expected: $msg"
}

# check_installed VENV: the installed package (not the checkout) has the cpu backend and works.
check_installed() {
    (cd "$WORK" && "$1/bin/python" - "$ROOT" <<'EOF'
import importlib.metadata as md
import os
import sys
import warnings

import torch

import ldreg_kernels as L
from ldreg_kernels import registry

assert not L.__file__.startswith(sys.argv[1] + os.sep), f"imported the checkout, not the install: {L.__file__}"
assert "cpu" in L.available_backends("cpu"), f"cpu backend missing: {registry.LOAD_ERRORS}"
assert md.version("ldreg-kernels") == L.__version__, (md.version("ldreg-kernels"), L.__version__)
dist = md.distribution("ldreg-kernels")
assert any(str(f).endswith("LICENSE") for f in dist.files), "LICENSE is not in the installed metadata"
assert dist.metadata["License-Expression"] == "MIT", dist.metadata["License-Expression"]
x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
with warnings.catch_warnings():
    warnings.simplefilter("error")  # "auto" must pick the extension without a fallback warning
    dist_, idx = L.knn(x, k=2)
    d_cpu, i_cpu = L.knn(x, k=2, backend="cpu")
assert idx.tolist() == [[1, 2], [0, 2], [0, 1], [2, 1]], idx.tolist()
assert torch.equal(i_cpu, idx) and torch.allclose(d_cpu, dist_)
print(f"ok: ldreg-kernels {L.__version__} at {os.path.dirname(L.__file__)}; backends {L.available_backends('cpu')}")
EOF
    )
}

step "fresh build venv ($PY)"
BV=$WORK/build-venv
"$PY" -m venv "$BV"
"$BV/bin/pip" install -q build

step "sdist (python -m build --sdist: isolated, so it must need neither torch nor a compiler)"
"$BV/bin/python" -m build --sdist --outdir "$DIST" . >"$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; fail "sdist"; }
SDIST=$(ls "$DIST"/ldreg_kernels-*.tar.gz)
tar -tzf "$SDIST" | sed 's|^[^/]*/||' | sort >"$WORK/sdist.files"
# Every tracked source the build or users need, whatever is added later.
git ls-files csrc ldreg_kernels CMakeLists.txt LICENSE README.md setup.py pyproject.toml MANIFEST.in | sort >"$WORK/want.files"
missing=$(comm -23 "$WORK/want.files" "$WORK/sdist.files")
[ -z "$missing" ] || fail "the sdist lacks: $missing"
extra=$(grep -E '\.(so|o|pyc)$|_build_info\.json$' "$WORK/sdist.files" || true)
[ -z "$extra" ] || fail "the sdist holds build outputs: $extra"
echo "$(basename "$SDIST"): $(wc -l <"$WORK/sdist.files") entries; all $(wc -l <"$WORK/want.files") tracked sources present"

step "a default (isolated) pip install must fail fast and say --no-build-isolation"
t0=$SECONDS
expect_failure "$WORK/isolated.log" "pip install --no-build-isolation ." \
    "$BV/bin/pip" install --no-deps "$SDIST"
# Fast means nothing big was fetched (a torch in the build requirements would take minutes).
[ $((SECONDS - t0)) -lt 60 ] || fail "the isolated install took $((SECONDS - t0)) s to fail"

# torch>=2.13 itself requires setuptools>=77, so this runs before torch is installed, with the
# setuptools a fresh venv comes with (65.5 on Python 3.11; none from 3.12 on: then skipped).
if "$BV/bin/python" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) >= 77)' 2>/dev/null; then
    step "setuptools < 77 (the fresh venv's own) must fail with a clear message"
    expect_failure "$WORK/old-setuptools.log" "setuptools>=77 is required" \
        "$BV/bin/pip" install --no-build-isolation --no-deps "$SDIST"
fi

step "torch into the build venv ($TORCH_SPEC, numpy; setuptools>=77, ninja)"
install_torch "$BV"
"$BV/bin/pip" install -q "setuptools>=77" ninja

step "install the sdist into the fresh venv (pip install --no-build-isolation SDIST)"
"$BV/bin/pip" install -q --no-build-isolation --no-deps "$SDIST"
check_installed "$BV"

step "wheel from the sdist (pip wheel --no-build-isolation SDIST, as python -m build does)"
"$BV/bin/pip" wheel -q --no-build-isolation --no-deps -w "$DIST" "$SDIST"
WHEEL=$(ls "$DIST"/ldreg_kernels-*.whl)
"$BV/bin/python" -m zipfile -l "$WHEEL" | awk 'NR > 1 {print $1}' >"$WORK/wheel.files"
for f in ldreg_kernels/_build_info.json ldreg_kernels/backends/native.py; do
    grep -qxF "$f" "$WORK/wheel.files" || fail "the wheel lacks $f"
done
grep -qE '^ldreg_kernels/_C\..*\.so$' "$WORK/wheel.files" || fail "the wheel lacks ldreg_kernels/_C*.so"
grep -qE '^ldreg_kernels-[^/]*\.dist-info/licenses/LICENSE$' "$WORK/wheel.files" || fail "the wheel lacks its LICENSE"
echo "$(basename "$WHEEL"): $(wc -l <"$WORK/wheel.files") files"

step "install the wheel into another fresh venv (no compiler or build tools needed)"
WV=$WORK/wheel-venv
"$PY" -m venv "$WV"
install_torch "$WV"
"$WV/bin/pip" install -q "$WHEEL"
check_installed "$WV"

step "passed"
