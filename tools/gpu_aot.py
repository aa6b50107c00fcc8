#!/usr/bin/env python3
"""``make gpu-aot``: compile every GPU kernel of ldreg_kernels for sm_80 (A100) and sm_90
(H100) on a machine without a GPU, and fail on what would fail, or run badly, at launch.

Triton. The launches are recorded from the project's own host code, not from a list: the
``@triton.jit`` kernels are swapped for recorders and the launch sites
(``knn_fwd.select_candidates`` for every buffer width and segment count that
``knn_fwd._plan`` picks for some k, every selection precision, with and without
exclude_self; ``knn_bwd.knn_backward`` for every input dtype, with and without grad_ref,
by atomics and by the deterministic reduction; ``rerank.exact_keys`` for every input
dtype) are driven on small CPU tensors. Each
recorded launch is specialised as the JIT does it (``JITFunction``'s binder and
``_pack_args``) and compiled by Triton's own stages for
``GPUTarget("cuda", 80 | 90, 32)``: TTIR, TTGIR, LLVM IR (where the shared-memory size
Triton checks at load time is decided), then PTX and Triton's bundled ptxas with ``-v``
(registers, spills). Shared memory comes from Triton's own allocation pass, run on the
TTGIR (``smem_probe``; a ptxas run checks it against make_llir's metadata.shared).

Tiers. By default ptxas runs for every launch the default settings can make: the default
selection precision, "ieee" (the redo path) and the backward; the opt-in precisions
("tf32x3", "bf16") get the shared-memory check. ``--all``: ptxas for everything.
``--no-ptxas``: shared memory only. Measurements (never verdicts) are cached by content
(kernel source and dependencies, specialisation, target, Triton/ptxas/nvcc versions, CUDA
sources) under ~/.cache/ldreg_kernels/gpu_aot, so a re-run compiles only what changed.
Times on the 2-core dev VM shared with other jobs (load 4-6): default 263 s cold, --all
384 s cold, 2 s warm; --no-ptxas --no-cuda 28 s; the nvcc part alone ~60 s.

CUDA. ``nvcc -Xptxas -v`` of csrc/cuda/knn_cuda.cu with the Makefile's nvcc-check flags:
registers, spills and static shared memory per kernel. The dynamic shared memory each
launch requests, and whether the code opts in to more than 48 KiB, come from
csrc/cuda/smem_plan.h, the header knn_cuda.cu itself uses: it is compiled alone with the
host C++ compiler and asked for every k <= kMaxK.

Rules (exit status 1 if any fails):
  smem     a block's shared memory (Triton: metadata.shared; CUDA: static + dynamic) over
           the card's opt-in limit per block: A100 166912 B, H100 232448 B. Triton raises
           OutOfResources at the first launch, CUDA fails the launch.
  regs     registers x threads per block over the 64K register file (OutOfResources).
  spill    more than SPILL_BUDGET bytes of spill stores per thread (see there).
  optin    a CUDA launch whose static + dynamic shared memory exceeds 48 KiB while the
           code (smem_plan.h's ``needs_optin``) would not set
           cudaFuncAttributeMaxDynamicSharedMemorySize; also every launch with dynamic
           shared memory must go through ``prepare_smem``, which must query the static size.

Usage: python tools/gpu_aot.py [--all | --no-ptxas] [--arch 80,90] [--jobs N] [--no-cuda]
                               [--variants] [--filter REGEX] [--json FILE] [--no-cache]
Needs the project's dependencies (torch, triton) and, for the CUDA part, nvcc (CUDA_HOME or
/usr/local/cuda) and a host C++ compiler. No GPU, no driver.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), the limit Triton
# compares metadata.shared with when it loads a kernel and CUDA applies at launch.
CARDS = {80: ("A100", 166912), 90: ("H100", 232448)}
SMEM_NO_OPTIN = 48 * 1024  # per block, static + dynamic, without the opt-in attribute
REGS_PER_SM = 65536  # both cards; also the most one block may use
# Spill budget, bytes of spill stores per thread (ptxas -v). Spilled registers go to local
# memory, cached in L1 (shared with the kernel's shared memory) and then L2. A few values
# spilled around the bitonic network cost little; the 1.2-2.6 KB per thread the first
# kp=128/256 configs spilled (issue #13, finding 3), and the 0.45-0.7 KB of tf32x3 with
# 32-wide D chunks, are re-read every tile and make the kernel bound on local memory.
# 256 B = 64 registers' worth, a quarter of a thread's 255-register file: above every
# config that fits its registers (0-112 B here), below every one measured not to (>= 450 B).
SPILL_BUDGET = 256
# Bump when what a cached measurement means changes (the rules are re-applied on every run).
CACHE_VERSION = "1"


# ------------------------------------------------------------------ ptxas output and rules
def parse_ptxas(log: str) -> list[dict]:
    """One dict per entry function in a ``ptxas -v`` log (its stderr, or nvcc's with
    ``-Xptxas -v``): name (mangled), arch, regs, stack, spill_st, spill_ld, smem (static)."""
    out, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = dict(name=m.group(1), arch=m.group(2), regs=0, stack=0, spill_st=0, spill_ld=0, smem=0)
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return out


def regs_per_block(regs: int, threads: int) -> int:
    """Registers a block holds: allocated per warp in units of 256."""
    return -(-regs * 32 // 256) * 256 * -(-threads // 32)


def check_block(arch: int, smem: int, threads: int, regs: int | None, spill_st: int | None) -> list[str]:
    """Rule failures of one compiled kernel (regs/spill_st None: not known, no ptxas)."""
    name, limit = CARDS[arch]
    fails = []
    if smem > limit:
        fails.append(f"smem {smem} B > {name} {limit} B")
    if regs is not None and regs_per_block(regs, threads) > REGS_PER_SM:
        fails.append(f"regs {regs} x {threads} threads > {REGS_PER_SM}")
    if spill_st is not None and spill_st > SPILL_BUDGET:
        fails.append(f"spill {spill_st} B > budget {SPILL_BUDGET} B")
    return fails


def check_dynamic_smem(kernel: str, arch: int, static: int, plan: list[tuple[int, int, bool]], k_of_m=None) -> list[str]:
    """Rules for one CUDA kernel with dynamic shared memory. ``plan`` lists (m, dynamic bytes,
    whether the code opts in) for every candidate count m = min(k + margin, n_valid) the
    backend can use; ``k_of_m(lo, hi)`` names the k range of an m range for the message."""
    name, limit = CARDS[arch]
    over, missing = [], []
    for m, dyn, optin in plan:
        if static + dyn > limit:
            over.append(m)
        elif static + dyn > SMEM_NO_OPTIN and not optin:
            missing.append(m)

    def where(ms):
        return f"m={ms[0]}..{ms[-1]}" + (f" ({k_of_m(ms[0], ms[-1])})" if k_of_m else "")

    fails = []
    if over:
        fails.append(f"{kernel} sm_{arch}: static {static} + dynamic > {name} {limit} B for {where(over)}")
    if missing:
        fails.append(f"{kernel} sm_{arch}: static {static} + dynamic > 48 KiB without the opt-in attribute for {where(missing)}")
    return fails


def lint_launches(source: str) -> list[str]:
    """Every kernel launch with dynamic shared memory goes through prepare_smem with the
    same kernel and byte count, and prepare_smem reads the static size and asks
    needs_optin."""
    fails = []
    for m in re.finditer(r"(\w+(?:<[^<>;]*>)?)\s*<<<\s*([^,>]+),\s*([^,>]+),\s*([^,>]+)", source):
        kern, smem = m.group(1), m.group(4).strip()
        if smem == "0":
            continue
        pat = r"prepare_smem\(\s*" + re.escape(re.sub(r"\s+", "", kern)) + r"\s*,\s*" + re.escape(smem) + r"\b"
        if not re.search(pat, re.sub(r"(?<=[<,])\s+|\s+(?=[>,])", "", source)):
            fails.append(f"launch of {kern} with {smem} bytes of dynamic shared memory has no prepare_smem({kern}, {smem}, ...)")
    body = re.search(r"void prepare_smem\(.*?\n}\n", source, re.S)
    if body is None:
        fails.append("prepare_smem not found in knn_cuda.cu")
    else:
        for needed in ("cudaFuncGetAttributes", "needs_optin(", "cudaFuncAttributeMaxDynamicSharedMemorySize"):
            if needed not in body.group(0):
                fails.append(f"prepare_smem does not use {needed}")
    return fails


# ------------------------------------------------------------------ recording Triton launches
@dataclass
class Launch:
    module: str
    kernel: str
    label: str
    sort: tuple
    args: tuple
    kwargs: dict
    extra: dict = field(default_factory=dict)


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, module: str, name: str):
        self.module, self.name, self.calls, self.tag = module, name, [], None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            label, sort, extra = self.tag
            self.calls.append(Launch(self.module, self.name, label, sort, args, kwargs, dict(extra, grid=tuple(grid))))

        return launch


def _import_backend():
    """ldreg_kernels' Triton modules, imported for the GPU (interpreter off)."""
    os.environ.pop("TRITON_INTERPRET", None)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import importlib

    return {n: importlib.import_module(f"ldreg_kernels.backends.triton.{n}") for n in ("knn_fwd", "knn_bwd", "rerank")}


