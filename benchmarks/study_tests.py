"""Type-I error and power of every test, by simulation (issue: statistics that hold).

    python benchmarks/study_tests.py --reps 200 --json docs/study.json --md docs/study.md
    # re-measure some tests only, keeping the other cells of an earlier run:
    python benchmarks/study_tests.py --reps 200 --tests selection_gauss --merge docs/study.json --drop-old \
        --worlds isotropic,anisotropic,cone,cone_planted_x0.5 --json docs/study.json --md docs/study.md

Each replicate draws S (m rows), T (M rows) and an independent reference pool from
a world, runs the audit's statistics with the product's own kernels, and records
which tests reject at alpha. Collapse-free worlds give the type-I error; worlds with
a planted dense mode of increasing mass give the power. Rates are reported with their
binomial standard errors.

Tests measured:
  paper          worst case vs the pointwise band of q random anchors (seed 000)
  erl            worst case vs the ERL global envelope of the same q anchors
  paper_random   a random anchor vs the pointwise band (multiplicity over 41 radii only)
  erl_random     a random anchor vs the ERL envelope (should hold alpha)
  selection_ref  selection-aware test, null = a reference set from the collapse-free world
  selection_gauss  selection-aware test, null = the projected-normal surrogate fitted to S
  selection_perm  selection-aware test, permutation null over S + T + a reference of |T| x --ref-ratio rows
                 (what an audit with --reference runs since round 2)
  selection_contrast  permutation test over the same pool of max over the top-k distinct modes (chosen on S)
                 of each ball's excess in T over R (conditional binomial z)
  selection_minp  both statistics of the same splits combined by min-p (an audit with --reference since
                 round 3); reported whenever selection_contrast is
  two_sample     top distinct balls, T vs reference, Holm (family-wise: any ball rejects)
"""
from __future__ import annotations

import argparse
import json
import os
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class World:
    """A distribution of unit embeddings; `reference` is its collapse-free counterpart."""

    def __init__(self, name, kind, D=32, n_id=100, weights=None, spread=0.75, planted_mass=0.0,
                 tightness=0.7, aniso=0.0, offset=0.0, at_peak=False, world_seed=0, centre_aniso=0.0):
        self.name, self.kind, self.D = name, kind, D
        rng = np.random.default_rng([world_seed, 77])
        # centre_aniso > 0: identity centres crowd along a few directions (anisotropic identity space)
        self.centres = _unit(rng.standard_normal((n_id + 1, D)) * (np.arange(1, D + 1) ** -centre_aniso))
        w = np.ones(n_id) if weights is None else np.asarray(weights, np.float64)
        w = w / w.sum()
        self.base_w = w
        self.spread, self.tightness = spread, tightness
        self.planted_mass = planted_mass
        self.scales = (np.arange(1, D + 1) ** -aniso) if aniso else np.ones(D)
        self.offset = np.r_[offset, np.zeros(D - 1)]   # a mean direction: the sample is a cone, as real embeddings are
        if kind == "gauss" and planted_mass:
            x = _unit(rng.standard_normal((20_000, D)) * self.scales + self.offset)
            # At the cone's peak (its mean direction) when `at_peak`: collapse *of* the densest
            # region, which is where GAN collapse shows up; else at a random sample point.
            self.planted_centre = _unit(self.offset[None, :] + 1e-9)[0] if at_peak else x[0]
            cos = x @ x[:200].T
            self.typical_ball = float(np.median((cos >= np.cos(np.pi * 0.25)).mean(axis=0)))

    def _draw(self, rng, n, planted_mass):
        if self.kind == "gauss":
            x = _unit(rng.standard_normal((n, self.D)) * self.scales + self.offset)
            if planted_mass:
                # A tight ball around one sample direction holding planted_mass x the mass of a
                # 0.25-ball around a typical point: collapse inside a smooth world.
                k = rng.random(n) < planted_mass * self.typical_ball
                x[k] = _unit(self.planted_centre + 0.35 * rng.standard_normal((int(k.sum()), self.D)) / np.sqrt(self.D))
            return x
        typical = self.base_w.mean()
        pm = planted_mass * typical  # planted identity: planted_mass times a typical identity's mass
        w = np.append(self.base_w * (1 - pm), pm)
        ids = rng.choice(len(w), n, p=w / w.sum())
        s = np.full(n, self.spread)
        s[ids == len(w) - 1] *= self.tightness
        return _unit(self.centres[ids] + s[:, None] * rng.standard_normal((n, self.D)) / np.sqrt(self.D))

    def sample(self, rng, n):
        return self._draw(rng, n, self.planted_mass)

    def reference(self, rng, n):
        return self._draw(rng, n, 0.0)


