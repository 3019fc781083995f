"""Toy-world table: train reference GANs, score them against the truth, audit their checkpoints.

For every (world, method, seed): `modeaudit toy train` (in-process, 1 torch thread), ground-truth
scores of the final checkpoint (`score_generator`, 50,000 samples), and `modeaudit audit
--generator torchscript:CKPT --descriptor rff --reference-generator toy:WORLD --preset demo`
(in-process through the CLI's `main`, so one Prefect server serves every audit; smaller T and
selection sizes than the preset, `AUDIT_SIZES`). Controls: the
true world audited against itself (no collapse: the audit should stay quiet).

Scores are reported twice: at the seed's mode sd (seed 003's rule, literal: 3 sd = 0.003 on the
ring) and at the "classic" widths of Metz et al. / VEEGAN (ring sd 0.02, grid sd 0.05), because
short CPU training does not bring samples within 0.003 of a mode (see docs/toy-benchmarks.md).
Training data is always the seed's world.

    .venv/bin/python benchmarks/toy_table.py --steps 2000 --out runs/toy-table \
        --json benchmarks/toy_table.json --md docs/toy-benchmarks.md
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import tempfile  # noqa: E402

# A private Prefect home and one temporary server for all audits (as the test suite does):
# the shared ~/.prefect database and an ephemeral server per call were seen dying mid-table here.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="modeaudit-toy-prefect-")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# The demo preset with T, C, A, the selection test and the reference draw cut down, and no
# efficiency curves: about 35 s of audit work per checkpoint here instead of ~4 minutes.
AUDIT_SIZES = ["--M", "50000", "--mccs-set", "20000", "--anchors", "1000", "--selection-m", "2000",
               "--selection-t", "20000", "--n-ref", "50000", "--no-efficiency"]
# --no-diversity: the peers' metrics (k-NN over 10,000 rows: most of an audit's time under load) are left
# out; the tables do not show them.
NO_DIVERSITY = ["--diversity-rows", "0"]
WIDE_SD = {"ring8": 0.02, "grid25": 0.05, "ring8-imbalanced": 0.02}
# --reuse-audits: an audit directory whose result.json ran the same tests is read, not audited again.
REUSE_AUDITS = False
SKIP_DIVERSITY = False


def _audit(spec_args: list[str], out: Path, world: str, preset: str, bandwidth: float = 1.0,
           tests: str | None = None) -> dict:
    from modeaudit.flows.cli import main
    argv = ["audit", *spec_args, "--descriptor", "rff", "-D", f"bandwidth={bandwidth}",
            "--reference-generator", f"toy:{world}",
            "--preset", preset, *AUDIT_SIZES, *(NO_DIVERSITY if SKIP_DIVERSITY else []),
            *(["--tests", tests] if tests else []), "--out", str(out), "--overwrite"]
    t0 = time.perf_counter()
    buf = io.StringIO()
    done = out / "result.json"
    if REUSE_AUDITS and done.exists() and json.loads(done.read_text())["settings"].get("tests") == (
            tests.split(",") if tests else json.loads(done.read_text())["settings"].get("tests")):
        rc = 0      # a finished audit of these tests (result.json is written last): parsed, not rerun
    else:
        try:
            with contextlib.redirect_stdout(buf):
                rc = main(argv)
        except Exception as e:  # one failed audit (e.g. the Prefect server going away) must not lose the table
            return {"rc": -1, "error": f"{type(e).__name__}: {e}"[:300], "argv": argv}
    if rc != 0:
        return {"rc": rc, "argv": argv}
    r = json.loads((out / "result.json").read_text())
    two = r["tests"].get("two_sample", [])
    return {"rc": 0, "dir": str(out), "seconds": round(time.perf_counter() - t0, 1), "headline": r["verdict"]["headline"],
            "reject": {k: (any(b["reject"] for b in v) if isinstance(v, list) else bool(v["reject"]))
                       for k, v in r["tests"].items()},
            "mccs_worst": r["mccs"]["worst_case"], "mccs_mean": r["mccs"]["mean"],
            "worst_s_index": r["worst_case"]["s_index"], "worst_count_d0": r["worst_case"]["count_d0"],
            "two_sample": [{k: b[k] for k in ("s_index", "ratio", "p_adj", "reject")} for b in two],
            "selection_p": r["tests"].get("selection", {}).get("p"), "argv": ["modeaudit", *argv],
            **({"deficit": [{k: b[k] for k in ("ref_index", "x_t", "x_r", "ratio", "p_adj", "reject")}
                            for b in r["tests"]["deficit"].get("balls", [])]} if "deficit" in r["tests"] else {})}


def _adir(name: str, a) -> str:
    return name if a.bandwidth == 1.0 else f"{name}-h{a.bandwidth:g}"


def _worst_mode(run_dir: Path, ckpt: Path | None, world, s_indices: list[int], latent_dim: int) -> list[int]:
    """Ground-truth mode (-1: between modes) of S rows, regenerated from their stored latents."""
    from modeaudit.storage.store import RunStore
    z = np.asarray(RunStore.open(run_dir).array("S", "latents")[:])[s_indices]
    if ckpt is None:
        x = world.from_latents(z)
    else:
        import torch
        m = torch.jit.load(str(ckpt)).eval()
        with torch.inference_mode():
            x = m(torch.from_numpy(np.ascontiguousarray(z[:, :latent_dim], np.float32))).numpy()
    return [int(i) for i in world.assign(x)]


def reference_modes(run_dir: Path, world, indices: list[int]) -> list[int]:
    """Nearest true mode of reference rows (a toy:WORLD reference generator), regenerated from their stored latents."""
    from modeaudit.storage.store import RunStore
    if not indices:
        return []
    z = np.asarray(RunStore.open(run_dir).array("R", "latents")[:])[indices]
    x = world.from_latents(z)
    return [int(i) for i in np.sqrt(((x[:, None, :] - world.means[None]) ** 2).sum(-1)).argmin(1)]


def annotate(doc: dict) -> dict:
    """Add, per audited run, where the audit's balls are in truth: nearest mode, distance, share/weight."""
    import torch
    from modeaudit.storage.store import RunStore
    from modeaudit.tasks.toy.rff import distance_to_radius
    from modeaudit.tasks.toy.trainers import sample_checkpoint
    from modeaudit.tasks.toy.worlds import get_world
    for r in doc["runs"]:
        au = r.get("audit", {})
        if au.get("rc") != 0:
            continue
        w = get_world(r["world"])
        idx = [au["worst_s_index"]] + [b["s_index"] for b in au["two_sample"]]
        adir = Path(au.get("dir", Path(r["checkpoint"]).parent / "audit"))
        z = np.asarray(RunStore.open(adir).array("S", "latents")[:])[idx]
        with torch.inference_mode():
            x = torch.jit.load(r["checkpoint"]).eval()(torch.from_numpy(np.ascontiguousarray(z, np.float32))).numpy()
        dist = np.sqrt(((x[:, None, :] - w.means[None]) ** 2).sum(-1))
        near, dmin = dist.argmin(1), dist.min(1)
        shares = np.array(r["truth_wide"]["mode_shares"])
        # The audit's balls have Euclidean radius r(d0) = 0.83 h: the checkpoint's share within that
        # radius of each mode (50,000 samples) is the ground truth the two-sample test estimates.
        h = float(next((v.split("=")[1] for v in au["argv"] if v.startswith("bandwidth=")), 1.0))
        xs = sample_checkpoint(r["checkpoint"], 50_000, r.get("latent_dim", 2))
        ball = (np.sqrt(((xs[:, None, :] - w.means[None]) ** 2).sum(-1)) <= distance_to_radius(0.25, h)).mean(0)
        balls = [{"nearest_mode": int(k), "distance": round(float(d), 4),
                  "share_over_weight": round(float(shares[k] / w.weights[k]), 3),
                  "ball_share_over_weight": round(float(ball[k] / w.weights[k]), 3)} for k, d in zip(near, dmin)]
        au["worst_truth"] = balls[0]
        au["ball_share_over_weight_per_mode"] = [round(float(v), 3) for v in ball / w.weights]
        au["outside_all_balls"] = round(float(1 - ball.sum()), 4)
        for b, t in zip(au["two_sample"], balls[1:]):
            b["truth"] = t
    return doc


