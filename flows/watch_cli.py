"""`modeaudit watch CKPT_DIR --out RUNS_DIR [audit options]`: the CLI of flows/watch.py (no Prefect at import)."""
from __future__ import annotations

import argparse
import json
import sys

from modeaudit.flows.args import HelpFormatter

# Options of `watch` that are not AuditConfig fields.
WATCH_ONLY = ("ckpt_dir", "once", "interval")


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds > 0")
    return v


def add_watch_parser(sub) -> None:
    """The `watch` subcommand: the audit's options (flows/cli.add_audit_arguments, without the inputs)."""
    from modeaudit.flows.cli import add_audit_arguments
    w = sub.add_parser("watch", help="audit every new checkpoint (.pt TorchScript, .onnx) of a folder, oldest first",
                       formatter_class=HelpFormatter)
    w.add_argument("ckpt_dir", metavar="CKPT_DIR", help="folder of checkpoint files (.pt: TorchScript, .onnx; not "
                   "recursive); identity is the file's sha256, so renamed copies are not audited again")
    w.add_argument("--out", required=True, metavar="RUNS_DIR", help="folder of the runs: one run folder per "
                   "checkpoint (<stem>-<sha256[:12]>), history.json, index.html")
    w.add_argument("--once", action="store_true", help="audit what is there and exit (else poll every --interval)")
    w.add_argument("--interval", type=_seconds, default=300.0, help="seconds between two passes over CKPT_DIR")
    w.add_argument("--overwrite", action="store_true", help="replace a run folder holding a different audit "
                   "(e.g. after changing the audit options)")
    w.add_argument("--fail-on", choices=["collapse", "warning", "never"], default="never",
                   help="with --once: exit code 3 when a newly audited checkpoint's verdict reaches this level")
    add_audit_arguments(w, inputs=False)


def check_watch_settings(base) -> None:
    """The checks of flows/cli.preflight that need no generator: settings, kernel, scheduler, sizes."""
    from modeaudit.tasks.config import apply_preset, finalize_sizes, kernel_for, validate_settings
    base = base.replace(generator="torchscript:CHECKPOINT")     # each checkpoint is the generator
    validate_settings(base)
    kernel_for(base.kernel)
    if base.scheduler:
        from modeaudit.flows.cluster import probe_scheduler
        probe_scheduler(base.scheduler)
    cfg = apply_preset(base)
    finalize_sizes(cfg, cfg.m, cfg.M)


def check_watch(args):
    """The audits' base config, its settings and the two folders checked (ConfigError when refused): run by the
    CLI before Prefect loads, so a refused watch answers in a second or two."""
    from modeaudit.flows.cli import config_from_args
    from modeaudit.tasks import watch as w
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in WATCH_ONLY})
    base = config_from_args(ns)
    check_watch_settings(base)
    w.check_dirs(args.ckpt_dir, args.out)
    return base


def run_watch(args, base) -> int:
    """Exit 0, 2 (bad input, or with --once a checkpoint whose audit failed), 3 (--fail-on reached with --once).
    `base`: check_watch's config (the CLI checks it before Prefect loads)."""
    from prefect.exceptions import FailedRun

    from modeaudit.flows.cli import gate
    from modeaudit.storage.store import StoreError
    from modeaudit.tasks.registry import ConfigError
    try:
        from modeaudit.flows.watch import watch_flow
        audit = {k: v for k, v in base.to_dict().items() if k not in ("generator", "out")}
        summary = watch_flow(args.ckpt_dir, args.out, audit, once=args.once, interval=args.interval)
    except (ConfigError, StoreError, FailedRun) as e:
        print(f"modeaudit: error: {e}", file=sys.stderr)
        return 2
    for e in summary["failed"]:
        print(f"modeaudit: error: checkpoint {e['checkpoint']} (attempt {e['attempts']}): {e['error']}; it is "
              "recorded as failed in history.json and retried on the next pass", file=sys.stderr)
    print(json.dumps({"audited": [{"checkpoint": e["checkpoint"], "run": e["run"], "headline": e["headline"]}
                                  for e in summary["audited"]],
                      "failed": [e["checkpoint"] for e in summary["failed"]], "skipped": summary["skipped"],
                      "history": summary["history"], "index": summary["index"]}, indent=1))
    codes = [gate(e["level"], args.fail_on) for e in summary["audited"]]
    if any(codes):
        return max(codes)
    return 2 if summary["failed"] else 0
