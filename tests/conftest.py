"""Test setup: Prefect runs against a throwaway home and one test server per session."""
import os
import sys
import tempfile

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="modeaudit-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Dask's own housekeeping, slowed for the suite's clusters (each pytest worker keeps one for the whole run, and
# tests start more): an idle 2-worker LocalCluster cost ~14% of a core here (4.3 CPU s in 30 s; 0.5 s with
# these), mostly each worker's statistical profiler sampling every thread every 10 ms and 20 ms event-loop
# ticks. Set before dask is imported; workers, `dask scheduler` and `dask worker` subprocesses inherit them.
# They change when Dask looks at itself, never what a task computes.
for _key, _value in (("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", "False"),
                     ("DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL", "1s"),
                     ("DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL", "5s"),
                     ("DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL", "1s")):
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402

if "dask" in sys.modules:   # a plugin imported dask before this file ran: read the settings above again
    import dask.config
    dask.config.refresh()


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
    """Name the run for its shared Prefect server (xdist workers inherit the name); files in our order."""
    from shared_prefect import name_the_run
    name_the_run(config)
    # xdist's --no-loadscope-reorder, set here rather than in addopts (which would break `-p no:xdist`):
    # `--dist loadfile` then hands out files in collection order (HEAVIEST_FIRST), not most tests first.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


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


# The suite runs as `pytest -n 2 --dist loadfile`, loadscope reordering off (pytest_configure): xdist hands out
# whole files in collection order, two to each worker first. xdist's own order (most tests first) left the
# heaviest file (test_audit_flow.py, 6 tests) to start last. Longest first (measured per-file seconds) lets
# the two workers finish together; the second file needs no Prefect server, so that worker computes while
# the first one starts the run's server.
HEAVIEST_FIRST = ("test_audit_flow.py", "test_join_torch.py", "test_calibrate_flow.py", "test_package.py",
                  "test_dask_scheduler.py", "test_watch.py", "test_metrics.py", "test_servers.py", "test_adapters.py",
                  "test_pictures.py", "test_cli.py", "test_report.py", "test_image_folders.py", "test_reliability.py",
                  "test_bad_inputs.py", "test_compare.py", "test_fid.py", "test_two_sample.py", "test_join.py",
                  "test_calibration.py", "test_envelope.py", "test_bench_harness.py", "test_surrogate.py",
                  "test_digits_demo.py", "test_toy.py", "test_ties.py", "test_store.py")


def pytest_collection_modifyitems(session, config, items):
    """Order test files heaviest first (stable within a file); files not listed keep their order after."""
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
