"""Study of `modeaudit compare`'s statistics: false-positive rate on pairs of collapse-free runs, power on
planted-vs-null pairs (docs/statistics.md, "Comparing two runs").

Each run is generated the way an audit generates it (tasks/models/shards.embed_rows: streams "S" and "T" of the
run's seed), its distinct dense modes are chosen on S as the audit chooses them (exact self counts at d0, then
tasks/stats/modes.distinct_modes), and the pair goes through tasks/stats/compare.compare_runs, the function the
CLI calls. Usage: python benchmarks/study_compare.py [--pairs 50] [--m 2000] [--M 20000]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import stats

from modeaudit.tasks.join.kernels import range_counts
from modeaudit.tasks.models.generators import GENERATORS
from modeaudit.tasks.models.shards import embed_rows
from modeaudit.tasks.stats.compare import compare_runs
from modeaudit.tasks.stats.modes import distinct_modes

D0, THETA, ALPHA, K = 0.25, 0.3, 0.05, 10


def run(spec: str, seed: int, m: int, M: int, **opts) -> dict:
    gen = {"spec": spec, "options": GENERATORS.resolve_options(spec, opts)}
    desc = {"spec": "identity", "options": {}}
    S = np.asarray(embed_rows(gen, desc, seed, "S", 0, m)[1], np.float32)
    T = np.asarray(embed_rows(gen, desc, seed, "T", 0, M)[1], np.float32)
    counts = range_counts(S, S, [D0], anchor_ids=np.arange(m))[:, 0]
    modes = distinct_modes(S, counts, K, D0)
    return {"S": S, "T": T, "modes": modes}


def compare(a: dict, b: dict, replicates: int) -> dict:
    return compare_runs(a["S"][a["modes"]], b["S"][b["modes"]], a["T"], b["T"], d0=D0, alpha=ALPHA,
                        worst_a=a["S"][a["modes"][0]], worst_b=b["S"][b["modes"][0]], n_c_a=len(a["T"]),
                        n_c_b=len(b["T"]), theta=THETA, replicates=replicates, seed=0, fd_rows=5000)


def ci(k: int, n: int) -> list[float]:
    r = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return [round(r.low, 4), round(r.high, 4)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--m", type=int, default=2000)
    ap.add_argument("--M", type=int, default=20000)
    ap.add_argument("--replicates", type=int, default=200)
    args = ap.parse_args()
    t0 = time.time()
    rows = {}
    settings = [("null vs null", None), ("null vs planted p=0.02", 0.02), ("null vs planted p=0.005", 0.005),
                ("null vs planted p=0.003", 0.003)]
    for name, prob in settings:
        calls = {"A": 0, "B": 0, None: 0}
        mccs_pos = 0
        for i in range(args.pairs):
            a = run("synthetic:null", 1000 + i, args.m, args.M)
            if prob is None:
                b = run("synthetic:null", 5000 + i, args.m, args.M)
            else:
                b = run("synthetic:planted", 5000 + i, args.m, args.M, planted_prob=prob)
            r = compare(a, b, args.replicates)
            calls[r["more_collapsed"]] += 1
            mccs_pos += r["mccs"]["interval"][0] > 0
        n = args.pairs
        declared = calls["A"] + calls["B"]
        rows[name] = {"pairs": n, "declared_A": calls["A"], "declared_B": calls["B"],
                      "rate_declared": declared / n, "rate_declared_ci95": ci(declared, n),
                      "rate_B": calls["B"] / n, "rate_B_ci95": ci(calls["B"], n),
                      "mccs_interval_above_0": mccs_pos / n}
        print(name, json.dumps(rows[name]), flush=True)
    print(json.dumps({"m": args.m, "M": args.M, "pairs": args.pairs, "alpha": ALPHA, "modes": K, "d0": D0,
                      "seconds": round(time.time() - t0, 1), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
