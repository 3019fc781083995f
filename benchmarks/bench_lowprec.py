"""Low-precision first pass of the join (kernel "lowprec") against the float32 join and the GEMM floors.

    nice -n 10 .venv/bin/python benchmarks/bench_lowprec.py [--quick] [--anchors 1001] [--rows 1e6]
                                                            [--threads 2] [--json OUT]

Everything is measured in one run, so the ratios compare like with like (the machine
is shared: absolute times move with its load, printed at start and end); the variants
of each section run interleaved (a, b, c, a, b, c, ...), so load changes hit all of them.

  1. GEMM floors at the join's shape (anchors x rows x D, in the join's 512 x 2048 score
     tiles, results discarded): numpy float32 sgemm (what "fast" runs), the same sgemm on
     bfloat16-rounded values (what "lowprec" runs on a CPU: the numerics of a bfloat16
     dot product with float32 accumulation), torch float32, torch bfloat16 (oneDNN; its
     output is bfloat16, the only bfloat16 GEMM torch's CPU build has: the floor a native
     bfloat16 first pass could reach here) and torch._int_mm (int8 in, int32 out).
  2. The join, 41 radii: range_counts kernel "fast" vs "lowprec", clustered and isotropic
     data; counts asserted equal, and MCCS sums (theta 0.3) asserted bit-identical.
  3. The re-check fraction: the share of pairs whose first-pass score lies within the
     rigorous bound of some threshold (these are re-scored in float64), for the float32
     bound, the bfloat16 bound lowprec uses (one per block), the bfloat16 bound per pair
     (row residuals), and int8 with per-row scales (per pair), on both data sets.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_join import Pool, _best_interleaved, machine_info  # noqa: E402

from modeaudit.tasks.join import kernels as join  # noqa: E402
from modeaudit.tasks.join import lowprec  # noqa: E402

A_TILE, B_TILE = 512, 2048  # the join's score tile (kernels._ANCHOR_TILE, _ROW_TILE)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def gemm_floors(A, blocks, repeat, threads):
    """Best seconds of each GEMM over all (anchor tile x row tile) products."""
    import torch
    torch.set_num_threads(threads)  # a benchmark process: its own setting, nobody else's
    out = np.empty((A_TILE, B_TILE), np.float32)

    def tiles(fa, fbs, mm):
        def run():
            for fb in fbs:
                for c in range(0, fb.shape[0], B_TILE):
                    bt = fb[c:c + B_TILE]
                    for r in range(0, fa.shape[0], A_TILE):
                        mm(fa[r:r + A_TILE], bt)
        return run

    def np_mm(a, b):
        np.matmul(a, b.T, out=out[:a.shape[0], :b.shape[0]])

    Aq, Bq = lowprec.to_bf16(A), [lowprec.to_bf16(b) for b in blocks]
    tA, tB = torch.from_numpy(A), [torch.from_numpy(b) for b in blocks]
    bA, bB = tA.bfloat16(), [b.bfloat16() for b in tB]
    s8 = lambda x: x / (np.abs(x).max(axis=1, keepdims=True) / 127)  # noqa: E731
    iA = torch.from_numpy(np.round(s8(A)).astype(np.int8))
    iBT = [torch.from_numpy(np.ascontiguousarray(np.round(s8(b)).astype(np.int8).T)) for b in blocks]
    t_out32 = torch.empty((A_TILE, B_TILE))
    t_out16 = torch.empty((A_TILE, B_TILE), dtype=torch.bfloat16)
    t_outi: dict = {}   # _int_mm wants a contiguous output: one per tile shape

    def t_mm(o):
        return lambda a, b: torch.matmul(a, b.T, out=o[:a.shape[0], :b.shape[0]])

    def int_mm(a, bT_cols):
        shape = (a.shape[0], bT_cols.shape[1])
        if shape not in t_outi:
            t_outi[shape] = torch.empty(shape, dtype=torch.int32)
        torch._int_mm(a, bT_cols, out=t_outi[shape])

    def int_tiles():
        for bT in iBT:
            for c in range(0, bT.shape[1], B_TILE):
                cols = bT[:, c:c + B_TILE].contiguous()   # _int_mm wants a contiguous (K, N) operand
                for r in range(0, iA.shape[0], A_TILE):
                    int_mm(iA[r:r + A_TILE], cols)

    funcs = {
        "numpy_fp32": tiles(A, blocks, np_mm),
        "numpy_fp32_on_bf16_values": tiles(Aq, Bq, np_mm),
        "torch_fp32": tiles(tA, tB, t_mm(t_out32)),
        "torch_bf16_bf16out": tiles(bA, bB, t_mm(t_out16)),
        "torch_int8_int32out": int_tiles,
    }
    for f in funcs.values():   # warm-up (thread pools, oneDNN's kernel selection)
        f()
    best = _best_interleaved(funcs, repeat, budget=math.inf)
    best.pop("_rounds")
    return best


def recheck_fractions(A, B, radii, sample_rows=8192):
    """Share of pairs within each rigorous bound of a threshold (first sample_rows rows of B)."""
    B = B[:sample_rows]
    A64, B64 = A.astype(np.float64), B.astype(np.float64)
    thr = join.radius_thresholds(radii)
    exact = A64 @ B64.T
    Aq, Bq = lowprec.to_bf16(A), lowprec.to_bf16(B)
    s_bf = (Aq @ Bq.T).astype(np.float64)
    s_32 = (A @ B.T).astype(np.float64)
    D = A.shape[1]

    def near(s, eps):
        i = np.searchsorted(-thr, -s)  # thresholds decrease
        lo = np.abs(s - thr[np.clip(i - 1, 0, thr.size - 1)])
        hi = np.abs(s - thr[np.clip(i, 0, thr.size - 1)])
        return float(np.mean(np.minimum(lo, hi) <= eps))

    ra, rb = (np.linalg.norm(x - q.astype(np.float64), axis=1) for x, q in ((A64, Aq), (B64, Bq)))
    nq_a, n_b = np.linalg.norm(Aq.astype(np.float64), axis=1), np.linalg.norm(B64, axis=1)
    acc = 2.0 * (D + 2) * 2.0 ** -24
    per_pair = ra[:, None] * np.linalg.norm(Bq.astype(np.float64), axis=1)[None, :] + \
        np.linalg.norm(A64, axis=1)[:, None] * rb[None, :] + acc * nq_a[:, None] * n_b[None, :] + 1e-12
    block = lowprec.bf16_eps(D, lowprec.row_stats(A, Aq), lowprec.row_stats(B, Bq))

    def q8(x):
        s = np.abs(x).max(axis=1, keepdims=True) / 127.0
        return np.round(x / s) * s

    qa, qb = q8(A64), q8(B64)
    i8 = np.linalg.norm(A64 - qa, axis=1)[:, None] * n_b[None, :] + \
        np.linalg.norm(qa, axis=1)[:, None] * np.linalg.norm(B64 - qb, axis=1)[None, :] + 1e-12
    s_i8 = qa @ qb.T
    c_mccs = math.cos(math.pi * 0.3)
    fp32_eps = join._gemm_eps(D, join._max_norm(A64), join._max_norm(B64))
    out = {
        "float32 (fast)": near(s_32, fp32_eps),
        "bfloat16, one bound per block (lowprec)": near(s_bf, block),
        "bfloat16, bound per pair": near(s_bf, per_pair),
        "int8 per-row scales, bound per pair": near(s_i8, i8),
        "eps_float32": fp32_eps, "eps_bf16_block": block, "eps_bf16_pair_median": float(np.median(per_pair)),
        "eps_int8_pair_median": float(np.median(i8)),
        "mccs_candidates_exact": float(np.mean(exact >= c_mccs)),
        "mccs_candidates_bf16": float(np.mean(s_bf >= c_mccs - block)),
    }
    assert np.all(np.abs(s_bf - exact) <= block), "bfloat16 bound violated"
    assert np.all(np.abs(s_i8 - exact) <= i8 + 1e-9), "int8 bound violated"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1e5 rows, one repeat (about a minute)")
    ap.add_argument("--anchors", type=int, default=1001)
    ap.add_argument("--rows", type=float, default=None, help="rows of T per data set (default 1e6; quick 1e5)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block-rows", type=int, default=65536, help="rows per streamed block of T")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the GEMM floors")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = int(a.rows or (1e5 if a.quick else 1e6))
    repeat = a.repeat or (1 if a.quick else 2)
    block_rows = a.block_rows
    info = machine_info()
    print(f"# {info['cpu_model']}, {info['cores_available']} cores, simd {' '.join(info['simd'])}, "
          f"load {info['load_avg_start']}")
    print(f"# {a.anchors} anchors x {rows:,} rows x {a.dim}-d, 41 radii, best of {repeat}")
    radii = join.DEFAULT_RADII
    pool = Pool(a.dim, block_rows, 4, seed=0)
    rng = np.random.default_rng(1)
    iso_blocks = [_unit(rng.standard_normal((block_rows, a.dim))) for _ in range(4)]
    data = {
        "clustered": (pool.sample(a.anchors, stream=99), pool.blocks),
        "isotropic": (_unit(rng.standard_normal((a.anchors, a.dim))), iso_blocks),
    }

    def stream(blocks):
        out, off, k = [], 0, 0
        while off < rows:
            b = blocks[k % len(blocks)][:rows - off]
            out.append((off, b))
            off += len(b)
            k += 1
        return out

    res = {"machine": info, "anchors": a.anchors, "rows": rows, "dim": a.dim, "repeat": repeat}
    A_c, blocks_c = data["clustered"]
    floors = gemm_floors(A_c, [b for _, b in stream(blocks_c)], repeat, a.threads)
    res["gemm_floor_s"] = floors
    print("\n## 1. GEMM floors (join's tile shape), seconds and ratio to numpy float32")
    for k, v in floors.items():
        print(f"  {k:28s} {v:8.3f} s   {v / floors['numpy_fp32']:5.2f}x")

    print("\n## 2. join (range_counts, 41 radii) and 3. re-check fraction")
    res["join_s"], res["recheck"] = {}, {}
    for name, (A, blocks) in data.items():
        st = stream(blocks)
        got = {}
        funcs = {k: (lambda k=k: got.__setitem__(k, join.range_counts(A, st, radii, kernel=k)))
                 for k in ("fast", "lowprec")}
        times = _best_interleaved(funcs, repeat, budget=math.inf)
        times.pop("_rounds")
        assert np.array_equal(got["fast"], got["lowprec"]), f"{name}: lowprec counts differ from fast"
        m = {k: join.mccs_sums(A, st[:2], 0.3, kernel=k) for k in ("fast", "lowprec")}
        assert m["fast"].tobytes() == m["lowprec"].tobytes(), f"{name}: MCCS sums differ"
        res["join_s"][name] = times
        fr = recheck_fractions(A, blocks[0], radii)
        res["recheck"][name] = fr
        print(f"  {name:10s} fast {times['fast']:7.3f} s ({times['fast'] / floors['numpy_fp32']:4.2f}x fp32 floor)"
              f"   lowprec {times['lowprec']:7.3f} s ({times['lowprec'] / times['fast']:4.2f}x fast)"
              f"   counts equal, MCCS sums bit-identical")
        for k, v in fr.items():
            if not k.startswith(("eps", "mccs")):
                print(f"      re-check fraction {k:40s} {100 * v:7.3f} %")
        print(f"      eps: float32 {fr['eps_float32']:.2e}, bf16 block {fr['eps_bf16_block']:.2e}, "
              f"bf16 pair median {fr['eps_bf16_pair_median']:.2e}, int8 pair median {fr['eps_int8_pair_median']:.2e};"
              f" MCCS candidates exact {100 * fr['mccs_candidates_exact']:.3f} %,"
              f" bf16 {100 * fr['mccs_candidates_bf16']:.3f} %")
    res["load_avg_end"] = list(os.getloadavg())
    print(f"\n# load at end {res['load_avg_end']}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