def forward_buckets(fwd, margin, k_max: int = 8192) -> dict:
    """{(kp, nseg > 1): (k_min, k_max, largest nseg)} over every k the forward accepts, from
    the forward's own plan, with a reference far larger than k (the widest buffers) and one
    just large enough (n_valid = k + 1: the smallest)."""
    out = {}
    for k in range(1, k_max + 1):
        for n_valid in (1 << 30, k + 1):
            plan = fwd._plan(k, n_valid, margin(k))
            if plan is None:
                continue
            _, kp, nseg = plan
            key = (kp, nseg > 1)
            lo, hi, ns = out.get(key, (k, k, nseg))
            out[key] = (min(lo, k), max(hi, k), max(ns, nseg))
    return out


def forward_label(extra: dict) -> str:
    return f"kp={extra['kp']} nseg={','.join(sorted(extra['nseg']))} k={extra['k'][0]}..{extra['k'][1]} {extra['tail']}"


def forward_k_max(fwd, margin, k_max: int = 8192) -> int:
    """Largest k the forward keeps in Triton against a large reference."""
    return max(k for k in range(1, k_max + 1) if fwd._plan(k, 1 << 30, margin(k)) is not None)


def record_triton_launches(variants: bool = False) -> tuple[list[Launch], dict, int]:
    import torch

    from triton.runtime.jit import JITFunction

    mods = _import_backend()
    fwd, bwd = mods["knn_fwd"], mods["knn_bwd"]
    from ldreg_kernels import _host

    recs = {}
    for mname, mod in mods.items():
        for attr, val in list(vars(mod).items()):
            if isinstance(val, JITFunction):
                recs[(mname, attr)] = (val, _Recorder(mname, attr))
                setattr(mod, attr, recs[(mname, attr)][1])
    buckets = forward_buckets(fwd, _host.default_margin)
    g = torch.Generator().manual_seed(0)
    try:
        rec = recs[("knn_fwd", "_knn_select_kernel")][1]
        shapes = [(256, 4096, 128)] + ([(250, 3001, 100), (64, 1000, 8)] if variants else [])
        for b, n, d in shapes:
            xs, rs = torch.randn(b, d, generator=g), torch.randn(n, d, generator=g)
            sq, own = (rs * rs).sum(1), torch.arange(b)
            for (kp, multi), (klo, khi, nseg) in sorted(buckets.items()):
                for prec in fwd.PRECISIONS:
                    for excl in (True, False):
                        shape = "" if (b, n, d) == shapes[0] else f" B,N,D={b},{n},{d}"
                        extra = dict(kp=kp, k=(klo, khi), nseg={">1" if multi else "1"}, prec=prec,
                                     tail=f"{prec}{'' if excl else ' noexcl'}{shape}")
                        rec.tag = (forward_label(extra), (0, kp, prec, not excl, shape), extra)
                        fwd.select_candidates(xs, rs, sq, own if excl else None, kp, prec, nseg)
        bwd_recs = [recs[("knn_bwd", name)][1] for name in ("_knn_bwd_kernel", "_knn_bwd_ref_sorted_kernel")]
        det_mode = torch.are_deterministic_algorithms_enabled()
        for d in [128] + ([8, 100] if variants else []):
            for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                ct = _host.compute_dtype(dt)
                b, n, k = 256, 4096, 32
                x, ref = torch.randn(b, d, generator=g).to(dt), torch.randn(n, d, generator=g).to(dt)
                idx, dist = torch.randint(0, n, (b, k), generator=g), torch.rand(b, k, generator=g).to(ct)
                # grad_ref by atomics, none, or (deterministic mode) by the sorted reduction.
                for need_ref, det in ((True, False), (False, False), (True, True)):
                    label = f"x={str(dt)[6:]} grad_ref={int(need_ref)}{' det' if det else ''}" + ("" if d == 128 else f" D={d}")
                    for rec in bwd_recs:
                        rec.tag = (label, (1, str(dt), need_ref, det, d), {})
                    torch.use_deterministic_algorithms(det)
                    try:
                        bwd.knn_backward(dist, x, ref, idx, dist, need_ref)
                    finally:
                        torch.use_deterministic_algorithms(det_mode)
        # The fused exact re-rank: fp32 arithmetic with packed keys for every input but
        # float64, which accumulates in fp64; its blocks depend on D only up to BLOCK_D.
        rec = recs[("rerank", "_rerank_kernel")][1]
        for d in [128] + ([8, 100, 2048] if variants else []):
            for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                b, n, m = 256, 4096, 80
                x, ref = torch.randn(b, d, generator=g).to(dt), torch.randn(n, d, generator=g).to(dt)
                cand = torch.randint(0, n, (b, m), generator=g)
                rec.tag = (f"x={str(dt)[6:]}" + ("" if d == 128 else f" D={d}"), (2, str(dt), d), {})
                mods["rerank"].exact_keys(x, ref, cand)
    finally:
        for (mname, attr), (jit, _) in recs.items():
            setattr(mods[mname], attr, jit)
    never = [f"{m}.{a}" for (m, a), (_, r) in recs.items() if not r.calls]
    if never:
        raise SystemExit(f"gpu-aot: kernels never launched by the sweep (add them to record_triton_launches): {never}")
    return [c for _, r in recs.values() for c in r.calls], buckets, forward_k_max(fwd, _host.default_margin)


