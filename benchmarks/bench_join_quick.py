"""Quick timing of the range-join fast path against the GEMM it is built on.

    .venv/bin/python benchmarks/bench_join_quick.py [--anchors 1001] [--rows 200000] [--dim 128]

Times, for float32 unit vectors: the numpy GEMM alone (same tiling as the join,
all BLAS threads), the fused fast path (tasks.join.range_counts), the MCCS sums,
and the obvious bucketize + bincount (np.searchsorted + per-row np.bincount, and
torch.bucketize + one offset torch.bincount if torch is installed), and prints
each as a ratio to the GEMM. The bucketize baselines (GEMM included) run on a
slice of the rows and are scaled up, they are that slow.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tasks import join  # noqa: E402


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _best(f, repeat):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchors", type=int, default=1001)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    # Mildly clustered data so that every radius has non-trivial counts.
    centres = _unit(rng.standard_normal((64, args.dim)))
    pts = centres[rng.integers(0, 64, args.rows)] + 0.12 * rng.standard_normal((args.rows, args.dim))
    B = _unit(pts).astype(np.float32)
    A = B[rng.choice(args.rows, args.anchors, replace=False)].copy()
    radii = join.DEFAULT_RADII
    thr = join.radius_thresholds(radii)
    n_scores = A.shape[0] * B.shape[0]

    def gemm():
        out = np.empty((min(len(A), join._ANCHOR_TILE), join._ROW_TILE), dtype=np.float32)
        for c0 in range(0, len(B), join._ROW_TILE):
            bt = B[c0:c0 + join._ROW_TILE]
            for r0 in range(0, len(A), join._ANCHOR_TILE):
                at = A[r0:r0 + join._ANCHOR_TILE]
                np.matmul(at, bt.T, out=out[:len(at), :len(bt)])

    def fast():
        return join.range_counts(A, [(0, B)], radii)

    def mccs():
        return join.mccs_sums(A, [(0, B)], 0.3)

    sub = B[: max(1, min(len(B), 20_000))]
    asc = thr[::-1].astype(np.float32)

    def bucketize():
        R = len(thr)
        for c0 in range(0, len(sub), join._ROW_TILE):
            sims = A @ sub[c0:c0 + join._ROW_TILE].T
            # bin = number of thresholds the score reaches (ascending thresholds)
            bins = np.searchsorted(asc, sims, side="right")
            for i in range(len(A)):
                np.bincount(bins[i], minlength=R + 1)

    def torch_bucketize():
        import torch

        R = len(thr)
        boundaries = torch.from_numpy(asc.copy())
        for c0 in range(0, len(sub), join._ROW_TILE):
            sims = torch.from_numpy(A @ sub[c0:c0 + join._ROW_TILE].T)
            bins = torch.bucketize(sims, boundaries, right=True)
            # one bincount for the whole tile: row i's bins shifted by i * (R + 1)
            bins += torch.arange(len(A)).unsqueeze(1) * (R + 1)
            torch.bincount(bins.ravel(), minlength=len(A) * (R + 1)).view(len(A), R + 1)

    try:
        import torch  # noqa: F401
    except ImportError:
        torch_bucketize = None

    fast()  # compile / load the numba cache
    mccs()
    t_gemm = _best(gemm, args.repeat)
    t_fast = _best(fast, args.repeat)
    t_mccs = _best(mccs, args.repeat)
    t_buck = _best(bucketize, 1) * len(B) / len(sub)
    t_torch = _best(torch_bucketize, 1) * len(B) / len(sub) if torch_bucketize else None

    print(f"a={len(A)} b={len(B)} D={args.dim} R={len(radii)}  scores={n_scores:.3g}  "
          f"cpus={len(os.sched_getaffinity(0))}")
    print(f"{'numpy GEMM alone':34s} {t_gemm:8.3f} s   1.00x   "
          f"{2 * n_scores * args.dim / t_gemm / 1e9:6.1f} GFLOP/s")
    for name, t in [("range_counts fast (GEMM + count)", t_fast),
                    ("mccs_sums fast (GEMM + filter)", t_mccs),
                    ("searchsorted + bincount (est.)", t_buck),
                    ("torch bucketize + bincount (est.)", t_torch)]:
        if t is None:
            continue
        print(f"{name:34s} {t:8.3f} s  {t / t_gemm:5.2f}x   {t / n_scores * 1e9:6.2f} ns/score")


if __name__ == "__main__":
    main()
