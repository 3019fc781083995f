"""The run directory's layout and the one way to write a file in it.

Every path inside a run directory is named here, and every file this tool writes
there goes through `atomic_write_*` (temp file in the same directory, fsync, rename),
so a crash or a concurrent reader sees the old file or the new one, never half of one.
`OWNED` lists the top-level entries a run writes: `--overwrite` may remove those and
nothing else (a user's own files in the folder are never touched).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

RESULT_JSON = "result.json"
REPORT_HTML = "report.html"
PLOTS = "plots"
STORE_ZARR = "store.zarr"
MANIFEST = "manifest"
RUN_JSON = "run.json"          # inside manifest/: the store's fingerprint and layouts
SCANS = "scans"
CALIBRATION = "calibration"
LOCK = ".modeaudit.lock"
# Figures under plots/ are saved in both formats (PNG embedded in the reports, SVG for print).
PLOT_FORMATS = ("png", "svg")
# The pictures regenerated from stored latents (tasks/report/pictures.py), as plots/<name>.png/.svg.
PICTURES = ("neighbours_worst", "neighbours_random", "modes")
# What a run writes at the top of its directory (and so what --overwrite may remove).
OWNED = (RESULT_JSON, REPORT_HTML, PLOTS, STORE_ZARR, MANIFEST, SCANS, CALIBRATION)


class RunLayout:
    """Paths of one run directory (an audit run; calibrations live under calibration/<method>/)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def result_json(self) -> Path:
        """result.json: written last; its presence means the audit completed."""
        return self.root / RESULT_JSON

    @property
    def report_html(self) -> Path:
        """The audit report."""
        return self.root / REPORT_HTML

    @property
    def written_report(self) -> Path | None:
        """report.html if the run wrote one; None when it ran with --no-report (link result.json instead)."""
        return self.report_html if self.report_html.is_file() else None

    @property
    def plots(self) -> Path:
        """Figures of the report, as files."""
        return self.root / PLOTS

    def plot(self, name: str, fmt: str = "png") -> Path:
        """One figure of the report under plots/ (name without extension; fmt png or svg)."""
        return self.plot_in(self.plots, name, fmt)

    @staticmethod
    def plot_in(plots_dir: Path, name: str, fmt: str = "png") -> Path:
        """plots_dir/<name>.<fmt>; names are plain file stems (no folders)."""
        if not name or "/" in name or "\\" in name or name.startswith(".") or fmt not in PLOT_FORMATS:
            raise ValueError(f"bad plot name {name!r}.{fmt}: a plain file stem, format one of {PLOT_FORMATS}")
        return Path(plots_dir) / f"{name}.{fmt}"

    @property
    def run_json(self) -> Path:
        """The store's record (fingerprint, layouts): a directory with it is a modeaudit run."""
        return self.root / MANIFEST / RUN_JSON

    @property
    def lock(self) -> Path:
        """Held by the process writing this run."""
        return self.root / LOCK

    def calibration(self, method: str) -> Path:
        """Folder of one calibration method (sampler/, audit/, calibration.json, report.html)."""
        return self.root / CALIBRATION / method

    def calibration_json(self, method: str) -> Path:
        """calibration.json of a method: written last."""
        return self.calibration(method) / "calibration.json"

    def calibration_report(self, method: str) -> Path:
        """The before/after report of a calibration method."""
        return self.calibration(method) / REPORT_HTML

    def calibration_sampler(self, method: str) -> Path:
        """The calibrated sampler (params.npz + meta.json): the generator calibrated:PATH."""
        return self.calibration(method) / "sampler"

    def calibration_audit(self, method: str) -> Path:
        """The re-audit of the calibrated sampler (a run directory of its own)."""
        return self.calibration(method) / "audit"

    @staticmethod
    def scan(set_name: str, index: int) -> str:
        """Store-relative path of one shard's validity scan."""
        return f"{SCANS}/{set_name}/{index}.json"

    @staticmethod
    def result_array(name: str) -> str:
        """Store-relative name of a result array (self_counts, curves, mccs_A)."""
        return f"results/{name}"

    def owned_entries(self) -> list[Path]:
        """The entries of OWNED that exist in this directory."""
        return [self.root / n for n in OWNED if (self.root / n).exists()]


# What a result.json records about how a run went rather than what it computed: two runs of
# the same audit (a resume, a cache hit, another machine, another hour) differ only here.
RUN_HISTORY = ("timings", "run_info", "source.shards", "source.cache")


def comparable_result(result: dict) -> dict:
    """A copy of a result.json dict without its run history (RUN_HISTORY): equal for two runs of one audit."""
    r = json.loads(json.dumps(result, default=json_default))
    for key in RUN_HISTORY:
        *parents, last = key.split(".")
        node = r
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return r


