"""Is the permutation null's worst-case curve statistic exchangeable? The observed split's ERL rank among B + 1.

    python benchmarks/check_exchangeable.py cone 1000 10000 10000 300     # world m M |R| replicates [B] [SEED]
    python benchmarks/check_exchangeable.py cone 1000 10000 10000 200 39 2026   # the study's own replicates

For each replicate: draw S, T, R from a collapse-free study world, pool them, and rank the observed
split's worst-case curve (ERL measure, ties against it) among it and B (19) random splits, exactly as
the shipped null draws them. Under exchangeability the rank is uniform on 1..B+1. Without SEED the
data are drawn from fresh seeds; with SEED, from study_tests.py's (its --seed), so the replicates
are the study's own (P(rank <= 2) is then its selection_perm rate at B = 39).
Used in round 3 to tell a chance excess in the study from a broken test (docs/study.md).
"""
from __future__ import annotations

import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_tests import worlds  # noqa: E402

from modeaudit.tasks.join import kernels as join  # noqa: E402
from modeaudit.tasks.stats.envelope import erl_measures  # noqa: E402
from modeaudit.tasks.stats.paper import top_anchors  # noqa: E402


def stat(S, T, radii):
    """The selection's statistic of one split: the worst case of S and its curve in T, as fractions."""
    c = join.range_counts(S, [(0, S)], [0.25], anchor_ids=np.arange(len(S)))[:, 0]
    w = int(top_anchors(c, 1)[0])
    return join.range_counts(S[[w]], [(0, T)], radii)[0] / len(T)


def main(argv) -> None:
    """Print P(rank <= 1), P(rank <= 2) and the rank histogram."""
    name, m, M, n_r, reps = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    world = {x.name: x for x in worlds()}[name]
    B = int(argv[5]) if len(argv) > 5 else 19
    seed = int(argv[6]) if len(argv) > 6 else None
    radii, ranks = join.DEFAULT_RADII, []
    t = time.time()
    for rep in range(reps):
        rng = np.random.default_rng([99, rep] if seed is None else [seed, rep, zlib.crc32(name.encode())])
        S, T, R = world.sample(rng, m), world.sample(rng, M), world.reference(rng, n_r)
        P = np.concatenate([S, T, R])
        curves = [stat(S, T, radii)]
        for b in range(B):
            idx = np.random.default_rng([rep, 0x5E1, b]).permutation(len(P))
            curves.append(stat(P[np.sort(idx[:m])], P[np.sort(idx[m:m + M])], radii))
        e = erl_measures(np.array(curves), "greater")
        ranks.append(int((e <= e[0]).sum()))
    r = np.array(ranks)
    print(argv, "time", round(time.time() - t), "s")
    print("P(rank <= 1) =", (r <= 1).mean(), " P(rank <= 2) =", (r <= 2).mean(), "(exchangeable: 0.05, 0.10)")
    print("rank histogram:", np.bincount(r, minlength=B + 2)[1:].tolist())


if __name__ == "__main__":
    main(sys.argv[1:])
