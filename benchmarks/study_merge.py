"""Merge per-cell study JSONs (one `study_tests.py --json` per world and --ref-ratio) into one file and table.

    python benchmarks/study_merge.py /tmp/study3/r*.json --json benchmarks/study_round3.json --md /tmp/table.md

Cells are keyed "world @ |R|/|T|"; each keeps its own replicate count and wall time, so a grid
run cell by cell (and cut off at a deadline) is reported exactly as far as it went.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TESTS = ["selection_perm", "selection_contrast", "selection_minp", "two_sample"]


def main(argv=None) -> dict:
    """Read the cells, write the merged JSON and a Markdown table (rate ± se, n, wall time)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("cells", nargs="+")
    ap.add_argument("--json")
    ap.add_argument("--md")
    a = ap.parse_args(argv)
    cells, config = {}, None
    for f in a.cells:
        d = json.loads(Path(f).read_text())
        cfg = {k: v for k, v in d["config"].items() if k != "ref_ratio"}
        if config is None:
            config = cfg
        elif cfg != config:
            raise SystemExit(f"{f}: its config differs from the other cells'")
        for world, rates in d["rates"].items():
            cells[f"{world} @ {d['config']['ref_ratio']:g}"] = {
                "world": world, "ref_ratio": d["config"]["ref_ratio"], "reps": d["reps"], "wall_s": d["wall_s"],
                "collapse_free": world in d["collapse_free"], "rates": rates}
    order = sorted(cells, key=lambda k: (not cells[k]["collapse_free"], cells[k]["world"], cells[k]["ref_ratio"]))
    cells = {k: cells[k] for k in order}
    lines = ["| world | \\|R\\| / \\|T\\| | reps | " + " | ".join(TESTS) + " | wall (s) |",
             "|---|---|---|" + "---|" * len(TESTS) + "---|"]
    for k, c in cells.items():
        r = c["rates"]
        lines.append(f"| {c['world']}{'' if c['collapse_free'] else ' (planted)'} | {c['ref_ratio']:g} | {c['reps']} | "
                     + " | ".join(f"{r[t]['rate']:.3f} ± {r[t]['se']:.3f}" if t in r else "—" for t in TESTS)
                     + f" | {c['wall_s']} |")
    md = "\n".join(lines)
    print(md)
    out = {"config": config, "cells": cells}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    if a.md:
        Path(a.md).write_text(md + "\n")
    return out


if __name__ == "__main__":
    main()
