"""The Zarr run store: layout, shard manifest, atomic shard completion, resume.

A run directory DIR holds

    DIR/store.zarr/                 Zarr v3 group; set arrays at "<set>/<kind>",
                                    extra arrays (write_array) anywhere else
    DIR/manifest/run.json           {"fingerprint", "layouts"}: what this run is
    DIR/manifest/<set>/<index>.json completion record of one shard (checksums)

Every set array is chunked along rows with chunk = shard_rows and full width, so
one shard is exactly one chunk: concurrent writers of different shards never
touch the same file, and no lock is needed. A shard counts as complete only once
its manifest entry exists, and that entry is written (atomically) only after all
of the shard's data is in place, so a crash at any point leaves the shard
incomplete rather than half-written-but-trusted.

This module must stay free of Prefect: Dask workers and tests import it alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from modeaudit.storage.layout import (MANIFEST, RUN_JSON, STORE_ZARR, atomic_write_json,
                                      json_default)

__all__ = [
    "ArraySpec",
    "RunStore",
    "SetLayout",
    "StoreError",
    "fingerprint_hash",
]

STORE_FORMAT = 1
_ZARR_DIR = STORE_ZARR
_MANIFEST_DIR = MANIFEST
_RUN_JSON = RUN_JSON
_MISSING = object()
# Numeric and bool only: checksums are taken over raw C-order bytes, which is
# meaningless for object/str dtypes.
_ALLOWED_DTYPE_KINDS = "biufc"


class StoreError(ValueError):
    """A run store problem; the message says what is wrong and how to fix it."""


# --------------------------------------------------------------------------- #
# JSON helpers
# --------------------------------------------------------------------------- #


def _canonical_json(obj: Any) -> str:
    try:
        return json.dumps(
            obj, sort_keys=True, separators=(",", ":"), default=json_default, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise StoreError(
            f"value is not canonical JSON ({exc}); use only str/int/float/bool/None, "
            "lists and dicts with str keys (no NaN/inf) in fingerprints"
        ) from exc


def _shard_list(indices: list[int]) -> str:
    """Shard numbers for a message: the first ten, then "..."."""
    return ", ".join(map(str, indices[:10])) + (" ..." if len(indices) > 10 else "")


def fingerprint_hash(obj: dict) -> str:
    """Return the sha256 hex digest of ``obj`` as canonical JSON (sorted keys, compact).

    Numpy scalars are treated as the Python numbers they hold, tuples as lists,
    so equal fingerprints hash equally however they were built.
    """
    return hashlib.sha256(_canonical_json(obj).encode("utf-8")).hexdigest()


def _normalise_json(obj: Any) -> Any:
    # Round trip through canonical JSON so the in-memory fingerprint compares
    # equal to the one read back from run.json (tuples -> lists, np -> py).
    return json.loads(_canonical_json(obj))


def _first_difference(old: Any, new: Any, prefix: str) -> str | None:
    """Dotted path of the first key where two JSON values differ, or None if equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in new:
                return f"{where} (only in the existing run)"
            if key not in old:
                return f"{where} (not in the existing run)"
            diff = _first_difference(old[key], new[key], where)
            if diff is not None:
                return diff
        return None
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return f"{prefix} (length {len(old)} in the existing run, {len(new)} now)"
        for i, (a, b) in enumerate(zip(old, new)):
            diff = _first_difference(a, b, f"{prefix}[{i}]")
            if diff is not None:
                return diff
        return None
    if old != new or type(old) is not type(new):
        return f"{prefix} (existing run: {old!r}, now: {new!r})"
    return None


# --------------------------------------------------------------------------- #
# Layout
# --------------------------------------------------------------------------- #


def _check_name(what: str, name: str) -> None:
    # Names become path components both in the zarr group and in manifest/.
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
    ):
        raise StoreError(
            f"invalid {what} name {name!r}; use a non-empty name without '/', '\\' "
            "or a leading '.'"
        )


