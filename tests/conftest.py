"""Test setup: Prefect runs against a throwaway home and one test server per session."""
import os
import tempfile

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="modeaudit-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402


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
    """Name the run for its shared Prefect server (xdist workers inherit the name)."""
    from shared_prefect import name_the_run
    name_the_run(config)


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
