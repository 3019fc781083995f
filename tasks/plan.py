"""The execution plan: where and how a run computes, decided in this one place.

The kernel (resolved on this machine), the kind of Dask cluster, the thread budget of
each worker and the default device of torch models. flows/ and deploy/ start clusters
from a plan (flows/cluster.py); the audit steps read the model device from it.
"""
from __future__ import annotations

from dataclasses import dataclass

from modeaudit.tasks.join.threads import usable_cores

# Every --kernel a run accepts (what each is: tasks/join/backend.py). Here, not in backend.py, so that
# the CLI can list them without importing the numba kernels at start-up.
KERNELS = ("auto", "fast", "reference", "torch-cpu", "torch-cuda", "lowprec")
# The kernels of the exact k-NN metrics (tasks/metrics/knn.py, knn_torch.py): the GEMM ones (the float64
# references are not streamed); "lowprec" is knn.py's numba filters over a bfloat16 GEMM in torch.
METRIC_KERNELS = tuple(k for k in KERNELS if k in ("auto", "fast", "lowprec", "torch-cpu", "torch-cuda"))


@dataclass(frozen=True)
class ExecutionPlan:
    """Where and how a run computes, decided once (plan_execution) and used by the flows and deploy/.

    kernel: the concrete join kernel; cluster: "external" (a scheduler address), "local"
    (worker processes here), "local-threads" (worker threads of this process, for callables
    living here) or "local-cuda" (one worker per GPU); model_device: where torch models run
    by default ("cuda" with the CUDA kernel, else "cpu").
    """
    kernel: str
    cluster: str
    workers: int
    threads_per_worker: int
    scheduler: str | None = None
    # Said to the user when the plan's cluster starts: why it is not the one they might expect.
    note: str | None = None

    @property
    def model_device(self) -> str:
        """The default torch device of the models (a -G/-D device option overrides it)."""
        return _device_of(self.kernel)


def _device_of(kernel: str) -> str:
    return "cuda" if kernel == "torch-cuda" else "cpu"


def model_device(kernel: str) -> str:
    """The default torch device of the models for a requested --kernel ("auto" resolved here), as the run's plan
    has it, without planning its cluster (which, on a GPU machine, imports dask-cuda to choose its kind)."""
    from modeaudit.tasks.config import kernel_for
    return _device_of(kernel_for(kernel))


def max_local_workers() -> int:
    """The most worker processes a local cluster may start here: 4 per usable core, at least 64. More is a
    typo (--workers 1e9 started processes until the machine ran out of memory), not a plan."""
    return max(64, 4 * usable_cores())


def check_local_workers(workers: int, option: str = "--workers") -> None:
    """ConfigError when a local cluster of `workers` processes is more than this machine should start."""
    from modeaudit.tasks.registry import ConfigError
    top = max_local_workers()
    if workers > top:
        raise ConfigError(f"{option} {workers}: at most {top} local worker processes here ({usable_cores()} cores); "
                          "for a bigger cluster start one (deploy/clusters.py) and pass --scheduler")


def _dask_cuda_problem() -> str | None:
    """None when dask-cuda imports; else why not (not installed, or its import failing: a missing pynvml,
    a version clash), for the plan's note."""
    import importlib.util
    if importlib.util.find_spec("dask_cuda") is None:
        return "dask-cuda is not installed"
    try:
        import dask_cuda  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure of an optional package's import means: do without it
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return f"dask-cuda is installed but does not import ({type(e).__name__}: {first})"
    return None


def plan_execution(kernel: str, workers: int = 1, threads_per_worker: int | None = None,
                   scheduler: str | None = None, in_process: bool = False) -> ExecutionPlan:
    """The execution plan of a run: the kernel resolved on this machine, the cluster kind, thread budgets."""
    from modeaudit.tasks.config import kernel_for
    kernel = kernel_for(kernel)
    note = None
    if scheduler:
        kind = "external"
    elif in_process:
        kind = "local-threads"
    elif kernel == "torch-cuda" and (problem := _dask_cuda_problem()) is None:
        kind = "local-cuda"
    elif kernel == "torch-cuda":
        # dask-cuda is the optional `gpu` extra: without it a GPU run still runs, its worker
        # processes sharing the first visible GPU, rather than failing on the import.
        kind = "local"
        note = (f"{problem}: the Dask workers share the first GPU; "
                "pip install 'modeaudit[gpu]' for one worker per GPU")
    else:
        kind = "local"
    if kind != "external":
        check_local_workers(workers)
    tpw = threads_per_worker or max(1, usable_cores() // max(1, workers))
    return ExecutionPlan(kernel, kind, workers, tpw, scheduler, note)


