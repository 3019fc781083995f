"""KID's two ways of summing, timed side by side in one process on one BLAS thread (a Dask worker's setting).

    python benchmarks/bench_kid.py [--sizes 2000,3000,5000,10000] [--dims 128,2048] [--repeats 2]

For each size (rows a set) and width, KID at its defaults (100 subsets of 1000 rows, kernel (x.y/d + 1)^3)
summed per subset (each subset's three kernel matrices formed on its own) and from the whole sets' kernel
matrices (formed once, tile by tile, every subset's sums read from them as z^T K z), each the fastest of
--repeats runs after a warm-up, with the ratio, the relative difference of the two values, and which path
`kid` picks for those sizes (tasks/metrics/kid.py: _whole_matrices_cheaper). real ~ N(0, I), fake ~ N(0, I),
float32, fixed seeds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_metrics import cpu_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,3000,5000,10000")
    ap.add_argument("--dims", default="128,2048")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    import threadpoolctl
    from modeaudit.tasks.metrics import kid as kid_mod
    decide = kid_mod._whole_matrices_cheaper
    print(f"{cpu_model()}; one BLAS thread; 100 subsets of 1000 rows")
    rng = np.random.default_rng(0)
    warm = rng.standard_normal((1200, 8)).astype(np.float32)
    with threadpoolctl.threadpool_limits(1):
        for d in (int(v) for v in a.dims.split(",")):
            for n in (int(float(v)) for v in a.sizes.split(",")):
                real = rng.standard_normal((n, d)).astype(np.float32)
                fake = rng.standard_normal((n, d)).astype(np.float32)
                best, value = {}, {}
                for path, rule in (("whole", lambda *_: True), ("per-subset", lambda *_: False)):
                    kid_mod._whole_matrices_cheaper = rule
                    kid_mod.kid(warm, warm, subsets=2, subset_size=1000)
                    times = []
                    for _ in range(a.repeats):
                        t0 = time.perf_counter()
                        value[path] = kid_mod.kid(real, fake)["kid"]
                        times.append(time.perf_counter() - t0)
                    best[path] = min(times)
                kid_mod._whole_matrices_cheaper = decide
                rel = abs(value["whole"] - value["per-subset"]) / abs(value["per-subset"])
                print(f"{n:>7,} x {d:<5} whole {best['whole']:7.2f} s  per-subset {best['per-subset']:7.2f} s  "
                      f"per-subset/whole {best['per-subset'] / best['whole']:5.2f}x  |diff| {rel:.1e} rel  "
                      f"kid picks {'whole' if decide(n, n, d, 1000, 100) else 'per-subset'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