def worlds():
    """The study's cells: collapse-free worlds (type-I error) and planted ones (power)."""
    lognormal = np.random.default_rng(5).lognormal(0, 1.0, 100)
    return [
        World("isotropic", "gauss", D=16),
        World("anisotropic", "gauss", D=16, aniso=1.0),
        World("cone", "gauss", D=16, aniso=0.5, offset=1.5),
        World("identities_equal", "ids"),
        World("identities_unequal", "ids", weights=lognormal),
        # The issue-[9] hidden worlds' kind: anisotropic identity centres AND Zipf-like identity sizes.
        World("aniso_zipf", "ids", weights=1.0 / np.arange(1, 101), centre_aniso=1.0),
        World("cone_planted_x0.5", "gauss", D=16, aniso=0.5, offset=1.5, planted_mass=0.5),
        World("cone_peak_planted_x0.5", "gauss", D=16, aniso=0.5, offset=1.5, planted_mass=0.5, at_peak=True),
        World("planted_x2", "ids", planted_mass=2.0),
        World("aniso_zipf_planted_x5", "ids", weights=1.0 / np.arange(1, 101), centre_aniso=1.0, planted_mass=5.0),
        World("planted_x4", "ids", planted_mass=4.0),
        World("planted_x5", "ids", planted_mass=5.0),
        World("aniso_zipf_planted_x2", "ids", weights=1.0 / np.arange(1, 101), centre_aniso=1.0, planted_mass=2.0),
        World("planted_x8", "ids", planted_mass=8.0),
    ]


