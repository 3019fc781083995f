"""Does the audit see a dropped mode? Two planted ring8 generators, scored and audited.

* ``dropped-renorm`` -- mode 0 of ring8 never generated; its mass goes to the other seven
  (each 1/7 instead of 1/8): the remaining modes are denser than the real data.
* ``dropped-junk`` -- mode 0 never generated; its 1/8 of the mass is spread uniformly over the
  square [-3, 3]^2 (poor samples): every generated mode keeps exactly its true mass.

Both are TorchScript generators (latents (n, 3) -> points), scored with `toy score`'s code and
audited like the trained checkpoints (`--descriptor rff --reference-generator toy:ring8`), with the
deficit test added (`--tests`). ``--trained ring8/gan/0`` adds trained checkpoints (world/method/seed,
2,000 steps, reused from --train-out when already trained), e.g. gan seed 0, whose starved modes
the deficit test is meant to name. Each rejected deficit ball is mapped to its true mode through the
reference row's stored latent.

    nice -n 10 .venv/bin/python benchmarks/toy_dropped_mode.py --trained ring8/gan/0 \
        --out runs/toy-dropped --json benchmarks/toy_dropped_mode.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="modeaudit-toy-prefect-")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402


class DroppedMode(torch.nn.Module):
    """ring8 without mode 0; `junk` = its mass as uniform points on [-3, 3]^2, else renormalised."""

    def __init__(self, junk: bool, sd: float = 0.001):
        super().__init__()
        a = torch.arange(8, dtype=torch.float32) * torch.pi / 4
        self.register_buffer("means", torch.stack([2 * torch.cos(a), 2 * torch.sin(a)], 1))
        self.junk, self.sd = junk, sd

    def forward(self, z):
        u = torch.special.ndtr(z[:, 0])
        lo = 0.125 if self.junk else 0.0
        k = 1 + torch.clamp(((u - lo) / (1 - lo) * 7).floor().long(), 0, 6)
        x = self.means[k] + self.sd * z[:, 1:3]
        if self.junk:
            flat = 6 * torch.special.ndtr(z[:, 1:3]) - 3
            x = torch.where((u < lo).unsqueeze(1), flat, x)
        return x


def _trained(spec: str, root: Path, steps: int) -> tuple[str, Path, int]:
    """(name, checkpoint, latent_dim) of world/method/seed, trained (1 torch thread) unless train.json is there."""
    from modeaudit.tasks.toy.trainers import TrainConfig, torch_threads, train
    world, method, seed = spec.split("/")
    run = root / world / method / f"seed{seed}"
    if (run / "train.json").exists():
        summ = json.loads((run / "train.json").read_text())
    else:
        with torch_threads(1):
            summ = train(TrainConfig(world, method, steps, seed=int(seed), every=steps), run)
    return f"{method}-seed{seed}", run / summ["final"], summ["latent_dim"]


def main() -> int:
    """Score and audit both planted generators (and any --trained checkpoints); write one JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/toy-dropped")
    ap.add_argument("--json", default="benchmarks/toy_dropped_mode.json")
    ap.add_argument("--bandwidths", default="1.0,0.5", help="rff bandwidths to audit with")
    ap.add_argument("--tests", default="paper,erl,selection,two_sample,deficit")
    ap.add_argument("--trained", default="", help="comma list of ring8/METHOD/SEED checkpoints to add")
    ap.add_argument("--train-out", default="runs/toy-table")
    ap.add_argument("--steps", type=int, default=2000)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import toy_table
    from toy_table import _audit, reference_modes
    toy_table.REUSE_AUDITS = True     # a finished audit of the same tests in --out is read, not rerun
    toy_table.SKIP_DIVERSITY = True   # the peers' metrics: not shown here, most of an audit's time
    from modeaudit.flows.toy_cli import score_generator
    from modeaudit.tasks.toy.rff import distance_to_radius
    from modeaudit.tasks.toy.trainers import sample_checkpoint
    from modeaudit.tasks.toy.worlds import get_world
    from prefect.testing.utilities import prefect_test_harness
    out, rows, world = Path(a.out), [], get_world("ring8")
    out.mkdir(parents=True, exist_ok=True)
    gens = []
    for name, junk in (("dropped-renorm", False), ("dropped-junk", True)):
        ckpt = out / f"{name}.pt"
        torch.jit.save(torch.jit.script(DroppedMode(junk)), str(ckpt))
        gens.append((name, ckpt, 3))
    gens += [_trained(t, Path(a.train_out), a.steps) for t in a.trained.split(",") if t]
    with prefect_test_harness(server_startup_timeout=600):
        for name, ckpt, latent_dim in gens:
            _, m = score_generator("ring8", f"torchscript:{ckpt}", {"latent_dim": str(latent_dim)}, 50_000)
            _, wide = score_generator("ring8", f"torchscript:{ckpt}", {"latent_dim": str(latent_dim)}, 50_000, sd=0.02)
            xs = sample_checkpoint(ckpt, 50_000, latent_dim)
            dist = np.sqrt(((xs[:, None, :] - world.means[None]) ** 2).sum(-1))
            for h in (float(b) for b in a.bandwidths.split(",")):
                au = _audit(["--generator", f"torchscript:{ckpt}", "-G", f"latent_dim={latent_dim}"],
                            out / f"{name}-h{h:g}", "ring8", "demo", h, a.tests)
                if au.get("rc") == 0:
                    for b, md in zip(au.get("deficit", []), reference_modes(
                            Path(au["dir"]), world, [b["ref_index"] for b in au.get("deficit", [])])):
                        b["mode"] = md
                # Ground truth at the audit's scale: each mode's share within r(d0) = 0.83 h, over its weight.
                ball = (dist <= distance_to_radius(0.25, h)).mean(0) / world.weights
                rows.append({"generator": name, "checkpoint": str(ckpt), "bandwidth": h, "truth": {k: m[k] for k in (
                    "modes_covered", "quality", "reverse_kl", "mode_shares")},
                    "truth_wide": {k: wide[k] for k in ("modes_covered", "quality", "reverse_kl", "mode_shares")},
                    "ball_share_over_weight_per_mode": [round(float(v), 3) for v in ball], "audit": au})
                print(json.dumps(rows[-1]), flush=True)
                Path(a.json).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "runs": rows},
                                                   indent=1))
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    """Markdown: truth beside the audit's two-sample and deficit balls."""
    def r(v):
        return "inf" if v is None else f"{v:.2f}"
    lines = ["| generator | rff h | modes covered (seed sd / wide) | quality % (seed sd / wide) | reverse KL | share / "
             "weight within r(d0) per mode | verdict (tests rejecting) | two-sample ratios (rejected *) | deficit "
             "rejects (mode: ratio) |", "|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        au, t, w = x["audit"], x["truth"], x["truth_wide"]
        tests = "".join({"two_sample": "T", "deficit": "D"}.get(k, k[0].upper())
                        for k, v in au.get("reject", {}).items() if v) or "none"
        two = ", ".join(r(b["ratio"]) + ("*" if b["reject"] else "") for b in au.get("two_sample", []))
        dfc = ", ".join(f"{b.get('mode', '?')}: {r(b['ratio'])}" for b in au.get("deficit", []) if b["reject"]) or "none"
        lines.append(f"| {x['generator']} | {x['bandwidth']:g} | {t['modes_covered']} / {w['modes_covered']} | "
                     f"{100 * t['quality']:.1f} / {100 * w['quality']:.1f} | {t['reverse_kl']:.3f} | "
                     f"{' '.join(f'{v:.2f}' for v in x['ball_share_over_weight_per_mode'])} | "
                     f"{au.get('headline')} ({tests}) | {two} | {dfc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
