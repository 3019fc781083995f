"""Counter-based latent sampling: latent row j is a pure function of (seed, stream, j).

Rows are drawn in fixed blocks of BLOCK_ROWS from a generator keyed by
(seed, stream, block index). A shard [start, stop) regenerates the blocks it
overlaps and slices them, so its rows do not depend on the shard size, the number
of workers, the order shards run in, or on retries.
"""
from __future__ import annotations

import zlib

import numpy as np

BLOCK_ROWS = 4096

# Streams keep S, T and any later set (reference draws, calibration) independent
# for the same root seed. The ids are part of the determinism contract: never renumber.
STREAMS = {"S": 1, "T": 2, "R": 3, "W": 4}


def stream_id(name: str) -> int:
    """Stable integer id of a named stream; unknown names get a crc32 id (stable across runs)."""
    if name in STREAMS:
        return STREAMS[name]
    return 1000 + zlib.crc32(name.encode()) % 1_000_000


def _block(seed: int, stream: int, block: int, dim: int, dtype) -> np.ndarray:
    # SeedSequence hashes the full key, so neighbouring blocks get unrelated streams.
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, stream, block])))
    return rng.standard_normal((BLOCK_ROWS, dim), dtype=dtype)


def latent_rows(seed: int, stream: str | int, start: int, stop: int, dim: int,
                dtype=np.float32) -> np.ndarray:
    """Standard-normal latents for global rows [start, stop) of a stream, shape (stop-start, dim)."""
    if not (0 <= start <= stop):
        raise ValueError(f"bad row range [{start}, {stop})")
    sid = stream if isinstance(stream, int) else stream_id(stream)
    out = np.empty((stop - start, dim), dtype=dtype)
    b0, b1 = start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS if stop > start else start // BLOCK_ROWS - 1
    pos = 0
    for b in range(b0, b1 + 1):
        blk = _block(seed, sid, b, dim, dtype)
        lo = max(start, b * BLOCK_ROWS) - b * BLOCK_ROWS
        hi = min(stop, (b + 1) * BLOCK_ROWS) - b * BLOCK_ROWS
        out[pos:pos + hi - lo] = blk[lo:hi]
        pos += hi - lo
    return out


def uniform_rows(seed: int, stream: str | int, start: int, stop: int, dtype=np.float64) -> np.ndarray:
    """Uniform(0,1) numbers for global rows [start, stop), same counter discipline (used by rejection samplers)."""
    sid = (stream if isinstance(stream, int) else stream_id(stream)) + 7_000_000
    z = latent_rows(seed, sid, start, stop, 1, dtype=np.float64)[:, 0]
    from scipy.special import ndtr
    return ndtr(z).astype(dtype)
