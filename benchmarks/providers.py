"""The methods the benchmark compares: one kNN function per method, plus how to make a loss.

Every method answers the same question: for each row of ``x`` (B, D), the k nearest rows of
``ref`` (N, D) with their Euclidean distances, ascending. ``ref is None`` means the batch
itself (detached), with each query's own row excluded; a separate ``ref`` is a memory bank
that does not hold the queries (nothing excluded). The loss every method is timed on is the
paper's LDReg term on the MoM LID, ``-beta * mean ln LID`` (Eq. 1).

Peers are imported lazily: a missing package makes the method unavailable with a reason
(``Method.unavailable``), never an ImportError.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import ldreg_kernels as L
from ldreg_kernels import reference

BETA = 0.01  # the paper's SimCLR setting; it only scales the gradient
KnnFn = Callable[[Tensor, Tensor | None, int], "tuple[Tensor, Tensor]"]


@dataclass
class Method:
    """One benchmarked method.

    Attributes:
        name: stable id used by ``--methods`` and in the CSV.
        kind: "oracle", "peer", "ours" or "floor".
        knn: ``knn(x, ref, k) -> (dist, idx)``; ``dist`` differentiable to ``x`` when
            ``autograd`` (ignored for the floor, which returns ``x @ ref.T``).
        note: what the row means, shown in the Markdown legend.
        autograd: False: forward only ("full" rows are recorded as skipped).
        bytes_per_pair: working memory per (query, reference) pair, for the --max-bytes guard;
            0 for methods that never hold B x N.
        loss: ``loss(x, ref, k)``; default: the paper's LDReg term on ``knn``'s distances.
        unavailable: why the method cannot run here (a missing package), else None.
        own_runtime: it brings its own thread pool (FAISS's bundled OpenMP and OpenBLAS,
            KeOps's compiled OpenMP), whose threads keep spinning after a call and would take
            a core from the next method in an interleaved round: timed on its own instead.
    """

    name: str
    kind: str
    knn: KnnFn
    note: str
    autograd: bool = True
    bytes_per_pair: float = 0.0
    loss: Callable[[Tensor, Tensor | None, int], Tensor] | None = None
    unavailable: str | None = None
    reset: Callable[[], None] = field(default=lambda: None)
    own_runtime: bool = False

    def loss_fn(self, x: Tensor, ref: Tensor | None, k: int) -> Tensor:
        """The timed forward: LDReg loss (MoM, l1) of ``x`` against ``ref``."""
        if self.loss is not None:
            return self.loss(x, ref, k)
        return reference.ldreg_regularizer(reference.lid_mom(self.knn(x, ref, k)[0]), BETA)


# ---------------------------------------------------------------- helpers
def _self_masked(d: Tensor) -> Tensor:
    """d with the diagonal (each query's own row, by index) set to +inf."""
    rows = torch.arange(d.shape[0], device=d.device)
    return d.index_put((rows, rows), d.new_tensor(float("inf")))


def _drop_self(dist: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """From k+1 ascending neighbours, drop each query's own index (else the last column).

    Libraries without by-index exclusion (FAISS, KeOps) search k+1 and drop self here; a
    stable re-sort after setting self to +inf moves it to the end without reordering ties.
    """
    rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
    d = dist.masked_fill(idx == rows, float("inf"))
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return dist.gather(1, order), idx.gather(1, order)


def gather_dist(x: Tensor, ref: Tensor, idx: Tensor) -> Tensor:
    """Exact distances |x_i - ref_idx_ij| by direct differences, differentiable to x.

    How a user adds autograd to an index-only kNN (KeOps' own advice for its argKmin): the
    selection is piecewise constant, so the gradient flows through these k distances only.
    """
    return (x.unsqueeze(1) - ref[idx]).norm(dim=-1)


def _package_missing(module: str) -> str | None:
    """The skip reason when ``module`` is not installed. find_spec, not an import: importing
    pykeops costs seconds; a broken install fails at its first call and is recorded there."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"skipped: {module} not installed"


# ---------------------------------------------------------------- oracle and plain-torch peers
def oracle_knn(x: Tensor, ref: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """ldreg_kernels.reference: cdist by direct differences + full stable sort."""
    if ref is None:
        return reference.knn(x, x.detach(), k)
    return reference.knn(x, ref, k, exclude_self=False)


def paper_knn(x: Tensor, ref: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """The paper's code path: torch.cdist (default mm mode) + full sort, self masked by index."""
    d = torch.cdist(x, x.detach() if ref is None else ref)
    if ref is None:
        d = _self_masked(d)
    dist, idx = torch.sort(d, dim=1)
    return dist[:, :k], idx[:, :k]


def mm_topk_knn(x: Tensor, ref: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """What a user writes next: |r|^2 - 2 x.r by one matmul, topk, sqrt; no exact re-rank."""
    r = x.detach() if ref is None else ref
    s = (r * r).sum(1) - 2.0 * x @ r.t()
    if ref is None:
        s = _self_masked(s)
    v, i = torch.topk(s, k, dim=1, largest=False)
    return (v + (x * x).sum(1, keepdim=True)).clamp_min(0).sqrt(), i


class CompiledOracle:
    """torch.compile of the oracle's kNN, compiled on first use (the untimed first call).

    One compiled function serves the whole sweep: dynamo's automatic dynamic shapes make the
    first recompile shape-generic, so a 40-shape sweep pays a few compiles, not 40. The
    recompile limit is raised because past it dynamo silently falls back to eager.
    """

    def __init__(self) -> None:
        self.fn: Callable | None = None

    def __call__(self, x: Tensor, ref: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
        if self.fn is None:
            cfg = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.6
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), 64))
            self.fn = torch.compile(oracle_knn)
        return self.fn(x, ref, k)


# ---------------------------------------------------------------- FAISS and KeOps
_FAISS_GPU: list = []


def _faiss_gpu_resources():
    """One faiss.StandardGpuResources per process (it owns scratch memory and streams)."""
    import faiss

    if not _FAISS_GPU:
        _FAISS_GPU.append(faiss.StandardGpuResources())
    return _FAISS_GPU[0]


def faiss_knn(x: Tensor, ref: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """FAISS IndexFlatL2 (exact brute force) built and searched per call, as a training step
    would (the batch or bank changes every step). FAISS returns squared distances."""
    import faiss

    r = (x if ref is None else ref).detach().float().contiguous()
    q = x.detach().float().contiguous()
    kk = k + 1 if ref is None else k
    if x.is_cuda:  # faiss-gpu: its GPU flat index, fed torch tensors directly
        import faiss.contrib.torch_utils  # noqa: F401  (patches faiss to accept torch tensors)

        index = faiss.GpuIndexFlatL2(_faiss_gpu_resources(), r.shape[1])
        index.add(r)
        d2, idx = index.search(q, kk)
    else:
        faiss.omp_set_num_threads(torch.get_num_threads())  # same thread budget as torch
        index = faiss.IndexFlatL2(r.shape[1])
        index.add(r.numpy())
        d2, i = index.search(q.numpy(), kk)
        d2, idx = torch.from_numpy(d2), torch.from_numpy(i)
    dist = d2.clamp_min(0).sqrt()
    return _drop_self(dist, idx, k) if ref is None else (dist, idx)


def keops_knn(x: Tensor, ref: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """KeOps Kmin_argKmin on the symbolic ((x_i - y_j)**2).sum(-1): never forms B x N.
    The first call per (D, k) compiles a C++ kernel with g++ (done in the untimed warm-up)."""
    from pykeops.torch import LazyTensor

    r = x.detach() if ref is None else ref
    xi = LazyTensor(x.detach().contiguous()[:, None, :])
    yj = LazyTensor(r.contiguous()[None, :, :])
    kk = k + 1 if ref is None else k
    d2, idx = ((xi - yj) ** 2).sum(-1).Kmin_argKmin(kk, dim=1)
    dist = d2.clamp_min(0).sqrt()
    return _drop_self(dist, idx, k) if ref is None else (dist, idx)


def _gather_loss(knn: KnnFn) -> Callable[[Tensor, Tensor | None, int], Tensor]:
    """LDReg loss with autograd for an index-only kNN: search, then exact distances by gather."""

    def loss(x: Tensor, ref: Tensor | None, k: int) -> Tensor:
        _, idx = knn(x, ref, k)
        dist = gather_dist(x, x.detach() if ref is None else ref, idx)
        return reference.ldreg_regularizer(reference.lid_mom(dist), BETA)

    return loss


# ---------------------------------------------------------------- ours
OPS = ("knn", "lid", "ldreg_loss")


def ours_op(op: str, backend: str) -> Callable[[Tensor, Tensor | None, int], object]:
    """Our public op ``op`` (one of ``OPS``) on ``backend``, called as ``fn(x, ref, k)``.

    The benchmarks' conventions, shared by the sweep and the pytest-benchmark
    microbenchmarks (benchmarks/test_micro.py): ``ref=None`` is the batch itself with self
    excluded, a tensor ``ref`` a bank that does not hold the queries; MoM LID; the loss is
    the paper's l1 term with ``BETA``. Returns ``knn``'s ``(dist, idx)``, ``lid``'s (B,)
    LIDs or the scalar loss.
    """
    if op == "knn":
        return lambda x, ref, k: L.knn(x, ref, k, exclude_self=ref is None, backend=backend)
    if op == "lid":
        return lambda x, ref, k: L.lid(x, ref, k, exclude_self=ref is None, backend=backend)
    if op == "ldreg_loss":
        return lambda x, ref, k: L.ldreg_loss(x, ref, k, BETA, exclude_self=ref is None, backend=backend)
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def timed_backends(device: torch.device) -> list[str]:
    """Our backends worth timing on ``device``: every available one except Triton off CUDA
    (on the CPU it runs under its interpreter, which is for tests, not timing)."""
    return [b for b in L.available_backends(device) if b != "triton" or device.type == "cuda"]


def _ours(backend: str) -> Method:
    return Method(f"ours-{backend}", "ours", ours_op("knn", backend),
                  f"ldreg_kernels.ldreg_loss(backend={backend!r})", loss=ours_op("ldreg_loss", backend))


class FloorMM:
    """The floor: one bare x @ ref.T of the same shape (2*B*N*D flops) into a preallocated
    output, so that it measures the matmul and not the first touch of a fresh B x N buffer."""

    def __init__(self) -> None:
        self.out: Tensor | None = None

    def reset(self) -> None:
        self.out = None

    def __call__(self, x: Tensor, ref: Tensor | None, k: int) -> Tensor:
        r = x.detach() if ref is None else ref
        if self.out is None or self.out.shape != (x.shape[0], r.shape[0]) or self.out.device != x.device:
            self.out = x.new_empty((x.shape[0], r.shape[0]))
        return torch.mm(x.detach(), r.t(), out=self.out)


def methods(device: torch.device) -> list[Method]:
    """Every method, available or not (unavailable ones carry the reason), in table order."""
    compiled = CompiledOracle()
    out = [
        Method("oracle", "oracle", oracle_knn,
               "ldreg_kernels.reference: cdist by direct differences + full sort (TF32 off)", bytes_per_pair=20),
        Method("paper", "peer", paper_knn,
               "the paper's code: torch.cdist (mm mode) + full sort, TF32 off", bytes_per_pair=20),
        Method("oracle-compiled", "peer", compiled, "torch.compile(oracle) (default options: dynamic shapes "
               "after the first recompile); compiled in the untimed first call", bytes_per_pair=20),
        Method("mm-topk", "peer", mm_topk_knn, "|r|^2 - 2x.r matmul + topk, no exact re-rank", bytes_per_pair=12),
    ]
    faiss_note = "FAISS IndexFlatL2 per call; fwd: its own (squared, expanded) distances, no autograd; " \
                 "full: autograd via index gather"
    keops_note = "KeOps Kmin_argKmin; fwd: its own distances, no autograd (Kmin has none); " \
                 "full: autograd via index gather"
    faiss_missing = _package_missing("faiss")
    if faiss_missing is None and device.type != "cpu":
        import faiss

        if not hasattr(faiss, "StandardGpuResources"):
            faiss_missing = "skipped: faiss here is CPU-only (no faiss-gpu); a host round trip is no GPU peer"
    out.append(Method("faiss", "peer", faiss_knn, faiss_note, loss=_gather_loss(faiss_knn), unavailable=faiss_missing,
                      own_runtime=device.type == "cpu"))
    out.append(Method("keops", "peer", keops_knn, keops_note, loss=_gather_loss(keops_knn),
                      unavailable=_package_missing("pykeops"), own_runtime=device.type == "cpu"))
    for b in timed_backends(device):
        if b != "reference":  # "reference" is the oracle above
            out.append(_ours(b))
    floor = FloorMM()
    out.append(Method("floor", "floor", floor, "bare x @ ref.T of the same shape into a preallocated output "
                      "(fwd only; drawn dashed)", autograd=False, bytes_per_pair=4, reset=floor.reset))
    return out
