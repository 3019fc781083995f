"""The feature cache: embeddings of image folders, kept across runs.

An entry is keyed by a content key (sha256 of the descriptor's fingerprint, every file's
relative path, size and sha256, the image pipeline's version; see
`tasks/models/image_folders.content_key`) and lives at

    ROOT/features/v<CACHE_FORMAT>/<key[:2]>/<key>/emb.npy     float32 rows of the accepted files
                                                 /meta.json   files, refused files, descriptor, sha256 of emb.npy

ROOT is `--cache-dir`, else $MODEAUDIT_CACHE, else $XDG_CACHE_HOME/modeaudit, else
~/.cache/modeaudit. It never lives inside a run directory, and a run's --overwrite never
touches it (delete ROOT to empty it; nothing else removes entries).

Writers build an entry in a temporary folder next to it (files written with
storage/layout's atomic writers) and publish it with one rename; a reader only ever sees a
complete entry or none. Two runs writing the same entry at once: the first rename wins, the
second discards its copy (same key, same bytes). A damaged entry (its emb.npy does not match
the checksum in meta.json, or meta.json is unreadable) is logged, ignored and rebuilt.
A cache that cannot be written (read-only, full disk) is logged and skipped: it is never a
reason for a run to fail.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from modeaudit.storage.layout import atomic_write_bytes, atomic_write_json

CACHE_FORMAT = 1
ENV = "MODEAUDIT_CACHE"
log = logging.getLogger("modeaudit.cache")


def default_cache_root() -> Path:
    """$MODEAUDIT_CACHE, else $XDG_CACHE_HOME/modeaudit, else ~/.cache/modeaudit."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "modeaudit"
    return Path.home() / ".cache" / "modeaudit"


def cache_root(cache_dir: str | None) -> Path:
    """The cache root a run uses (absolute)."""
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_root()).absolute()


class FeatureCache:
    """Embeddings by content key under a cache root."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        """Folder of one entry."""
        return self.root / "features" / f"v{CACHE_FORMAT}" / key[:2] / key

    def get(self, key: str) -> tuple[np.ndarray, dict] | None:
        """(rows, meta) of a complete, intact entry; None when absent or damaged (a damaged one is removed)."""
        d = self.entry(key)
        if not (d / "meta.json").exists():
            return None
        try:
            meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
            data = (d / "emb.npy").read_bytes()
            why = None
            if not isinstance(meta, dict) or meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
                why = "its meta.json does not describe this entry"
            elif hashlib.sha256(data).hexdigest() != meta.get("emb_sha256"):
                why = "emb.npy does not match its checksum"
            else:
                rows = np.load(io.BytesIO(data), allow_pickle=False)
                if rows.dtype != np.float32 or rows.ndim != 2 or rows.shape[0] != meta.get("rows"):
                    why = f"emb.npy has shape {rows.shape} and dtype {rows.dtype}"
        except (OSError, ValueError) as e:
            why = f"it cannot be read ({e})"
        if why is not None:
            log.warning("modeaudit: feature cache entry %s is damaged (%s); ignoring it and embedding again", d, why)
            self._discard(d)
            return None
        return rows, meta

    def put(self, key: str, rows: np.ndarray, meta: dict) -> Path | None:
        """Publish an entry atomically; returns its folder, or None when the cache could not be written."""
        d = self.entry(key)
        tmp = d.parent / f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(rows, np.float32), allow_pickle=False)
        data = buf.getvalue()
        meta = {**meta, "format": CACHE_FORMAT, "key": key, "rows": int(rows.shape[0]),
                "dim": int(rows.shape[1]), "emb_sha256": hashlib.sha256(data).hexdigest()}
        try:
            tmp.mkdir(parents=True)
            atomic_write_bytes(tmp / "emb.npy", data)
            atomic_write_json(tmp / "meta.json", meta)
            try:
                os.rename(tmp, d)
            except OSError:
                if (d / "meta.json").exists():      # another run published the same entry first
                    shutil.rmtree(tmp, ignore_errors=True)
                    return d
                self._discard(d)                    # a folder without meta.json is no entry: replace it
                os.rename(tmp, d)
        except OSError as e:
            log.warning("modeaudit: cannot write the feature cache at %s (%s); continuing without caching",
                        self.root, e.strerror or e)
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        return d

    @staticmethod
    def _discard(d: Path) -> None:
        # Renamed away first: a concurrent reader sees the entry whole or not at all.
        gone = d.parent / f".{d.name}.{uuid.uuid4().hex}.damaged"
        try:
            os.rename(d, gone)
        except OSError:
            return
        shutil.rmtree(gone, ignore_errors=True)