def one_replicate(args):
    """All tests on one draw of (S, T, reference) from a world; returns {test: rejected}."""
    world, rep, cfg = args
    from modeaudit.tasks.join import kernels as join
    from modeaudit.tasks.stats.envelope import erl_test
    from modeaudit.tasks.stats.modes import distinct_modes
    from modeaudit.tasks.stats.paper import paper_test, reference_anchors, top_anchors
    from modeaudit.tasks.stats.selection import (contrast_z, gaussian_surrogate, min_p_combination, pool_sampler,
                                                 selection_test)
    from modeaudit.tasks.stats.two_sample import density_ratio_test

    rng = np.random.default_rng([cfg["seed"], rep, zlib.crc32(world.name.encode())])
    m, M, q, a = cfg["m"], cfg["M"], cfg["q"], cfg["alpha"]
    radii = join.DEFAULT_RADII
    S, T = world.sample(rng, m), world.sample(rng, M)
    pool = world.reference(rng, cfg["pool"] if not cfg["tests"] or "selection_ref" in cfg["tests"]
                           else int(cfg["ref_ratio"] * M))
    counts = join.range_counts(S, [(0, S)], [0.25], anchor_ids=np.arange(m))[:, 0]
    w = int(top_anchors(counts, 1)[0])
    want = cfg["tests"]
    band_tests = ("paper", "erl", "paper_random", "erl_random")
    if not want or any(t in want for t in band_tests):
        refs = reference_anchors(rep, m, q + 1)
        rand, refs = refs[0], refs[1:]
        curves = join.range_counts(S[np.r_[w, rand, refs]], [(0, T)], radii)
    else:   # only the worst case's curve is needed (q + 1 more anchors cost seconds a replicate)
        curves = join.range_counts(S[[w]], [(0, T)], radii)
    obs = curves[0].astype(float)
    ran, ref = curves[1:2].astype(float).reshape(-1, len(radii)), curves[2:].astype(float)
    out = {
        "paper": lambda: paper_test(obs, ref, a)["reject"],
        "erl": lambda: erl_test(obs, ref, alpha=a)["reject"],
        "paper_random": lambda: paper_test(ran[0], ref, a)["reject"],
        "erl_random": lambda: erl_test(ran[0], ref, alpha=a)["reject"],
    }
    frac = obs / M
    for name, null in (("selection_ref", lambda: pool_sampler(pool, rep, "ref")),
                       ("selection_gauss", lambda: gaussian_surrogate(S, rep))):
        out[name] = lambda null=null: selection_test(frac, null(), m=m, n_t=M, d0=0.25, radii=radii,
                                                     replicates=cfg["B"], alpha=a, obs_S=S, obs_w=w)["reject"]

    # The reference an audit would be given: |R| = ref_ratio |T| rows (the pool holds 4 (m + M)),
    # the same rows for every test that uses one, as in an audit.
    R = pool[:int(cfg["ref_ratio"] * M)]
    P = np.concatenate([S, T, R])          # the permutation pool: S + T + R exchange rows under H0 (one law)
    P64 = P.astype(np.float64)
    cos0 = np.cos(np.pi * 0.25)

    def contrast(c, s_idx, t_mask, r_mask):
        # Top-k distinct modes chosen on the S rows (self counts c), each one's excess in T over R
        # (conditional binomial z given the ball's total), max over the modes. Ball membership as
        # cos >= cos(pi d0) in float64: the kernels' decision but for pairs exactly at d0 (measure zero).
        md = distinct_modes(P[s_idx], c, cfg["k"], 0.25)
        inside = (P64[s_idx[md]] @ P64.T) >= cos0
        xt = np.count_nonzero(inside & t_mask, axis=1).astype(float)
        xr = np.count_nonzero(inside & r_mask, axis=1).astype(float)
        return contrast_z(xt, xr, int(t_mask.sum()), int(r_mask.sum()))

    perm_tests = [t for t in ("selection_perm", "selection_contrast") if not want or t in want]
    if perm_tests:
        # One set of permutations for both: the shipped null's own draws (pool_sampler's seeds), so
        # selection_perm below is exactly what selection_test(pool_sampler(P, rep)) computes.
        null = pool_sampler(P, rep, "perm")
        lab = np.zeros(len(P), np.int8)
        lab[m:m + M], lab[m + M:] = 1, 2
        rep_curves, rep_z = [], []
        for b in range(cfg["B"]):
            idx = np.random.default_rng([rep, 0x5E1, b]).permutation(len(P))
            s_idx, t_idx = np.sort(idx[:m]), np.sort(idx[m:m + M])
            t_mask = np.zeros(len(P), bool)
            t_mask[t_idx] = True
            r_mask = np.ones(len(P), bool)
            r_mask[idx[:m + M]] = False
            Sb, Tb = P[s_idx], P[t_idx]
            cb = join.range_counts(Sb, [(0, Sb)], [0.25], anchor_ids=np.arange(m))[:, 0]
            wb = int(top_anchors(cb, 1)[0])
            rep_curves.append(join.range_counts(Sb[[wb]], [(0, Tb)], radii)[0] / float(M))
            if "selection_contrast" in perm_tests:
                rep_z.append(contrast(cb, s_idx, t_mask, r_mask))
        out["selection_perm"] = lambda: selection_test(frac, null, m=m, n_t=M, d0=0.25, radii=radii,
                                                       replicates=cfg["B"], alpha=a, curves=rep_curves)["reject"]
        if "selection_contrast" in perm_tests:
            obs_z = contrast(counts, np.arange(m), lab == 1, lab == 2)
            out["selection_contrast"] = lambda: (1 + sum(z >= obs_z for z in rep_z)) / (cfg["B"] + 1) <= a
            # Both statistics of the same splits, combined by min-p (what an audit with a reference runs
            # since round 3); measured whenever selection_contrast is
            out["selection_minp"] = lambda: min_p_combination(np.vstack([frac, rep_curves]), np.r_[obs_z, rep_z],
                                                              a)["reject"]

    def two_sample():
        modes = distinct_modes(S, counts, cfg["k"], 0.25)
        x = join.range_counts(S[modes], [(0, T)], [0.25])[:, 0]
        xr = join.range_counts(S[modes], [(0, R)], [0.25])[:, 0]
        return any(b["reject"] for b in density_ratio_test(x, M, xr, len(R), alpha=a))
    out["two_sample"] = two_sample
    return world.name, {k: bool(f()) for k, f in out.items()
                        if not want or k in want or (k == "selection_minp" and "selection_contrast" in want)}


def _wall(w) -> str:
    if isinstance(w, dict):   # a merged study: earlier cells and this run's
        e = _wall(w["earlier"])
        return f"{e} for the earlier cells, {w['this_run']} s for {', '.join(w['tests_rerun'])} ({w['cells']})" \
            if "cells" in w else f"{e} earlier, {w['this_run']} s for {', '.join(w['tests_rerun'])}"
    return f"{w} s"


