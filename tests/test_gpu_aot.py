"""tools/gpu_aot.py (make gpu-aot): its parsing and rules on canned ptxas output, the shared
memory plan of the CUDA kernels for every k, and one fast run (no ptxas) over the real
Triton launches."""

import importlib.util
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_aot", os.path.join(ROOT, "tools", "gpu_aot.py"))
aot = sys.modules["gpu_aot"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aot)

# nvcc -Xptxas -v of knn_cuda.cu (two entries, abridged) and Triton's ptxas -v of a
# spilling selection kernel: the formats the tool parses.
NVCC_LOG = """\
ptxas info    : 130 bytes gmem, 280 bytes cmem[4]
ptxas info    : Compiling entry function '_ZN5ldreg44_GLOBAL__N__fccc9e94_11_knn_cuda_cu_24a135b413rerank_kernelIN3c108BFloat16EfEEvPKT_S6_lPKT0_PKiiiiS9_S9_S7_bPS7_PlPb' for 'sm_80'
ptxas info    : Function properties for _ZN5ldreg44_GLOBAL__N__fccc9e94_11_knn_cuda_cu_24a135b413rerank_kernelIN3c108BFloat16EfEEvPKT_S6_lPKT0_PKiiiiS9_S9_S7_bPS7_PlPb
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 128 bytes smem, 456 bytes cmem[0]
ptxas info    : Compile time = 38.161 ms
ptxas info    : Compiling entry function '_ZN5ldreg44_GLOBAL__N__fccc9e94_11_knn_cuda_cu_24a135b413select_kernelIfEEvPKT_llliPS2_PiS6_S5_iilb' for 'sm_90'
ptxas info    : Function properties for _ZN5ldreg44_GLOBAL__N__fccc9e94_11_knn_cuda_cu_24a135b413select_kernelIfEEvPKT_llliPS2_PiS6_S5_iilb
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 28 registers, used 1 barriers, 16 bytes smem
"""
TRITON_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_knn_select_kernel' for 'sm_90a'
ptxas info    : Function properties for _knn_select_kernel
    2312 bytes stack frame, 2304 bytes spill stores, 1732 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2312 bytes cumulative stack size, 400 bytes cmem[0]
"""


def test_parse_ptxas_nvcc_and_triton_logs():
    rr, sel = aot.parse_ptxas(NVCC_LOG)
    assert (rr["arch"], rr["regs"], rr["smem"], rr["spill_st"]) == ("sm_80", 32, 128, 0)
    assert (sel["arch"], sel["regs"], sel["smem"]) == ("sm_90", 28, 16)
    (tk,) = aot.parse_ptxas(TRITON_LOG)
    assert tk["name"] == "_knn_select_kernel" and tk["arch"] == "sm_90a"
    assert (tk["regs"], tk["stack"], tk["spill_st"], tk["spill_ld"], tk["smem"]) == (255, 2312, 2304, 1732, 0)
    if shutil.which("c++filt"):
        assert aot.demangle([rr["name"], sel["name"]]) == ["rerank_kernel<BFloat16, float>", "select_kernel<float>"]


def test_block_rules():
    a100, h100 = aot.CARDS[80][1], aot.CARDS[90][1]
    assert (a100, h100) == (166912, 232448)
    assert aot.check_block(80, a100, 256, 255, 0) == []
    assert aot.check_block(90, a100 + 1, 256, 255, 0) == []
    assert ["smem" in f for f in aot.check_block(80, a100 + 1, 256, None, None)] == [True]
    assert ["smem" in f for f in aot.check_block(90, h100 + 1, 128, None, None)] == [True]
    # Registers are allocated per warp in units of 256: 255 x 256 threads is exactly 64K.
    assert aot.check_block(80, 0, 256, 255, 0) == []
    assert ["regs" in f for f in aot.check_block(80, 0, 512, 255, 0)] == [True]
    assert aot.check_block(80, 0, 128, 200, aot.SPILL_BUDGET) == []
    (f,) = aot.check_block(80, 0, 128, 200, aot.SPILL_BUDGET + 4)
    assert "spill" in f
    assert aot.check_block(90, 65536, 256, 255, 452)  # tf32x3 at kp=256 with BLOCK_D=32
    assert not aot.check_block(90, 73728, 256, 255, 112)  # the worst config kept (ieee, kp=256)
    (tk,) = aot.parse_ptxas(TRITON_LOG)  # the 2.3 KB spill of a kp=512 what-if fails
    assert aot.check_block(90, 135168, 256, tk["regs"], tk["spill_st"])


def test_dynamic_smem_rules():
    no_optin = aot.SMEM_NO_OPTIN
    # Issue #13 finding 2: dynamic exactly 48 KiB plus static, not opted in.
    plan = [(1, no_optin - 64, False), (2, no_optin, False), (3, no_optin + 64, True)]
    (f,) = aot.check_dynamic_smem("rerank_kernel<double>", 80, 256, plan)
    assert "without the opt-in" in f and "m=1..2" in f
    assert aot.check_dynamic_smem("rerank_kernel<double>", 80, 0, plan) == []
    (f,) = aot.check_dynamic_smem("k", 80, 16, [(7, aot.CARDS[80][1], True)])
    assert "A100" in f and "m=7..7" in f
    assert aot.check_dynamic_smem("k", 90, 16, [(7, aot.CARDS[80][1], True)]) == []


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a host C++ compiler")
def test_cuda_smem_plan_header_every_k(tmp_path):
    """csrc/cuda/smem_plan.h, compiled alone: every k <= kMaxK launches on both cards with
    the static sizes ptxas reports (16 B select, 256 B fp64 re-rank), and the rule it
    carries opts in wherever CUDA requires; the pre-fix rule (dynamic > 48 KiB) did not."""
    sys.path.insert(0, ROOT)
    from ldreg_kernels import _host

    sp = aot.SmemPlan(str(tmp_path))
    kmax, _, _ = sp.ask(0)
    assert kmax == 4096
    m_max = kmax + _host.default_margin(kmax)
    _, plans, _ = sp.ask(m_max)
    statics = {("select", 4): 16, ("rerank", 4): 128, ("select", 8): 16, ("rerank", 8): 256}
    queries = [(plans[(acc, m)][kn == "rerank"], st) for (kn, acc), st in statics.items() for m in range(1, m_max + 1)]
    _, _, optin = sp.ask(0, queries)
    it = iter(optin)
    old_fails = []
    for (kn, acc), st in statics.items():
        plan = [(m, plans[(acc, m)][kn == "rerank"], next(it)) for m in range(1, m_max + 1)]
        for arch in (80, 90):
            assert aot.check_dynamic_smem(kn, arch, st, plan) == []
            old = [(m, d, d > aot.SMEM_NO_OPTIN) for m, d, _ in plan]
            old_fails += aot.check_dynamic_smem(f"{kn}<{acc}>", arch, st, old)
    assert any("select<8>" in f and "m=1793.." in f for f in old_fails), old_fails
    assert any("rerank<8>" in f and "m=2049.." in f for f in old_fails), old_fails


def test_launch_lint():
    ok = """
