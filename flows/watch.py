"""The watch flow: audit every checkpoint of a folder that has not been audited yet, oldest first.

Composition only: scanning, identity, history.json and index.html are in tasks/watch.py; each
checkpoint's audit is the audit flow itself (a subflow), with the CLI's checks first.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.states import Failed

from modeaudit.storage.layout import atomic_write_json, check_out_dir, run_lock
from modeaudit.storage.store import StoreError
from modeaudit.tasks import console
from modeaudit.tasks import watch as w
from modeaudit.tasks.config import AuditConfig
from modeaudit.tasks.registry import ConfigError

log = logging.getLogger("modeaudit.watch")

# Between two passes (a name of its own, so a test can replace it without touching time.sleep).
_sleep = time.sleep

# AuditConfig fields a watch sets itself, per checkpoint.
PER_CHECKPOINT = ("generator", "out")


def base_config(runs_dir: str, audit: dict | None) -> AuditConfig:
    """The audit settings shared by every checkpoint (AuditConfig fields but generator and out), validated."""
    audit = dict(audit or {})
    given = [k for k in PER_CHECKPOINT if k in audit]
    if given:
        raise ConfigError(f"audit settings of a watch cannot set {', '.join(given)}: each checkpoint is the "
                          "generator (torchscript:PATH or onnx:PATH) and its run folder is RUNS_DIR/<stem>-<sha256[:12]>")
    return AuditConfig.parse({**audit, "out": str(runs_dir)})


def audit_checkpoint(ck: w.Checkpoint, base: AuditConfig, runs: Path) -> dict:
    """One checkpoint's audit into RUNS_DIR/<run_name>, through the CLI's checks and the audit flow (a subflow)."""
    from modeaudit.flows.audit import audit_flow
    from modeaudit.flows.cli import preflight
    cfg = AuditConfig.parse({**base.to_dict(), "generator": ck.spec, "out": str(runs / ck.run_name)})
    preflight(cfg)
    check_out_dir(cfg.out)
    return audit_flow(cfg.to_dict())


def watch_pass(ckpt_dir: str | Path, runs_dir: str | Path, base: AuditConfig) -> dict:
    """Audit the new checkpoints once; history.json and index.html are updated after each. Returns a summary."""
    runs = Path(runs_dir)
    history = w.load_history(runs)
    done = w.audited(history)
    audited, failed, skipped, seen = [], [], 0, set()
    for ck in w.scan_checkpoints(ckpt_dir):
        if ck.sha256 in done or ck.sha256 in seen:     # audited already (maybe under another name)
            skipped += 1
            continue
        seen.add(ck.sha256)
        attempt = w.attempts_of(history, ck.sha256) + 1
        # A normal progress line (console.note: stderr in the CLI, an INFO record elsewhere), not a warning.
        console.note(f"watch: auditing {ck.path.name} (sha256 {ck.sha256[:12]}) into {ck.run_name}")
        try:
            result = audit_checkpoint(ck, base, runs)
            entry = w.ok_entry(ck, attempt, result, runs / ck.run_name)
            audited.append(entry)
        except Exception as e:  # noqa: BLE001 - recorded as failed, retried on the next pass
            entry = w.failed_entry(ck, attempt, w.one_line(e))
            failed.append(entry)
            log.warning("modeaudit watch: %s failed: %s", ck.path.name, entry["error"])
        history = w.record(runs, history, entry)
        _index(runs, history)
    if not (runs / w.INDEX_HTML).exists():
        if not (runs / w.HISTORY_JSON).exists():
            # An empty history marks the folder as this watch's (check_dirs refuses an index.html without one).
            atomic_write_json(runs / w.HISTORY_JSON, history)
        _index(runs, history)
    return {"audited": audited, "failed": failed, "skipped": skipped,
            "history": str(runs / w.HISTORY_JSON), "index": str(runs / w.INDEX_HTML)}


def _index(runs: Path, history: dict) -> None:
    try:
        w.write_index(runs, history)
    except Exception as e:  # noqa: BLE001 - the page is a view of history.json; never fails the watch
        log.warning("modeaudit watch: could not write %s: %s", runs / w.INDEX_HTML, w.one_line(e))


@flow(name="modeaudit-watch", log_prints=True, validate_parameters=False)
def watch_flow(ckpt_dir: str, runs_dir: str, audit: dict[str, Any] | None = None, once: bool = True,
               interval: float = 300.0) -> dict:
    """Prefect flow: audit every checkpoint file (.pt TorchScript, .onnx) in `ckpt_dir` not audited yet.

    `audit` holds AuditConfig fields (all but generator and out) shared by every checkpoint, e.g.
    {"generator_options": {"latent_dim": 512}, "descriptor": "torchscript:/models/arcface.pt"}. One run
    folder per checkpoint under `runs_dir`, plus runs_dir/history.json and index.html. `once`: one pass,
    then return its summary; otherwise pass again every `interval` seconds, forever. One watcher per
    runs_dir (a lock); bad parameters end the run with a one-line error.
    """
    try:
        if isinstance(once, str) or isinstance(interval, (str, bool)) or not interval > 0:
            raise ConfigError(f"watch: once must be true/false and interval a number of seconds > 0 (got once={once!r}, "
                              f"interval={interval!r})")
        base = base_config(runs_dir, audit)
        _, runs = w.check_dirs(ckpt_dir, runs_dir)
        with run_lock(runs):
            while True:
                summary = watch_pass(ckpt_dir, runs, base)
                if once:
                    return summary
                _sleep(float(interval))
    except (ConfigError, StoreError) as e:
        return Failed(message=str(e))