@dataclass(frozen=True)
class ArraySpec:
    """One array (kind) of a sample set: ``width=None`` means a 1-d array of length rows."""

    kind: str
    dtype: str
    width: int | None = None

    def __post_init__(self) -> None:
        _check_name("array kind", self.kind)
        try:
            dt = np.dtype(self.dtype)
        except TypeError as exc:
            raise StoreError(
                f"array {self.kind!r}: unknown dtype {self.dtype!r}; use a numpy dtype name "
                "such as 'float32', 'float16', 'int64' or 'bool'"
            ) from exc
        if dt.kind not in _ALLOWED_DTYPE_KINDS:
            raise StoreError(
                f"array {self.kind!r}: dtype {dt} is not numeric; use a bool, integer, "
                "float or complex dtype"
            )
        # Normalise spellings ('f4' == 'float32') so layouts compare by meaning.
        object.__setattr__(self, "dtype", dt.name)
        if self.width is not None:
            if isinstance(self.width, bool) or int(self.width) != self.width or self.width < 1:
                raise StoreError(
                    f"array {self.kind!r}: width must be a positive int or None (1-d), "
                    f"got {self.width!r}"
                )
            object.__setattr__(self, "width", int(self.width))

    def shape(self, rows: int) -> tuple[int, ...]:
        """Shape of this array for ``rows`` rows."""
        return (rows,) if self.width is None else (rows, self.width)


