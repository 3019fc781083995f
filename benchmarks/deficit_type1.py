"""Type-I error of the deficit test (tasks/stats/deficit.py) under H0, and what the held-out split buys.

Each replicate draws a reference set (n_ref rows) and T (n_t rows) from the SAME law, with fresh
seeds, and runs the audit's own step (tasks/stats/steps.deficit, in process, on .npy sources).
The family-wise rejection rate (any ball rejected after Holm) must stay at or below alpha; it is
reported with its exact 95 % interval. Beside it, the same balls tested the naive way (x_R counted
on the selection rows that chose them, no held-out rows) show why the split is there.

Laws (d0 = 0.25, k = 10 balls, the audit's defaults):

* ``ring8-rff``: toy:ring8's true law through the rff descriptor (h = 0.5): point-like modes.
* ``grid25-rff``: toy:grid25 (h = 1): 25 modes, more than k balls.
* ``ring8-imbalanced-rff``: ring8 with modes 10x rarer than others (h = 0.5).
* ``smooth-sphere``: one smooth bump on S^15 (a normal around a direction, normalised): no modes, the
  balls are chosen on sampling noise alone, the case where a selection bias would show most.

    nice -n 10 .venv/bin/python benchmarks/deficit_type1.py --replicates 300 --json benchmarks/deficit_type1.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import stats

D0, ALPHA, K = 0.25, 0.05, 10


def _law(name: str):
    """A function (n, rng) -> unit float32 rows, for each law of the study."""
    if name == "smooth-sphere":
        mu = np.zeros(16)
        mu[0] = 1.0

        def draw(n, rng):
            x = mu + 0.6 * rng.standard_normal((n, 16))
            return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        return draw
    from modeaudit.tasks.models.descriptors import DESCRIPTORS
    from modeaudit.tasks.toy.worlds import get_world
    world_name = name.removesuffix("-rff")
    world = get_world(world_name)
    desc = DESCRIPTORS.build("rff", {"bandwidth": 1.0 if world_name == "grid25" else 0.5})

    def draw(n, rng):
        return desc.embed(world.sample(n, int(rng.integers(2 ** 31))))
    return draw


def _naive_reject(x_t, n_t, x_r, n_r) -> bool:
    from modeaudit.tasks.stats.deficit import deficit_test
    return any(b["reject"] for b in deficit_test(x_t, n_t, x_r, n_r, ALPHA))


def replicate(draw, n_ref: int, n_t: int, seed: int, tmp: Path) -> dict:
    """One H0 replicate: the audit's deficit step, and the naive variant on the same balls."""
    from modeaudit.tasks.join.sources import Source
    from modeaudit.tasks.stats.steps import deficit
    rng = np.random.default_rng([seed, 14])
    ref, T = draw(n_ref, rng), draw(n_t, rng)
    np.save(tmp / "ref.npy", ref)
    np.save(tmp / "t.npy", T)
    R = Source("npy", str(tmp / "ref.npy"), n_ref, ref.shape[1])
    out = deficit(None, Source("npy", str(tmp / "t.npy"), n_t, T.shape[1]), R, D0, ALPHA, "fast", K)
    n_sel = out["reference_rows_select"]
    # Naive: the selection rows both choose and count (centre excluded, as in its own count).
    x_r_naive = np.array([b["count_select"] for b in out["balls"]])
    x_t = np.array([b["x_t"] for b in out["balls"]])
    return {"reject": out["reject"], "rejected_balls": out["rejected_balls"], "n_balls": out["n_balls"],
            "min_p": min(b["p"] for b in out["balls"]),
            "naive_reject": _naive_reject(x_t, n_t, x_r_naive, n_sel - 1),
            "n_sel": n_sel, "n_counted": out["reference_rows_counted"]}


def _cp(k: int, n: int) -> list[float]:
    lo = 0.0 if k == 0 else float(stats.beta.ppf(0.025, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(0.975, k + 1, n - k))
    return [lo, hi]


def main() -> int:
    """Run every law for --replicates replicates; write one JSON and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicates", type=int, default=300)
    ap.add_argument("--n-ref", type=int, default=4000)
    ap.add_argument("--n-t", type=int, default=8000)
    ap.add_argument("--laws", default="ring8-rff,grid25-rff,ring8-imbalanced-rff,smooth-sphere")
    ap.add_argument("--json", default="benchmarks/deficit_type1.json")
    a = ap.parse_args()
    rows, t_all = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deficit-type1-") as tmp:
        for law in a.laws.split(","):
            draw, t0 = _law(law), time.perf_counter()
            reps = [replicate(draw, a.n_ref, a.n_t, s, Path(tmp)) for s in range(a.replicates)]
            k = sum(r["reject"] for r in reps)
            kn = sum(r["naive_reject"] for r in reps)
            rows.append({"law": law, "replicates": a.replicates, "n_ref": a.n_ref, "n_t": a.n_t,
                         "n_select": reps[0]["n_sel"], "n_counted": reps[0]["n_counted"],
                         "mean_balls": float(np.mean([r["n_balls"] for r in reps])),
                         "familywise_rejections": k, "rate": k / a.replicates, "rate_ci95": _cp(k, a.replicates),
                         "naive_rejections": kn, "naive_rate": kn / a.replicates,
                         "naive_rate_ci95": _cp(kn, a.replicates),
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    doc = {"command": " ".join(["python", *sys.argv]), "alpha": ALPHA, "d0": D0, "k": K, "laws": rows,
           "seconds": round(time.perf_counter() - t_all, 1), "cpu": _cpu(),
           "load_average_end": os.getloadavg()}
    tmp = Path(a.json + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, a.json)
    print(table(doc))
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return "unknown"


def table(doc: dict) -> str:
    """Markdown table of the study."""
    lines = ["| law | replicates | n_ref (select / counted) | n_T | balls (mean) | family-wise rejections: deficit "
             "test [95 % CI] | naive (selection rows counted) [95 % CI] |", "|---|---|---|---|---|---|---|"]
    for r in doc["laws"]:
        lo, hi = r["rate_ci95"]
        nlo, nhi = r["naive_rate_ci95"]
        lines.append(f"| {r['law']} | {r['replicates']} | {r['n_ref']} ({r['n_select']} / {r['n_counted']}) | "
                     f"{r['n_t']} | {r['mean_balls']:.1f} | {r['familywise_rejections']} = {100 * r['rate']:.1f} % "
                     f"[{100 * lo:.1f}, {100 * hi:.1f}] | {r['naive_rejections']} = {100 * r['naive_rate']:.1f} % "
                     f"[{100 * nlo:.1f}, {100 * nhi:.1f}] |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
