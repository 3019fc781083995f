"""Seed 002's latent-dimension experiment with our trainers: moons without noise, latent dim 2 vs 4.

Seed 002 trains a small GAN (G: 2 hidden layers of 8 and 4 units; SGD, batch 32, lr 5e-4,
150,000 iterations) on scikit-learn's moons with noise 0 and reports, from pictures only, that
with a 2-D latent the samples form one connected curve that does not separate the two moons
("concentrated around just one mode"), and that a 4-D latent separates them better. Here the
same comparison runs with our `gan` trainer (tasks/toy/trainers.py: 4-layer MLPs of width 128,
Adam, batch 128; `--hidden 8` for narrow networks closer to the seed's G) for `--steps` steps,
several seeds, and the pictures' claim is measured:

* the share of samples on each moon (within 3 sd of its arc, sd 0.01 = the world's default, and
  within the wide 0.05), and their sum (quality);
* ``bridge``: the share farther than 3 wide sd from both arcs (mass between or off the moons);
* the mean distance of a sample to the nearer arc.

    nice -n 10 .venv/bin/python benchmarks/toy_moons_latent.py --steps 2000 --seeds 0,1,2 \
        --out runs/toy-moons --json benchmarks/toy_moons_latent.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

WIDE_SD = 0.05


def _arc_distance(world, x: np.ndarray) -> np.ndarray:
    from modeaudit.tasks.toy.worlds import _moon_distance
    return np.stack([_moon_distance(np.asarray(x, np.float64), k) for k in range(world.n_modes)], axis=1)


def measure(points: np.ndarray) -> dict:
    """Scores of 2-D points on moons at the world's sd and the wide sd, plus the bridge share."""
    from modeaudit.tasks.toy.score import score_points
    from modeaudit.tasks.toy.worlds import get_world
    lit, wide = score_points(get_world("moons"), points), score_points(get_world("moons", WIDE_SD), points)
    d = _arc_distance(get_world("moons"), points).min(1)
    keep = ("modes_covered", "quality", "reverse_kl", "mode_shares")
    return {"truth": {k: lit[k] for k in keep}, "truth_wide": {k: wide[k] for k in keep},
            "bridge_wide": float((d > 3 * WIDE_SD).mean()), "mean_arc_distance": float(d.mean())}


def main() -> int:
    """Train gan on moons with latent dim 2 and 4 for each seed, score 50,000 samples, write one JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--dims", default="2,4")
    ap.add_argument("--method", default="gan")
    ap.add_argument("--hidden", type=int, default=128, help="width of every MLP layer (G, D, and E/F where used)")
    ap.add_argument("--n-score", type=int, default=50_000)
    ap.add_argument("--out", default="runs/toy-moons")
    ap.add_argument("--json", default="benchmarks/toy_moons_latent.json")
    a = ap.parse_args()
    from modeaudit.tasks.toy.trainers import TrainConfig, sample_checkpoint, torch_threads, train
    rows, t_all = [], time.perf_counter()
    for dim in (int(d) for d in a.dims.split(",")):
        for s in (int(x) for x in a.seeds.split(",")):
            run = Path(a.out) / f"{a.method}-w{a.hidden}-z{dim}" / f"seed{s}"
            with torch_threads(1):
                summ = train(TrainConfig("moons", a.method, a.steps, seed=s, every=a.steps, latent_dim=dim,
                                         hidden=a.hidden), run)
                x = sample_checkpoint(run / summ["final"], a.n_score, dim, seed=0)
            row = {"method": a.method, "hidden": a.hidden, "latent_dim": dim, "seed": s, "steps": a.steps,
                   "train_seconds": summ["seconds"], "checkpoint": str(run / summ["final"]), **measure(x)}
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("latent_dim", "seed", "train_seconds", "bridge_wide")}
                             | {"wide": row["truth_wide"]}), flush=True)
    doc = {"args": vars(a), "seconds": round(time.perf_counter() - t_all, 1), "runs": rows,
           "command": " ".join(["python", *sys.argv])}
    tmp = Path(a.json + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, a.json)
    print(table(doc))
    return 0


def table(doc: dict) -> str:
    """Markdown: one row per run and the mean ± sd per latent dimension."""
    lines = ["| latent dim | seed | moon shares (sd 0.01) | quality % (sd 0.01 / 0.05) | modes covered (0.01 / 0.05) "
             "| bridge % (> 3 x 0.05 from both arcs) | mean distance to arc |", "|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        t, w = r["truth"], r["truth_wide"]
        lines.append(f"| {r['latent_dim']} | {r['seed']} | {' / '.join(f'{v:.2f}' for v in t['mode_shares'])} | "
                     f"{100 * t['quality']:.1f} / {100 * w['quality']:.1f} | {t['modes_covered']} / "
                     f"{w['modes_covered']} | {100 * r['bridge_wide']:.1f} | {r['mean_arc_distance']:.3f} |")
    lines += ["", "| latent dim | quality % (sd 0.01) | quality % (sd 0.05) | bridge % | mean distance to arc |",
              "|---|---|---|---|---|"]
    for dim in dict.fromkeys(r["latent_dim"] for r in doc["runs"]):
        rs = [r for r in doc["runs"] if r["latent_dim"] == dim]

        def ms(v, scale=1.0, nd=1):
            v = np.asarray(v, float) * scale
            return f"{v.mean():.{nd}f} ± {v.std(ddof=1) if len(v) > 1 else 0:.{nd}f}"
        lines.append(f"| {dim} | {ms([r['truth']['quality'] for r in rs], 100)} | "
                     f"{ms([r['truth_wide']['quality'] for r in rs], 100)} | {ms([r['bridge_wide'] for r in rs], 100)} "
                     f"| {ms([r['mean_arc_distance'] for r in rs], 1, 3)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
