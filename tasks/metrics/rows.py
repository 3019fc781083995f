"""Feature rows that Dask workers read from a file themselves, instead of receiving them.

At 1e6 rows of 2048 columns a set is 8 GiB of float32. Read into the client and
scattered, both sets sit in the client and in every worker (32 GiB a worker for the
two joins' inputs). A `FeatureFile` is a small picklable description of the rows (a
.npy file, a Zarr array, or an audit run's stored T set: `tasks/join/sources.Source`,
which the audit's workers already open by path); each task of the metrics' joins
(tasks/metrics/engine.py) reads its own query rows and streams the other set's
blocks from it, so a worker holds one query group and one block, and the client
holds neither set.

Angular distance needs unit rows: `unit=True` scales each row on read with
`unit_rows`, whose every row depends on that row only, so a block read and the whole
set read give the same bits and the joins' results do not depend on how rows were
split between tasks.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from modeaudit.tasks.join.sources import _F32_SAFE, Source, keep_unit, reduction_ranges, row_norms

__all__ = ["FeatureFile", "FileRowsAt", "ON_DISK", "unit_rows", "rows_of", "rows_at", "take_rows", "shape_of"]

# Bytes per block of a sequential pass (validation, gathering rows by index): 16 Ki rows of
# 2048 float32 columns, large enough for sequential reads, small beside the sets.
_PASS_BYTES = 1 << 27

def unit_rows(x) -> np.ndarray:
    """Rows scaled to unit length in float32, each row's bits depending on that row alone.

    The norm is `row_norms`' sequential float64 sum (numba: no SIMD reassociation that
    could change with a row's alignment in memory), so rows [lo:hi) of the whole set's
    result equal the result of rows [lo:hi) read alone. ValueError on an all-zero row. Rows already
    unit to float32's precision are kept bit for bit (sources.keep_unit), so normalising twice is
    normalising once.
    """
    x = np.array(x, dtype=np.float32)
    if x.ndim != 2:
        return x
    norms = row_norms(x)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(f"row {int(zero[0])} is all zeros: it has no direction for the angular distance; remove "
                         "it or use euclidean")
    norms = keep_unit(norms)
    # sources.unit_rows' rule (float32 inside _F32_SAFE, float64 outside), decided per row, not per block.
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        safe = (norms > _F32_SAFE[0]) & (norms < _F32_SAFE[1])
        if safe.all():
            x /= norms.astype(np.float32)[:, None]   # the usual case: in place, no masked copy of the rows
            return x
        x[safe] /= norms[safe].astype(np.float32)[:, None]
        rest = np.flatnonzero(~safe)
        x[rest] = (x[rest].astype(np.float64) / norms[rest, None]).astype(np.float32)
    return x


@dataclass(frozen=True)
class FeatureFile:
    """(rows, dim) float32 feature rows kept in a file and read by row range; picklable.

    source: a `Source` read as stored (`stored_unit=True`, float32: no renormalising);
    unit: scale every row to unit length on read (the angular distance).
    """
    source: Source
    unit: bool = False

    @classmethod
    def of(cls, source: Source, unit: bool = False) -> "FeatureFile":
        """The rows of `source` exactly as stored (as float32), unit-scaled on read when `unit`."""
        return cls(dataclasses.replace(source, stored_unit=True, dtype="float32"), unit)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, dim), from the file's metadata."""
        return (self.source.rows, self.source.dim)

    @property
    def path(self) -> str:
        """The file or folder the rows live in."""
        return self.source.path

    def as_unit(self) -> "FeatureFile":
        """The same rows, unit-scaled on read."""
        return dataclasses.replace(self, unit=True)

    def read(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows [lo, hi) as C-contiguous float32 (unit-scaled when self.unit); OSError when the file
        no longer holds them (it shrank, or a worker sees another file at this path)."""
        hi = self.source.rows if hi is None else min(hi, self.source.rows)
        x = np.ascontiguousarray(self.source.read(lo, hi), dtype=np.float32)
        if x.shape != (max(0, hi - lo), self.source.dim):
            raise OSError(f"{self.source.path}: rows {lo}..{hi} read as shape {x.shape}, not ({max(0, hi - lo)}, "
                          f"{self.source.dim}): the file changed since it was checked")
        return unit_rows(x) if self.unit else x

    def identity(self) -> tuple:
        """What this machine sees at the path now, from the file's metadata: (kind, rows, dim[, bytes])."""
        s = self.source
        if s.kind == "store":
            from modeaudit.storage.store import RunStore
            store = RunStore.open(s.path)
            return ("store", store.layout(s.set_name).rows, int(store.array(s.set_name, "emb").shape[1]))
        from modeaudit.tasks.join.sources import open_embeddings
        now = open_embeddings(s.path, "feature rows")
        out = (s.kind, now.rows, now.dim)
        return out + (os.stat(s.path).st_size,) if s.kind == "npy" else out

    def pass_rows(self) -> int:
        """Rows per block of a sequential pass over the file (about 128 MiB)."""
        return max(1, _PASS_BYTES // (4 * max(1, self.source.dim)))

    def blocks(self, block_rows: int | None = None):
        """(global offset, rows) blocks of `block_rows` rows (None: one pass-sized block after another)."""
        step = self.pass_rows() if block_rows is None else int(block_rows)
        if step < 1:
            raise ValueError(f"block_rows must be a positive integer, got {block_rows}")
        for lo, hi in reduction_ranges(0, self.source.rows, step):
            yield lo, self.read(lo, hi)

    def take(self, idx) -> np.ndarray:
        """The rows at indices `idx` (any order, repeats allowed), read in one sequential pass."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((idx.size, self.source.dim), np.float32)
        if idx.size == 0:
            return out
        if idx.min() < 0 or idx.max() >= self.source.rows:
            raise IndexError(f"row index out of range for {self.source.rows} rows")
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        step = self.pass_rows()
        if self.source.kind == "npy":
            # A memory map reads only the pages of the wanted rows.
            mm = np.load(self.source.path, mmap_mode="r")
            for a in range(0, idx.size, step):
                rows = np.asarray(mm[sorted_idx[a:a + step]], dtype=np.float32)
                out[order[a:a + step]] = unit_rows(rows) if self.unit else rows
            return out
        # Only the pass-sized blocks that hold a wanted row are read.
        starts = np.unique(sorted_idx // step) * step
        for lo in starts:
            a, b = np.searchsorted(sorted_idx, [lo, lo + step])
            block = self.read(int(lo), int(lo) + step)
            out[order[a:b]] = block[sorted_idx[a:b] - lo]
        return out


@dataclass(frozen=True, eq=False)
class FileRowsAt:
    """The rows of a FeatureFile at sorted indices `ids`, read by whichever task uses them: a query
    set of a join that may be most of a file (the support size's rows with >= k near-duplicates)
    without passing through this process."""
    file: FeatureFile
    ids: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """(len(ids), dim)."""
        return (int(len(self.ids)), self.file.source.dim)

    def read(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows ids[lo:hi] of the file."""
        return self.file.take(self.ids[lo:hi])


# The row sets the metrics' tasks read themselves.
ON_DISK = (FeatureFile, FileRowsAt)


def shape_of(x) -> tuple[int, ...]:
    """The shape of an array or of rows on disk (np.shape would read those as an object)."""
    return tuple(x.shape) if isinstance(x, ON_DISK) else np.shape(x)


def rows_of(x, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Rows [lo, hi) of an array or of rows on disk."""
    if isinstance(x, ON_DISK):
        return x.read(lo, hi)
    return x[lo:hi]


def rows_at(x, ids):
    """The rows of x at sorted indices ids: a FileRowsAt for a FeatureFile (read where used), else an array."""
    ids = np.asarray(ids, dtype=np.int64)
    if isinstance(x, FeatureFile):
        return FileRowsAt(x, ids)
    return np.asarray(x)[ids]


def take_rows(x, idx) -> np.ndarray:
    """Rows at indices idx of an array or a FeatureFile, read now."""
    if isinstance(x, FeatureFile):
        return x.take(idx)
    return np.asarray(x)[np.asarray(idx, dtype=np.int64)]