def main(argv=None) -> dict:
    """Run the study and write the JSON and Markdown tables."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--m", type=int, default=1000)
    ap.add_argument("--M", type=int, default=10000)
    ap.add_argument("--q", type=int, default=199)
    ap.add_argument("--B", type=int, default=39, help="null replicates of the selection test")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--ref-ratio", type=float, default=1.0, help="|R| / |T| for selection_perm")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--worlds", default="", help="comma list (default: all)")
    ap.add_argument("--tests", default="", help="comma list of tests to run (default: all)")
    ap.add_argument("--merge", help="an earlier study JSON whose other cells are kept")
    ap.add_argument("--drop-old", action="store_true", help="with --merge: drop the earlier cells of the tests "
                    "rerun here, in every world (after a change to those tests)")
    ap.add_argument("--json")
    ap.add_argument("--md")
    a = ap.parse_args(argv)
    cfg = dict(m=a.m, M=a.M, q=a.q, B=a.B, alpha=a.alpha, seed=a.seed, k=10, pool=4 * (a.m + a.M),
               ref_ratio=a.ref_ratio,
               tests=[t for t in a.tests.split(",") if t])
    ws = [w for w in worlds() if not a.worlds or w.name in a.worlds.split(",")]
    jobs = [(w, r, cfg) for w in ws for r in range(a.reps)]
    os.environ["MODEAUDIT_THREADS"] = "1"  # one process per core
    t0 = time.perf_counter()
    tally: dict = {}
    with ProcessPoolExecutor(a.procs) as ex:
        for name, out in ex.map(one_replicate, jobs, chunksize=4):
            for k, v in out.items():
                tally.setdefault(name, {}).setdefault(k, []).append(bool(v))
    rows = {}
    for w in ws:
        rows[w.name] = {k: {"rate": float(np.mean(v)), "se": float(np.sqrt(np.mean(v) * (1 - np.mean(v)) / len(v))),
                            "n": len(v)} for k, v in tally[w.name].items()}
    wall = round(time.perf_counter() - t0, 1)
    if a.merge:
        old = json.loads(Path(a.merge).read_text())
        same = {k: v for k, v in old["config"].items() if k != "tests"} == {k: v for k, v in cfg.items() if k != "tests"}
        if not same or old["reps"] != a.reps:
            raise SystemExit(f"--merge {a.merge}: its config/reps differ from this run's; rerun all cells instead")
        if a.drop_old:   # the test's code changed: keep no cell of its earlier version
            rerun = set(cfg["tests"]) or {t for cells in rows.values() for t in cells}
            for cells in old["rates"].values():
                for t in rerun:
                    cells.pop(t, None)
        for name, cells in rows.items():
            old["rates"].setdefault(name, {}).update(cells)
        rows = old["rates"]
        wall = {"earlier": old["wall_s"], "this_run": wall, "tests_rerun": cfg["tests"] or ["all"],
                "cells": ", ".join(w.name for w in ws)}
    cfg_out = {k: v for k, v in cfg.items() if k != "tests"}
    names = [w.name for w in worlds()]
    rows = dict(sorted(rows.items(), key=lambda kv: names.index(kv[0]) if kv[0] in names else len(names)))
    res = {"config": cfg_out, "reps": a.reps, "wall_s": wall,
           "collapse_free": [w.name for w in worlds() if not w.planted_mass and w.name in rows], "rates": rows}
    tests = ["paper", "erl", "paper_random", "erl_random", "selection_ref", "selection_gauss", "selection_perm",
             "selection_contrast", "selection_minp", "two_sample"]
    tests = [t for t in tests if any(t in r for r in rows.values())]
    lines = ["| world | " + " | ".join(tests) + " |", "|---|" + "---|" * len(tests)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[t]['rate']:.3f} ± {r[t]['se']:.3f}" if t in r else "—"
                                                  for t in tests) + " |")
    lines.append("")
    lines.append(f"{a.reps} replicates per cell, alpha = {a.alpha}, m = {a.m}, M = {a.M}, q = {a.q}, "
                 f"B = {a.B}, reference pool {cfg['pool']} rows; wall time {_wall(wall)}. Rejection rates ± "
                 f"binomial standard error; collapse-free worlds: {', '.join(res['collapse_free'])}.")
    md = "\n".join(lines)
    print(md)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    if a.md:
        Path(a.md).write_text(md + "\n")
    return res


if __name__ == "__main__":
    main()
