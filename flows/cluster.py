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
import warnings

from distributed.diagnostics.plugin import WorkerPlugin

from modeaudit.tasks import console
from modeaudit.tasks.config import check_scheduler_address
from modeaudit.tasks.plan import ExecutionPlan
from modeaudit.tasks.registry import ConfigError


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


def dashboard_available() -> bool:
    """Whether Dask's dashboard can be served here (it needs bokeh >= 3.1: `pip install 'modeaudit[dashboard]'`)."""
    try:
        import bokeh
    except ImportError:
        return False
    major, minor = (int(x) for x in bokeh.__version__.split(".")[:2])
    return (major, minor) >= (3, 1)


# Dask's usual dashboard port; when it is taken (another cluster), Dask picks a free one.
DASHBOARD_ADDRESS = ":8787"


def local_cluster(plan: ExecutionPlan, dashboard: bool = False, **kwargs):
    """Start the cluster a plan asks for on this machine (not for "external"); kwargs go to the cluster class.
    `dashboard`: serve Dask's dashboard (bokeh must be importable, see dashboard_available)."""
    kwargs["dashboard_address"] = DASHBOARD_ADDRESS if dashboard else None
    with warnings.catch_warnings():
        if not console.verbose():
            # The scheduler's HTTP server (health, and the dashboard when asked for) moves to a free port
            # when another cluster holds 8787: nothing for the user to act on.
            warnings.filterwarnings("ignore", message=r"Port \d+ is already in use")
        return _local_cluster(plan, kwargs)


def _local_cluster(plan: ExecutionPlan, kwargs: dict):
    import dask
    from distributed import LocalCluster
    if plan.cluster == "local-threads":
        return LocalCluster(n_workers=plan.workers, threads_per_worker=1, processes=False, memory_limit=0, **kwargs)
    if plan.cluster == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise ConfigError("a cluster of one worker per GPU needs dask-cuda, which is not installed: "
                              "pip install 'modeaudit[gpu]'") from None
        return LocalCUDACluster(threads_per_worker=1, memory_limit=0, **kwargs)
    if plan.cluster != "local":
        raise ValueError(f"no local cluster for plan {plan.cluster!r}")
    tpw = plan.threads_per_worker
    # Worker-only settings, applied inside each worker process at its start (Nanny
    # "environ", never this process's os.environ): torch/OpenMP read OMP_NUM_THREADS
    # when they load; the kernels read MODEAUDIT_THREADS. BLAS is pinned to one thread
    # by the worker plugin (SingleThreadedBLAS), before any task runs, and never changed after.
    env = {"MODEAUDIT_THREADS": str(tpw), "OMP_NUM_THREADS": str(tpw), "MKL_NUM_THREADS": str(tpw)}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": "65536"},
                          "distributed.nanny.environ": env,
                          "distributed.worker.daemon": False,
                          "distributed.admin.system-monitor.gil.enabled": False}):
        if logging.getLogger("distributed").getEffectiveLevel() < logging.WARNING:
            logging.getLogger("distributed").setLevel(logging.WARNING)
        # silence_logs: a task's failure reaches the user once, as the run's one-line error,
        # not also as a traceback from every worker that ran it (and no "port in use" notices);
        # `--verbose` shows Dask's own logs.
        return LocalCluster(n_workers=plan.workers, threads_per_worker=1, processes=True, memory_limit=0,
                            silence_logs=False if console.verbose() else logging.CRITICAL, **kwargs)


def connect(cluster_or_address, plan: ExecutionPlan):
    """A Client of a cluster this tool started (workers' BLAS pinned) or of an external scheduler."""
    from distributed import Client
    if isinstance(cluster_or_address, str):
        probe_scheduler(cluster_or_address)
        try:
            return Client(cluster_or_address, timeout="30s")
        except (OSError, TimeoutError) as e:
            raise ConfigError(f"cannot reach the Dask scheduler at {cluster_or_address} ({e}); start it, or "
                              "leave --scheduler out for a local cluster") from None
    client = Client(cluster_or_address)
    if plan.cluster == "local":
        # The scheduler keeps the plugin for workers that start later (a restarted one too);
        # a worker dying during the registration itself is waited out and registered again.
        from modeaudit.tasks.join.parallel import worker_lost
        for attempt in range(3):
            try:
                client.register_plugin(SingleThreadedBLAS(), name="modeaudit-blas")
                break
            except Exception as e:
                if not worker_lost(e) or attempt == 2:
                    raise
                client.wait_for_workers(1, timeout=120)
    return client


def probe_scheduler(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds (ConfigError) when nothing listens at a tcp:// scheduler address."""
    import socket
    check_scheduler_address(address)
    if not address.startswith("tcp://"):
        return
    host, _, port = address[len("tcp://"):].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConfigError(f"cannot reach the Dask scheduler at {address} ({e.strerror or e}); start it, or leave "
                          "--scheduler out for a local cluster") from None


def _start_local(plan: ExecutionPlan, attempts: int = 2):
    """local_cluster, started again if a worker process dies while starting (killed, out of memory); in a CLI run
    with its dashboard when bokeh is installed, and its address (or why there is none) on stderr."""
    from modeaudit.tasks.errors import WorkerLost
    dashboard = console.wants_dashboard() and dashboard_available()
    for i in range(attempts):
        try:
            cluster = local_cluster(plan, dashboard=dashboard)
            if plan.note:        # once the cluster is up: a worker that failed to start does not say it twice
                console.note(plan.note)
            if dashboard:
                console.note(f"Dask dashboard: {cluster.dashboard_link}")
            elif console.wants_dashboard():
                console.note("no Dask dashboard: bokeh >= 3.1 is not installed (pip install 'modeaudit[dashboard]')")
            return cluster
        except RuntimeError as e:
            if "failed to start" not in str(e):
                raise
            last = e
    raise WorkerLost(f"the local Dask workers failed to start {attempts} times ({last}); out of memory? Rerun "
                     "with fewer --workers")


@contextlib.contextmanager
def dask_client(plan: ExecutionPlan):
    """Yield a distributed.Client for the run; a cluster started here is torn down afterwards."""
    cluster = None if plan.cluster == "external" else _start_local(plan)
    client = connect(plan.scheduler if cluster is None else cluster, plan)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
