"""Dask clusters: one place that decides where the data-parallel work runs.

- an existing scheduler (`--scheduler tcp://host:8786`): multi-node, or a cluster
  started from deploy/ specs;
- otherwise a LocalCluster of worker processes on this machine.
Each worker runs one task at a time and gives its BLAS / numba threads to it:
Dask's default of one BLAS thread per worker would leave cores idle in the GEMM.
"""
from __future__ import annotations

import contextlib
import logging

from distributed.diagnostics.plugin import WorkerPlugin

from modeaudit.tasks.join.threads import usable_cores


class SingleThreadedBLAS(WorkerPlugin):
    """Worker plugin: BLAS at one thread for the worker's whole life, set once at its start.

    The kernels get their parallelism from their own tile threads, and statistics that
    call BLAS (the surrogate's EM) then give the same bits on any number of workers.
    Registered on clusters this tool starts; an external cluster's workers should be
    started with OPENBLAS_NUM_THREADS=1 (deploy/clusters.py does).
    """

    idempotent = True

    def setup(self, worker):
        import numpy  # noqa: F401  (load both BLAS libraries before limiting them)
        import scipy.linalg  # noqa: F401
        from threadpoolctl import threadpool_limits
        # Kept on the worker: dropping the object would not undo the limit, but
        # holding it documents that it is meant to last.
        worker._modeaudit_blas_limit = threadpool_limits(limits=1, user_api="blas")


@contextlib.contextmanager
def dask_client(workers: int = 1, threads_per_worker: int | None = None, scheduler: str | None = None,
                gpus: bool = False, processes: bool = True):
    """Yield a distributed.Client for the run; a local cluster is torn down afterwards.

    gpus=True starts dask_cuda.LocalCUDACluster: one worker per visible GPU, each
    pinned to its device through CUDA_VISIBLE_DEVICES (imported only then).
    processes=False runs the workers as threads of this process (callables handed to
    the Python API live here); nothing about this process's thread pools is changed.
    """
    import dask
    from distributed import Client, LocalCluster

    cluster = None
    if scheduler:
        client = Client(scheduler, timeout="30s")
    elif not processes:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=False, dashboard_address=None,
                               memory_limit=0)
    elif gpus:
        from dask_cuda import LocalCUDACluster
        cluster = LocalCUDACluster(threads_per_worker=1, dashboard_address=None, memory_limit=0)
    else:
        tpw = threads_per_worker or max(1, usable_cores() // max(1, workers))
        # Worker-only settings, applied inside each worker process at its start (Nanny
        # "environ", never this process's os.environ): torch/OpenMP read OMP_NUM_THREADS
        # when they load; the kernels read MODEAUDIT_THREADS. BLAS is pinned to one thread
        # by the worker plugin below, before any task runs, and never changed after.
        env = {"MODEAUDIT_THREADS": str(tpw), "OMP_NUM_THREADS": str(tpw), "MKL_NUM_THREADS": str(tpw)}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": "65536"},
                              "distributed.nanny.environ": env,
                              "distributed.worker.daemon": False,
                              "distributed.admin.system-monitor.gil.enabled": False}):
            logging.getLogger("distributed").setLevel(logging.WARNING)
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, memory_limit=0)
    if cluster is not None:
        client = Client(cluster)
        if processes and not gpus:
            client.register_plugin(SingleThreadedBLAS(), name="modeaudit-blas")
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
