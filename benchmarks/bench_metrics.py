"""Precision/recall/density/coverage: modeaudit's exact streamed k-NN kernels against prdc
and against the float32 GEMM floor of the same pairs, in one run.

    python benchmarks/bench_metrics.py --sizes 1e4,2e4 --dims 128,2048 [--k 5] [--json out.json]

Each (method, rows, dim) runs in its own subprocess, so peak memory (ru_maxrss) is
that method's alone. Both sets have `rows` rows: real ~ N(0, I), fake ~ N(0.1, I),
float32, fixed seeds.

* modeaudit: manifold_counts (k-NN radii of R and F, then one R x F pass with both
  balls) and the four metrics from its counts.
* gemm floor: a bare float32 np.matmul over the same pairs (R R^T, F F^T, R F^T) in
  2048-row slabs, BLAS on all cores: the cost of merely forming the inner products.
* prdc: prdc.compute_prdc on the same features, only when its estimated peak
  (three n^2 float32 distance matrices plus np.argpartition's n^2 int64 indices
  and the n^2 temporaries of its comparisons: 1.38 GiB measured at n = 1e4, ~ 15 n^2 bytes) fits --prdc-max-gb.
  Its four values are compared with ours (|difference| printed).

Every line starts with the CPU model from /proc/cpuinfo, the core count and the
1-minute load average before and after (the machine may be shared). modeaudit and
the GEMM floor run --repeats times, interleaved, and the best of each is reported
(all times go to --json); prdc runs once.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (and the cores this process may use)."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def _data(n: int, d: int):
    import numpy as np
    real = np.random.default_rng(1).standard_normal((n, d), dtype=np.float32)
    fake = np.random.default_rng(2).standard_normal((n, d), dtype=np.float32)
    fake += np.float32(0.1)
    return real, fake


def _worker(method: str, n: int, d: int, k: int) -> dict:
    import numpy as np
    real, fake = _data(n, d)
    out = {}
    if method == "modeaudit":
        # A worker process of its own: one BLAS thread and one tile thread per core, as `modeaudit metrics` runs.
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=1, user_api="blas")
        from modeaudit.tasks.metrics.density_coverage import density_coverage_from_counts
        from modeaudit.tasks.metrics.manifold import manifold_counts
        from modeaudit.tasks.metrics.precision_recall import precision_recall_from_counts
        # Not timed: numba's cache load (or compilation, after an edit) of every kernel used below.
        manifold_counts(real[:600], fake[:600], k)
        t = time.perf_counter()
        m = manifold_counts(real, fake, k)
        p, r = precision_recall_from_counts(m.fake_in_real_balls, m.real_in_fake_balls)
        dens, cov = density_coverage_from_counts(m.fake_in_real_balls, m.real_ball_counts, k)
        out["seconds"] = time.perf_counter() - t
        out.update(precision=p, recall=r, density=dens, coverage=cov)
    elif method == "gemm":
        slab = 2048
        buf = np.empty((slab, n), dtype=np.float32)
        t = time.perf_counter()
        for a, b in ((real, real), (fake, fake), (real, fake)):
            bt = b.T
            for i in range(0, n, slab):
                at = a[i:i + slab]
                np.matmul(at, bt, out=buf[:at.shape[0]])
        out["seconds"] = time.perf_counter() - t
    elif method == "prdc":
        import contextlib
        import io
        import prdc
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
            res = prdc.compute_prdc(real, fake, k)
        out["seconds"] = time.perf_counter() - t
        out.update({key: float(v) for key, v in res.items()})
    else:
        raise ValueError(method)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["peak_rss_gib"] = ru.ru_maxrss / 2**20
    # The process's CPU seconds (all threads, set-up included): on a loaded machine the wall
    # time measures the load as much as the code.
    out["process_cpu_seconds"] = ru.ru_utime + ru.ru_stime
    return out


def _run(method: str, n: int, d: int, k: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(n), str(d), str(k)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e4,2e4", help="rows per set, comma separated")
    ap.add_argument("--dims", default="128,2048", help="feature widths, comma separated")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of modeaudit and the GEMM floor "
                    "(prdc runs once); the best of each is reported")
    ap.add_argument("--prdc-max-gb", type=float, default=8.0, help="skip prdc above this estimated peak")
    ap.add_argument("--no-prdc", action="store_true")
    ap.add_argument("--no-gemm", action="store_true", help="skip the GEMM floor (at 2e5 rows it takes as long as "
                    "modeaudit itself)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per method and size, seconds")
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "N", "D", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        method, n, d, k = args.worker
        print(json.dumps(_worker(method, int(n), int(d), int(k))))
        return 0
    cpu = cpu_model()
    rows = []
    for d in (int(float(x)) for x in args.dims.split(",")):
        for n in (int(float(x)) for x in args.sizes.split(",")):
            res = {"n": n, "d": d, "k": args.k, "cpu": cpu, "load_before": os.getloadavg()[0]}
            # Interleaved repeats, best of each: on a shared machine the load moves
            # between runs, and the minimum is the least disturbed one.
            runs = {"modeaudit": []} if args.no_gemm else {"modeaudit": [], "gemm": []}
            for _ in range(args.repeats):
                for method in runs:
                    runs[method].append(_run(method, n, d, args.k, args.timeout))
            for method, rs in runs.items():
                ok = [r for r in rs if "seconds" in r]
                res[method] = dict(min(ok, key=lambda r: r["seconds"])) if ok else rs[0]
                res[method]["all_seconds"] = [r.get("seconds") for r in rs]
            est = 16 * n * n / 2**30
            if args.no_prdc:
                res["prdc"] = {"skipped": "not run (--no-prdc)"}
            elif est > args.prdc_max_gb:
                res["prdc"] = {"skipped": f"estimated peak {est:.1f} GiB > --prdc-max-gb {args.prdc_max_gb}"}
            else:
                res["prdc"] = _run("prdc", n, d, args.k, args.timeout)
            res["load_after"] = os.getloadavg()[0]
            ours, gemm, ref = res["modeaudit"], res.get("gemm", {}), res["prdc"]
            line = (f"[{cpu}; load {res['load_before']:.1f}->{res['load_after']:.1f}] n={n} d={d} k={args.k}, best of "
                    f"{args.repeats}: modeaudit ")
            line += (f"{ours['seconds']:.2f} s ({ours['peak_rss_gib']:.2f} GiB, process CPU "
                     f"{ours['process_cpu_seconds']:.1f} s)" if "seconds" in ours else ours.get("error", "?"))
            if "seconds" in gemm:
                line += f", gemm floor {gemm['seconds']:.2f} s"
                if "seconds" in ours:
                    res["ratio_to_gemm"] = ours["seconds"] / gemm["seconds"]
                    line += f" (x{res['ratio_to_gemm']:.2f})"
            if "seconds" in ref:
                line += f", prdc {ref['seconds']:.2f} s ({ref['peak_rss_gib']:.2f} GiB)"
                if "seconds" in ours:
                    res["speedup_vs_prdc"] = ref["seconds"] / ours["seconds"]
                    res["max_abs_diff_vs_prdc"] = max(abs(ours[key] - ref[key]) for key in
                                                     ("precision", "recall", "density", "coverage"))
                    line += (f", {res['speedup_vs_prdc']:.1f}x faster, max |diff| "
                             f"{res['max_abs_diff_vs_prdc']:.1e}")
            else:
                line += f", prdc: {ref.get('skipped') or ref.get('error')}"
            if "seconds" in ours:
                line += "; P={precision:.4f} R={recall:.4f} D={density:.4f} C={coverage:.4f}".format(**ours)
            print(line, flush=True)
            rows.append(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
