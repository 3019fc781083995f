"""Precision/recall/density/coverage: modeaudit's exact streamed k-NN kernels against prdc
and against the float32 GEMM floor of the same pairs, in one run.

    python benchmarks/bench_metrics.py --sizes 1e4,2e4 --dims 128,2048 [--k 5] [--kernel fast,lowprec]
        [--json out.json]

Each (method, rows, dim) runs in its own subprocess, so peak memory (ru_maxrss) is
that method's alone. Both sets have `rows` rows, float32, fixed seeds, from --world:
  gaussian (default): real ~ N(0, I), fake ~ N(0.1, I);
  pooled-relu: every component the mean of 4 ReLU(N(0, 1)) draws (fake: ReLU(N(0.01, 1))), non-negative
    rows whose mean is ~1.4x their spread (|mean|^2 / mean |x - mean|^2 ~ 1.9), as a CNN's pooled
    ReLU features (Inception's pool3) sit far from the origin (at 5e3 x 2048: P 0.31, R 0.57; a shift
    of 0.1, like the gaussian world's, gives P ~0 and R ~0.98, 0.05 P 0.04);
  offset: real ~ N(1.5, I), fake ~ N(1.6, I): the gaussian world moved off the origin (ratio 2.25).

* modeaudit: manifold_counts (k-NN radii of R and F, then one R x F pass with both
  balls) and the four metrics from its counts, with each --kernel (default auto, as
  `modeaudit metrics`: the bfloat16-GEMM "lowprec" kernel at 512+ columns and 1e8+
  pairs on a CPU with AMX or AVX512-BF16, else "fast", the float32 one).
* gemm floor: a bare float32 np.matmul over the same pairs (R R^T, F F^T, R F^T) in
  2048-row slabs, BLAS on all cores: the cost of merely forming the inner products.
* bf16 gemm floor (at 512+ columns, where the bfloat16 kernel "lowprec" may run, when torch
  is installed): a bare bfloat16 torch.mm over the ~2 n^2 inner products lowprec forms (the
  self-joins' upper triangles by slabs, and R F^T), every core; printed beside a lowprec run.
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
import importlib.util
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


WORLDS = ("gaussian", "pooled-relu", "offset")


def _data(n: int, d: int, world: str = "gaussian"):
    """(real, fake) float32 rows of one world (see the module docstring)."""
    import numpy as np
    if world not in WORLDS:
        raise ValueError(f"world must be one of {', '.join(WORLDS)}; got {world!r}")
    sets = []
    for seed, shift in ((1, 0.0), (2, 0.01 if world == "pooled-relu" else 0.1)):
        g = np.random.default_rng(seed)
        if world == "pooled-relu":
            x = np.zeros((n, d), np.float32)
            for _ in range(4):
                z = g.standard_normal((n, d), dtype=np.float32)
                z += np.float32(shift)
                np.maximum(z, 0, out=z)
                x += z
            x /= np.float32(4)
        else:
            x = g.standard_normal((n, d), dtype=np.float32)
            x += np.float32(shift + (1.5 if world == "offset" else 0.0))
        sets.append(x)
    return tuple(sets)


def _worker(method: str, n: int, d: int, k: int, kernel: str = "auto", world: str = "gaussian") -> dict:
    import numpy as np
    real, fake = _data(n, d, world)
    out = {}
    if method == "modeaudit":
        # A worker process of its own: one BLAS thread and one tile thread per core, as `modeaudit metrics` runs.
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=1, user_api="blas")
        from modeaudit.tasks.metrics.density_coverage import density_coverage_from_counts
        from modeaudit.tasks.metrics.manifold import manifold_counts
        from modeaudit.tasks.metrics.precision_recall import precision_recall_from_counts
        from modeaudit.tasks.join.backend import metric_kernel
        from modeaudit.tasks.metrics.engine import KnnEngine
        out["kernel"] = metric_kernel(kernel, d, float(n) * n)
        # Not timed: numba's cache load (or compilation, after an edit) of every kernel used below,
        # and torch's import for the lowprec kernel.
        manifold_counts(real[:600], fake[:600], k, engine=KnnEngine(kernel=kernel))
        t = time.perf_counter()
        m = manifold_counts(real, fake, k, engine=KnnEngine(kernel=kernel))
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
    elif method == "gemm_bf16":
        here = os.path.dirname(os.path.abspath(__file__))
        if here not in sys.path:
            sys.path.insert(0, here)
        from profile_metrics import bare_gemm
        bare_gemm(real[:256], fake[:256], "bf16")   # torch's import and first GEMM, not timed
        out["seconds"] = bare_gemm(real, fake, "bf16")
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


def _run(method: str, n: int, d: int, k: int, timeout: float, kernel: str = "auto", world: str = "gaussian") -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(n), str(d), str(k), kernel, world]
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
    ap.add_argument("--kernel", default="auto", help="modeaudit's k-NN kernel, as `modeaudit metrics --kernel` "
                    "(auto: lowprec at 512+ columns and 1e8+ pairs on a CPU with AMX or AVX512-BF16, else fast); a comma-separated "
                    "list runs each")
    ap.add_argument("--world", default="gaussian", choices=WORLDS, help="the rows (see the module docstring)")
    ap.add_argument("--worker", nargs=6, metavar=("METHOD", "N", "D", "K", "KERNEL", "WORLD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        method, n, d, k, kernel, world = args.worker
        print(json.dumps(_worker(method, int(n), int(d), int(k), kernel, world)))
        return 0
    cpu = cpu_model()
    rows = []
    for d in (int(float(x)) for x in args.dims.split(",")):
        for n in (int(float(x)) for x in args.sizes.split(",")):
            res = {"n": n, "d": d, "k": args.k, "world": args.world, "cpu": cpu, "load_before": os.getloadavg()[0]}
            # Interleaved repeats, best of each: on a shared machine the load moves
            # between runs, and the minimum is the least disturbed one.
            kernels = [x.strip() for x in args.kernel.split(",") if x.strip()]
            runs = {f"modeaudit:{kn}": [] for kn in kernels}
            if not args.no_gemm:
                runs["gemm"] = []
                if d >= 512 and importlib.util.find_spec("torch") is not None:
                    runs["gemm_bf16"] = []
            for _ in range(args.repeats):
                for method in runs:
                    name, _, kn = method.partition(":")
                    runs[method].append(_run(name, n, d, args.k, args.timeout, kn or "auto", args.world))
            best = {}
            for method, rs in runs.items():
                ok = [r for r in rs if "seconds" in r]
                best[method] = dict(min(ok, key=lambda r: r["seconds"])) if ok else rs[0]
                best[method]["all_seconds"] = [r.get("seconds") for r in rs]
            # "modeaudit" is the first kernel's row (the key earlier results used); every kernel's is in
            # "modeaudit_by_kernel".
            res["modeaudit"] = best[f"modeaudit:{kernels[0]}"]
            res["modeaudit_by_kernel"] = {kn: best[f"modeaudit:{kn}"] for kn in kernels}
            for floor in ("gemm", "gemm_bf16"):
                if floor in best:
                    res[floor] = best[floor]
            est = 16 * n * n / 2**30
            if args.no_prdc:
                res["prdc"] = {"skipped": "not run (--no-prdc)"}
            elif est > args.prdc_max_gb:
                res["prdc"] = {"skipped": f"estimated peak {est:.1f} GiB > --prdc-max-gb {args.prdc_max_gb}"}
            else:
                res["prdc"] = _run("prdc", n, d, args.k, args.timeout, "auto", args.world)
            res["load_after"] = os.getloadavg()[0]
            gemm, gemm16, ref = res.get("gemm", {}), res.get("gemm_bf16", {}), res["prdc"]
            for kn, ours in res["modeaudit_by_kernel"].items():
                line = (f"[{cpu}; load {res['load_before']:.1f}->{res['load_after']:.1f}] {args.world} n={n} d={d} "
                        f"k={args.k}, "
                        f"best of {args.repeats}: modeaudit --kernel {kn} ({ours.get('kernel', '?')}) ")
                line += (f"{ours['seconds']:.2f} s ({ours['peak_rss_gib']:.2f} GiB, process CPU "
                         f"{ours['process_cpu_seconds']:.1f} s)" if "seconds" in ours else ours.get("error", "?"))
                if "seconds" in gemm:
                    line += f", gemm floor {gemm['seconds']:.2f} s"
                    if "seconds" in ours:
                        ours["ratio_to_gemm"] = ours["seconds"] / gemm["seconds"]
                        line += f" (x{ours['ratio_to_gemm']:.2f})"
                if "seconds" in gemm16 and ours.get("kernel") == "lowprec":
                    line += f", bf16 gemm floor {gemm16['seconds']:.2f} s"
                    if "seconds" in ours:
                        ours["ratio_to_bf16_gemm"] = ours["seconds"] / gemm16["seconds"]
                        line += f" (x{ours['ratio_to_bf16_gemm']:.2f})"
                if "seconds" in ref:
                    line += f", prdc {ref['seconds']:.2f} s ({ref['peak_rss_gib']:.2f} GiB)"
                    if "seconds" in ours:
                        ours["speedup_vs_prdc"] = ref["seconds"] / ours["seconds"]
                        ours["max_abs_diff_vs_prdc"] = max(abs(ours[key] - ref[key]) for key in
                                                          ("precision", "recall", "density", "coverage"))
                        line += (f", {ours['speedup_vs_prdc']:.1f}x faster, max |diff| "
                                 f"{ours['max_abs_diff_vs_prdc']:.1e}")
                else:
                    line += f", prdc: {ref.get('skipped') or ref.get('error')}"
                if "seconds" in ours:
                    line += "; P={precision:.4f} R={recall:.4f} D={density:.4f} C={coverage:.4f}".format(**ours)
                print(line, flush=True)
            for key in ("ratio_to_gemm", "ratio_to_bf16_gemm", "speedup_vs_prdc", "max_abs_diff_vs_prdc"):
                if key in res["modeaudit"]:
                    res[key] = res["modeaudit"][key]
            rows.append(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
