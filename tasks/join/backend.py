"""The one place that chooses the compute backend of the range-join / MCCS kernels.

Kernels:
  "fast"        numba, float32 GEMM + exact float64 correction (tasks/join/kernels.py)
  "reference"   float64 brute force per block (tasks/join/kernels.py; tests, small sets)
  "lowprec"     numba, bfloat16 first pass + exact float64 re-check of the pairs
                within its error bound of a threshold (tasks/join/lowprec.py,
                docs/lowprec.md). Opt-in: "auto" never picks it, because on the
                CPUs measured so far it is slower than "fast" (see below)
  "torch-cpu"   the torch kernels on the CPU (tasks/join/torch_kernels.py; for tests:
                "fast" is quicker on a CPU)
  "torch-cuda"  the torch kernels on the current CUDA device
  "auto"        "torch-cuda" when a CUDA GPU is usable, else "fast"
The exact k-NN metrics (tasks/metrics/) run on "fast" (numba, knn.py), on "lowprec"
(the same numba filters over a bfloat16 torch.mm, which pays on CPUs with AMX-BF16 or
AVX512-BF16: "auto" picks it there for wide rows, `metric_kernel`) and on the torch kernels (knn_torch.py), chosen
here too (`metric_kernel`, `knn_distances`, `knn_self`, `ball_counts`); their results are
equal bit for bit.
All of them return the same counts (exactly) and the same sums (to float64
rounding) for the same inputs; "lowprec" returns "fast"'s sums bit for bit.

Why "auto" does not pick "lowprec" on a CPU: with 8 significant bits, the rigorous
bound of a bfloat16 score is ~4e-3 at D = 128, and on the default grid (41
thresholds 0.01 apart in radius) 12-16 % of all pairs then lie within it of a
threshold and need a float64 dot product each, which costs more than the whole
float32 join of those pairs; and no CPU GEMM here is faster in bfloat16 with a
float32 output (docs/lowprec.md has the measurements). On CUDA "auto" already
runs the same two-pass design in float16 where that is lossless
(tasks/join/torch_kernels.py).

Importing this module never imports torch or cupy; gpu_available() does so
only on a machine that has NVIDIA device nodes, so CPU-only runs never pay for
(or depend on) a torch import.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

from modeaudit.tasks.join import kernels as join
from modeaudit.tasks.plan import KERNELS, METRIC_KERNELS

__all__ = ["KERNELS", "METRIC_KERNELS", "gpu_available", "cpu_has_bf16_matmul", "resolve_kernel", "range_counts",
           "mccs_sums", "metric_kernel", "join_size", "knn_distances", "knn_self", "knn_self_pair",
           "ball_counts"]


_NVIDIA_NODES = ("/dev/nvidiactl", "/dev/nvidia0")


def _has_nvidia_device_node() -> bool:
    return any(os.path.exists(p) for p in _NVIDIA_NODES)


def _torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


@functools.lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True iff an NVIDIA device node exists and torch sees a CUDA device.

    Without /dev/nvidiactl or /dev/nvidia0 this returns False without importing
    torch or cupy. With them, torch decides (torch.cuda.is_available(), which
    also honours CUDA_VISIBLE_DEVICES); without torch, cupy is asked; with
    neither there is no GPU kernel to run, so False. Cached per process.
    """
    if not _has_nvidia_device_node():
        return False
    if _torch_installed():
        try:
            import torch
        except Exception:  # noqa: BLE001 - a broken torch install means no torch kernels
            return False
        return bool(torch.cuda.is_available())
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy
            return cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:  # noqa: BLE001 - no driver, no device
            return False
    return False


