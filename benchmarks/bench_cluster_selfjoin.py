"""The metrics' self-join (every row's k-NN radius within its set) on a Dask cluster: one task per
pair of row groups, each pair formed once, against the query-group tasks (each group against the
whole set, each pair formed twice) the engine ran before, in one run.

    python benchmarks/bench_cluster_selfjoin.py --rows 4e4 --dim 128 [--workers 2] [--k 5] [--repeats 2]

One local cluster (`--workers` processes, one thread each, BLAS pinned as `modeaudit metrics
--workers N` starts them); the set (float32 N(0, I), fixed seed) is scattered once, and both ways
run once on a 2048-row slice first (each worker's first task loads the kernels). Prints each
way's wall time (best of --repeats, interleaved), their ratio, and checks the radii are equal.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_metrics import cpu_model  # noqa: E402


def _query_group(x, k, kernel, group):
    """The engine's self-join task before the pair tasks: query rows [lo, hi) against the whole set."""
    from modeaudit.tasks.join import backend
    from modeaudit.tasks.metrics.manifold import blocks_of
    (lo, hi), = group
    return backend.knn_distances(x[lo:hi], blocks_of(x, 65536), k, query_ids=np.arange(lo, hi), kernel=kernel)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=float, default=4e4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kernel", default="fast", help="a metrics kernel: fast, lowprec, torch-cpu or torch-cuda")
    ap.add_argument("--group-rows", type=int, default=None,
                    help="rows per group of the pair tasks (default: the engine's choice); the query-group "
                         "tasks keep the engine's default")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    from modeaudit.flows.cluster import dask_client
    from modeaudit.tasks.metrics.engine import KnnEngine
    from modeaudit.tasks.plan import plan_execution
    n = int(a.rows)
    x = np.random.default_rng(0).standard_normal((n, a.dim)).astype(np.float32)
    times = {"pairs": [], "query_groups": []}
    with dask_client(plan_execution("fast", a.workers)) as client:
        eng = KnnEngine(client, a.kernel, group_rows=a.group_rows)
        old_eng = KnnEngine(client, a.kernel)
        # Warm-up on a slice: the first task in each worker loads numba's kernels (and torch for lowprec).
        w = x[:min(n, 4 * 512)]
        eng.knn_self(w, a.k)
        old_eng._run(_query_group, old_eng._groups(len(w)), "rows' k-NN radii", w, a.k, a.kernel)
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            new = eng.knn_self(x, a.k)
            times["pairs"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            parts = old_eng._run(_query_group, old_eng._groups(n), "rows' k-NN radii", x, a.k, a.kernel)
            old = np.concatenate(parts)
            times["query_groups"].append(time.perf_counter() - t0)
            assert np.array_equal(new, old), "the two ways disagree"
    best = {m: min(t) for m, t in times.items()}
    out = {"cpu": cpu_model(), "rows": n, "dim": a.dim, "k": a.k, "workers": a.workers, "kernel": a.kernel,
           "group_rows": a.group_rows,
           "seconds": times, "best": best, "speedup": best["query_groups"] / best["pairs"], "equal": True}
    print(f"{cpu_model()}; {n:,} x {a.dim}, k={a.k}, {a.workers} workers, kernel {a.kernel}")
    print(f"  pair tasks (each pair once):     {best['pairs']:8.2f} s")
    print(f"  query groups (each pair twice):  {best['query_groups']:8.2f} s")
    print(f"  speed-up {out['speedup']:.2f}x, radii equal")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
