"""`modeaudit toy train|score`: reference GAN training and ground-truth scores on the toy worlds.

Hooked into `flows/cli.py` by `add_toy_parser(sub)` and one dispatch to `run_toy(args)`.
Every bad input ends as one line `modeaudit: error: <what; how to fix>` on stderr and exit
code 2: the toy parsers report argparse's own errors that way too.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from modeaudit.flows.args import HelpFormatter, OneLineParser, count as _count  # noqa: E402
from modeaudit.tasks.registry import ConfigError, parse_kv


def add_toy_parser(sub) -> None:
    """Add `toy train` and `toy score` under the main parser's subcommands."""
    t = sub.add_parser("toy", help="toy worlds with ground truth: train reference GANs, score generators")
    ts = t.add_subparsers(dest="toy_command", parser_class=OneLineParser)
    fmt = HelpFormatter
    tr = ts.add_parser("train", formatter_class=fmt, help="train a reference GAN on a toy world; TorchScript "
                       "checkpoints of the generator every --every steps")
    tr.add_argument("--world", required=True, help="ring8, grid25, ring8-imbalanced or moons")
    tr.add_argument("--method", required=True, help="gan, bigan, invertgan, lol1, lol2, lol1-pgp or lol2-pgp")
    tr.add_argument("--steps", required=True, type=_count, help="training steps (one D and one G update each)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the data, the weights and every batch")
    tr.add_argument("--out", required=True, metavar="DIR", help="folder for ckpt_NNNNNN.pt and train.json")
    tr.add_argument("--every", type=_count, default=500, help="save a checkpoint every N steps (and at the end)")
    tr.add_argument("--latent-dim", type=_count, default=2, help="latent dimension")
    tr.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate")
    tr.add_argument("--batch", type=_count, default=128, help="batch size")
    tr.add_argument("--sd", type=float, default=None, help="mode sd of the world (None: the seed's value)")
    tr.add_argument("--threads", type=_count, default=1, help="torch threads while training")
    sc = ts.add_parser("score", formatter_class=fmt, help="ground-truth scores of a generator on a toy world: "
                       "metrics.json and samples.npy in DIR")
    sc.add_argument("--world", required=True, help="ring8, grid25, ring8-imbalanced or moons")
    sc.add_argument("--generator", required=True, metavar="SPEC", help="e.g. torchscript:DIR/ckpt_002000.pt "
                    "(with -G latent_dim=2) or toy:ring8")
    sc.add_argument("-G", "--generator-option", action="append", metavar="KEY=VALUE", help="generator option")
    sc.add_argument("--n", type=_count, default=50_000, help="samples to draw (seed 003 scores 50K on Ring)")
    sc.add_argument("--seed", type=int, default=0, help="latent seed")
    sc.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json and samples.npy")
    sc.add_argument("--sd", type=float, default=None, help="mode sd of the world (None: the seed's value)")
    sc.add_argument("--min-share", type=float, default=None,
                    help="share of the samples a mode needs within 3 sd to count as covered (default 0.008)")


def _writable(out: str) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".modeaudit-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to --out {out} ({e.strerror or e}); choose a writable directory") from None
    return path


def _train(args) -> dict:
    from modeaudit.tasks.toy.trainers import TrainConfig, torch_threads, train
    cfg = TrainConfig(world=args.world, method=args.method, steps=args.steps, seed=args.seed, every=args.every,
                      batch=args.batch, latent_dim=args.latent_dim, lr=args.lr, world_sd=args.sd).validate()
    out = _writable(args.out)
    with torch_threads(args.threads):
        s = train(cfg, out, log=print)
    return {"out": str(out), "final": str(out / s["final"]), "checkpoints": len(s["checkpoints"]),
            "seconds": s["seconds"],
            "audit_with": f"--generator torchscript:{out / s['final']} -G latent_dim={cfg.latent_dim} "
                          f"--descriptor rff --reference-generator toy:{cfg.world}"}


def score_generator(world_name: str, spec: str, options: dict, n: int, seed: int = 0, sd: float | None = None,
                    min_share: float | None = None):
    """(points, metrics) for n samples of a registered generator scored on a toy world."""
    import numpy as np
    from modeaudit.tasks.models.generators import GENERATORS
    from modeaudit.tasks.toy.score import MIN_SHARE, score_points
    from modeaudit.tasks.toy.worlds import get_world
    world = get_world(world_name, sd)
    if n < 1:
        raise ConfigError(f"--n {n}: draw at least one sample")
    share = MIN_SHARE if min_share is None else min_share
    if not (0 < share < 1):
        raise ConfigError(f"--min-share {share} must be in (0, 1)")
    try:
        g = GENERATORS.build(spec, options)
    except (RuntimeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"generator {spec!r} could not be loaded ({type(e).__name__}); give a TorchScript "
                          "checkpoint saved by `modeaudit toy train`") from None
    z = g.latents(seed, "toy-score", 0, n)
    try:
        x = np.concatenate([g.generate(z[i:i + g.batch_size]) for i in range(0, n, g.batch_size)])
    except RuntimeError as e:
        # torch reports a latent-width mismatch as a RuntimeError deep inside the module.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"generator {spec!r} failed on latents of width {g.latent_dim} ({first}); set -G "
                          "latent_dim= to the width it was trained with (train.json says)") from None
    if x.ndim != 2 or x.shape[1] != 2:
        raise ConfigError(f"generator {spec!r} makes samples of shape {tuple(x.shape[1:])}, not 2-D points; "
                          "toy scores need a generator trained on a toy world")
    metrics = score_points(world, x, share)
    metrics.update(generator=spec, generator_options=options, seed=seed)
    return x, metrics


def _score(args) -> dict:
    from modeaudit.tasks.toy.score import write_scores
    opts = parse_kv(args.generator_option, "-G")
    x, metrics = score_generator(args.world, args.generator, opts, args.n, args.seed, args.sd, args.min_share)
    out = _writable(args.out)
    write_scores(out, x, metrics)
    return {k: metrics[k] for k in ("world", "n", "modes_covered", "modes_total", "quality", "reverse_kl")} | {
        "out": str(out)}


def run_toy(args) -> int:
    """Run `toy train` or `toy score`; user errors are one line on stderr and exit code 2."""
    try:
        if args.toy_command is None:
            raise ConfigError("`modeaudit toy` needs a subcommand: train or score (see `modeaudit toy --help`)")
        result = _train(args) if args.toy_command == "train" else _score(args)
    except ConfigError as e:
        print(f"modeaudit: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0