template <typename Kernel>
void prepare_smem(Kernel kernel, size_t bytes, int device, int64_t k, const char* what) {
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (cuda_smem::needs_optin(bytes, attr.sharedSizeBytes)) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  }
}
  prepare_smem(select_kernel<acc_t>, smem_sel, device, k, "selection");
  select_kernel<acc_t><<<grid, kSelThreads, smem_sel, stream>>>(a, b);
  backward_kernel<scalar_t, acc_t><<<b, threads, 0, stream>>>(c);
"""
    assert aot.lint_launches(ok) == []
    bad = ok.replace("  prepare_smem(select_kernel<acc_t>, smem_sel", "  prepare_smem(select_kernel<acc_t>, smem_other")
    assert len(aot.lint_launches(bad)) == 1
    old_rule = ok.replace("cuda_smem::needs_optin(bytes, attr.sharedSizeBytes)", "bytes > 48 * 1024")
    assert [("needs_optin" in f) for f in aot.lint_launches(old_rule)] == [True]
    with open(os.path.join(ROOT, "csrc", "cuda", "knn_cuda.cu")) as f:
        assert aot.lint_launches(f.read()) == []


def test_forward_buckets_cover_every_triton_k():
    """The tool enumerates the forward's buffers from knn_fwd._plan itself: every k up to
    the documented maximum lands in a bucket of at most MAX_KP entries."""
    pytest.importorskip("triton")
    sys.path.insert(0, ROOT)
    from ldreg_kernels import _host
    from ldreg_kernels.backends.triton import knn_fwd

    buckets = aot.forward_buckets(knn_fwd, _host.default_margin, k_max=2100)
    assert {kp for kp, _ in buckets} == {64, 128, 256} and max(kp for kp, _ in buckets) == knn_fwd.MAX_KP
    covered = set()
    for lo, hi, _ in buckets.values():
        covered |= set(range(lo, hi + 1))
    assert covered == set(range(1, 2048))  # n_valid = k + 1 reaches k = 2047; large N k <= 1639


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_fast_mode_run_passes():
    """One real run, --no-ptxas, sm_80 only (the smaller shared memory; ~20 s, both cards
    ~30 s): every Triton config the dispatcher launches compiles to TTGIR and fits the
    card's shared memory. make gpu-aot runs both cards with ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "tools", "gpu_aot.py"), "--no-ptxas", "--no-cuda", "--no-cache", "--arch", "80"]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "all rules pass" in p.stdout and "_knn_select_kernel" in p.stdout and "_knn_bwd_kernel" in p.stdout
    assert "sm_80 A100: Triton forward launches for every k" in p.stdout
    print(f"fast gpu-aot run: {time.time() - t0:.0f} s")
