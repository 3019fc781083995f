"""A real Prefect server (the run's shared one, tests/conftest.py), a process work pool and `prefect worker start`:
the audit deployment of a test copy of deploy/prefect.yaml runs on it, writes result.json, and leaves its verdict
in Prefect as a markdown artifact and a `modeaudit.verdict` event."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

import modeaudit.deploy
from modeaudit.flows.audit import VERDICT_ARTIFACT, VERDICT_EVENT

BIN = Path(sys.executable).parent
# The smallest audit that still runs every stage a deployment runs: generation, joins, MCCS, a test, the report.
TINY = dict(generator="synthetic:null", m=300, M=2000, q=50, n_a=100, n_c=2000, shard_rows=1000,
            tests="paper", efficiency=False, diversity_rows=0)


def _test_copy(tmp: Path, pool: str, out: Path, scheduler: str) -> Path:
    """deploy/prefect.yaml with its audit deployment only, on `pool`, unscheduled, auditing a tiny synthetic world
    on an existing Dask scheduler (as the shipped one does; here the tests' cluster, so the flow run starts none)."""
    spec = yaml.safe_load((Path(modeaudit.deploy.__file__).parent / "prefect.yaml").read_text())
    dep = next(d for d in spec["deployments"] if d["entrypoint"] == "modeaudit.flows.audit:audit_flow")
    dep.update(name="test-audit", work_pool={"name": pool}, parameters={"config": {**TINY, "out": str(out),
                                                                           "scheduler": scheduler}})
    dep.pop("schedules", None)
    spec["deployments"] = [dep]
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _wait_final(client, run_id, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state and run.state.is_final():
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout} s (state {run.state})")


def _events(client, name: str, resource_id: str, timeout=60) -> list:
    """Events `name` about `resource_id` read back from the server (its event persister writes in batches)."""
    body = {"filter": {"event": {"name": [name]}, "resource": {"id": [resource_id]}}, "limit": 10}
    deadline = time.monotonic() + timeout
    while True:
        events = client.request("POST", "/events/filter", json=body).json()["events"]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(1)


def _flow_run_groups(run_id) -> set:
    """Process groups of the flow run's processes: the process worker starts each run in a session of its own,
    so stopping the worker's group would not end a run left behind by a failed test."""
    groups = set()
    for proc in Path("/proc").iterdir():
        try:
            if f"PREFECT__FLOW_RUN_ID={run_id}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                groups.add(os.getpgid(int(proc.name)))
        except (OSError, ValueError):      # not a process folder, gone, or not ours to read
            pass
    return groups


def test_audit_deployment_runs_on_a_real_server_and_publishes_its_verdict(prefect_harness, scheduler, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    pool = f"audits-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "run"
    env = {**os.environ, "PREFECT_API_URL": prefect_harness}
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    # The worker starts while the deployment is made (both are seconds of imports); it polls every second.
    worker_log = open(tmp_path / "worker.log", "w+")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool], cwd=tmp_path,
                              env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}, stdout=worker_log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    run = None
    try:
        # The deployment as a user makes it: `prefect deploy` from (a test copy of) the shipped prefect.yaml.
        d = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file",
                            str(_test_copy(tmp_path, pool, out, scheduler))], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=180)
        assert d.returncode == 0, d.stdout + d.stderr
        run = run_deployment("modeaudit-audit/test-audit", timeout=0)
        with get_client(sync_client=True) as client:
            final = _wait_final(client, run.id)
            worker_log.seek(0)
            assert final.state.is_completed(), f"{final.state}\n{worker_log.read()}"
            result = json.loads((out / "result.json").read_text())
            assert result["sizes"]["S"] == TINY["m"] and result["source"]["generator"] == "synthetic:null"
            assert result["source"]["shards"]["T"]["generated"] == 2      # M / shard_rows shards, on the cluster
            headline = result["verdict"]["headline"]

            arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[VERDICT_ARTIFACT])),
                                         flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            assert len(arts) == 1 and arts[0].type == "markdown"
            assert headline in arts[0].data and str((out / "report.html").resolve()) in arts[0].data

            events = _events(client, VERDICT_EVENT, f"modeaudit.run.{out.resolve()}")
            assert len(events) == 1, events
            payload = events[0]["payload"]
            assert payload["headline"] == headline and payload["level"] == result["verdict"]["level"]
            assert payload["report"] == str((out / "report.html").resolve())
            # The event names the flow run it came from, so an automation can link back to it.
            assert any(r["prefect.resource.id"] == f"prefect.flow-run.{run.id}" for r in events[0]["related"])
    finally:
        for group in _flow_run_groups(run.id) if run is not None else ():
            os.killpg(group, signal.SIGKILL)
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        worker_log.close()
