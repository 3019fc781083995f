"""GPU benchmark of the torch range join against the card's own fp16 GEMM, in one run.

    python benchmarks/bench_gpu.py --json out.json                # on a CUDA machine
    python benchmarks/bench_gpu.py --device cpu --quick           # the harness itself, on any machine

Prints, for each embedding width D (default 128 and 512):
  * the card's dense fp16 tensor-core peak, measured here (best of a few n^3 matmuls
    with float32 accumulation), the reference every ratio is taken against;
  * the GEMM floor of the join's shapes: anchors (1001 x D) @ each block.T, fp16 in,
    float32 out, blocks already on the device;
  * the join (tasks/join/torch_kernels.py through tasks/join/backend.py, counts for 41 radii,
    exact), its blocks coming from host memory as the audit feeds them;
  * join / GEMM floor, and the join's GEMM-equivalent rate (2 a M D / time) as a
    fraction of the measured peak (issue target at D = 512: above 40%).
The counts of the timed join are checked against the numba kernel on the first block.
Benchmarks are not tests: tests/test_bench_gpu.py runs this harness on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from modeaudit.tasks.join import kernels as join  # noqa: E402


def _sync(torch, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _best(f, repeat, torch, dev):
    f()  # warm-up (kernels, allocator, cuBLAS heuristics)
    _sync(torch, dev)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        _sync(torch, dev)
        best = min(best, time.perf_counter() - t)
    return best


def gemm_peak(torch, dev, n: int, repeat: int) -> dict:
    """Dense n^3 matmul rate: fp16 in / fp32 accumulate on CUDA, float32 on the CPU."""
    dt = torch.float16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)
    t = _best(lambda: torch.mm(a, b), repeat, torch, dev)
    return {"n": n, "dtype": str(dt), "best_s": t, "tflops": 2.0 * n ** 3 / t / 1e12}


def unit_rows(rng, n, d, centres):
    """Clustered unit rows as float16 (the run store's dtype): counts are non-trivial at every radius."""
    c = centres[rng.integers(0, len(centres), n)]
    x = c + rng.standard_normal((n, d), dtype=np.float32) * rng.choice([0.3, 0.6, 1.0], n)[:, None] / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def one_width(torch, dev, kernel, d, anchors, M, block_rows, repeat, peak, seed) -> dict:
    """GEMM floor and join time for one width D; blocks cycle through a pool to reach M rows."""
    from modeaudit.tasks.join import backend
    rng = np.random.default_rng([seed, d])
    centres = rng.standard_normal((300, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    A = unit_rows(rng, anchors, d, centres)
    n_pool = max(1, min(4, -(-M // block_rows)))
    pool = [unit_rows(rng, block_rows, d, centres) for _ in range(n_pool)]
    blocks = []
    off = 0
    while off < M:
        b = pool[len(blocks) % n_pool][:M - off]
        blocks.append((off, b))
        off += len(b)
    radii = join.DEFAULT_RADII

    # GEMM floor: the same products, blocks resident on the device (pure compute).
    dt = torch.float16 if dev.type == "cuda" else torch.float32
    A_d = torch.from_numpy(A.astype(np.float32)).to(dev, dt)
    pool_d = [torch.from_numpy(b.astype(np.float32)).to(dev, dt) for b in pool]

    from modeaudit.tasks.join.torch_kernels import _mm_f16_f32, _mm_out_dtype_supported
    if dev.type == "cuda" and _mm_out_dtype_supported(dev):
        mm = _mm_f16_f32                              # fp16 in, fp32 accumulate and out: what the join runs
    else:
        mm = lambda a, b: torch.mm(a, b.T)            # noqa: E731

    def floor():
        for i, (_, b) in enumerate(blocks):
            mm(A_d, pool_d[i % n_pool][:len(b)])
    t_floor = _best(floor, repeat, torch, dev)

    run = lambda: backend.range_counts(A, blocks, radii, kernel=kernel)  # noqa: E731
    t_join = _best(run, repeat, torch, dev)
    got = backend.range_counts(A, blocks[:1], radii, kernel=kernel)
    want = join.range_counts(A, blocks[:1], radii)
    assert np.array_equal(got, want), "torch join counts differ from the numba kernel's"
    flops = 2.0 * anchors * M * d
    return {"D": d, "anchors": anchors, "M": M, "block_rows": block_rows, "radii": len(radii),
            "gemm_floor_s": t_floor, "join_s": t_join, "join_over_gemm": t_join / t_floor,
            "gemm_floor_tflops": flops / t_floor / 1e12, "join_tflops_equiv": flops / t_join / 1e12,
            "join_fraction_of_peak": flops / t_join / 1e12 / peak["tflops"],
            "gemm_floor_fraction_of_peak": flops / t_floor / 1e12 / peak["tflops"],
            "counts_exact_first_block": True}


def main(argv=None) -> dict:
    """Run the benchmark; print a table and return (and optionally write) the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--anchors", type=int, default=1001)
    ap.add_argument("--M", type=float, default=1e7)
    ap.add_argument("--block-rows", type=int, default=1 << 20)
    ap.add_argument("--peak-n", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (checks the harness, not the speed)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.quick:
        a.M, a.block_rows, a.peak_n, a.anchors, a.repeat = 40_000, 16_384, 512, 64, 1
    import torch
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device visible; run on a GPU machine or pass --device cpu")
    dev = torch.device(a.device)
    kernel = "torch-cuda" if a.device == "cuda" else "torch-cpu"
    name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    peak = gemm_peak(torch, dev, a.peak_n, a.repeat + 2)
    print(f"# device {name}, torch {torch.__version__}; measured dense GEMM peak "
          f"({peak['dtype']}, {peak['n']}^3): {peak['tflops']:.1f} TFLOP/s")
    rows = [one_width(torch, dev, kernel, int(d), a.anchors, int(a.M), a.block_rows, a.repeat, peak, a.seed)
            for d in a.dims.split(",")]
    print(f"{'D':>5} {'M':>10} {'GEMM floor s':>12} {'join s':>8} {'join/GEMM':>9} {'join TFLOP/s':>12} "
          f"{'% of peak':>9}")
    for r in rows:
        print(f"{r['D']:>5} {r['M']:>10,} {r['gemm_floor_s']:>12.3f} {r['join_s']:>8.3f} "
              f"{r['join_over_gemm']:>9.2f} {r['join_tflops_equiv']:>12.1f} {100 * r['join_fraction_of_peak']:>8.1f}%")
    res = {"device": name, "torch": torch.__version__, "kernel": kernel, "peak": peak, "widths": rows,
           "args": vars(a)}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