def _digest(*parts) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


class Cache:
    """Measurements (never verdicts) by a key over everything that determines them: the
    kernel's source with its dependencies, the specialisation, the target, and the Triton,
    ptxas and nvcc versions. ``path=None``: no cache."""

    def __init__(self, path: str | None):
        self.path = path
        self.hits = 0

    def get(self, key: str):
        if self.path is None:
            return None
        try:
            with open(os.path.join(self.path, key + ".json")) as f:
                val = json.load(f)
        except (OSError, ValueError):
            return None
        self.hits += 1
        return val

    def put(self, key: str, val) -> None:
        if self.path is None:
            return
        os.makedirs(self.path, exist_ok=True)
        tmp = os.path.join(self.path, f".{key}.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(val, f)
        os.replace(tmp, os.path.join(self.path, key + ".json"))


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ldreg_kernels", "gpu_aot")


def specialise(launch: Launch, jit, arch: int) -> dict:
    """The compile job of one launch, specialised as ``JITFunction.run`` does it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kw = dict(launch.kwargs, debug=jit.debug, instrumentation_mode="")
    bound, spec, opts = binder(*launch.args, **kw)
    options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, spec, opts)
    key = json.dumps([jit.cache_key, signature, sorted(map(str, constexprs.items())), sorted(map(str, attrs.items())),
                      sorted(map(str, options.__dict__.items())), arch])
    return dict(module=launch.module, kernel=launch.kernel, label=launch.label, sort=launch.sort, arch=arch,
                signature=signature, constexprs=constexprs, attrs=attrs, options=options.__dict__, key=key,
                extra={k: set(v) if isinstance(v, set) else v for k, v in launch.extra.items()})


# ------------------------------------------------------------------ compiling (worker side)
_W: dict = {}


def _worker_init(tmp: str):
    import logging

    logging.disable(logging.WARNING)
    os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, f"cache{os.getpid()}")
    _W["mods"] = _import_backend()
    _W["tmp"] = tempfile.mkdtemp(prefix=f"w{os.getpid()}", dir=tmp)


def smem_probe(ttgir: str, backend, options) -> int:
    """Shared memory of a TTGIR module: the passes that make_llir runs up to and including
    Triton's shared-memory allocation (its first five), on a copy, with no LLVM lowering;
    make_llir reads ``ttg.shared`` right after them. A full run checks that this equals the
    metadata.shared that make_llir reports (rule "probe")."""
    from triton._C.libtriton import ir, nvidia, passes
    from triton.backends.nvidia.compiler import get_ptx_version_from_options

    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    path = os.path.join(_W["tmp"], "probe.ttgir")
    with open(path, "w") as f:
        f.write(ttgir)
    mod = ir.parse_mlir_module(path, ctx)
    mod.context = ctx
    pm = ir.pass_manager(ctx)
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    passes.ttgpuir.add_allocate_warp_groups(pm)
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    capability = backend._parse_arch(options.arch)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, capability, get_ptx_version_from_options(options, backend.target.arch))
    pm.run(mod, "gpu_aot_smem_probe")
    return mod.get_int_attr("ttg.shared") or 0


def compile_job(job: dict, ptxas: bool) -> dict:
    """Run Triton's stages for one job: to TTGIR and the shared-memory probe, then (full
    mode) LLVM IR, PTX and ptxas."""
    from triton import knobs
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget, Language
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    t0 = time.time()
    res = {k: job[k] for k in ("module", "kernel", "label", "sort", "arch", "extra", "key")}
    res["fails_compile"] = []
    stage = "setup"
    try:
        fn = getattr(_W["mods"][job["module"]], job["kernel"])
        target = GPUTarget("cuda", job["arch"], 32)
        backend = make_backend(target)
        options = backend.parse_options(job["options"])
        res["threads"] = options.num_warps * 32
        src = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"], attrs=job["attrs"])
        stages: dict = {}
        backend.add_stages(stages, options, Language.TRITON)
        ctx = ir.context()
        ir.load_dialects(ctx)
        backend.load_dialects(ctx)
        stage = "ast"
        mod = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), ctx)
        md = {"target": target, **options.__dict__}
        res["times"] = {}
        for stage in stages:
            t = time.time()
            if stage == "llir":
                res["smem"] = smem_probe(str(mod), backend, options)
                res["times"]["probe"] = time.time() - t
                if not ptxas:
                    break
                t = time.time()
            if stage == "cubin":
                log = io.StringIO()
                with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
                    knobs.nvidia.dump_ptxas_log = True
                    stages[stage](mod, md)
                (info,) = parse_ptxas(log.getvalue())
                res.update(regs=info["regs"], spill_st=info["spill_st"], spill_ld=info["spill_ld"], stack=info["stack"])
            else:
                mod = stages[stage](mod, md)
            res["times"][stage] = time.time() - t
        res["fails"] = check_block(job["arch"], res["smem"], res["threads"], res.get("regs"), res.get("spill_st"))
        if ptxas and md["shared"] != res["smem"]:
            res["fails_compile"].append(
                f"probe: shared-memory probe {res['smem']} B != make_llir's {md['shared']} B (update smem_probe)")
            res["smem"] = md["shared"]
        res["fails"] += res["fails_compile"]
    except Exception as e:  # a compile error is a finding: report it, go on
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        res["fails"] = [f"{stage} failed: " + (msg[0] if msg else "?")[:300]]
        res["compile_error"] = True
    res["wall"] = time.time() - t0
    return res


def _run(a):
    return compile_job(*a)


# ------------------------------------------------------------------ CUDA
CUDA_INPUTS = ("csrc/cuda/knn_cuda.cu", "csrc/cuda/smem_plan.h", "csrc/knn.h")


def nvcc_start(archs, tmp: str, cache: Cache) -> dict:
    import torch.utils.cpp_extension as ce

    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    incs = ["-I" + p for p in ce.include_paths() + [sysconfig.get_paths()["include"]]]
    gencode = [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    # The Makefile's nvcc-check flags, plus -Xptxas -v.
    cmd = [nvcc, "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-DLDREG_WITH_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           "-D__CUDA_NO_HALF_OPERATORS__", *gencode, "-Xptxas", "-v", "-Icsrc", *incs,
           "-c", "csrc/cuda/knn_cuda.cu", "-o", os.path.join(tmp, "knn_cuda.o")]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    srcs = [open(os.path.join(ROOT, p)).read() for p in CUDA_INPUTS]
    key = "nvcc-" + _digest(CACHE_VERSION, cmd[1:-2], version, srcs)
    hit = cache.get(key)
    if hit is not None:
        return dict(t0=time.time(), log=hit["log"], rc=0, cached=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return dict(t0=time.time(), proc=proc, key=key, cache=cache, cached=False)


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        dem = out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names
    short = []
    for d in dem:
        d = re.sub(r"^void ", "", d.replace("ldreg::(anonymous namespace)::", "").replace("c10::", ""))
        short.append(re.sub(r"\(.*$", "", d))
    return short


class SmemPlan:
    """csrc/cuda/smem_plan.h compiled alone with the host C++ compiler, and asked."""

    def __init__(self, tmp: str):
        src = os.path.join(tmp, "smem_plan_main.cpp")
        with open(src, "w") as f:
            f.write(
                '#include "cuda/smem_plan.h"\n#include <cstdio>\n#include <cstdlib>\n'
                "namespace s = ldreg::cuda_smem;\n"
                "int main(int argc, char** argv) {\n"
                '  std::printf("K %lld\\n", static_cast<long long>(s::kMaxK));\n'
                "  const long long m_max = std::atoll(argv[1]);\n"
                "  const size_t accs[] = {sizeof(float), sizeof(double)};\n"
                "  for (size_t acc : accs)\n"
                "    for (long long m = 1; m <= m_max; ++m) {\n"
                "      const s::Plan p = s::plan(m, acc);\n"
                '      std::printf("P %zu %lld %zu %zu\\n", acc, m, p.select_bytes, p.rerank_bytes);\n'
                "    }\n"
                "  unsigned long long dyn, st;\n"
                '  while (std::scanf("%llu %llu", &dyn, &st) == 2) std::printf("Q %d\\n", s::needs_optin(dyn, st) ? 1 : 0);\n'
                "}\n"
            )
        self.exe = os.path.join(tmp, "smem_plan_main")
        cxx = os.environ.get("CXX", "c++")
        subprocess.run([cxx, "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc"), src, "-o", self.exe], check=True)

    def ask(self, m_max: int, queries=()) -> tuple[int, dict, list[bool]]:
        """(kMaxK, {(acc size, m): (select bytes, re-rank bytes)} for m <= m_max,
        [needs_optin(dynamic, static) for each query])."""
        stdin = "".join(f"{d} {s}\n" for d, s in queries)
        out = subprocess.run([self.exe, str(m_max)], input=stdin, capture_output=True, text=True, check=True).stdout
        kmax, plans, optin = 0, {}, []
        for line in out.splitlines():
            p = line.split()
            if p[0] == "K":
                kmax = int(p[1])
            elif p[0] == "P":
                plans[(int(p[1]), int(p[2]))] = (int(p[3]), int(p[4]))
            else:
                optin.append(p[1] == "1")
        return kmax, plans, optin


def cuda_check(h: dict, archs, tmp: str) -> dict:
    """Finish the nvcc run; per-kernel rows and failures."""
    if h["cached"]:
        log, rc = h["log"], 0
    else:
        log = h["proc"].communicate()[0]
        rc = h["proc"].returncode
        if rc == 0:
            h["cache"].put(h["key"], dict(log=log))
    res = dict(wall=time.time() - h["t0"], rc=rc, rows=[], fails=[], cached=h["cached"])
    if rc != 0:
        res["fails"].append("nvcc failed:\n" + log[-3000:])
        return res
    rows = parse_ptxas(log)
    for r, name in zip(rows, demangle([r["name"] for r in rows])):
        r["kernel"] = name
        r["fails"] = check_block(int(r["arch"][3:5]), r["smem"], 256, r["regs"], r["spill_st"])
        res["fails"] += [f"{name} {r['arch']}: {f}" for f in r["fails"]]
    res["rows"] = rows
    source = open(os.path.join(ROOT, "csrc", "cuda", "knn_cuda.cu")).read()
    res["fails"] += lint_launches(source)
    # Dynamic shared memory: select_kernel<acc_t> and rerank_kernel<scalar_t, acc_t>.
    sys.path.insert(0, ROOT)
    from ldreg_kernels import _host

    m_of_k = lambda k: k + _host.default_margin(k)  # noqa: E731  (n_valid >= k + margin: the largest m)
    statics = {}  # (kernel, acc size, arch) -> largest static smem over its instantiations
    for r in rows:
        m = re.match(r"(select_kernel|rerank_kernel)<(.*)>$", r["kernel"])
        if m:
            acc = 8 if m.group(2).split(",")[-1].strip() == "double" else 4
            key = (m.group(1), acc, int(r["arch"][3:5]))
            statics[key] = max(statics.get(key, 0), r["smem"])
    missing = [(kn, acc, a) for kn in ("select_kernel", "rerank_kernel") for acc in (4, 8) for a in archs
               if (kn, acc, a) not in statics]
    if missing:
        res["fails"].append(f"kernels not found in the ptxas log: {missing}")
        return res
    sp = SmemPlan(tmp)
    kmax, _, _ = sp.ask(0)
    m_max = m_of_k(kmax)
    _, plans, _ = sp.ask(m_max)
    order = [(kn, acc, arch, m) for (kn, acc, arch) in sorted(statics) for m in range(1, m_max + 1)]
    queries = [(plans[(acc, m)][kn == "rerank_kernel"], statics[(kn, acc, arch)]) for kn, acc, arch, m in order]
    _, _, optin = sp.ask(0, queries)
    per = {}
    for (kn, acc, arch, m), (dyn, _), oi in zip(order, queries, optin):
        per.setdefault((kn, acc, arch), []).append((m, dyn, oi))

    def k_of_m(lo, hi):
        ks = [k for k in range(1, kmax + 1) if lo <= m_of_k(k) <= hi]
        return f"k={ks[0]}..{ks[-1]} when N > k + margin" if ks else "small N only"

    res["dyn"] = []
    for (kn, acc, arch), plan in sorted(per.items()):
        st = statics[(kn, acc, arch)]
        name = f"{kn}<{'double' if acc == 8 else 'float'}>"
        res["fails"] += check_dynamic_smem(name, arch, st, plan, k_of_m)
        first = next((m for m, _, oi in plan if oi), None)
        res["dyn"].append(dict(kernel=name, arch=f"sm_{arch}", static=st, max_total=st + plan[-1][1],
                               optin_from=f"m={first} ({k_of_m(first, first)})" if first else "-"))
    res["kmax"] = kmax
    return res


# ------------------------------------------------------------------ report
def table(rows: list[dict], cols: list[str]) -> str:
    w = [max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in cols]
    lines = ["  ".join(c.ljust(x) for c, x in zip(cols, w)).rstrip(), "  ".join("-" * x for x in w)]
    lines += ["  ".join(str(r.get(c, "")).ljust(x) for c, x in zip(cols, w)).rstrip() for r in rows]
    return "\n".join(lines)


def report(results: list[dict], buckets: dict, k_large_n: int, archs, cuda: dict | None) -> str:
    out = []
    for kern in sorted({r["kernel"] for r in results}):
        rows = []
        for r in sorted((r for r in results if r["kernel"] == kern), key=lambda r: (r["arch"], r["sort"])):
            rows.append({"arch": f"sm_{r['arch']}", "config": r["label"], "warps": r.get("threads", 0) // 32,
                         "smem B": r.get("smem", ""), "regs": r.get("regs", "-"),
                         "spill st/ld": f"{r['spill_st']}/{r['spill_ld']}" if "spill_st" in r else "-",
                         "result": "FAIL: " + "; ".join(r["fails"]) if r["fails"] else "pass",
                         "t(s)": "cached" if r.get("cached") else f"{r['wall']:.1f}"})
        out.append(f"\n=== Triton {kern} ===\n" + table(rows, list(rows[0])))
    fw = [r for r in results if r["kernel"] == "_knn_select_kernel" and "B,N,D" not in r["label"]]
    top = max((hi for _, hi, _ in buckets.values()), default=0)
    for arch in archs:
        bad = sorted({r["extra"]["k"] for r in fw if r["arch"] == arch and r["fails"]})
        out.append(f"sm_{arch} {CARDS[arch][0]}: Triton forward launches for every k it takes (k <= {top}; "
                   f"k <= {k_large_n} when N > k + margin)" if not bad else
                   f"sm_{arch} {CARDS[arch][0]}: Triton forward FAILS for k in {bad}")
    if cuda is not None:
        when = "cached" if cuda.get("cached") else f"{cuda['wall']:.0f} s"
        out.append(f"\n=== CUDA csrc/cuda/knn_cuda.cu, nvcc -Xptxas -v ({when}) ===")
        if cuda["rows"]:
            out.append(table([dict(r, spill=f"{r['spill_st']}/{r['spill_ld']}", result="FAIL" if r["fails"] else "pass")
                              for r in cuda["rows"]], ["arch", "kernel", "regs", "spill", "stack", "smem", "result"]))
        if cuda.get("dyn"):
            out.append(f"dynamic shared memory for k <= kMaxK = {cuda['kmax']} (smem_plan.h):")
            out.append(table(cuda["dyn"], ["kernel", "arch", "static", "max_total", "optin_from"]))
    fails = [f"{r['kernel']} sm_{r['arch']} [{r['label']}]: {f}" for r in results for f in r["fails"]]
    fails += cuda["fails"] if cuda else []
    out.append("\n" + ("FAIL:\n  " + "\n  ".join(fails) if fails else "gpu-aot: all rules pass"))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-ptxas", action="store_true", help="shared memory only, no LLVM/PTX/ptxas (fast)")
    ap.add_argument("--all", action="store_true",
                    help="ptxas for every precision (default: the default precision and 'ieee', the redo path; "
                         "the opt-in precisions get the shared-memory check only)")
    ap.add_argument("--arch", default="80,90")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    ap.add_argument("--variants", action="store_true", help="also ragged and small shapes")
    ap.add_argument("--filter", default=None, help="regex on config labels")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cache-dir", default=default_cache_dir(), help="measurements by content hash (default: %(default)s)")
    ap.add_argument("--no-cache", action="store_true")
    a = ap.parse_args(argv)
    cache = Cache(None if a.no_cache else a.cache_dir)
    archs = [int(x) for x in a.arch.split(",")]
    for arch in archs:
        if arch not in CARDS:
            ap.error(f"--arch: known cards are {sorted(CARDS)}")
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="gpu_aot_")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
    try:
        nvcc = None if a.no_cuda else nvcc_start(archs, tmp, cache)
        launches, buckets, k_large_n = record_triton_launches(a.variants)
        mods = _import_backend()
        jobs, seen = [], {}
        for launch in launches:
            if a.filter and not re.search(a.filter, launch.label):
                continue
            for arch in archs:
                job = specialise(launch, getattr(mods[launch.module], launch.kernel), arch)
                if job["key"] not in seen:
                    seen[job["key"]] = job
                    jobs.append(job)
                elif "kp" in job["extra"]:  # one kernel serves several launches: merge their k ranges
                    e, f = seen[job["key"]]["extra"], job["extra"]
                    e.update(k=(min(e["k"][0], f["k"][0]), max(e["k"][1], f["k"][1])), nseg=e["nseg"] | f["nseg"])
                    seen[job["key"]]["label"] = forward_label(e)
        print(f"gpu-aot: {len(jobs)} Triton (config, arch) compiles{'' if a.no_cuda else ' + nvcc'}, {a.jobs} workers", flush=True)
        import triton
        from triton import knobs

        versions = [CACHE_VERSION, triton.__version__, knobs.nvidia.ptxas.version]
        tier1 = {mods["knn_fwd"].get_precision(), "ieee"}
        results, todo = [], []
        for j in jobs:
            j["ptxas"] = not a.no_ptxas and (a.all or j["extra"].get("prec", "ieee") in tier1)
            j["cache_key"] = "triton-" + _digest(versions, j["key"], j["ptxas"])
            hit = cache.get(j["cache_key"])
            if hit is None and not j["ptxas"]:  # a full measurement answers a shared-memory one
                hit = cache.get("triton-" + _digest(versions, j["key"], True))
            if hit is None:
                todo.append(j)
                continue
            r = {k: j[k] for k in ("module", "kernel", "label", "sort", "arch", "extra")}
            r.update(hit, cached=True)
            r["fails"] = check_block(r["arch"], r["smem"], r["threads"], r.get("regs"), r.get("spill_st")) + r["fails_compile"]
            results.append(r)
        print(f"gpu-aot: {len(jobs) - len(todo)} of {len(jobs)} from the cache ({cache.path})", flush=True)
        ctx = mp.get_context("spawn")
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(ctx.Pool(min(a.jobs, len(todo)), initializer=_worker_init, initargs=(tmp,))) if todo else None
            # Heaviest first (wide buffers, ptxas), so the pool ends together.
            todo.sort(key=lambda j: -j["extra"].get("kp", 0))
            by_key = {j["key"]: j for j in todo}
            for i, r in enumerate(pool.imap_unordered(_run, [(j, j["ptxas"]) for j in todo]) if pool else [], 1):
                if "smem" in r and not r.get("compile_error"):
                    keep = ("smem", "threads", "regs", "spill_st", "spill_ld", "stack", "times")
                    cache.put(by_key[r["key"]]["cache_key"], dict({k: r[k] for k in keep if k in r}, fails_compile=r["fails_compile"]))
                results.append(r)
                times = " ".join(f"{k}={v:.1f}" for k, v in r.get("times", {}).items())
                print(f"  [{i}/{len(todo)}] sm_{r['arch']} {r['kernel']} {r['label']}: "
                      f"{'FAIL' if r['fails'] else 'pass'} ({r['wall']:.1f} s: {times})", flush=True)
        cuda = cuda_check(nvcc, archs, tmp) if nvcc else None
        print(report(results, buckets, k_large_n, archs, cuda))
        mode = "--no-ptxas" if a.no_ptxas else ("--all" if a.all else f"ptxas for {sorted(tier1)}, shared memory for the rest")
        print(f"\ngpu-aot: {time.time() - t0:.0f} s on {os.cpu_count()} cores ({mode}; {cache.hits} cached)")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(triton=results, cuda=cuda), f, indent=1, default=str)
        bad = any(r["fails"] for r in results) or bool(cuda and cuda["fails"])
        return 1 if bad else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