def _r(ratio) -> str:
    # result.json writes an infinite ratio (no reference row in the ball) as null.
    return "inf" if ratio is None else f"{ratio:.2f}"


def _deficit_cell(au: dict) -> str:
    """Rejected deficit balls as "mode: ratio", "none", or "-" when the audit did not run the test."""
    if "deficit" not in au:
        return "-"
    return ", ".join(f"{b.get('mode', '?')}: {_r(b['ratio'])}" for b in au["deficit"] if b["reject"]) or "none"


def _fmt(vals, nd=2, pct=False):
    if len(vals) == 0:
        return "not run"
    a = np.asarray(vals, float) * (100 if pct else 1)
    return f"{a.mean():.{nd}f} ± {a.std(ddof=1) if len(a) > 1 else 0:.{nd}f}"


def main() -> int:
    """Run the table (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="ring8,grid25")
    ap.add_argument("--methods", default="gan,invertgan,lol2")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--n-score", type=int, default=50_000)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--out", default="runs/toy-table")
    ap.add_argument("--json", default="benchmarks/toy_table.json")
    ap.add_argument("--md", default=None, help="also write the markdown tables here")
    ap.add_argument("--no-audit", action="store_true")
    ap.add_argument("--bandwidth", type=float, default=1.0, help="rff bandwidth h of the audits")
    ap.add_argument("--control-seeds", default="0", help="audit seeds of the true-world controls")
    ap.add_argument("--controls-only", action="store_true", help="audit only the true worlds (no training)")
    ap.add_argument("--reuse", action="store_true", help="reuse a finished training (train.json) in --out")
    ap.add_argument("--tables-only", action="store_true", help="only rewrite --md tables from an existing --json")
    ap.add_argument("--tests", default=None, help="--tests of the audits (default: the audit's defaults)")
    ap.add_argument("--reuse-audits", action="store_true", help="read finished audits (same tests) instead of rerunning")
    ap.add_argument("--no-diversity", action="store_true", help="audits without the diversity metrics (NO_DIVERSITY)")
    a = ap.parse_args()
    global REUSE_AUDITS, SKIP_DIVERSITY
    REUSE_AUDITS, SKIP_DIVERSITY = a.reuse_audits, a.no_diversity
    if a.tables_only:
        doc = annotate(json.loads(Path(a.json).read_text()))
        Path(a.json).write_text(json.dumps(doc, indent=1))
        print(tables(doc))
        return 0
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=600):
        return _run(a)


def _run(a) -> int:
    from modeaudit.flows.toy_cli import score_generator
    from modeaudit.tasks.toy.trainers import TrainConfig, torch_threads, train
    from modeaudit.tasks.toy.worlds import get_world

    out = Path(a.out)
    rows, controls, t_all = [], [], time.perf_counter()
    worlds, methods, seeds = a.worlds.split(","), a.methods.split(","), [int(s) for s in a.seeds.split(",")]
    if not a.no_audit:
        for w in worlds:
            for cs in (int(c) for c in a.control_seeds.split(",")):
                name = "truth-audit" if cs == 0 else f"truth-audit-seed{cs}"
                au = _audit(["--generator", f"toy:{w}", "--seed", str(cs)], out / w / _adir(name, a), w, a.preset,
                            a.bandwidth, a.tests)
                if au["rc"] == 0:
                    au["worst_mode"] = _worst_mode(Path(au["dir"]), None, get_world(w), [au["worst_s_index"]],
                                                   3)[0]
                controls.append({"world": w, "generator": f"toy:{w}", "audit_seed": cs, "audit": au})
                print(json.dumps(controls[-1]), flush=True)
    if a.controls_only:
        _write(a, rows, controls, time.perf_counter() - t_all)
        return 0
    for w in worlds:
        for m in methods:
            for s in seeds:
                run = out / w / m / f"seed{s}"
                t0 = time.perf_counter()
                if a.reuse and (run / "train.json").exists():
                    summ = json.loads((run / "train.json").read_text())
                    t_train = summ["seconds"]
                else:
                    with torch_threads(1):
                        summ = train(TrainConfig(w, m, a.steps, seed=s, every=a.steps), run)
                    t_train = time.perf_counter() - t0
                ckpt = run / summ["final"]
                spec, gopt = f"torchscript:{ckpt}", {"latent_dim": str(summ["latent_dim"])}
                _, lit = score_generator(w, spec, gopt, a.n_score, seed=0)
                _, wide = score_generator(w, spec, gopt, a.n_score, seed=0, sd=WIDE_SD[w])
                keep = ("modes_covered", "quality", "reverse_kl", "mode_shares")
                row = {"world": w, "method": m, "seed": s, "steps": a.steps, "train_seconds": round(t_train, 1),
                       "checkpoint": str(ckpt), "truth": {k: lit[k] for k in keep},
                       "truth_wide": {k: wide[k] for k in keep} | {"sd": WIDE_SD[w]},
                       "commands": [f"modeaudit toy train --world {w} --method {m} --steps {a.steps} --seed {s} "
                                    f"--out {run} --every {a.steps}",
                                    f"modeaudit toy score --world {w} --generator {spec} -G latent_dim="
                                    f"{summ['latent_dim']} --n {a.n_score} --out {run}/score"]}
                if not a.no_audit:
                    au = _audit(["--generator", spec, "-G", f"latent_dim={summ['latent_dim']}"], run / _adir("audit", a),
                                w, a.preset, a.bandwidth, a.tests)
                    if au["rc"] == 0:
                        for b, md in zip(au.get("deficit", []), reference_modes(
                                Path(au["dir"]), get_world(w), [b["ref_index"] for b in au.get("deficit", [])])):
                            b["mode"] = md
                        idx = [au["worst_s_index"]] + [b["s_index"] for b in au["two_sample"]]
                        modes = _worst_mode(Path(au["dir"]), ckpt, get_world(w, WIDE_SD[w]), idx, summ["latent_dim"])
                        au["worst_mode_wide"] = modes[0]
                        for b, md in zip(au["two_sample"], modes[1:]):
                            b["mode_wide"] = md
                    row["audit"] = au
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("world", "method", "seed", "train_seconds")}
                                 | {"truth": {k: row["truth"][k] for k in keep[:3]},
                                    "wide": {k: row["truth_wide"][k] for k in keep[:3]},
                                    "audit": {k: row.get("audit", {}).get(k) for k in ("headline", "mccs_worst",
                                                                                         "reject", "seconds")}}),
                      flush=True)
                _write(a, rows, controls, time.perf_counter() - t_all)
    _write(a, rows, controls, time.perf_counter() - t_all)
    return 0


def _write(a, rows, controls, seconds):
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    doc = {"args": vars(a), "seconds": round(seconds, 1), "controls": controls, "runs": rows,
           "command": " ".join(["python", *sys.argv])}
    tmp = Path(a.json + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, a.json)
    if a.md:
        Path(a.md + ".tables").write_text(tables(doc))


def tables(doc: dict) -> str:
    """Markdown: per-run table and seed 003's Table 1 shape (mean ± sd over seeds)."""
    lines = ["| world | method | seed | verdict (tests rejecting) | worst MCCS | two-sample balls rejected | worst "
             "anchor: nearest mode at distance: its share / weight within 3 wide sd / within r(d0) | modes covered (seed sd / wide) | quality % (seed sd / wide) | reverse KL "
             "(seed sd / wide) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in doc["controls"]:
        au = c["audit"]
        tests = "".join(k[0].upper() for k, v in au.get("reject", {}).items() if v) or "none"
        lines.append(f"| {c['world']} | *true world* | audit seed {c.get('audit_seed', 0)} | {au.get('headline')} ({tests}) | {au.get('mccs_worst', 0):.3f} | "
                     f"{sum(b['reject'] for b in au.get('two_sample', []))}/{len(au.get('two_sample', []))} | "
                     f"{au.get('worst_mode', '-')} | all | ~98.9 | ~0 |")
    for r in doc["runs"]:
        au, t, tw = r.get("audit", {}), r["truth"], r["truth_wide"]
        two = au.get("two_sample", [])
        wt = au.get("worst_truth")
        ratio = next((_r(b["ratio"]) for b in two if b["s_index"] == au.get("worst_s_index")), "-")
        wcell = "-" if wt is None else (f"{wt['nearest_mode']} at {wt['distance']:.2f}: {wt['share_over_weight']:.2f}"
                                        f" / {wt['ball_share_over_weight']:.2f} (audit ratio {ratio})")
        tests = "".join(k[0].upper() for k, v in au.get("reject", {}).items() if v) or "none"
        lines.append(f"| {r['world']} | {r['method']} | {r['seed']} | {au.get('headline', '-')} ({tests}) | "
                     f"{au.get('mccs_worst', float('nan')):.3f} | {sum(b['reject'] for b in two)}/{len(two)} | "
                     f"{wcell} | "
                     f"{t['modes_covered']} / {tw['modes_covered']} | {100 * t['quality']:.1f} / "
                     f"{100 * tw['quality']:.1f} | {t['reverse_kl']:.2f} / {tw['reverse_kl']:.2f} |")
    out = ["\n".join(lines), ""]
    per = [r for r in doc["runs"] if "ball_share_over_weight_per_mode" in r.get("audit", {})]
    if per:
        pl = ["Ground truth at the audit's own scale: each mode's share within r(d0) of its mean, over its true "
              "weight (50,000 samples of the checkpoint), and the two-sample test's rejected balls:", "",
              "| world | method | seed | share / weight per mode | outside every ball | two-sample rejects (nearest "
              "mode: ratio) | deficit rejects (mode: ratio) |", "|---|---|---|---|---|---|---|"]
        for r in per:
            au = r["audit"]
            rej = ", ".join(f"{b['truth']['nearest_mode']}: {_r(b['ratio'])}" for b in au["two_sample"]
                            if b["reject"] and "truth" in b) or "none"
            pl.append(f"| {r['world']} | {r['method']} | {r['seed']} | "
                      f"{' '.join(f'{v:.2f}' for v in au['ball_share_over_weight_per_mode'])} | "
                      f"{100 * au['outside_all_balls']:.1f} % | {rej} | {_deficit_cell(au)} |")
        out += ["\n".join(pl), ""]
    worlds = list(dict.fromkeys(r["world"] for r in doc["runs"]))
    methods = list(dict.fromkeys(r["method"] for r in doc["runs"]))
    for key, title in (("truth", "seed sd (seed 003's rule, literal)"), ("truth_wide", "wide sd (ring 0.02, grid 0.05)")):
        head = "| method | " + " | ".join(f"{w}: modes | {w}: quality % | {w}: RKL" for w in worlds) + " |"
        lines = [f"Scored at the {title}, mean ± sd over seeds:", "", head,
                 "|---|" + "---|" * (3 * len(worlds))]
        for m in methods:
            cells = []
            for w in worlds:
                rs = [r[key] for r in doc["runs"] if r["world"] == w and r["method"] == m]
                cells += [_fmt([x["modes_covered"] for x in rs], 1), _fmt([x["quality"] for x in rs], 1, pct=True),
                          _fmt([x["reverse_kl"] for x in rs], 2)]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        out += ["\n".join(lines), ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
