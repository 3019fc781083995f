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
import os

from modeaudit.tasks.join.threads import usable_cores


@contextlib.contextmanager
def dask_client(workers: int = 1, threads_per_worker: int | None = None, scheduler: str | None = None,
                gpus: bool = False):
    """Yield a distributed.Client for the run; a local cluster is torn down afterwards.

    gpus=True starts dask_cuda.LocalCUDACluster: one worker per visible GPU, each
    pinned to its device through CUDA_VISIBLE_DEVICES (imported only then).
    """
    import dask
    from distributed import Client, LocalCluster

    cluster = None
    if scheduler:
        client = Client(scheduler, timeout="30s")
    elif gpus:
        from dask_cuda import LocalCUDACluster
        cluster = LocalCUDACluster(threads_per_worker=1, dashboard_address=None, memory_limit=0)
    else:
        tpw = threads_per_worker or max(1, usable_cores() // max(1, workers))
        # BLAS reads its thread count when it loads, so it must be in the environment
        # before the worker starts (Dask sets these in this process too: restored below).
        # numba must NOT be set this way: changing NUMBA_NUM_THREADS in a process whose
        # numba threads already run is an error; kernels read MODEAUDIT_THREADS instead.
        blas = {k: str(tpw) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        saved = dict(os.environ)
        with dask.config.set({"distributed.nanny.pre-spawn-environ": {**blas, "MALLOC_TRIM_THRESHOLD_": "65536"},
                              "distributed.nanny.environ": {"MODEAUDIT_THREADS": str(tpw)},
                              "distributed.worker.daemon": False,
                              "distributed.admin.system-monitor.gil.enabled": False}):
            logging.getLogger("distributed").setLevel(logging.WARNING)
            try:
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, memory_limit=0)
            finally:
                os.environ.clear()
                os.environ.update(saved)
    if cluster is not None:
        client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
