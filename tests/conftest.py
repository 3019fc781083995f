"""Test setup: Prefect runs against a throwaway home and one test server per session."""
import os
import tempfile

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="modeaudit-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


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