def resolve_kernel(kernel: str) -> str:
    """The concrete kernel for a requested one: "auto" becomes "torch-cuda" when
    gpu_available() and "fast" otherwise; the others are checked and returned.
    ValueError for an unknown name, for "torch-cuda" without a GPU and for the
    torch kernels without torch."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if kernel == "auto":
        return "torch-cuda" if gpu_available() else "fast"
    if kernel == "torch-cuda" and not gpu_available():
        raise ValueError("kernel 'torch-cuda' requested but no CUDA GPU visible; use --kernel fast")
    if kernel == "torch-cpu" and not _torch_installed():
        raise ValueError("kernel 'torch-cpu' needs torch, which is not installed; use --kernel fast")
    return kernel


def _torch_device(kernel: str) -> str:
    return "cuda" if kernel == "torch-cuda" else "cpu"


def range_counts(anchors, blocks, radii, *, anchor_ids=None, kernel: str = "fast") -> np.ndarray:
    """Neighbour counts, int64 (a, R), with the chosen kernel; see join.range_counts."""
    k = resolve_kernel(kernel)
    if k in join.NUMPY_KERNELS:
        return join.range_counts(anchors, blocks, radii, anchor_ids=anchor_ids, kernel=k)
    from modeaudit.tasks.join import torch_kernels as join_torch
    return join_torch.range_counts_torch(anchors, blocks, radii, anchor_ids=anchor_ids, device=_torch_device(k))


def mccs_sums(anchors, blocks, theta, *, anchor_ids=None, kernel: str = "fast") -> np.ndarray:
    """MCCS sums, float64 (a,), with the chosen kernel; see join.mccs_sums."""
    k = resolve_kernel(kernel)
    if k in join.NUMPY_KERNELS:
        return join.mccs_sums(anchors, blocks, theta, anchor_ids=anchor_ids, kernel=k)
    from modeaudit.tasks.join import torch_kernels as join_torch
    return join_torch.mccs_sums_torch(anchors, blocks, theta, anchor_ids=anchor_ids, device=_torch_device(k))


# ----------------------------------------------------------------------------
# the exact k-NN metrics' kernels (tasks/metrics/knn.py, tasks/metrics/knn_torch.py)


# "auto" runs the metrics' GEMM in bfloat16 from this width and this many pairs on, on a CPU with a
# bfloat16 matmul unit (BENCHMARKS.md, "bfloat16 GEMM for the metrics"): 1.1-1.4x the float32 path at
# 1e4-2e4 rows of 512 to 2048 columns on an AMX Xeon, 1.19x (512), 1.31x (1024) and 1.36x (2048) on an
# AVX512-BF16 AMD EPYC; slower at 128 columns, where the filters and the wider band's float64
# re-checks, not the GEMM, are the cost.
LOWPREC_MIN_DIM = 512
LOWPREC_MIN_PAIRS = 1e8


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX-BF16 tiles (Linux /proc/cpuinfo; False where it cannot be read): the bfloat16
    k-NN kernel's tile sizes depend on it (metrics.knn)."""
    return "amx_bf16" in _cpu_flags()


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware with float32 accumulation: AMX-BF16 tiles or
    AVX512-BF16 dot products (Linux /proc/cpuinfo; False where it cannot be read). Both read
    subnormal bfloat16 inputs as zero, which the lowprec kernel's rounding already does."""
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def metric_kernel(kernel: str, dim: int | None = None, pairs: float | None = None) -> str:
    """The concrete k-NN metrics kernel ("fast", "lowprec", "torch-cpu" or "torch-cuda") for a requested one.

    "auto": "torch-cuda" with a usable GPU; else "lowprec" (numba filters, bfloat16 GEMM in
    torch) for a join of rows of width dim >= LOWPREC_MIN_DIM over at least LOWPREC_MIN_PAIRS
    pairs, on a CPU with a bfloat16 matmul unit (AMX-BF16 or AVX512-BF16) where torch is installed; else "fast". Every kernel returns
    the same values. ValueError for a kernel the metrics do not have, and as resolve_kernel
    for the rest.
    """
    if kernel not in METRIC_KERNELS:
        raise ValueError(f"kernel {kernel!r} has no k-NN form; the metrics run on {', '.join(METRIC_KERNELS)}")
    if kernel == "lowprec":
        if not _torch_installed():
            raise ValueError("kernel 'lowprec' runs the metrics' bfloat16 GEMM in torch, which is not installed; "
                             "use --kernel fast")
        if not _bf16_sound():
            raise ValueError("this torch's bfloat16 matmul does not accumulate in float32 (a probe failed), so "
                             "kernel 'lowprec' cannot bound its error; use --kernel fast")
        return kernel
    if (kernel == "auto" and dim is not None and dim >= LOWPREC_MIN_DIM and pairs is not None
            and pairs >= LOWPREC_MIN_PAIRS and not gpu_available() and cpu_has_bf16_matmul() and _torch_installed()
            and _bf16_sound()):
        return "lowprec"
    return resolve_kernel(kernel)


