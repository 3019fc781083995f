"""Fault-injection harness: real faults on real processes; every run must end byte-identical or in one clean line.

    python benchmarks/fault_injection.py --runs 20 --seed 0 --work /tmp/faults

Faults, drawn at random per run:
  kill_flow      SIGKILL of the whole `modeaudit audit` process group once k random shards are recorded,
                 then the same command again (resume) -> must equal the reference result
  kill_worker    SIGKILL of one Dask worker process at a random moment -> identical result, or exit 2 with
                 one line and no result.json
  corrupt_chunk  random bytes written into a random chunk of a finished run's store, then the same command
                 again -> the damaged shard is regenerated, result identical
  disk_full      the run on a small tmpfs (skipped, saying so, where one cannot be mounted) -> exit 2, one line,
                 no result.json (or identical when it fits)
Outcomes: identical | clean-error | DIFFERENT | TRACEBACK | NO-RESULT; the script exits 1 on any of the last three.
One Prefect server is started for all runs (PREFECT_API_URL), as a scheduled deployment would have.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SIZES = ["--m", "2000", "--M", "24000", "--q", "200", "--anchors", "500", "--mccs-set", "24000",
         "--tests", "paper,erl", "--no-efficiency", "--shard-rows", "2000", "--seed", "3"]
BIN = Path(sys.executable).parent


def _strip(text: str) -> dict:
    from modeaudit.storage.layout import comparable_result
    r = comparable_result(json.loads(text))
    r.get("settings", {}).pop("workers", None)   # runs are drawn on 1 or 2 workers
    return r


def _cmd(out: Path, workers: int) -> list[str]:
    return [str(BIN / "modeaudit"), "audit", "--generator", "synthetic:planted", *SIZES, "--workers", str(workers),
            "--out", str(out)]


def _run(cmd, env, timeout=600):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True)


LAST_STDERR = [""]


def _judge(proc_rc: int, stderr: str, out: Path, ref: dict) -> str:
    LAST_STDERR[0] = stderr
    res = out / "result.json"
    if proc_rc == 0:
        if not res.exists():
            return "NO-RESULT"
        return "identical" if _strip(res.read_text()) == ref else "DIFFERENT"
    if "Traceback" in stderr or proc_rc != 2:
        return "TRACEBACK"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return "clean-error" if last.startswith("modeaudit: error: ") and not res.exists() else "TRACEBACK"


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    pairs = [(int(a), int(b)) for a, b in zip(out[::2], out[1::2])]
    kids, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c, pp in pairs:
            if pp == p:
                kids.append(c)
                todo.append(c)
    return kids


def _is_worker(pid: int) -> bool:
    try:
        return "spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
    except OSError:
        return False


def kill_flow(rng, work, env, ref, workers):
    out = work / "run"
    p = subprocess.Popen(_cmd(out, workers), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    k = rng.randint(1, 10)
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < 300:
        if len(list((out / "manifest" / "T").glob("*.json"))) >= k:
            break
        time.sleep(0.05)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    r = _run(_cmd(out, workers), env)
    return f"after {k} shards", _judge(r.returncode, r.stderr, out, ref)


def kill_worker(rng, work, env, ref, workers):
    out = work / "run"
    p = subprocess.Popen(_cmd(out, workers), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    # Wait for the run's workers to exist, then strike at a random moment of its work.
    t0 = time.time()
    victims = []
    while p.poll() is None and not victims and time.time() - t0 < 120:
        time.sleep(0.2)
        victims = [c for c in _descendants(p.pid) if _is_worker(c)]
    delay = rng.uniform(0.0, 10.0)
    time.sleep(delay)
    victims = [c for c in _descendants(p.pid) if _is_worker(c)]
    if victims:
        os.kill(rng.choice(victims), signal.SIGKILL)
    _, err = p.communicate(timeout=600)
    return (f"{delay:.1f} s after start ({'killed' if victims else 'run over'})",
            _judge(p.returncode, err, out, ref))


def corrupt_chunk(rng, work, env, ref, workers, ref_dir):
    out = work / "run"
    shutil.copytree(ref_dir, out)
    chunks = sorted((out / "store.zarr").glob("[ST]/emb/c/*/*"))
    victim = rng.choice(chunks)
    data = bytearray(victim.read_bytes())
    for _ in range(8):
        data[rng.randrange(len(data))] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = _run(_cmd(out, workers), env)
    return str(victim.relative_to(out)), _judge(r.returncode, r.stderr, out, ref)


def disk_full(rng, work, env, ref, workers):
    mnt = work / "tiny"
    mnt.mkdir()
    size = rng.choice([2, 4, 8])
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}m", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if m.returncode != 0:
        return f"cannot mount a tmpfs ({m.stderr.strip()})", "skipped"
    try:
        r = _run(_cmd(mnt / "run", workers), env)
        return f"{size} MiB", _judge(r.returncode, r.stderr, mnt / "run", ref)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    """Run the harness; print one line per run and a summary; exit 1 if any run ended wrong."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/modeaudit-faults")
    ap.add_argument("--faults", default="kill_flow,kill_worker,corrupt_chunk,disk_full")
    a = ap.parse_args(argv)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    port = _free_port()
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(180):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(1)
        ref_dir = work / "reference"
        r = _run(_cmd(ref_dir, 1), env)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        ref = _strip((ref_dir / "result.json").read_text())
        rng = random.Random(a.seed)
        faults = a.faults.split(",")
        rows, bad = [], 0
        for i in range(a.runs):
            fault, workers = rng.choice(faults), rng.choice([1, 2])
            run_dir = work / f"r{i}"
            run_dir.mkdir()
            t0 = time.time()
            fn = globals()[fault]
            detail, outcome = (fn(rng, run_dir, env, ref, workers, ref_dir) if fault == "corrupt_chunk"
                               else fn(rng, run_dir, env, ref, workers))
            bad += outcome in ("DIFFERENT", "TRACEBACK", "NO-RESULT")
            if outcome == "TRACEBACK":
                (run_dir / "stderr.txt").write_text(LAST_STDERR[0])
            rows.append((i, fault, workers, detail, outcome, time.time() - t0))
            print(f"{i:3d} {fault:14s} workers={workers} {detail:32s} -> {outcome} ({time.time() - t0:.0f} s)",
                  flush=True)
        counts = {o: sum(r[4] == o for r in rows) for o in sorted({r[4] for r in rows})}
        print("summary:", json.dumps(counts))
        return 1 if bad else 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
