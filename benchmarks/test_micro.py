"""Microbenchmarks (pytest-benchmark): each op x backend x shape, forward and forward+backward.

    make microbench                                          # pytest benchmarks --benchmark-only
    pytest benchmarks --benchmark-only --benchmark-autosave  # save this commit's numbers
    pytest benchmarks --benchmark-only --benchmark-compare   # compare with the last saved run
    pytest benchmarks --benchmark-only -k "ldreg_loss and cpu"   # a subset
    pytest benchmarks --benchmark-disable                    # smoke: every case once, tiny shapes

What is timed: ``knn``, ``lid`` (MoM) and ``ldreg_loss`` (l1, beta 0.01) through
``benchmarks.providers.ours_op``, the same callables the sweep (``python -m benchmarks.run``)
times, on ``benchmarks.measure.make_inputs``' Gaussian features. "fwd" is the forward with
``x`` requiring grad (the autograd graph is built, as in training); "fwd_bwd" adds the
backward of the output (summed for knn's distances and lid). On a GPU each call ends with a
synchronise, so the wall clock pytest-benchmark reads is the kernels' time.

Backends: every one ``available_backends`` lists for the device, except Triton on the CPU
(its interpreter is for tests, not timing); "reference" at the first shape only. ``extra_info`` of each result holds op, mode,
device, backend, the shape and ``tflops``: the selection matmul's 2*B*N*D flops over the
median time (``measure.selection_flops``), the number the sweep reports too.

This is the tool for comparing two commits case by case. The sweep stays the tool for
tables against the peers (FAISS, KeOps, the paper's code), accuracy, memory and plots.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="microbenchmarks need pytest-benchmark (pip install pytest-benchmark)")

from benchmarks import measure, providers  # noqa: E402

Shape = tuple[int, int, int, int]  # (B, N, D, k); B == N: the batch against itself

# Timed shapes: a batch against itself at two sizes, and a memory bank (B queries, N rows).
FULL: dict[str, list[Shape]] = {
    "cpu": [(1024, 1024, 128, 64), (2048, 2048, 256, 64), (512, 16384, 128, 64)],
    "cuda": [(4096, 4096, 256, 64), (8192, 8192, 512, 64), (4096, 65536, 256, 64)],
}
# Smoke shapes (CI, --benchmark-disable): every code path once, in seconds.
SMOKE: dict[str, list[Shape]] = {
    "cpu": [(128, 128, 32, 16), (64, 512, 32, 16)],
    "cuda": [(256, 256, 64, 16), (128, 2048, 64, 16)],
}
MODES = ("fwd", "fwd_bwd")


def micro_shapes(config: pytest.Config) -> str:
    """The shape set in force: --micro-shapes (benchmarks/conftest.py), else smoke when
    benchmarking is disabled (the CI smoke run), else full."""
    chosen = config.getoption("--micro-shapes")
    if chosen is not None:
        return chosen
    return "smoke" if config.getoption("benchmark_disable", default=False) else "full"


def devices() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise over op x mode x (device, backend) x shape, with readable ids."""
    if "case" not in metafunc.fixturenames:
        return
    table = SMOKE if micro_shapes(metafunc.config) == "smoke" else FULL
    cases = []
    for dev in devices():
        for backend in providers.timed_backends(dev):
            for op in providers.OPS:
                for mode in MODES:
                    # The reference backend (the oracle: cdist + full sort, seconds a call on a
                    # CPU) only at the first shape, as the baseline; the sweep times it across shapes.
                    for b, n, d, k in table[dev.type][: 1 if backend == "reference" else None]:
                        cases.append(pytest.param(
                            (op, mode, dev, backend, (b, n, d, k)),
                            id=f"{op}-{mode}-{dev.type}-{backend}-B{b}-N{n}-D{d}-k{k}"))
    metafunc.parametrize("case", cases)


def _scalar(out: object) -> torch.Tensor:
    """What the backward starts from: knn's distances and lid's LIDs summed, the loss as is."""
    t = out[0] if isinstance(out, tuple) else out
    return t.sum()


def test_micro(benchmark, case) -> None:
    op, mode, device, backend, (b, n, d, k) = case
    x, ref = measure.make_inputs(b, n, d, device)
    fn = providers.ours_op(op, backend)

    if mode == "fwd":
        def call() -> torch.Tensor:
            out = fn(x, ref, k)
            measure.sync(device)
            return out[0] if isinstance(out, tuple) else out
    else:
        def call() -> torch.Tensor:
            x.grad = None
            _scalar(fn(x, ref, k)).backward()
            measure.sync(device)
            return x.grad

    flops = measure.selection_flops(b, n, d)
    benchmark.group = f"{op} {mode} {device.type} B={b} N={n} D={d} k={k}"  # backends side by side
    benchmark.extra_info.update(op=op, mode=mode, device=device.type, backend=backend,
                                shape={"B": b, "N": n, "D": d, "k": k}, flops=flops)
    if not benchmark.disabled:
        call()  # untimed first call: lazy loading, Triton/CUDA compilation, allocator warm-up
    result = benchmark(call)
    assert result is not None and bool(torch.isfinite(result).all()), f"{op}/{mode} on {backend}: non-finite output"
    if benchmark.stats is not None:  # None with --benchmark-disable (the function ran once, untimed)
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12

