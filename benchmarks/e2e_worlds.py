"""Embeddings files from the study's worlds, for end-to-end audits at the hidden-world sizes (issue [9]).

    python benchmarks/e2e_worlds.py --world aniso_zipf_planted_x5 --seed 1 --out /tmp/w1
    modeaudit audit --embeddings-s /tmp/w1/S.npy --embeddings-t /tmp/w1/T.npy --reference /tmp/w1/R.npy --out RUN

S (--m rows) and T (--M rows) are draws of the world (with its planted mode, if any); R (--ref rows,
default |T|) is a draw of its collapse-free counterpart: what the acceptance check feeds `modeaudit audit`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_tests import worlds  # noqa: E402


def main(argv=None) -> None:
    """Write S.npy, T.npy and R.npy of one world and seed into --out."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--m", type=int, default=2000)
    ap.add_argument("--M", type=int, default=40000)
    ap.add_argument("--ref", type=int, help="reference rows (default: --M)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    w = {x.name: x for x in worlds()}[a.world]
    rng = np.random.default_rng([a.seed, 0xE2E])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "S.npy", w.sample(rng, a.m))
    np.save(out / "T.npy", w.sample(rng, a.M))
    np.save(out / "R.npy", w.reference(rng, a.ref or a.M))


if __name__ == "__main__":
    main()
