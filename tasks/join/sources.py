"""Embedding sources: where the rows of S and T come from, read in blocks.

A source is a small picklable description (path + kind), so Dask workers open
it themselves instead of receiving data. Every read returns unit-length float32
rows: the statistics are defined on unit vectors, and renormalising on read keeps
float16 storage and user files with slightly-off norms consistent.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from modeaudit.tasks.errors import InputError

# A row whose norm is off by more than this is reported as "renormalised".
UNIT_TOL = 1e-3


# Rows per reduction block: fixed, independent of shard size and worker count, so
# float partial sums merged in block order give the same bits on any cluster.
REDUCE_ROWS = 65536


def rows_as(x, dtype) -> np.ndarray:
    """Rows x cast to dtype, C-contiguous. Values beyond the dtype's range become inf silently: every
    caller checks the rows are finite next and names them in its one-line error, which numpy's
    overflow warning would otherwise precede."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(x, dtype=dtype)


def reduction_ranges(start: int, stop: int, step: int = REDUCE_ROWS) -> list[tuple[int, int]]:
    """Fixed blocks [lo, hi) covering [start, stop), aligned to global multiples of step (the one block plan)."""
    if stop <= start:
        return []
    first = (start // step) * step
    return [(max(lo, start), min(lo + step, stop)) for lo in range(first, stop, step)]


@dataclass(frozen=True)
class Source:
    """Rows [0, rows) of an embedding matrix in a run store set, a .npy file or a Zarr array."""
    kind: str            # "store", "npy" or "zarr"
    path: str
    rows: int
    dim: int
    set_name: str = ""   # for kind == "store"
    # Rows are handed to the kernels in this dtype. float16 stores give float16
    # unit rows (normalised in float32, then rounded), which GPU kernels multiply
    # on tensor cores with float32 accumulation; all kernels are exact with
    # respect to the rows they are given, so every backend counts the same.
    dtype: str = "float32"
    # True when the rows were normalised before they were stored (the run store's
    # generated embeddings): they are used exactly as stored, the float16 rounding
    # included, and reading is a plain copy (renormalising cost more than the join).
    stored_unit: bool = False

    @classmethod
    def of_store(cls, store, set_name: str) -> "Source":
        """A run store's set (storage.store.RunStore) as a Source of its rows as stored (unit rows, its dtype)."""
        emb = store.array(set_name, "emb")
        return cls("store", str(store.root), store.layout(set_name).rows, emb.shape[1], set_name,
                   dtype=str(emb.dtype), stored_unit=True)

    def _raw(self, start: int, stop: int) -> np.ndarray:
        from modeaudit.storage.store import RunStore, StoreError
        try:
            if self.kind == "store":
                return RunStore.open(self.path).read(self.set_name, "emb", start, stop)
            if self.kind == "npy":
                return np.load(self.path, mmap_mode="r")[start:stop]
            import zarr
            return zarr.open_array(self.path, mode="r")[start:stop]
        except StoreError:
            raise
        except (FileNotFoundError, PermissionError) as e:
            # Not damage: a worker (perhaps on another machine) cannot see or open the path.
            raise InputError(f"{self.path}: cannot be read here ({e.strerror or e}); every worker must see the "
                             "file at this path with read access") from None
        except (RuntimeError, ValueError, OSError) as e:
            # A chunk that no longer decodes, a file cut short since it was opened: one line, not a codec traceback.
            why = " ".join(str(e).split())[:160]
            if self.kind == "store":
                raise StoreError(f"{self.path}: rows {start}-{stop} of its set {self.set_name!r} cannot be read "
                                 f"({type(e).__name__}: {why}); rerun the audit with the same --out to regenerate "
                                 "damaged shards") from None
            raise InputError(f"{self.path}: rows {start}-{stop} cannot be read ({type(e).__name__}: {why}); the "
                             "file is damaged or was changed while in use: write it again") from None

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Unit-normalised rows [start, stop), in self.dtype."""
        stop = self.rows if stop is None else stop
        if self.stored_unit:
            return rows_as(self._raw(start, stop), self.dtype)
        x = unit_rows(self._raw(start, stop))
        return x if self.dtype == "float32" else x.astype(self.dtype)

    def scan_blocks(self, ranges) -> list[dict]:
        """scan_block of the raw rows (as stored, before normalising) of each (lo, hi) range: what the
        validation scans merge (merge_scans) and check (check_scan)."""
        return [scan_block(self._raw(lo, hi), lo) for lo, hi in ranges]

    def blocks(self, start: int = 0, stop: int | None = None, block_rows: int = REDUCE_ROWS):
        """Yield (global_offset, unit rows) over [start, stop), block edges on global multiples of block_rows."""
        stop = self.rows if stop is None else stop
        for lo, hi in reduction_ranges(start, stop, block_rows):
            yield lo, self.read(lo, hi)


def open_embeddings(path: str | Path, what: str) -> Source:
    """Describe a user embedding matrix (.npy or Zarr v3 array), checking shape and dtype without reading it all."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {path}: no such file or directory; give a .npy file or a Zarr array directory")
    if p.suffix == ".npy" and p.is_file():
        try:
            arr = np.load(p, mmap_mode="r")
        except Exception as e:  # a corrupt or pickled file
            # numpy's own text for both suggests allow_pickle=True: unsafe advice, and wrong for a file that is
            # not a .npy at all.
            why = ("not an array of numbers (a pickle, or not a .npy file at all)" if "allow_pickle" in str(e)
                   else str(e))
            raise InputError(f"{what} {path}: cannot read as .npy ({why}); save the features with numpy.save") \
                from None
        kind = "npy"
    elif p.is_dir():
        import zarr
        try:
            arr = zarr.open(str(p), mode="r")
        except Exception as e:
            raise InputError(f"{what} {path}: cannot open as a Zarr array ({e})") from None
        if not hasattr(arr, "shape"):
            names = ", ".join(sorted(arr.array_keys())) or "none"
            raise InputError(f"{what} {path} is a Zarr group, not an array; point at one of its arrays ({names})")
        kind = "zarr"
    else:
        raise InputError(f"{what} {path}: unsupported format; give a .npy file or a Zarr array directory")
    if len(arr.shape) != 2:
        raise InputError(f"{what} {path} has shape {tuple(arr.shape)}; it must be 2-d, one row per sample")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{what} {path} is empty (shape {tuple(arr.shape)}); it needs at least one row and column")
    if not np.issubdtype(np.dtype(arr.dtype), np.floating):
        raise InputError(f"{what} {path} has dtype {arr.dtype}; embeddings must be floating point")
    return Source(kind, str(p), int(arr.shape[0]), int(arr.shape[1]))


