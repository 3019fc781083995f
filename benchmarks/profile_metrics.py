"""Where the time of the exact k-NN metrics goes: the three joins, the same joins with the per-score
kernels replaced by no-ops (the GEMMs and tiling alone), and a bare GEMM over the same pairs.

    python benchmarks/profile_metrics.py [--n 2e4] [--d 128] [--k 5] [--repeats 3] [--scores float32|bf16] [--wall]

Default: CPU time (time.process_time) on one tile thread with one BLAS thread, best of --repeats:
on a shared machine it moves far less with the load than wall time does. --wall: wall time with
every core, as `modeaudit metrics` runs (one BLAS thread, a tile thread per core), plus the bare
GEMM line: the same number of inner products (the two self-joins' upper triangles and R x F, ~2 n^2)
as one GEMM call per 2048-row slab, on every core: numpy float32, or torch bfloat16 for --scores bf16.
Same data as bench_metrics.py (real ~ N(0, I), fake ~ N(0.1, I), float32). The difference between
the first two lines is the cost of the score scans, the k-NN list updates and the exact re-checks.
The first line starts with the CPU model.
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
    ap.add_argument("--scores", choices=("float32", "bf16"), default="float32",
                    help="the GEMM's precision: float32 (kernel fast) or bf16 (kernel lowprec)")
    ap.add_argument("--wall", action="store_true", help="wall time on every core, and the bare GEMM line")
    args = ap.parse_args(argv)
    import contextlib

    from threadpoolctl import threadpool_limits

    from modeaudit.tasks.join.threads import thread_budget
    # One BLAS thread (a tile thread per core, as `modeaudit metrics` runs); without --wall one tile thread
    # too, so CPU time is one core's work. Both restored on return (the tests call main in their process).
    with threadpool_limits(limits=1, user_api="blas"), (contextlib.nullcontext() if args.wall else thread_budget(1)):
        return _profile(args)


def _profile(args) -> int:
    import numpy as np
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_metrics import cpu_model
    from modeaudit.tasks.metrics import knn
    n, d, k, scores = int(float(args.n)), args.d, args.k, args.scores
    real = np.random.default_rng(1).standard_normal((n, d), dtype=np.float32)
    fake = np.random.default_rng(2).standard_normal((n, d), dtype=np.float32)
    fake += np.float32(0.1)
    small = knn.knn_self(real[:600], k, scores=scores)   # numba's cache load, not timed
    knn.ball_counts(real[:600], [(0, fake[:600])], small[:, -1], small[:, -1], scores=scores)
    clock = time.perf_counter if args.wall else time.process_time

    def joins():
        t0 = clock()
        r = knn.knn_self(real, k, scores=scores)
        t1 = clock()
        f = knn.knn_self(fake, k, scores=scores)
        t2 = clock()
        c = knn.ball_counts(real, [(0, fake)], r[:, -1], f[:, -1], scores=scores)
        t3 = clock()
        return (t1 - t0, t2 - t1, t3 - t2), (r, f, *c.as_tuple())

    def best_of(fn):
        best, out = None, None
        for _ in range(args.repeats):
            ts, out = fn()
            best = ts if best is None else tuple(map(min, best, ts))
        return best, out

    best, out = best_of(joins)
    h = hashlib.sha256()
    for a in out:
        h.update(np.ascontiguousarray(a).tobytes())
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[0]
    how = "wall s on every core" if args.wall else "CPU s on one thread"
    print(f"[{cpu_model()}] n={n} d={d} k={k} scores={scores}, {how}, best of {args.repeats} (load {load}): "
          f"knn_self(real) {best[0]:.2f}, knn_self(fake) {best[1]:.2f}, ball_counts {best[2]:.2f}, "
          f"total {sum(best):.2f}; results sha256 {h.hexdigest()[:16]}")

    saved = {name: getattr(knn, name) for name in NOOPS}
    try:
        for name in NOOPS:
            setattr(knn, name, _noop)
        best, _ = best_of(joins)
    finally:
        for name, fn in saved.items():
            setattr(knn, name, fn)
    print(f"  the same joins, per-score kernels as no-ops (GEMMs and tiling alone): {best[0]:.2f}, {best[1]:.2f}, "
          f"{best[2]:.2f}, total {sum(best):.2f}")
    if args.wall:
        secs = min(bare_gemm(real, fake, scores) for _ in range(args.repeats))
        print(f"  a bare {scores} GEMM of the same ~2 n^2 inner products, every core: {secs:.2f}")
    return 0


# The per-score kernels: scans, k-NN list updates, exact re-checks (everything but the GEMM, its bound and the tiling).
NOOPS = ("_sym_phase_a", "_knn_sym_tile", "_settle_rows", "_ball_rows", "_ball_band", "_knn_rows", "_merge_lists")


def _noop(*args):
    return 0


def bare_gemm(real, fake, scores: str, slab: int = 2048) -> float:
    """Seconds of one GEMM call per slab over the pairs the joins form: each self-join's upper triangle by
    slabs (a slab against itself and every later row) and R x F."""
    import numpy as np
    if scores == "bf16":
        import torch
        r, f = torch.from_numpy(real).to(torch.bfloat16), torch.from_numpy(fake).to(torch.bfloat16)
        mm = torch.mm
    else:
        r, f = real, fake
        mm = np.matmul
    from threadpoolctl import threadpool_limits
    n = real.shape[0]
    # BLAS on every core here (the joins above ran it on one thread per tile thread); torch has its own threads.
    with threadpool_limits(limits=len(os.sched_getaffinity(0)), user_api="blas"):
        t = time.perf_counter()
        for x in (r, f):
            for i in range(0, n, slab):
                mm(x[i:i + slab], x[i:].T)
        for i in range(0, n, slab):
            mm(r[i:i + slab], f.T)
        return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
