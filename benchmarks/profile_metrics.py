"""Where the time of the exact k-NN metrics goes: CPU seconds of each join on one thread, and of
the same joins with the per-score kernels replaced by no-ops (the GEMMs and tiling alone).

    python benchmarks/profile_metrics.py [--n 2e4] [--d 128] [--k 5] [--repeats 3]

CPU time (time.process_time) on one tile thread with one BLAS thread, best of --repeats:
on a shared machine it moves far less with the load than wall time does. Same data as
bench_metrics.py (real ~ N(0, I), fake ~ N(0.1, I), float32). The difference between the
two lines is the cost of the score scans, the k-NN list updates and the exact re-checks.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="2e4")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    # A process of its own: one tile thread and one BLAS thread, so CPU time is one core's work.
    os.environ["MODEAUDIT_THREADS"] = "1"
    import numpy as np
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")
    from modeaudit.tasks.metrics import knn
    n, d, k = int(float(args.n)), args.d, args.k
    real = np.random.default_rng(1).standard_normal((n, d), dtype=np.float32)
    fake = np.random.default_rng(2).standard_normal((n, d), dtype=np.float32)
    fake += np.float32(0.1)
    small = knn.knn_self(real[:600], k)   # numba's cache load, not timed
    knn.ball_counts(real[:600], [(0, fake[:600])], small[:, -1], small[:, -1])
    pt = time.process_time

    def joins():
        t0 = pt()
        r = knn.knn_self(real, k)
        t1 = pt()
        f = knn.knn_self(fake, k)
        t2 = pt()
        c = knn.ball_counts(real, [(0, fake)], r[:, -1], f[:, -1])
        t3 = pt()
        return (t1 - t0, t2 - t1, t3 - t2), (r, f, *c.as_tuple())

    best, out = None, None
    for _ in range(args.repeats):
        ts, out = joins()
        best = ts if best is None else tuple(map(min, best, ts))
    h = hashlib.sha256()
    for a in out:
        h.update(np.ascontiguousarray(a).tobytes())
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[0]
    print(f"n={n} d={d} k={k}, CPU s on one thread, best of {args.repeats} (load {load}): knn_self(real) "
          f"{best[0]:.2f}, knn_self(fake) {best[1]:.2f}, ball_counts {best[2]:.2f}, total {sum(best):.2f}; "
          f"results sha256 {h.hexdigest()[:16]}")

    def noop(*a):
        return None
    knn._knn_sym_tile = knn._settle_all = knn._ball_rows = noop
    best = None
    for _ in range(args.repeats):
        ts, _ = joins()
        best = ts if best is None else tuple(map(min, best, ts))
    print(f"  the same joins, per-score kernels as no-ops (GEMMs and tiling alone): {best[0]:.2f}, {best[1]:.2f}, "
          f"{best[2]:.2f}, total {sum(best):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
