"""A real `dask scheduler` and two `dask worker` processes on 127.0.0.1, used by the `modeaudit` command through
--scheduler: the terminal is quiet by default (progress lines, the verdict), Prefect's logs show with --verbose,
and the progress lines change no number."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from modeaudit.flows.audit import audit_flow
from modeaudit.tasks.config import AuditConfig

BIN = Path(sys.executable).parent
TINY = ["--generator", "synthetic:planted", "--m", "1000", "--M", "8000", "--q", "100", "--anchors", "200",
        "--mccs-set", "8000", "--shard-rows", "2000", "--tests", "paper,erl", "--no-efficiency"]


def _stop(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.fixture(scope="module")
def dask_scheduler():
    """tcp:// address of a scheduler with two single-threaded worker processes (each its own `dask worker`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"tcp://127.0.0.1:{port}"
    # One BLAS thread per worker, as deploy/clusters.py asks of external workers.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                 start_new_session=True)
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], **quiet)]
    try:
        procs += [subprocess.Popen([str(BIN / "dask"), "worker", addr, "--nthreads", "1", "--no-dashboard",
                                    "--host", "127.0.0.1"], **quiet) for _ in range(2)]
        from distributed import Client
        with Client(addr, timeout="60s") as c:
            c.wait_for_workers(2, timeout=120)
            assert len(c.scheduler_info()["workers"]) == 2
        yield addr
    finally:
        for p in reversed(procs):
            _stop(p)


def _cli(*argv):
    # INFO in the environment: what keeps Prefect's lines off the terminal is the command, not the test's settings.
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "INFO"}
    return subprocess.run([sys.executable, "-m", "modeaudit.flows.cli", "audit", *argv], env=env,
                          capture_output=True, text=True, timeout=300)


def _numbers(result: dict) -> dict:
    r = json.loads(json.dumps(result))
    for k in ("timings", "run_info", "settings"):
        r.pop(k)
    r["source"].pop("shards")
    return r


def test_cli_on_a_real_scheduler_shows_progress_and_the_verdict_only(dask_scheduler, prefect_harness, scheduler,
                                                                      tmp_path):
    p = _cli(*TINY, "--scheduler", dask_scheduler, "--out", str(tmp_path / "cli"))
    assert p.returncode == 0, p.stderr
    result = json.loads((tmp_path / "cli" / "result.json").read_text())
    lines = [ln for ln in p.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    # One line per stage, counted in rows with a rate and an ETA (tqdm's [elapsed<remaining, rate]).
    for label, total in (("generate: S", "1.00k/1.00k"), ("generate: T", "8.00k/8.00k"),
                         ("self_join: rows joined", "1.00k/1.00k"), ("curves: rows joined", "8.00k/8.00k"),
                         ("mccs: rows summed", "8.00k/8.00k")):
        done = [ln for ln in lines if ln.startswith(label) and "100%" in ln]
        assert done and total in done[-1] and "rows/s]" in done[-1] and "<" in done[-1], (label, p.stderr)
    assert not [ln for ln in lines if "| INFO" in ln or "Flow run" in ln or "Task run" in ln
                or "distributed." in ln], p.stderr
    report = tmp_path / "cli" / "report.html"
    assert lines[-1] == f"modeaudit: {result['verdict']['headline']} (report: {report})"
    assert json.loads(p.stdout)["headline"] == result["verdict"]["headline"]
    assert "progress" not in json.dumps(result) and "rows/s" not in json.dumps(result)

    # The same audit through the API (no terminal, no progress) on the session's local cluster (worker
    # processes this tool started, conftest.scheduler): the external workers give the same numbers.
    api = audit_flow(AuditConfig(out=str(tmp_path / "api"), generator="synthetic:planted", m=1000, M=8000, q=100,
                                 n_a=200, n_c=8000, shard_rows=2000, tests="paper,erl", efficiency=False,
                                 scheduler=scheduler).to_dict())
    assert _numbers(api) == _numbers(result)


def test_verbose_shows_prefect_logs(dask_scheduler, prefect_harness, tmp_path):
    small = ["--generator", "synthetic:null", "--m", "300", "--M", "2000", "--q", "50", "--anchors", "100",
             "--mccs-set", "2000", "--tests", "paper", "--no-efficiency"]
    p = _cli(*small, "--scheduler", dask_scheduler, "--out", str(tmp_path / "v"), "--verbose")
    assert p.returncode == 0, p.stderr
    assert "Beginning flow run" in p.stderr and "Finished in state Completed" in p.stderr, p.stderr
    assert "rows/s" in p.stderr      # progress too