@njit(cache=True)
def _row_norms(x, out):
    for i in range(x.shape[0]):
        acc = 0.0
        for j in range(x.shape[1]):
            v = np.float64(x[i, j])
            acc += v * v
        if acc < 1e300 and acc > 1e-300:
            out[i] = np.sqrt(acc)
            continue
        # Over- or underflow of the squares (float64 rows near 1e+-154), an all-zero row,
        # or a NaN/Inf: rescale by the row's largest magnitude, so a finite row always
        # gets its finite norm and only NaN/Inf rows a non-finite one.
        m = 0.0
        finite = True
        for j in range(x.shape[1]):
            v = abs(np.float64(x[i, j]))
            if not np.isfinite(v):
                finite = False
            elif v > m:
                m = v
        if not finite:
            out[i] = np.inf
        elif m == 0.0:
            out[i] = 0.0
        else:
            acc = 0.0
            for j in range(x.shape[1]):
                v = np.float64(x[i, j]) / m
                acc += v * v
            out[i] = m * np.sqrt(acc)


def row_norms(x: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row in float64, in one pass (no float64 copy of x), free of over- and underflow."""
    x = np.ascontiguousarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32 if x.dtype == np.float16 else np.float64)
    out = np.empty(x.shape[0], np.float64)
    _row_norms(x, out)
    return out


# Rows whose norm lies in this range are normalised in float32 (fast, exact enough: the
# kernels are exact w.r.t. the unit rows they get); others in float64 first, so a row of
# 1e30 or 1e-60 becomes its direction instead of Inf or a zero row.
_F32_SAFE = (1e-18, 1e18)
# A row whose norm is this close to 1 is unit to float32's precision and is used as given: dividing it by its
# float32-rounded norm would move it by a rounding, so normalising was not idempotent (a fuzz found 16% of
# float32-normalised 7-d rows changed by a second pass; nearly parallel unit rows then changed their metrics).
# Our own normalisation leaves every norm within ~1.1 x 2^-23 of 1 (the norm's rounding and each quotient's; a
# float64 row's cast adds a third), inside this, so normalising twice is normalising once.
UNIT_KEEP = 2.0 ** -22


def keep_unit(norms: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
    """The divisors that normalise rows of these float64 norms: the norm, or exactly 1 for a row already unit
    to float32's precision (the row is kept, as float32). The test is |norm - 1| <= UNIT_KEEP on the norm of the
    float32 row a second pass would see: `norms` for float32 rows; for rows x of another dtype, the norms of
    their float32 casts, taken for the rows near 1 (a cast moves a norm by 2^-24 of it at most)."""
    test = norms
    if x is not None and np.asarray(x).dtype != np.float32:
        near = np.flatnonzero(np.abs(norms - 1.0) <= 4.0 * UNIT_KEEP)
        if near.size:
            test = norms.copy()
            test[near] = row_norms(np.asarray(x)[near].astype(np.float32))
    return np.where(np.abs(test - 1.0) <= UNIT_KEEP, 1.0, norms)


def unit_rows(x: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    """float32 unit rows of x (norms from row_norms; rows of norm 0 or non-finite come out non-finite); rows
    already unit to float32's precision are kept as given (keep_unit), so this is idempotent."""
    norms = keep_unit(row_norms(x) if norms is None else norms, x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if len(norms) and (norms.min() > _F32_SAFE[0]) and (norms.max() < _F32_SAFE[1]):
            out = np.array(x, dtype=np.float32)   # a copy: memory-mapped user files are read-only
            out /= norms.astype(np.float32)[:, None]
            return out
        return (np.asarray(x, np.float64) / norms[:, None]).astype(np.float32)


def scan_block(x: np.ndarray, offset: int, norms: np.ndarray | None = None) -> dict:
    """Validity summary of raw rows: first non-finite row, first all-zero row, rows not unit length."""
    norms = row_norms(x) if norms is None else norms
    # A NaN or Inf anywhere in a row makes its norm non-finite, and only that does
    # (row_norms rescales rows whose squares over- or underflow).
    finite = np.isfinite(norms)
    bad = np.flatnonzero(~finite)
    zero = np.flatnonzero(finite & (norms == 0))
    return {
        "rows": len(x),
        "nonfinite": int(len(bad)), "first_nonfinite": int(offset + bad[0]) if len(bad) else None,
        "zero": int(len(zero)), "first_zero": int(offset + zero[0]) if len(zero) else None,
        "renormalized": int(np.sum(finite & (norms > 0) & (np.abs(norms - 1) > UNIT_TOL))),
    }


def merge_scans(parts: list[dict]) -> dict:
    """Merge block scans in offset order."""
    out = {"rows": 0, "nonfinite": 0, "first_nonfinite": None, "zero": 0, "first_zero": None, "renormalized": 0}
    for p in parts:
        for k in ("rows", "nonfinite", "zero", "renormalized"):
            out[k] += p[k]
        if "rejected_by_descriptor" in p:    # generated sets: samples the descriptor refused and redrew
            out["rejected_by_descriptor"] = out.get("rejected_by_descriptor", 0) + p["rejected_by_descriptor"]
        for k in ("first_nonfinite", "first_zero"):
            if out[k] is None:
                out[k] = p[k]
    return out


def check_scan(scan: dict, what: str) -> None:
    """Raise InputError for NaN/Inf or all-zero rows found by a scan."""
    if scan["nonfinite"]:
        raise InputError(f"{what} has {scan['nonfinite']} row(s) with NaN or Inf (first: row {scan['first_nonfinite']}); "
                         "remove or re-embed those samples")
    if scan["zero"]:
        raise InputError(f"{what} has {scan['zero']} all-zero row(s) (first: row {scan['first_zero']}); an all-zero "
                         "embedding has no direction: remove or re-embed those samples")
