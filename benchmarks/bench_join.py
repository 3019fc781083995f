"""Range-join benchmark: modeaudit.tasks.join.kernels against the GEMM floor and the obvious alternatives.

    .venv/bin/python benchmarks/bench_join.py [--quick] [--dim 128] [--anchors 1001]
                                              [--sizes 1e5,1e6,1e7] [--json OUT]

Everything is measured in one run on this machine, so the ratios compare like
with like; absolute times depend on the machine (described at the top of the
output: CPU, cores, BLAS, a measured sgemm peak, and the load average, since a
busy machine makes every figure noisy).

Sections
  1. Anchor curves: a anchors x M points x D (float32 unit vectors), 41 radii.
     (a) GEMM floor: numpy sgemm of the same shapes, over the same row blocks
         (results discarded); the fastest of up to three ways of calling it
         (--gemm-variants; --quick skips the one that lost here).
     (b) modeaudit.tasks.join.kernels.range_counts(kernel="fast"); the target is (b)/(a) <= 2.
     (c) numpy bucketize + bincount (float32 GEMM, np.searchsorted, one offset
         np.bincount per tile),
     (d) faiss IndexFlatIP.range_search at the largest radius + np.searchsorted
         counting of the returned scores,
     (e) scikit-learn NearestNeighbors(algorithm="brute").radius_neighbors at the
         euclidean radius of the largest radius + counting.
     (c)-(e) are far slower (and (d), (e) return about half of the points per
     anchor), so they run on the first rows of T only and are scaled linearly to
     M; the output marks them "est.". Targets: (b) >= 5x faster than (c) and (d).
     Exactness: (b) must equal, count for count, the same numpy bucketize run in
     float64 on the subset (asserted; prints "counts exact"). The float32
     baselines are not exact; how far they are off is reported.
  2. Scaling of (b) with M: time(M_last) / time(M_prev) (target <= 1.1 x the size ratio).
  3. Self-join shape: m x m, one radius (d0 = 0.25), anchor_ids = arange(m), vs GEMM floor.
  4. MCCS shape: |A| x |C|, theta = 0.3, vs GEMM floor.
  5. Peak RSS (ru_maxrss, a high-water mark) after each section.

Data: clustered unit vectors (a mixture around a few hundred centres with
spreads from tight to wide, so the counts are non-trivial at every radius),
generated from a fixed seed into a pool of distinct blocks before any timing.
M rows are served by cycling through the pool with increasing global offsets,
so T is never materialised and generation is never timed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from modeaudit.tasks.join import backend  # noqa: E402
from modeaudit.tasks.join import kernels as join  # noqa: E402


class _Kernel:
    """The kernel measured as (b): modeaudit.tasks.join.backend with the --kernel chosen in main()."""
    name = "fast"

    def range_counts(self, *a, **kw):
        return backend.range_counts(*a, kernel=self.name, **kw)

    def mccs_sums(self, *a, **kw):
        return backend.mccs_sums(*a, kernel=self.name, **kw)


KERNEL = _Kernel()

SELF_JOIN_RADIUS = 0.25  # the default d0 of the dense-mode search (tasks/config.py)
MCCS_THETA = 0.3

# The defaults of each mode; a flag given on the command line wins.
FULL = dict(sizes="1e5,1e6,1e7", subset_rows=1_000_000, faiss_rows=131_072, sklearn_rows=16_384,
            selfjoin_m=100_000, mccs_anchors=10_000, mccs_points=1_000_000,
            pool_blocks=8, repeat=3, budget=60.0, peak_n=4096, gemm_variants="block,tile,workers")
QUICK = dict(sizes="1e5,1e6", subset_rows=65_536, faiss_rows=32_768, sklearn_rows=4_096,
             selfjoin_m=10_000, mccs_anchors=1_000, mccs_points=100_000,
             pool_blocks=4, repeat=2, budget=6.0, peak_n=4096, gemm_variants="block,workers")


# ----------------------------------------------------------------------------
# small helpers


def _rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)


def _ncores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _parse_size(s: str) -> int:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of rows: {s!r}") from None
    if not math.isfinite(v) or v < 1 or v != int(v):
        raise argparse.ArgumentTypeError(f"not a positive whole number of rows: {s!r}")
    return int(v)


def _fmt_rows(n: int) -> str:
    e = int(math.floor(math.log10(n))) if n > 0 else 0
    return f"{n // 10 ** e}e{e}" if n % 10 ** e == 0 and e >= 3 else f"{n:,}"


def _timed(f):
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def _best_interleaved(funcs: dict, repeat: int, budget: float) -> dict:
    """Best time of each function, running them in turn (a, b, c, a, b, c, ...).

    Interleaving spreads any disturbance from other load over all of them. At
    least one round runs; another starts only while `repeat` is not reached and
    the rounds so far, plus one more, fit in `budget` seconds.
    """
    best = {k: math.inf for k in funcs}
    rounds = 0
    spent = 0.0
    while True:
        t_round = 0.0
        for k, f in funcs.items():
            t, _ = _timed(f)
            best[k] = min(best[k], t)
            t_round += t
        rounds += 1
        spent += t_round
        if rounds >= repeat or spent + t_round > budget:
            break
    best["_rounds"] = rounds
    return best


# ----------------------------------------------------------------------------
# machine


def machine_info() -> dict:
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        model = platform.processor() or "unknown"
    blas = []
    try:
        from threadpoolctl import threadpool_info
        for lib in threadpool_info():
            if lib.get("user_api") == "blas":
                blas.append({k: lib.get(k) for k in
                             ("internal_api", "version", "num_threads", "threading_layer",
                              "architecture", "filepath")})
    except ImportError:
        pass
    import numba
    return {
        "cpu_model": model,
        "simd": sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                                                 "avx512_vnni", "avx512_bf16", "amx_tile")),
        "cores_available": _ncores(),
        "cpu_count": os.cpu_count(),
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "blas": blas,
        "load_avg_start": list(os.getloadavg()),
    }


def sgemm_peak(n: int, repeat: int = 3) -> dict:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, n), dtype=np.float32)
    y = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    np.matmul(x, y, out=out)  # warm up the BLAS threads
    best = min(_timed(lambda: np.matmul(x, y, out=out))[0] for _ in range(repeat))
    return {"n": n, "best_s": best, "gflops": 2.0 * n ** 3 / best / 1e9}


# ----------------------------------------------------------------------------
# data


class Pool:
    """Distinct blocks of clustered unit vectors, generated once, served cyclically.

    Rows come from a mixture of `centres` directions with per-centre spreads from
    tight (pairs ~6 degrees apart, d ~ 0.03) to wide (~70 degrees, d ~ 0.4) and
    Zipf-like weights, plus a few percent of uniform background; unrelated centres
    sit ~90 degrees (d ~ 0.5) apart. So counts are non-trivial at every radius.
    """

    def __init__(self, dim: int, block_rows: int, n_blocks: int, seed: int, centres: int = 300):
        self.dim, self.block_rows, self.seed = dim, block_rows, seed
        rng = np.random.default_rng([seed, 0])
        c = rng.standard_normal((centres, dim))
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        # spread sigma per coordinate: the offset from the centre is ~ atan(sigma sqrt(D))
        self.sigma = np.exp(rng.uniform(np.log(0.07), np.log(1.4), centres)) / math.sqrt(dim)
        w = 1.0 / np.arange(1, centres + 1) ** 0.8
        self.weights = rng.permutation(w / w.sum())
        self.blocks = [self.sample(block_rows, stream=1 + k) for k in range(n_blocks)]

    def sample(self, n: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream])
        lab = rng.choice(len(self.centres), size=n, p=self.weights)
        x = self.centres[lab] + self.sigma[lab, None] * rng.standard_normal((n, self.dim))
        bg = rng.random(n) < 0.03  # uniform background
        x[bg] = rng.standard_normal((int(bg.sum()), self.dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)

    def blocks_for(self, n_rows: int) -> list:
        """(offset, block) pairs covering global rows [0, n_rows): pool blocks in turn."""
        out = []
        off = 0
        k = 0
        while off < n_rows:
            b = self.blocks[k % len(self.blocks)]
            b = b[: min(len(b), n_rows - off)]
            out.append((off, b))
            off += len(b)
            k += 1
        return out

    def rows(self, n_rows: int) -> np.ndarray:
        """The first n_rows rows as one array (for the self-join set S)."""
        return np.concatenate([b for _, b in self.blocks_for(n_rows)])


# ----------------------------------------------------------------------------
# the timed computations


_blas_ctl = None


def _one_thread_blas():
    global _blas_ctl
    if _blas_ctl is None:
        from threadpoolctl import ThreadpoolController
        _blas_ctl = ThreadpoolController()
    return _blas_ctl.limit(limits=1, user_api="blas")


GEMM_VARIANTS = ("block", "tile", "workers")


def gemm_variants(A: np.ndarray, blocks: list, names=GEMM_VARIANTS) -> dict:
    """Ways to compute every A @ B.T of the join with numpy (results discarded).

    The floor is the fastest of them: `block` is A-tile @ whole block.T (the
    literal shape), `tile` cuts the block into 2048-row tiles so the output stays
    in cache, `workers` is join's own plan (one thread per core, each with
    single-threaded BLAS on 512 x 2048 tiles). Anchors are cut into tiles of
    1024 rows so the output buffer stays bounded for large anchor sets.
    """
    a = A.shape[0]
    at = min(a, 1024)
    max_rows = max(len(b) for _, b in blocks)

    def tiled(rt):
        buf = np.empty((at, min(rt, max_rows)), dtype=np.float32)

        def run():
            for _, b in blocks:
                for c0 in range(0, len(b), rt):
                    bt = b[c0:c0 + rt]
                    for r0 in range(0, a, at):
                        ar = A[r0:r0 + at]
                        np.matmul(ar, bt.T, out=buf[:len(ar), :len(bt)])
        return run

    def workers():
        tiles = [(b, r0, c0) for _, b in blocks for c0 in range(0, len(b), 2048)
                 for r0 in range(0, a, 512)]
        it = iter(tiles)
        lock = threading.Lock()

        def work():
            buf = np.empty((512, 2048), dtype=np.float32)
            while True:
                with lock:
                    t = next(it, None)
                if t is None:
                    return
                b, r0, c0 = t
                ar, bt = A[r0:r0 + 512], b[c0:c0 + 2048]
                np.matmul(ar, bt.T, out=buf[:len(ar), :len(bt)])

        n = _ncores()
        with _one_thread_blas(), ThreadPoolExecutor(n) as ex:
            for f in [ex.submit(work) for _ in range(n)]:
                f.result()

    every = {"block": tiled(max_rows), "tile": tiled(2048), "workers": workers}
    return {f"gemm_{k}": every[k] for k in names}


def time_vs_floor(A, blocks, fast, repeat, budget, variants=GEMM_VARIANTS) -> dict:
    """GEMM floor (best variant) and the fast kernel, interleaved; times in seconds."""
    funcs = gemm_variants(A, blocks, variants)
    funcs["fast"] = fast
    best = _best_interleaved(funcs, repeat, budget)
    variants = {k: best[k] for k in funcs if k.startswith("gemm_")}
    floor_name = min(variants, key=variants.get)
    n_scores = A.shape[0] * sum(len(b) for _, b in blocks)
    flops = 2.0 * n_scores * A.shape[1]
    return {
        "scores": n_scores,
        "gemm_floor_s": variants[floor_name],
        "gemm_floor_variant": floor_name,
        "gemm_variants_s": variants,
        "gemm_gflops": flops / variants[floor_name] / 1e9,
        "fast_s": best["fast"],
        "fast_over_gemm": best["fast"] / variants[floor_name],
        "fast_ns_per_score": best["fast"] / n_scores * 1e9,
        "rounds": best["_rounds"],
    }


def bucketize_counts(A, blocks, radii, dtype=np.float32, tile=2048) -> np.ndarray:
    """(c) numpy: GEMM tile, np.searchsorted into the thresholds, one offset bincount per tile."""
    thr = join.radius_thresholds(radii)  # decreasing with the radius
    asc = np.ascontiguousarray(thr[::-1]).astype(dtype)
    A_ = A.astype(dtype, copy=False)
    a, R = A.shape[0], len(radii)
    offs = (np.arange(a, dtype=np.int64) * (R + 1))[:, None]
    hist = np.zeros(a * (R + 1), dtype=np.int64)
    for _, b in blocks:
        b_ = b.astype(dtype, copy=False)
        for c0 in range(0, len(b_), tile):
            sims = A_ @ b_[c0:c0 + tile].T
            # bins = #thresholds <= score = #radii the pair is within
            bins = np.searchsorted(asc, sims, side="right")
            bins += offs
            hist += np.bincount(bins.ravel(), minlength=a * (R + 1))
    hist = hist.reshape(a, R + 1)
    # counts[:, k] = #{bins >= R - k}
    return np.cumsum(hist[:, ::-1], axis=1)[:, :R]


def faiss_counts(A, blocks, radii, chunk=32768) -> np.ndarray:
    """(d) faiss: IndexFlatIP range search at the largest radius, then count every radius.

    Each chunk of rows gets its own index, which bounds the result memory: at
    d = 0.5 (score > cos(pi/2) = 0) a range search returns about half the rows.
    """
    import faiss
    thr = join.radius_thresholds(radii)
    asc = np.ascontiguousarray(thr[::-1]).astype(np.float32)
    a, R = A.shape[0], len(radii)
    A32 = np.ascontiguousarray(A, dtype=np.float32)
    rows = np.arange(a, dtype=np.int64) * (R + 1)
    hist = np.zeros(a * (R + 1), dtype=np.int64)
    for _, b in blocks:
        for c0 in range(0, len(b), chunk):
            index = faiss.IndexFlatIP(A.shape[1])
            index.add(np.ascontiguousarray(b[c0:c0 + chunk]))
            lims, scores, _ = index.range_search(A32, float(thr[-1]))
            bins = np.searchsorted(asc, scores, side="right")
            bins += np.repeat(rows, np.diff(lims).astype(np.int64))
            hist += np.bincount(bins, minlength=a * (R + 1))
            del index, scores, bins
    hist = hist.reshape(a, R + 1)
    return np.cumsum(hist[:, ::-1], axis=1)[:, :R]


def sklearn_counts(A, blocks, radii, chunk=16384) -> np.ndarray:
    """(e) scikit-learn brute-force radius_neighbors at the euclidean twin of the largest
    radius (|a - b| = sqrt(2 - 2 cos(pi d)) for unit vectors), then count every radius."""
    from sklearn.neighbors import NearestNeighbors
    thr = join.radius_thresholds(radii)
    e = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * thr))  # increasing with the radius
    a, R = A.shape[0], len(radii)
    rows = np.arange(a, dtype=np.int64) * (R + 1)
    hist = np.zeros(a * (R + 1), dtype=np.int64)
    for _, b in blocks:
        for c0 in range(0, len(b), chunk):
            nn = NearestNeighbors(radius=float(e[-1]), algorithm="brute").fit(b[c0:c0 + chunk])
            dist, _ = nn.radius_neighbors(A, return_distance=True)
            lens = np.fromiter((len(x) for x in dist), dtype=np.int64, count=a)
            d = np.concatenate(dist) if lens.sum() else np.zeros(0)
            # bins = #radii the pair is NOT within: radius k holds iff k >= bins
            bins = np.searchsorted(e, d, side="left")
            bins += np.repeat(rows, lens)
            hist += np.bincount(bins, minlength=a * (R + 1))
            del dist, d, bins
    hist = hist.reshape(a, R + 1)
    return np.cumsum(hist, axis=1)[:, :R]


# ----------------------------------------------------------------------------
# the run


def _baseline(name, func, A, pool, n_rows, radii, exact_counts, note):
    """Time one slow baseline on the first n_rows rows; compare its counts with the exact ones."""
    blocks = pool.blocks_for(n_rows)
    try:
        t, counts = _timed(lambda: func(A, blocks, radii))
    except ImportError as exc:
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    ref = exact_counts(n_rows)
    diff = np.abs(counts - ref)
    scores = A.shape[0] * n_rows
    return {
        "rows": n_rows,
        "time_s": t,
        "ns_per_score": t / scores * 1e9,
        "method": note,
        "counts_differing": int(np.count_nonzero(diff)),
        "counts_total": int(diff.size),
        "max_abs_diff": int(diff.max()),
        # float32 rounding may flip a handful of pairs near a threshold; more than
        # that means the baseline computes something else and its timing is moot.
        "agrees": bool(diff.max() <= max(5, 1e-4 * ref.max())),
    }


def run(args) -> dict:
    t_start = time.perf_counter()
    res: dict = {"mode": "quick" if args.quick else "full",
                 "args": {k: v for k, v in vars(args).items() if k != "json"}}
    out = print

    # --- machine -----------------------------------------------------------
    mach = machine_info()
    res["machine"] = mach
    out(f"# modeaudit range-join benchmark ({res['mode']} mode)")
    out(f"cpu       {mach['cpu_model']}  [{' '.join(mach['simd'])}]")
    out(f"cores     {mach['cores_available']} available (os.cpu_count {mach['cpu_count']}), "
        f"{mach['mem_total_gb']} GiB RAM")
    for b in mach["blas"]:
        out(f"blas      {b['internal_api']} {b['version']} ({b.get('architecture')}, "
            f"{b['num_threads']} threads, {b.get('threading_layer')})")
    out(f"versions  python {mach['python']}, numpy {mach['numpy']}, numba {mach['numba']} "
        f"({mach['numba_threads']} threads)")
    load = mach["load_avg_start"][0]
    if load > 0.5 * mach["cores_available"]:
        out(f"WARNING   load average {load:.2f} on {mach['cores_available']} cores before the run: "
            "another process is using the CPU, every time below is inflated and noisy")
    peak = sgemm_peak(args.peak_n)
    res["machine"]["sgemm_peak"] = peak
    out(f"sgemm     {peak['n']}^3 float32 matmul, best of 3: {peak['best_s']:.3f} s = "
        f"{peak['gflops']:.1f} GFLOP/s")
    res["rss_mb"] = {"machine": _rss_mb()}

    # --- data --------------------------------------------------------------
    radii = join.DEFAULT_RADII
    R = len(radii)
    sizes = sorted(args.sizes)
    need = max(sizes + [args.subset_rows, args.faiss_rows, args.sklearn_rows,
                        args.selfjoin_m, args.mccs_points])
    n_blocks = max(1, min(args.pool_blocks, -(-need // args.block_rows)))
    t_gen, pool = _timed(lambda: Pool(args.dim, args.block_rows, n_blocks, args.seed))
    A = pool.sample(args.anchors, stream=1_000_001)
    out(f"data      clustered unit vectors, D={args.dim}, pool of {n_blocks} distinct blocks x "
        f"{len(pool.blocks[0]):,} rows (generated in {t_gen:.1f} s, not timed), seed {args.seed}")

    # compile / load the numba cache, warm the thread pools (not timed)
    w = pool.blocks[0][:4096]
    KERNEL.range_counts(A[:16], [(0, w)], radii)
    KERNEL.range_counts(w[:64], [(0, w)], [SELF_JOIN_RADIUS], anchor_ids=np.arange(64))
    KERNEL.mccs_sums(A[:16], [(0, w)], MCCS_THETA)

    # --- 1 + 2: anchor curves ------------------------------------------------
    out("")
    out(f"## 1. anchor curves: a={args.anchors} anchors x M rows, D={args.dim}, float32, "
        f"{R} radii {radii[0]:.2f}..{radii[-1]:.2f}, row blocks of {args.block_rows:,}")
    per_size = []
    for M in sizes:
        blocks = pool.blocks_for(M)
        r = time_vs_floor(A, blocks, lambda: KERNEL.range_counts(A, blocks, radii),
                          args.repeat, args.budget, args.gemm_variants)
        r["M"] = M
        per_size.append(r)

    # exact counts of the fast kernel on the first n rows (not timed)
    exact_cache: dict = {}

    def exact_counts(n):
        if n not in exact_cache:
            exact_cache[n] = KERNEL.range_counts(A, pool.blocks_for(n), radii)
        return exact_cache[n]

    cap = max(sizes)
    sub_c = min(args.subset_rows, cap)
    sub_d = min(args.faiss_rows, cap)
    sub_e = min(args.sklearn_rows, cap)
    base = {
        "bucketize": _baseline("bucketize", bucketize_counts, A, pool, sub_c, radii, exact_counts,
                               "float32 A @ B.T per 2048-row tile, np.searchsorted(thresholds), "
                               "one offset np.bincount per tile"),
        "faiss": _baseline("faiss", faiss_counts, A, pool, sub_d, radii, exact_counts,
                           "faiss.IndexFlatIP per 32768-row chunk, range_search(anchors, "
                           "cos(pi*0.5)), np.searchsorted + offset np.bincount of the scores"),
        "sklearn": _baseline("sklearn", sklearn_counts, A, pool, sub_e, radii, exact_counts,
                             "NearestNeighbors(radius=sqrt(2-2cos(pi*0.5)), algorithm='brute') "
                             "per 16384-row chunk, radius_neighbors(return_distance=True), "
                             "np.searchsorted + offset np.bincount of the distances"),
    }

    # exactness: the fast kernel against the same numpy pipeline in float64
    blocks_c = pool.blocks_for(sub_c)
    t64, c64 = _timed(lambda: bucketize_counts(A, blocks_c, radii, dtype=np.float64))
    fast_c = exact_counts(sub_c)
    n_bad = int(np.count_nonzero(fast_c != c64))
    assert n_bad == 0, (f"fast range_counts differ from the float64 numpy bucketize in {n_bad} of "
                        f"{c64.size} counts on the first {sub_c} rows")
    exact = {"rows": sub_c, "counts_compared": int(c64.size), "counts_exact": True,
             "reference": "numpy bucketize + bincount in float64 (same pipeline as (c))",
             "reference_time_s": t64,
             "float32_bucketize_counts_differing": base["bucketize"].get("counts_differing"),
             "float32_bucketize_max_abs_diff": base["bucketize"].get("max_abs_diff")}
    # how non-trivial the counts are (fraction of anchors with a neighbour, median count)
    probe = {f"{radii[k]:.2f}": {"frac_nonzero": float(np.mean(fast_c[:, k] > 0)),
                                 "median": float(np.median(fast_c[:, k]))}
             for k in (0, R // 4, R // 2, R - 1)}

    for r in per_size:
        M = r["M"]
        for k, b in base.items():
            if "time_s" in b:
                est = b["time_s"] * M / b["rows"]
                r[f"{k}_est_s"] = est
                r[f"speedup_vs_{k}"] = est / r["fast_s"]

    hdr = (f"{'M':>6} {'scores':>8} {'GEMM floor':>10} {'fast':>8} {'fast/GEMM':>9} {'ns/score':>8} "
           f"{'GFLOP/s':>7} | {'(c) bucketize':>13} {'(d) faiss':>10} {'(e) sklearn':>11} | "
           f"{'x(c)':>6} {'x(d)':>6} {'x(e)':>6}")
    out("times in seconds; (a) GEMM floor = fastest numpy sgemm of the same shapes "
        "(variant in brackets); (c)-(e) est. = measured on the first rows, scaled linearly to M")
    out(hdr)
    out("-" * len(hdr))

    def cell(r, k, w, fmt):
        v = r.get(k)
        return f"{v:{w}{fmt}}" if v is not None else f"{'n/a':>{w}}"

    for r in per_size:
        out(f"{_fmt_rows(r['M']):>6} {r['scores']:8.2e} {r['gemm_floor_s']:10.3f} {r['fast_s']:8.3f} "
            f"{r['fast_over_gemm']:9.2f} {r['fast_ns_per_score']:8.3f} {r['gemm_gflops']:7.1f} | "
            f"{cell(r, 'bucketize_est_s', 13, '.1f')} {cell(r, 'faiss_est_s', 10, '.1f')} "
            f"{cell(r, 'sklearn_est_s', 11, '.1f')} | {cell(r, 'speedup_vs_bucketize', 6, '.1f')} "
            f"{cell(r, 'speedup_vs_faiss', 6, '.1f')} {cell(r, 'speedup_vs_sklearn', 6, '.1f')}")
    for r in per_size:
        v = r["gemm_variants_s"]
        out(f"  M={_fmt_rows(r['M'])}: floor variant {r['gemm_floor_variant']}; "
            + ", ".join(f"{k[5:]} {t:.3f}" for k, t in v.items()) + f"; {r['rounds']} round(s)")
    out("baselines (measured on the first rows only, then scaled):")
    for k, b in base.items():
        if "skipped" in b:
            out(f"  ({'cde'[list(base).index(k)]}) {k}: skipped ({b['skipped']})")
            continue
        out(f"  ({'cde'[list(base).index(k)]}) {k}: {b['rows']:,} rows in {b['time_s']:.2f} s "
            f"= {b['ns_per_score']:.2f} ns/score; counts off from exact in {b['counts_differing']} "
            f"of {b['counts_total']} (max |diff| {b['max_abs_diff']})"
            + ("" if b["agrees"] else "  ** DISAGREES: check the baseline **"))
        out(f"      {b['method']}")
    out(f"counts exact: fast range_counts == numpy bucketize in float64 on the first {sub_c:,} rows "
        f"({c64.size:,} counts); the float32 bucketize (c) is off in "
        f"{exact['float32_bucketize_counts_differing']} of them")
    out("counts per anchor on the first rows (fraction nonzero / median): "
        + ", ".join(f"d={k}: {v['frac_nonzero']:.2f} / {v['median']:.0f}" for k, v in probe.items()))
    last = per_size[-1]
    out(f"targets at M={_fmt_rows(last['M'])}: fast/GEMM {last['fast_over_gemm']:.2f} (<= 2); "
        f"x(c) {last.get('speedup_vs_bucketize', float('nan')):.1f}, "
        f"x(d) {last.get('speedup_vs_faiss', float('nan')):.1f} (>= 5)")
    res["curves"] = {"anchors": args.anchors, "dim": args.dim, "radii": [float(x) for x in radii],
                     "block_rows": args.block_rows, "sizes": per_size, "baselines": base,
                     "exact_check": exact, "counts_probe": probe,
                     "targets": {"fast_over_gemm_max": 2.0, "speedup_vs_bucketize_min": 5.0,
                                 "speedup_vs_faiss_min": 5.0}}
    res["rss_mb"]["curves"] = _rss_mb()

    # scaling
    out("")
    out("## 2. scaling of the fast kernel with M")
    for r in per_size:
        out(f"  M={_fmt_rows(r['M']):>6}: {r['fast_s']:8.3f} s  ({r['fast_ns_per_score']:.3f} ns/score)")
    scaling = {"times_s": {str(r["M"]): r["fast_s"] for r in per_size}}
    if len(per_size) >= 2:
        p, q = per_size[-2], per_size[-1]
        size_ratio = q["M"] / p["M"]
        scaling.update({"from_M": p["M"], "to_M": q["M"], "size_ratio": size_ratio,
                        "time_ratio": q["fast_s"] / p["fast_s"], "time_ratio_max": 1.1 * size_ratio})
        out(f"  time({_fmt_rows(q['M'])}) / time({_fmt_rows(p['M'])}) = {scaling['time_ratio']:.2f} "
            f"for {size_ratio:g}x the rows (target <= {1.1 * size_ratio:.3g})")
    else:
        out("  (one size only: no ratio)")
    res["scaling"] = scaling
    res["rss_mb"]["scaling"] = _rss_mb()

    # --- 3: self-join --------------------------------------------------------
    m = args.selfjoin_m
    out("")
    out(f"## 3. self-join: S = {m:,} rows x itself, 1 radius (d0 = {SELF_JOIN_RADIUS}), "
        "anchor_ids = arange(m)")
    S = pool.rows(m)
    s_blocks = [(o, S[o:o + args.block_rows]) for o in range(0, m, args.block_rows)]
    ids = np.arange(m)
    box = {}

    def selfjoin():
        box["c"] = KERNEL.range_counts(S, s_blocks, [SELF_JOIN_RADIUS], anchor_ids=ids)

    sj = time_vs_floor(S, s_blocks, selfjoin, args.repeat, args.budget, args.gemm_variants)
    sj.update({"m": m, "radius": SELF_JOIN_RADIUS,
               "median_count": float(np.median(box["c"])), "max_count": int(box["c"].max())})
    out(f"  GEMM floor {sj['gemm_floor_s']:.3f} s ({sj['gemm_floor_variant']}, "
        f"{sj['gemm_gflops']:.1f} GFLOP/s), fast {sj['fast_s']:.3f} s, fast/GEMM "
        f"{sj['fast_over_gemm']:.2f}, {sj['fast_ns_per_score']:.3f} ns/score; "
        f"counts median {sj['median_count']:.0f}, max {sj['max_count']}")
    res["self_join"] = sj
    del S, s_blocks, box
    res["rss_mb"]["self_join"] = _rss_mb()

    # --- 4: MCCS -------------------------------------------------------------
    na, nc = args.mccs_anchors, args.mccs_points
    out("")
    out(f"## 4. MCCS sums: |A| = {na:,} x |C| = {nc:,}, theta = {MCCS_THETA}")
    Am = pool.sample(na, stream=1_000_002)  # not in C
    c_blocks = pool.blocks_for(nc)
    box = {}

    def mccs():
        box["s"] = KERNEL.mccs_sums(Am, c_blocks, MCCS_THETA)

    mc = time_vs_floor(Am, c_blocks, mccs, args.repeat, args.budget, args.gemm_variants)
    mc.update({"anchors": na, "points": nc, "theta": MCCS_THETA,
               "frac_anchors_nonzero": float(np.mean(box["s"] > 0))})
    out(f"  GEMM floor {mc['gemm_floor_s']:.3f} s ({mc['gemm_floor_variant']}, "
        f"{mc['gemm_gflops']:.1f} GFLOP/s), fast {mc['fast_s']:.3f} s, fast/GEMM "
        f"{mc['fast_over_gemm']:.2f}, {mc['fast_ns_per_score']:.3f} ns/score; "
        f"{mc['frac_anchors_nonzero']:.2f} of anchors have a nonzero sum")
    res["mccs"] = mc
    del Am, box
    res["rss_mb"]["mccs"] = _rss_mb()

    # --- 5: memory -----------------------------------------------------------
    out("")
    out("## 5. peak RSS of this process (high-water mark, MiB) after each section")
    out("  " + ", ".join(f"{k} {v:.0f}" for k, v in res["rss_mb"].items()))
    out(f"  (the data pool alone holds {sum(b.nbytes for b in pool.blocks) / 2 ** 20:.0f} MiB)")

    res["machine"]["load_avg_end"] = list(os.getloadavg())
    res["wall_s"] = time.perf_counter() - t_start
    out(f"\ntotal wall time {res['wall_s']:.1f} s; load average at the end "
        f"{res['machine']['load_avg_end'][0]:.2f}")
    return res


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Defaults marked (mode) differ between --quick and the full run: "
                                        f"full {FULL}, quick {QUICK}.")
    ap.add_argument("--quick", action="store_true", help="small sizes, < 1 min (what the test uses)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--kernel", default="fast", help="kernel measured as (b): fast, torch-cuda (GPU), torch-cpu")
    ap.add_argument("--anchors", type=int, default=1001)
    ap.add_argument("--sizes", type=str, default=None,
                    help="comma-separated row counts M of T, e.g. 1e5,1e6,1e7 (mode)")
    ap.add_argument("--json", metavar="OUT", default=None, help="write every figure to this JSON file")
    ap.add_argument("--block-rows", type=int, default=65536, help="rows per streamed block of T")
    ap.add_argument("--pool-blocks", type=int, default=None, help="distinct pre-generated blocks (mode)")
    ap.add_argument("--subset-rows", type=_parse_size, default=None,
                    help="rows for (c) bucketize and the exactness check (mode)")
    ap.add_argument("--faiss-rows", type=_parse_size, default=None, help="rows for (d) faiss (mode)")
    ap.add_argument("--sklearn-rows", type=_parse_size, default=None, help="rows for (e) sklearn (mode)")
    ap.add_argument("--selfjoin-m", type=_parse_size, default=None, help="self-join set size m (mode)")
    ap.add_argument("--mccs-anchors", type=_parse_size, default=None, help="MCCS |A| (mode)")
    ap.add_argument("--mccs-points", type=_parse_size, default=None, help="MCCS |C| (mode)")
    ap.add_argument("--repeat", type=int, default=None, help="best of this many rounds (mode)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds per measurement after which no further round starts (mode)")
    ap.add_argument("--peak-n", type=int, default=None, help="matrix size of the sgemm peak (mode)")
    ap.add_argument("--gemm-variants", default=None,
                    help="GEMM floor variants to time, the floor is the fastest: any of "
                         "block,tile,workers (mode; quick skips tile, the slowest here)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        args.sizes = sorted({_parse_size(s) for s in str(args.sizes).split(",") if s.strip()})
    except argparse.ArgumentTypeError as exc:
        _parser().error(str(exc))
    if not args.sizes:
        _parser().error("--sizes is empty")
    args.gemm_variants = tuple(v.strip() for v in str(args.gemm_variants).split(",") if v.strip())
    bad = [v for v in args.gemm_variants if v not in GEMM_VARIANTS]
    if bad or not args.gemm_variants:
        _parser().error(f"--gemm-variants: choose from {','.join(GEMM_VARIANTS)}, got {bad or 'none'}")
    return args


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def main(argv=None) -> dict:
    args = parse_args(argv)
    KERNEL.name = backend.resolve_kernel(args.kernel)
    res = _jsonable(run(args))
    res["kernel"] = KERNEL.name
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
        print(f"figures written to {args.json}")
    return res


if __name__ == "__main__":
    main()
