"""Test setup: Prefect runs against a throwaway home and one test server per session."""
import os
import tempfile

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="modeaudit-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _no_flow_heartbeat_wait():
    """Prefect's flow engine joins its heartbeat thread at the end of every flow run, and that thread
    sleeps in 1 s steps: up to a second of idle wait per flow, ~80 flows in the suite. Heartbeats only
    serve crash detection of deployed runs (180 s apart); no test here runs long enough to send one."""
    from prefect import flow_engine
    prop = flow_engine.BaseFlowRunEngine.heartbeat_seconds
    flow_engine.BaseFlowRunEngine.heartbeat_seconds = property(lambda self: None)
    try:
        yield
    finally:
        flow_engine.BaseFlowRunEngine.heartbeat_seconds = prop


@pytest.fixture(scope="session")
def prefect_harness():
    """The API URL of ONE real Prefect server shared by every xdist worker of the run (tests/shared_prefect.py);
    flows of this process and CLI subprocesses (PREFECT_API_URL) run against it."""
    import prefect.context
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from shared_prefect import drain, shared_prefect_server
    url = shared_prefect_server()
    os.environ["PREFECT_API_URL"] = url
    with temporary_settings(updates={PREFECT_API_URL: url}), \
            prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
        yield url
        drain()


def pytest_configure(config):
    """Name the run for its shared Prefect server (xdist workers inherit the name); warm numba's cache."""
    from shared_prefect import name_the_run
    name_the_run(config)
    if not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None):
        _warm_numba_cache()


def _warm_numba_cache() -> None:
    """Compile the kernels every flow runs once, in the controlling process, before the xdist workers and
    their Dask worker processes start. In a fresh clone (CI) numba's on-disk cache is empty, and each of
    those processes would otherwise compile the same kernels at the same time on the same 2 cores."""
    import numpy as np
    from modeaudit.tasks.join.kernels import mccs_sums, range_counts
    from modeaudit.tasks.metrics.knn import ball_counts, knn_self
    from modeaudit.tasks.models.generators import build_generator
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    range_counts(x, x, [0.1, 0.2, 0.3])
    mccs_sums(x, x, 0.3)
    for distance in ("euclidean", "angular"):
        r = knn_self(x, 3, distance=distance)[:, -1]
        ball_counts(x, [(0, x)], r, r, distance=distance, a_ids=np.arange(len(x)))
    g = build_generator("synthetic:planted")
    g.generate(g.latents(0, "S", 0, 8))


def pytest_sessionfinish(session):
    """The controlling pytest process stops the run's shared Prefect server."""
    from shared_prefect import stop_the_run_server
    stop_the_run_server(session.config)


@pytest.fixture(scope="session")
def scheduler():
    """One local Dask cluster (2 worker processes, set up as the flows set theirs) shared by flow tests
    that do not test the cluster itself: starting worker processes per run would dominate the suite."""
    from modeaudit.flows.cluster import ExecutionPlan, connect, local_cluster
    plan = ExecutionPlan("fast", "local", workers=2, threads_per_worker=1)
    cluster = local_cluster(plan)
    client = connect(cluster, plan)    # pins the workers' BLAS to one thread, as dask_client does
    try:
        yield cluster.scheduler_address
    finally:
        client.close()
        cluster.close()


# The suite runs as `pytest -n 2 --dist loadfile`: xdist hands out whole files in collection order.
# Alphabetical order left a 40 s file (test_watch.py) to start last, with one worker idle meanwhile;
# longest first (measured per-file seconds, most first) lets the two workers finish together.
HEAVIEST_FIRST = ("test_audit_flow.py", "test_calibrate_flow.py", "test_dask_scheduler.py", "test_servers.py",
                  "test_watch.py", "test_package.py",
                  "test_adapters.py", "test_reliability.py", "test_bad_inputs.py", "test_image_folders.py",
                  "test_pictures.py", "test_join_torch.py", "test_cli.py", "test_fid.py", "test_ties.py",
                  "test_calibration.py", "test_compare.py", "test_report.py")


def pytest_collection_modifyitems(session, config, items):
    """Order test files heaviest first (stable within a file); files not listed keep their order after."""
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
