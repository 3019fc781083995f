"""Where the GPU time of the exact k-NN metrics goes: each join timed on the device, then torch's profiler
over one self-join and one ball-count join, its operators ranked by device time and by host time.

    python benchmarks/profile_metrics_gpu.py [--n 1e5] [--d 128] [--k 5] [--json out.json]
    python benchmarks/profile_metrics_gpu.py --device cpu --n 3000     # the script itself, any machine

Same data as bench_metrics.py (real ~ N(0, I), fake ~ N(0.1, I), float32). The joins are the
ones `modeaudit metrics` runs with --kernel torch-cuda (tasks/metrics/knn_torch.py): the
symmetric self-join of each set and the R x F ball counts. Printed: seconds of each (synchronised,
after a warm-up on 2000 rows), pairs per second, and the profiler's top operators; the sha256 of
all outputs, to compare runs before and after a change to the kernels.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time


def main(argv=None) -> dict:
    """Time and profile the joins; print and return the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--n", default="1e5")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--profile-n", default=None, help="rows of the profiled joins (default: --n / 4)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    import numpy as np
    import torch
    from modeaudit.tasks.metrics.knn_torch import ball_counts_torch, knn_self_torch
    n, d, k = int(float(a.n)), a.d, a.k
    pn = int(float(a.profile_n)) if a.profile_n else max(2, n // 4)
    real = np.random.default_rng(1).standard_normal((n, d), dtype=np.float32)
    fake = np.random.default_rng(2).standard_normal((n, d), dtype=np.float32)
    fake += np.float32(0.1)
    dev = a.device

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def joins(r, f):
        t = [time.perf_counter()]
        kr = knn_self_torch(r, k, device=dev)
        sync()
        t.append(time.perf_counter())
        kf = knn_self_torch(f, k, device=dev)
        sync()
        t.append(time.perf_counter())
        c = ball_counts_torch(r, [(0, f)], kr[:, -1], kf[:, -1], device=dev)
        sync()
        t.append(time.perf_counter())
        return [t[i + 1] - t[i] for i in range(3)], (kr, kf, *c.as_tuple())

    joins(real[:2000], fake[:2000])      # CUDA context, kernels' first launches, allocator
    secs, out = joins(real, fake)
    h = hashlib.sha256()
    for x in out:
        h.update(np.ascontiguousarray(x).tobytes())
    pairs = (n * (n - 1) // 2, n * (n - 1) // 2, n * n)
    res = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
           "n": n, "d": d, "k": k, "seconds": dict(zip(("knn_self_real", "knn_self_fake", "ball_counts"), secs)),
           "pairs_per_s": dict(zip(("knn_self_real", "knn_self_fake", "ball_counts"),
                                   (p / s for p, s in zip(pairs, secs)))),
           "sha256": h.hexdigest()[:16]}
    print(f"# {res['device']}, torch {torch.__version__}; n={n} d={d} k={k}: knn_self(real) {secs[0]:.2f} s, "
          f"knn_self(fake) {secs[1]:.2f} s, ball_counts {secs[2]:.2f} s; "
          f"{sum(pairs) / sum(secs) / 1e9:.2f} G pairs/s; sha256 {res['sha256']}", flush=True)

    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    tables = {}
    for name, fn in (("knn_self", lambda: knn_self_torch(real[:pn], k, device=dev)),
                     ("ball_counts", lambda: ball_counts_torch(real[:pn], [(0, fake[:pn])], out[0][:pn, -1],
                                                               out[1][:pn, -1], device=dev))):
        with profile(activities=acts) as prof:
            fn()
            sync()
        ka = prof.key_averages()
        sort = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
        table = ka.table(sort_by=sort, row_limit=a.top)
        cpu_table = ka.table(sort_by="self_cpu_time_total", row_limit=a.top) if dev == "cuda" else ""
        print(f"\n## {name}, {pn} rows: operators by {sort}\n{table}", flush=True)
        if cpu_table:
            print(f"\n## {name}, {pn} rows: operators by host time\n{cpu_table}", flush=True)
        tables[name] = {"by_device": table, "by_host": cpu_table}
    res["profiles"] = tables
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
