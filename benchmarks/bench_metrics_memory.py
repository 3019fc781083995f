"""Memory of `modeaudit metrics` on a Dask cluster: sets read by the workers from their files
against the same sets read by the client and sent to every worker, in one run.

    python benchmarks/bench_metrics_memory.py --rows 5e4 --dim 512 [--workers 2] [--json out.json]

Writes two float32 .npy sets (real ~ N(0, I), fake ~ N(0.1, I), fixed seeds) to a
temporary folder, then, each in a fresh subprocess with a fresh local cluster
(`--workers` processes, one thread each, as `modeaudit metrics --workers N` starts):

* by path: `metrics_of(real.npy, fake.npy, client=...)`, what the command does on a
  cluster: the client checks the files in one streamed pass, the tasks read their rows;
* sent: the same with both sets loaded by np.load first (arrays), which the engine
  scatters to every worker: what the command did before the workers read by path.

Prints, for each: wall time, the client's peak RSS (ru_maxrss of the process that
called metrics_of) and the largest worker's peak RSS (each worker's own ru_maxrss,
read through client.run at the end), and checks that both metrics.json dicts are equal.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_metrics import _data, cpu_model  # noqa: E402  (the same CPU line and the same two sets)


def _peak_rss_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _child(mode: str, folder: str, workers: int) -> dict:
    import numpy as np
    from threadpoolctl import threadpool_limits

    from modeaudit.flows.cluster import dask_client
    from modeaudit.flows.metrics_cli import metrics_of
    from modeaudit.tasks.plan import plan_execution
    threadpool_limits(limits=1, user_api="blas")   # as `modeaudit metrics` does
    real, fake = (os.path.join(folder, f"{n}.npy") for n in ("real", "fake"))
    with dask_client(plan_execution("fast", workers)) as client:
        t0 = time.perf_counter()
        if mode == "sent":
            out = metrics_of(np.load(real), np.load(fake), client=client, kernel="fast")
        else:
            out = metrics_of(real, fake, client=client, kernel="fast")
        seconds = time.perf_counter() - t0
        worker_rss = client.run(_peak_rss_gib)
    for key in ("real", "fake"):
        out.pop(key)
    return {"mode": mode, "seconds": seconds, "client_peak_rss_gib": _peak_rss_gib(),
            "worker_peak_rss_gib": max(worker_rss.values()), "metrics": out}


def main(argv=None) -> int:
    """Run both modes in subprocesses and print one line each (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=float, default=5e4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child[0], a.child[1], a.workers)))
        return 0
    import numpy as np
    n = int(a.rows)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name, x in zip(("real", "fake"), _data(n, a.dim)):
            np.save(os.path.join(folder, f"{name}.npy"), x)
        del x
        set_gib = n * a.dim * 4 / 2**30
        for mode in ("path", "sent"):
            p = subprocess.run([sys.executable, __file__, "--child", mode, folder, "--workers", str(a.workers)],
                               capture_output=True, text=True)
            if p.returncode:
                sys.stderr.write(p.stderr)
                return p.returncode
            r = json.loads(p.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"[{cpu_model()}] n={n} d={a.dim} workers={a.workers} (one set: {set_gib:.2f} GiB) "
                  f"{'read by the workers' if mode == 'path' else 'sent from the client'}: {r['seconds']:.1f} s, "
                  f"client peak RSS {r['client_peak_rss_gib']:.2f} GiB, largest worker {r['worker_peak_rss_gib']:.2f} GiB",
                  flush=True)
    same = results[0]["metrics"] == results[1]["metrics"]
    print(f"metrics equal: {same}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": cpu_model(), "rows": n, "dim": a.dim, "workers": a.workers, "runs": results}, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