def json_default(obj: Any) -> Any:
    """JSON for numpy scalars/arrays, paths and sets: the plain value they stand for (np.int64(5) -> 5)."""
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not all platforms/filesystems allow
    # opening a directory, and durability there is best effort anyway.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, payload: bytes, mode: int = 0o644) -> Path:
    """Write `payload` to `path` so readers see either the old file or the new one; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique temp name per process *and* thread: several Dask workers may
    # write neighbouring manifest entries in the same directory at once.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """atomic_write_bytes of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> Path:
    """Indented JSON (numpy values as plain numbers), written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=json_default) + "\n")


def resolved_dir(out: str | os.PathLike) -> Path:
    """The directory a path names, as the OS resolves it once every folder on it exists: symlinks
    followed and ".." applied (os.path.realpath). "X/new/.." names X itself, not a new folder: checks
    of whether a run directory exists, and anything deleted, go by this path."""
    return Path(os.path.realpath(os.fspath(out)))


def make_writable_dir(path: Path, what: str) -> None:
    """Create `path` (and parents) and prove a file can be written there, or a one-line ConfigError."""
    from modeaudit.tasks.registry import ConfigError
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".modeaudit-write-test.{os.getpid()}.{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to {what} ({e.strerror or e}); choose a writable directory") from None


def check_out_dir(out: str | os.PathLike) -> Path:
    """Check that the run directory can be made and written, or say why it cannot be one: not writable, or
    holding files named like a run's outputs that no modeaudit run wrote (a user's own report.html or plots/
    are never overwritten). A folder that did not exist is made for the check and removed again."""
    from modeaudit.tasks.registry import ConfigError
    text = os.fspath(out)
    if not text.strip():
        raise ConfigError("--out is empty; give a directory for the run, e.g. --out runs/audit1")
    if "://" in text:
        raise ConfigError(f"--out {text}: only local (or mounted) directories are supported, not URLs; "
                          "mount the bucket or write locally and copy")
    path = resolved_dir(text)
    # The first folder of the path that does not exist yet: made for the write probe and
    # removed again, so the run itself finds no directory and knows it is new (a run that
    # fails before its first shard removes what it made: discard_unstarted_run).
    top = next((p for p in [*reversed(path.absolute().parents), path.absolute()] if not p.exists()), None)
    try:
        make_writable_dir(path, f"--out {text}")
    finally:
        if top is not None:
            import shutil
            shutil.rmtree(top, ignore_errors=True)
    if top is not None:
        return path
    lay = RunLayout(path)
    if not lay.run_json.exists():
        foreign = [p.name for p in lay.owned_entries()]
        if foreign:
            raise ConfigError(f"--out {text} holds {', '.join(foreign)} but is not a modeaudit run (no "
                              f"{MANIFEST}/{RUN_JSON}); "
                              "modeaudit would overwrite them: choose an empty or new folder")
    return path


def clear_derived(out: str | os.PathLike) -> None:
    """Remove what an earlier run derived from its store (result, report, plots, calibrations).

    Called only once the new run is validated and its store fingerprint checked: a refused
    run leaves the earlier one whole. The store itself is replaced (or resumed) by RunStore.
    """
    import shutil
    lay = RunLayout(out)
    for p in (lay.result_json, lay.report_html):
        p.unlink(missing_ok=True)
    for d in (lay.plots, lay.root / CALIBRATION):
        shutil.rmtree(d, ignore_errors=True)


def discard_unstarted_run(out: str | os.PathLike, keep=(), remove_dir: bool = True) -> bool:
    """Remove what a failed run wrote to a directory that held no run, if it recorded no finished shard.

    Called when a run that found no run at `out` fails (bad input found on the cluster, a full
    disk before the first shard): nothing in it is worth a resume, a refused run leaves no half
    result behind, and a rerun with corrected inputs is not refused as "a different run". Only
    the entries a run writes (OWNED, the lock) that were not there before (`keep`: their names)
    are removed, then the directory if the run made it (`remove_dir`) and that leaves it empty:
    a folder the user made, and whatever was in it, stays. A directory with a recorded shard is
    kept (a rerun resumes it). Returns whether the directory was removed.
    """
    import shutil
    root = resolved_dir(out)
    manifest = root / MANIFEST
    if not root.is_dir() or any(p.name != RUN_JSON for p in manifest.rglob("*.json")):
        return False
    for p in [*RunLayout(root).owned_entries(), root / LOCK]:
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink(missing_ok=True)
    if not remove_dir:
        return False
    try:
        root.rmdir()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def run_lock(out: str | os.PathLike):
    """Hold the run directory's lock for the duration of a run: a second writer is refused at once.

    An advisory flock on DIR/.modeaudit.lock: released by the kernel when the process
    ends, however it ends, so a killed run never leaves the directory locked.
    """
    import fcntl
    from modeaudit.tasks.registry import ConfigError
    path = RunLayout(out).lock
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise ConfigError(f"another modeaudit run ({holder}) is writing {out}; wait for it to finish or use "
                              "another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        yield
    finally:
        fh.close()