def _bf16_sound() -> bool:
    from modeaudit.tasks.metrics.knn import bf16_gemm_is_sound
    return bf16_gemm_is_sound()


def join_size(a, b):
    """(width, pairs) of a join of rows a against rows b, for metric_kernel; None if they are not 2-d.

    a, b: arrays, or anything with a 2-d `shape` (a metrics FeatureFile, read by the workers)."""
    sa, sb = (tuple(x.shape) if hasattr(x, "shape") else np.shape(x) for x in (a, b))
    if len(sa) != 2 or len(sb) != 2:
        return None
    return sa[1], float(sa[0]) * float(sb[0])


def _numba_scores(kn: str):
    """The numba k-NN kernels' GEMM precision for a concrete metrics kernel, None for a torch one."""
    return {"fast": "float32", "lowprec": "bf16"}.get(kn)


def knn_distances(queries, blocks, k: int, *, distance: str = "euclidean", query_ids=None,
                  kernel: str = "fast") -> np.ndarray:
    """Exact k-NN distances (q, k) with the chosen kernel; see metrics.knn.knn_distances (equal on every kernel)."""
    kn = metric_kernel(kernel)   # "auto" without the join's size: the engine resolves it with them
    if _numba_scores(kn):
        from modeaudit.tasks.metrics.knn import knn_distances as run
        return run(queries, blocks, k, distance=distance, query_ids=query_ids, scores=_numba_scores(kn))
    from modeaudit.tasks.metrics.knn_torch import knn_distances_torch
    return knn_distances_torch(queries, blocks, k, distance=distance, query_ids=query_ids,
                               device=_torch_device(kn))


def knn_self(x, k: int, *, distance: str = "euclidean", kernel: str = "fast") -> np.ndarray:
    """Exact k-NN distances of every row of x within x (self excluded) with the chosen kernel.

    Every kernel forms each pair's score once: the upper triangle of x x^T, each tile updating
    the lists of its rows and of its columns (metrics.knn.knn_self, metrics.knn_torch.knn_self_torch).
    """
    kn = metric_kernel(kernel, *(join_size(x, x) or ()))
    if _numba_scores(kn):
        from modeaudit.tasks.metrics.knn import knn_self as run
        return run(x, k, distance=distance, scores=_numba_scores(kn))
    from modeaudit.tasks.metrics.knn_torch import knn_self_torch
    return knn_self_torch(x, k, distance=distance, device=_torch_device(kn))


def knn_self_pair(a, b, k: int, *, distance: str = "euclidean", kernel: str = "fast"):
    """metrics.knn.knn_self_pair with the chosen kernel: two disjoint row groups of one set, each pair's score
    formed once, ((len(a), k), (len(b), k)) distances (inf where the other group has fewer than k rows)."""
    kn = metric_kernel(kernel, *(join_size(a, b) or ()))
    if _numba_scores(kn):
        from modeaudit.tasks.metrics.knn import knn_self_pair as run
        return run(a, b, k, distance=distance, scores=_numba_scores(kn))
    from modeaudit.tasks.metrics.knn_torch import knn_self_pair_torch
    return knn_self_pair_torch(a, b, k, distance=distance, device=_torch_device(kn))


def ball_counts(a, blocks, radii_a=None, radii_b=None, *, distance: str = "euclidean", a_ids=None,
                kernel: str = "fast"):
    """Strict ball counts (metrics.knn.BallCounts) with the chosen kernel; see metrics.knn.ball_counts."""
    kn = metric_kernel(kernel)   # "auto" without the join's size: the engine resolves it with them
    if _numba_scores(kn):
        from modeaudit.tasks.metrics.knn import ball_counts as run
        return run(a, blocks, radii_a, radii_b, distance=distance, a_ids=a_ids, scores=_numba_scores(kn))
    from modeaudit.tasks.metrics.knn_torch import ball_counts_torch
    return ball_counts_torch(a, blocks, radii_a, radii_b, distance=distance, a_ids=a_ids, device=_torch_device(kn))
