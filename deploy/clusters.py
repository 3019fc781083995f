"""Dask cluster specs for modeaudit runs: start one, then pass its address with --scheduler.

    python -m modeaudit.deploy.clusters local --workers 2          # LocalCluster, prints the address
    python -m modeaudit.deploy.clusters cuda                       # dask_cuda.LocalCUDACluster, one worker per GPU
    dask scheduler --port 8786 & dask worker tcp://127.0.0.1:8786 --nworkers 2 --nthreads 1   # by hand

SLURM / Kubernetes: any dask-jobqueue or dask-kubernetes cluster works the same way,
e.g. SLURMCluster(cores=16, memory="64GB", job_extra_directives=["--gres=gpu:1"]).scale(jobs=8);
workers need this package installed (pip install -e .) and read access to --out.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> None:
    """Start a cluster and keep it alive, printing its scheduler address."""
    ap = argparse.ArgumentParser(prog="python -m modeaudit.deploy.clusters")
    ap.add_argument("kind", choices=["local", "cuda"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--port", type=int, default=8786)
    a = ap.parse_args(argv)
    # The same plan and cluster the flows start, so its workers compute the same bits.
    from modeaudit.flows.cluster import ExecutionPlan, connect, local_cluster
    kind = "local-cuda" if a.kind == "cuda" else "local"
    plan = ExecutionPlan("torch-cuda" if a.kind == "cuda" else "fast", kind, a.workers, a.threads_per_worker)
    from modeaudit.tasks.registry import ConfigError
    try:
        cluster = local_cluster(plan, scheduler_port=a.port)
    except ConfigError as e:
        print(f"modeaudit: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    client = connect(cluster, plan)
    print(cluster.scheduler_address, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