@dataclass(frozen=True)
class SetLayout:
    """A named sample set: ``rows`` rows in shards of ``shard_rows`` (last may be short)."""

    name: str
    rows: int
    shard_rows: int
    arrays: tuple[ArraySpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check_name("set", self.name)
        if isinstance(self.rows, bool) or int(self.rows) != self.rows or self.rows < 0:
            raise StoreError(f"set {self.name!r}: rows must be an int >= 0, got {self.rows!r}")
        if (
            isinstance(self.shard_rows, bool)
            or int(self.shard_rows) != self.shard_rows
            or self.shard_rows < 1
        ):
            raise StoreError(
                f"set {self.name!r}: shard_rows must be an int >= 1, got {self.shard_rows!r}"
            )
        object.__setattr__(self, "rows", int(self.rows))
        object.__setattr__(self, "shard_rows", int(self.shard_rows))
        arrays = tuple(self.arrays)
        for spec in arrays:
            if not isinstance(spec, ArraySpec):
                raise StoreError(
                    f"set {self.name!r}: arrays must be ArraySpec objects, got {type(spec).__name__}"
                )
        kinds = [a.kind for a in arrays]
        dup = sorted({k for k in kinds if kinds.count(k) > 1})
        if dup:
            raise StoreError(f"set {self.name!r}: duplicate array kinds {dup}; give each kind once")
        object.__setattr__(self, "arrays", arrays)

    @property
    def n_shards(self) -> int:
        """Number of shards (0 for an empty set)."""
        return -(-self.rows // self.shard_rows)

    def shards(self) -> list[tuple[int, int, int]]:
        """All shards as ``(index, start, stop)``, in row order."""
        return [
            (i, i * self.shard_rows, min((i + 1) * self.shard_rows, self.rows))
            for i in range(self.n_shards)
        ]

    def shard(self, index: int) -> tuple[int, int, int]:
        """The ``(index, start, stop)`` of one shard; StoreError if out of range."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not (
            0 <= index < self.n_shards
        ):
            raise StoreError(
                f"set {self.name!r} has shards 0..{self.n_shards - 1}, got index {index!r}; "
                "take indices from layout(...).shards() or missing_shards(...)"
            )
        index = int(index)
        return index, index * self.shard_rows, min((index + 1) * self.shard_rows, self.rows)

    def spec(self, kind: str) -> ArraySpec:
        """The ArraySpec of ``kind``; StoreError naming the known kinds otherwise."""
        for a in self.arrays:
            if a.kind == kind:
                return a
        raise StoreError(
            f"set {self.name!r} has no array {kind!r}; known kinds: "
            f"{[a.kind for a in self.arrays]}"
        )

    def to_json(self) -> dict:
        """JSON form used in run.json (arrays keyed by kind so diffs name the kind)."""
        return {
            "rows": self.rows,
            "shard_rows": self.shard_rows,
            "arrays": {a.kind: {"dtype": a.dtype, "width": a.width} for a in self.arrays},
        }

    @classmethod
    def from_json(cls, name: str, obj: Mapping) -> "SetLayout":
        """Inverse of :meth:`to_json`."""
        return cls(
            name=name,
            rows=obj["rows"],
            shard_rows=obj["shard_rows"],
            arrays=tuple(
                ArraySpec(kind=k, dtype=v["dtype"], width=v["width"])
                for k, v in obj["arrays"].items()
            ),
        )


def _layouts_json(layouts: list[SetLayout]) -> dict:
    out: dict[str, dict] = {}
    for lay in layouts:
        if not isinstance(lay, SetLayout):
            raise StoreError(f"layouts must be SetLayout objects, got {type(lay).__name__}")
        if lay.name in out:
            raise StoreError(f"set {lay.name!r} appears twice in layouts; give each set once")
        out[lay.name] = lay.to_json()
    return out


def _sha256_of(arr: np.ndarray) -> str:
    # Hash the raw C-order bytes of the stored dtype: exactly what a reader
    # gets back, so verify() can recompute it from the store alone.
    arr = np.ascontiguousarray(arr)
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


def _combined_checksum(start: int, stop: int, checksums: Mapping[str, str]) -> str:
    return fingerprint_hash({"start": start, "stop": stop, "kinds": dict(checksums)})


def _resolve_root(root: str | os.PathLike) -> Path:
    text = os.fspath(root)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        raise StoreError(
            f"run directory {text!r} is a URL; the run store needs a local (or mounted) "
            "directory because shard completion relies on atomic os.replace; "
            "pass a filesystem path as --out"
        )
    return Path(text).expanduser().absolute()


# --------------------------------------------------------------------------- #
# The store
# --------------------------------------------------------------------------- #


class RunStore:
    """A run directory: Zarr arrays of every sample set plus the shard manifest.

    Create it once with :meth:`create_or_open`; workers reopen it with
    :meth:`open` (a RunStore also pickles as its path and reopens on unpickle).
    """

    def __init__(self, root: Path, fingerprint: dict, layouts: dict[str, SetLayout], group):
        # Use create_or_open / open; this only wires the pieces together.
        self.root: Path = root
        self.fingerprint: dict = fingerprint
        self._layouts = layouts
        self._group = group
        self._arrays: dict[tuple[str, str], Any] = {}

    # ----- construction ---------------------------------------------------- #

    @classmethod
    def create_or_open(
        cls,
        root: str | os.PathLike,
        fingerprint: dict,
        layouts: list[SetLayout],
        *,
        overwrite: bool = False,
    ) -> "RunStore":
        """Create ``DIR/store.zarr`` and ``DIR/manifest/run.json``, or reopen a matching run.

        If DIR already holds a run with the same fingerprint and layouts it is
        opened for resume (complete shards are kept). A different run raises
        StoreError naming the first differing key. ``overwrite=True`` deletes
        DIR/store.zarr and DIR/manifest first (other files in DIR are left).
        """
        root = _resolve_root(root)
        if not isinstance(fingerprint, Mapping):
            raise StoreError(
                f"fingerprint must be a dict, got {type(fingerprint).__name__}; "
                "pass the run's configuration as a JSON-like dict"
            )
        fp = _normalise_json(dict(fingerprint))
        lay_json = _layouts_json(list(layouts))
        manifest = root / _MANIFEST_DIR
        run_json = manifest / _RUN_JSON
        zarr_path = root / _ZARR_DIR

        try:
            root.mkdir(parents=True, exist_ok=True)
            if overwrite:
                # Only what this module owns: reports etc. in DIR stay.
                for p in (zarr_path, manifest):
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
        except OSError as exc:
            raise StoreError(f"cannot write to {root}: {exc}; choose a writable --out") from exc

        if run_json.exists():
            cls._refuse_other_run(root, fp, lay_json)
        elif zarr_path.exists():
            # A store.zarr without run.json is not ours, or its creation died
            # before anything was recorded; either way don't guess.
            raise StoreError(
                f"{zarr_path} exists but {run_json} does not, so it is not a (complete) "
                "modeaudit run; use a new --out directory or pass --overwrite"
            )
        else:
            # run.json first: it is what makes DIR recognisably "this run", so a
            # crash during array creation is resumed by the branch above.
            try:
                atomic_write_json(
                    run_json,
                    {
                        "format": STORE_FORMAT,
                        "fingerprint": fp,
                        "fingerprint_hash": fingerprint_hash(fp),
                        "layouts": lay_json,
                    },
                )
            except OSError as exc:
                raise StoreError(
                    f"cannot write to {root}: {exc}; choose a writable --out"
                ) from exc

        try:
            group = zarr.open_group(str(zarr_path), mode="a", zarr_format=3)
            set_layouts = {n: SetLayout.from_json(n, v) for n, v in lay_json.items()}
            for lay in set_layouts.values():
                cls._ensure_arrays(group, lay)
        except OSError as exc:
            raise StoreError(f"cannot write to {root}: {exc}; choose a writable --out") from exc
        return cls(root, fp, set_layouts, group)

    @classmethod
    def check_same_run(cls, root: str | os.PathLike, fingerprint: dict, layouts: list[SetLayout]) -> None:
        """Raise the StoreError create_or_open would raise (without overwrite) when DIR holds a run other
        than the one `fingerprint` and `layouts` describe; return when it holds that run or none. Reads
        only: the CLI and the API call it before Prefect starts, so a refused rerun answers at once."""
        root = _resolve_root(root)
        if (root / _MANIFEST_DIR / _RUN_JSON).exists():
            cls._refuse_other_run(root, _normalise_json(dict(fingerprint)), _layouts_json(list(layouts)))

    @classmethod
    def _refuse_other_run(cls, root: Path, fp: dict, lay_json: dict) -> None:
        existing = cls._read_run_json(root)
        old = {"fingerprint": existing.get("fingerprint"), "layouts": existing.get("layouts")}
        diff = _first_difference(old, {"fingerprint": fp, "layouts": lay_json}, "")
        if diff is not None and diff.startswith("fingerprint.embeddings."):
            # An embeddings run is keyed on its input files: say which file, not which key.
            which = diff.split(".")[2]
            path = (fp.get("embeddings") or {}).get(which, {}).get("path", "?")
            diff = (f"its {which} input differs (the file {path} was modified, replaced, or another file is "
                    "given)")
        if diff is not None:
            raise StoreError(
                f"{root} already holds a different run: {diff}; "
                "use a new --out directory or pass --overwrite"
            )

    @classmethod
    def open(cls, root: str | os.PathLike) -> "RunStore":
        """Open an existing run read/write (what a Dask worker does given only the path)."""
        root = _resolve_root(root)
        info = cls._read_run_json(root)
        layouts = {n: SetLayout.from_json(n, v) for n, v in info["layouts"].items()}
        zarr_path = root / _ZARR_DIR
        if not (zarr_path / "zarr.json").exists():
            raise StoreError(
                f"{zarr_path} is missing although {root / _MANIFEST_DIR / _RUN_JSON} exists; "
                "rerun the audit with the same --out to recreate it (or pass --overwrite)"
            )
        group = zarr.open_group(str(zarr_path), mode="r+", zarr_format=3)
        return cls(root, info["fingerprint"], layouts, group)

    @staticmethod
    def _read_run_json(root: Path) -> dict:
        path = root / _MANIFEST_DIR / _RUN_JSON
        try:
            with open(path, encoding="utf-8") as fh:
                info = json.load(fh)
        except FileNotFoundError as exc:
            raise StoreError(
                f"no modeaudit run at {root} ({path} not found); check --out, or start "
                "the run with RunStore.create_or_open"
            ) from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(
                f"cannot read {path}: {exc}; use a new --out directory or pass --overwrite"
            ) from exc
        if not isinstance(info, dict) or "layouts" not in info or "fingerprint" not in info:
            raise StoreError(
                f"{path} is not a modeaudit run manifest; use a new --out directory "
                "or pass --overwrite"
            )
        if info.get("format", STORE_FORMAT) != STORE_FORMAT:
            raise StoreError(
                f"{path} has store format {info.get('format')!r}, this modeaudit reads "
                f"{STORE_FORMAT}; use the matching modeaudit version or a new --out"
            )
        return info

    @staticmethod
    def _ensure_arrays(group, lay: SetLayout) -> None:
        for spec in lay.arrays:
            path = f"{lay.name}/{spec.kind}"
            shape = spec.shape(lay.rows)
            # One chunk = one shard (full width): different shards never share
            # a chunk file, which is what makes lock-free parallel writes safe.
            chunks = (lay.shard_rows,) if spec.width is None else (lay.shard_rows, spec.width)
            try:
                arr = group[path]
            except KeyError:
                # Uncompressed: latents and embeddings are high-entropy floats (zstd
                # saves < 10%) and decompression made every pass over T 4x slower.
                group.create_array(path, shape=shape, chunks=chunks, dtype=spec.dtype, compressors=None)
                continue
            if (
                not isinstance(arr, zarr.Array)
                or tuple(arr.shape) != shape
                or tuple(arr.chunks) != chunks
                or np.dtype(arr.dtype) != np.dtype(spec.dtype)
            ):
                raise StoreError(
                    f"zarr array {path} does not match the run's layout (want shape {shape}, "
                    f"chunks {chunks}, dtype {spec.dtype}); the store was modified outside "
                    "modeaudit: use a new --out directory or pass --overwrite"
                )

    def __reduce__(self):
        # Zarr handles hold an event loop and caches; ship the path instead and
        # reopen on the other side (e.g. a Dask worker process).
        return (RunStore.open, (str(self.root),))

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r}, sets={list(self._layouts)})"

    # ----- layout and arrays ---------------------------------------------- #

    @property
    def set_names(self) -> list[str]:
        """Names of the sample sets in this run."""
        return list(self._layouts)

    def layout(self, set_name: str) -> SetLayout:
        """The SetLayout of ``set_name``; StoreError naming the known sets otherwise."""
        try:
            return self._layouts[set_name]
        except KeyError:
            raise StoreError(
                f"run {self.root} has no sample set {set_name!r}; known sets: "
                f"{list(self._layouts)} (sets are fixed when the run is created)"
            ) from None

    def array(self, set_name: str, kind: str):
        """The zarr.Array holding ``kind`` of ``set_name`` (rows x width, or rows)."""
        key = (set_name, kind)
        arr = self._arrays.get(key)
        if arr is None:
            self.layout(set_name).spec(kind)
            try:
                arr = self._group[f"{set_name}/{kind}"]
            except KeyError:
                raise StoreError(
                    f"zarr array {set_name}/{kind} is missing from {self.root / _ZARR_DIR}; "
                    "rerun with the same --out to recreate it, or pass --overwrite"
                ) from None
            self._arrays[key] = arr
        return arr

    # ----- shards ---------------------------------------------------------- #

    def _entry_path(self, set_name: str, index: int) -> Path:
        return self.root / _MANIFEST_DIR / set_name / f"{int(index)}.json"

    def _write_rows(self, set_name: str, kind: str, start: int, stop: int, values: np.ndarray):
        # Separate method so tests can count/intercept the data writes.
        self.array(set_name, kind)[start:stop] = values

    def _record_completion(self, path: Path, entry: dict) -> None:
        # Separate method so tests can simulate a crash between data and manifest.
        atomic_write_json(path, entry)

    def write_shard(self, set_name: str, index: int, data: Mapping[str, np.ndarray]) -> str:
        """Write all kinds of shard ``index``, then record completion; return the combined checksum.

        ``data`` must hold exactly the layout's kinds, each with shape
        ``(stop - start, width)`` (or ``(stop - start,)`` for 1-d); values are
        cast to the stored dtype when numpy's 'same_kind' rule allows it. Any
        old completion record is removed first so an interrupted rewrite can
        never be mistaken for complete.
        """
        lay = self.layout(set_name)
        index, start, stop = lay.shard(index)
        want = [a.kind for a in lay.arrays]
        got = list(data.keys())
        if sorted(got) != sorted(want):
            missing = sorted(set(want) - set(got))
            extra = sorted(set(got) - set(want))
            raise StoreError(
                f"shard {index} of set {set_name!r}: data must hold exactly the kinds {want}; "
                f"missing {missing}, unexpected {extra}"
            )
        prepared: dict[str, np.ndarray] = {}
        for spec in lay.arrays:
            values = np.asarray(data[spec.kind])
            shape = spec.shape(stop - start)
            if values.shape != shape:
                raise StoreError(
                    f"shard {index} of set {set_name!r}, kind {spec.kind!r}: expected shape "
                    f"{shape} (rows {start}:{stop}), got {values.shape}"
                )
            dt = np.dtype(spec.dtype)
            if not np.can_cast(values.dtype, dt, casting="same_kind"):
                raise StoreError(
                    f"shard {index} of set {set_name!r}, kind {spec.kind!r}: cannot store "
                    f"{values.dtype} as {dt}; convert it first (e.g. arr.astype({dt.name!r}))"
                )
            prepared[spec.kind] = np.ascontiguousarray(values, dtype=dt)

        path = self._entry_path(set_name, index)
        try:
            path.unlink()
        except FileNotFoundError:
            pass

        checksums: dict[str, str] = {}
        for spec in lay.arrays:
            values = prepared[spec.kind]
            self._write_rows(set_name, spec.kind, start, stop, values)
            checksums[spec.kind] = _sha256_of(values)
        combined = _combined_checksum(start, stop, checksums)
        self._record_completion(
            path,
            {
                "set": set_name,
                "index": index,
                "start": start,
                "stop": stop,
                "checksums": checksums,
                "dtypes": {a.kind: a.dtype for a in lay.arrays},
                "combined": combined,
            },
        )
        return combined

    def _read_entry(self, set_name: str, index: int) -> dict | None:
        try:
            with open(self._entry_path(set_name, index), encoding="utf-8") as fh:
                entry = json.load(fh)
        except (FileNotFoundError, json.JSONDecodeError):
            # Atomic replace means a torn file should not exist; if one does,
            # treating it as "not done" just redoes that shard.
            return None
        return entry if isinstance(entry, dict) else None

    def _entry_matches_layout(self, lay: SetLayout, index: int, entry: dict) -> bool:
        _, start, stop = lay.shard(index)
        return (
            entry.get("start") == start
            and entry.get("stop") == stop
            and isinstance(entry.get("checksums"), dict)
            and sorted(entry["checksums"]) == sorted(a.kind for a in lay.arrays)
            and isinstance(entry.get("combined"), str)
        )

    def is_complete(self, set_name: str, index: int, verify: bool = False) -> bool:
        """True when shard ``index`` has a completion record.

        With ``verify=True`` the stored bytes are also re-read and compared with
        the recorded checksums (reads the whole shard).
        """
        lay = self.layout(set_name)
        index, start, stop = lay.shard(index)
        entry = self._read_entry(set_name, index)
        if entry is None or not self._entry_matches_layout(lay, index, entry):
            return False
        if not verify:
            return True
        checksums = {}
        for spec in lay.arrays:
            try:
                checksums[spec.kind] = _sha256_of(self.read(set_name, spec.kind, start, stop))
            except (RuntimeError, ValueError, OSError):
                # A chunk that no longer decodes (overwritten, truncated): damaged, like a wrong checksum.
                return False
        return (
            checksums == entry["checksums"]
            and _combined_checksum(start, stop, checksums) == entry["combined"]
        )

    def missing_shards(self, set_name: str, verify: bool = False) -> list[tuple[int, int, int]]:
        """Shards ``(index, start, stop)`` without a (valid, with ``verify``) completion record."""
        lay = self.layout(set_name)
        return [s for s in lay.shards() if not self.is_complete(set_name, s[0], verify=verify)]

    def verify_sets(self, set_names, what: str) -> None:
        """StoreError unless every shard of these sets is recorded complete and its bytes still match the
        checksums recorded when it was written (reads them all): what a command that reads a finished
        run's embeddings (compare, calibrate) checks first, so a damaged store is an error, not a verdict."""
        for name in set_names:
            try:
                self.shard_checksums(name)     # incomplete shards: its own message
            except StoreError as e:
                raise StoreError(f"{what}: {e}") from None
            damaged = [i for i, _, _ in self.missing_shards(name, verify=True)]
            if damaged:
                raise StoreError(
                    f"{what}: {len(damaged)} shard(s) of set {name!r} ({_shard_list(damaged)}) no longer match the "
                    "checksums recorded when they were written (damaged or changed on disk); rerun `modeaudit "
                    f"audit` with the same settings and --out {self.root} to regenerate them"
                )

    def shard_checksums(self, set_name: str) -> list[str]:
        """Combined checksums of all shards in shard order; StoreError if any is incomplete."""
        lay = self.layout(set_name)
        out, missing = [], []
        for index, _, _ in lay.shards():
            entry = self._read_entry(set_name, index)
            if entry is None or not self._entry_matches_layout(lay, index, entry):
                missing.append(index)
            else:
                out.append(entry["combined"])
        if missing:
            raise StoreError(
                f"set {set_name!r} has {len(missing)} incomplete shard(s) ({_shard_list(missing)}); "
                "rerun the audit with the same --out to finish them"
            )
        return out

    # ----- reading --------------------------------------------------------- #

    def _bounds(self, lay: SetLayout, start: int, stop: int | None) -> tuple[int, int]:
        stop = lay.rows if stop is None else stop
        if not (0 <= start <= stop <= lay.rows):
            raise StoreError(
                f"rows [{start}, {stop}) are outside set {lay.name!r} (0..{lay.rows}); "
                "pass 0 <= start <= stop <= rows"
            )
        return int(start), int(stop)

    def read(self, set_name: str, kind: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of ``kind`` as a numpy array (whole set by default)."""
        lay = self.layout(set_name)
        start, stop = self._bounds(lay, start, stop)
        return np.asarray(self.array(set_name, kind)[start:stop])

    # ----- small files and extra arrays ------------------------------------ #

    def _rel(self, relpath: str | os.PathLike) -> Path:
        rel = Path(relpath)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise StoreError(
                f"path {os.fspath(relpath)!r} must be relative to the run directory and stay "
                "inside it (no absolute path, no '..')"
            )
        if rel.parts[0] == _ZARR_DIR:
            raise StoreError(
                f"path {os.fspath(relpath)!r} points into {_ZARR_DIR}; use write_array for "
                "arrays and another folder for JSON"
            )
        return self.root / rel

    def write_json(self, relpath: str | os.PathLike, obj: Any) -> Path:
        """Atomically write ``obj`` as JSON to ``DIR/relpath`` (parents created); return the path."""
        path = self._rel(relpath)
        try:
            atomic_write_json(path, obj)
        except TypeError as exc:
            raise StoreError(
                f"cannot write {relpath}: {exc}; pass only JSON-compatible values"
            ) from exc
        except OSError as exc:
            raise StoreError(
                f"cannot write to {self.root}: {exc}; choose a writable --out"
            ) from exc
        return path

    def read_json(self, relpath: str | os.PathLike, default: Any = _MISSING) -> Any:
        """Read ``DIR/relpath`` as JSON; return ``default`` if given and the file is absent."""
        path = self._rel(relpath)
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            if default is not _MISSING:
                return default
            raise StoreError(
                f"{path} does not exist; write it first (write_json) or pass default="
            ) from None
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path} is not valid JSON ({exc}); delete it and rerun") from exc

    def _check_extra_name(self, name: str) -> str:
        parts = [p for p in str(name).split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise StoreError(f"invalid array name {name!r}; use e.g. 'results/self_counts'")
        if parts[0] in self._layouts:
            # Protect sample-set data from being clobbered by a results array.
            raise StoreError(
                f"array name {name!r} is inside sample set {parts[0]!r}; put extra arrays "
                "under another prefix such as 'results/'"
            )
        return "/".join(parts)

    def write_array(self, name: str, np_array: np.ndarray, chunks=None):
        """Store a small extra array at ``name`` in the zarr group, replacing any old one."""
        name = self._check_extra_name(name)
        # np.ascontiguousarray would turn a 0-d array into 1-d; keep the shape.
        values = np.array(np_array, order="C", copy=True)
        if values.dtype.kind not in _ALLOWED_DTYPE_KINDS:
            raise StoreError(
                f"array {name!r}: dtype {values.dtype} is not numeric; store numbers or bools"
            )
        kwargs = {} if chunks is None else {"chunks": tuple(chunks)}
        arr = self._group.create_array(
            name, shape=values.shape, dtype=values.dtype, overwrite=True, **kwargs
        )
        if values.size:
            arr[...] = values
        return arr

    def read_array(self, name: str) -> np.ndarray:
        """Read a whole extra array written by :meth:`write_array`."""
        name = self._check_extra_name(name)
        try:
            arr = self._group[name]
        except KeyError:
            raise StoreError(
                f"no array {name!r} in {self.root / _ZARR_DIR}; run the step that writes it first"
            ) from None
        if not isinstance(arr, zarr.Array):
            raise StoreError(f"{name!r} is a group, not an array; name one of its arrays")
        return np.asarray(arr[...])
