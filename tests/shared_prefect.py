"""ONE real Prefect server (`prefect server start` on 127.0.0.1) per pytest run, shared by every xdist worker.

The first worker that needs it starts it under a file lock in a folder keyed by the run (named by the
controlling pytest process, inherited by its workers), the others reuse it, and the controlling pytest
process stops it (its process group, by PID) when the session ends. The server's parent is a watchdog
that ends the group if that pytest process dies first. PREFECT_HOME and the database are throwaway.
Used by tests/conftest.py (fixture prefect_harness and its session hooks).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

# A fresh database is migrated at the first start: seconds on an idle machine, much longer on a busy one.
SERVER_START_TIMEOUT = 180


def name_the_run(config) -> None:
    """The controlling pytest process names the run; xdist workers, started later, inherit the name."""
    if not hasattr(config, "workerinput") and "MODEAUDIT_TEST_RUN" not in os.environ:
        os.environ["MODEAUDIT_TEST_RUN"] = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _controller_pid() -> int:
    return int(os.environ["MODEAUDIT_TEST_RUN"].split("-")[0])


def _run_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"modeaudit-prefect-server-{os.environ['MODEAUDIT_TEST_RUN']}"
    d.mkdir(exist_ok=True)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The server's parent and process group leader: starts `prefect server start` (argv[2:]) and ends the group
# when the controlling pytest process (argv[1]) is gone (killed, crashed), so no server outlives its test run.
_WATCHDOG = """
import os, signal, subprocess, sys, time
controller = int(sys.argv[1])
server = subprocess.Popen(sys.argv[2:])
while server.poll() is None:
    try:
        os.kill(controller, 0)
    except ProcessLookupError:
        os.killpg(0, signal.SIGTERM)
    time.sleep(1)
"""


def _start_server(run: Path) -> dict:
    port = _free_port()
    env = {**os.environ,
           "PREFECT_HOME": str(run / "home"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{run / 'prefect.db'}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
           # Only what the tests read back stays on: the API, events (persisted), task runs. The loop services
           # (schedules, late runs, pauses, workers' liveness, vacuum) and automations' triggers only cost CPU here.
           **{f"PREFECT_SERVER_SERVICES_{s}_ENABLED": "false" for s in (
               "SCHEDULER", "LATE_RUNS", "FOREMAN", "CANCELLATION_CLEANUP", "PAUSE_EXPIRATIONS", "REPOSSESSOR",
               "CLEANUP_RECONCILER", "DB_VACUUM", "TRIGGERS")}}
    env.pop("PREFECT_API_URL", None)
    with open(run / "server.log", "ab") as log:
        group = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(_controller_pid()),
                                  str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                  "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, cwd=run)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while not _healthy(url):
        if group.poll() is not None or time.monotonic() > deadline:
            _stop_group(group.pid)
            raise RuntimeError(f"prefect server start failed (rc={group.poll()}); see {run / 'server.log'}")
        time.sleep(0.3)
    info = {"pid": group.pid, "url": url}
    (run / "server.json").write_text(json.dumps(info))
    return info


def _stop_group(pgid: int) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after 15 s."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            # The leader is this process's child when this process started it: reap it, or the
            # zombie would keep the group "alive" for the whole wait.
            os.waitpid(pgid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def shared_prefect_server() -> str:
    """The API URL of this pytest run's Prefect server, started here if no worker has started it yet."""
    from filelock import FileLock
    run = _run_dir()
    with FileLock(str(run / "lock")):
        path = run / "server.json"
        if path.exists():
            info = json.loads(path.read_text())
            if _alive(info["pid"]) and _healthy(info["url"]):
                return info["url"]
            _stop_group(info["pid"])
        return _start_server(run)["url"]


def stop_the_run_server(config) -> None:
    """The controlling process (not an xdist worker) stops the run's server, by its process group."""
    if hasattr(config, "workerinput"):
        return
    run = _run_dir()
    path = run / "server.json"
    if path.exists():
        _stop_group(json.loads(path.read_text())["pid"])
    shutil.rmtree(run, ignore_errors=True)


def drain() -> None:
    """Send the logs and events still queued in this process before the server goes (no errors at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except Exception:  # noqa: BLE001 - a worker never started has nothing to send
            pass
