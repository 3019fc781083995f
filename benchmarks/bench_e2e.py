"""End-to-end timing and peak memory of one audit (all processes summed).

    python benchmarks/bench_e2e.py --out /tmp/paper -- --generator synthetic:planted --preset paper

Runs `modeaudit audit ... --out OUT` as a subprocess and samples the summed RSS of
its whole process tree (flow process, Prefect's temporary server, Dask workers)
every 0.2 s. Prints wall time, peak summed RSS and the stage timings from result.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil


def tree_rss(proc: psutil.Process) -> int:
    """Summed resident memory of a process and all its descendants."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main(argv=None) -> dict:
    """Run one audit, return {wall_s, peak_rss_gib, timings}."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then modeaudit audit options")
    a = ap.parse_args(argv)
    rest = [x for x in a.rest if x != "--"]
    cmd = [sys.executable, "-m", "modeaudit.flows.cli", "audit", *rest, "--out", a.out, "--overwrite"]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    log = proc.stdout.read()
    if proc.returncode != 0:
        print(log[-3000:])
        raise SystemExit(f"audit failed with exit code {proc.returncode}")
    result = json.loads((Path(a.out) / "result.json").read_text())
    fig = {"command": " ".join(cmd), "wall_s": round(wall, 1), "peak_rss_gib": round(peak / 2**30, 2),
           "timings": result["timings"], "sizes": result["sizes"],
           "worst_case_is_planted": result.get("truth", {}).get("worst_case_is_planted")}
    print(json.dumps(fig, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=1))
    return fig


if __name__ == "__main__":
    main()
