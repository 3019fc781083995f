"""The exact k-NN radii and strict ball counts of knn.py with the score GEMM in torch (CUDA, or the CPU for tests).

Same contracts as `knn.knn_distances` and `knn.ball_counts`, and the same results bit
for bit (both equal `knn_distances_reference` / `ball_counts_reference`): only where
the float32 scores are computed and filtered changes.

* GEMM and its bound: a float32 `torch.mm` per (query tile x block tile), on the
  device. Its error bound is the torch join's (`tasks/join/torch_kernels._eps`, mode
  "fp32", with the input rounding TF32 / bfloat16 "fast float32" modes may apply,
  read from torch's settings by `_fp32_input_unit`); the key tolerance around it is
  knn.py's (`_Queries.tol`), so the same pairs are provably decided by their scores.
  Rows whose float32 inner products could overflow (norms past 1e18) get a float64
  `torch.mm` and knn._gemm_eps64's bound instead (`_mm`), as in knn.py.
* Filtering on the device: keys (float64 on the device, from the float32 scores and
  float64 squared norms) are reduced there; only the pairs within the tolerance of a
  decision leave the score tile: for k-NN, per query the running k smallest keys
  (phase A) and the pairs with key <= min(k-th key + 2 tol, key of the k-th exact
  distance + tol) (phase B), as in `knn._knn_rows`; for balls, the pairs within tol
  of a radius' key.
* Exact values: those pairs' float64 sums are formed on the device in knn.py's fixed
  order (four strided accumulators over the float32 rows widened to float64, then
  (s0 + s1) + (s2 + s3), the tail into s0), with one elementwise IEEE operation per
  step, so every pair gets the bits `_exact_sqdist` / `_exact_dist` give it. The sums
  then go to the host for the distance map: numpy's sqrt (torch's CPU sqrt is not
  correctly rounded: it differed in the last bit here) and the scalar libm acos
  (`arccos_over_pi`), never the device's arccos, whose last bit differs.

This module imports torch at the top: it is only imported once a torch kernel has been
chosen (tasks/join/backend.py is the one place that chooses).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from modeaudit.tasks.join import torch_kernels as jt
from modeaudit.tasks.join.kernels import _iter_blocks, arccos_over_pi
from modeaudit.tasks.metrics.knn import (
    BallCounts, _check_distance, _check_k, _Queries, ball_side, pair_rows, pair_spans, self_spans,
)

__all__ = ["knn_distances_torch", "knn_self_torch", "knn_self_pair_torch", "ball_counts_torch"]

# Score tile (query rows x block rows): 2^22 scores on the CPU (the float64 keys of a
# tile: 32 MiB), 2^25 on CUDA (256 MiB of keys; an H100/H200 has room, and bigger tiles
# mean fewer launches).
_QUERY_TILE = 1024
_BLOCK_TILE = {"cpu": 4096, "cuda": 32768}
# Pairs x width per chunk of exact float64 evaluations.
_EXACT_ELEMENTS = 1 << 22


def _tensor(x: np.ndarray, dev: torch.device) -> torch.Tensor:
    """x on the device; a read-only array (np.load's memory map, a Dask-scattered one) is copied first,
    as torch may not share it."""
    if not x.flags.writeable:
        x = x.copy()
    return torch.from_numpy(x).to(dev)


def _device_of(device) -> torch.device:
    return jt._resolve_device(device)


def _torch_eps(dev: torch.device):
    """eps_of(dim, norm_a, norm_b) for knn._Queries.tol: the torch join's float32 GEMM bound on this device."""
    in_unit = jt._fp32_input_unit(dev)
    return lambda dim, na, nb: jt._eps(dim, na, nb, mode="fp32", in_unit=in_unit)


def _mm(a: torch.Tensor, b: torch.Tensor, f64: bool) -> torch.Tensor:
    """Scores a b^T of float32 rows: float32, or float64 where float32 could overflow (knn._Queries.overflows)."""
    if f64:
        return torch.mm(a.to(torch.float64), b.to(torch.float64).T)
    return torch.mm(a, b.T)


def _exact(qx: torch.Tensor, ai: torch.Tensor, bx: torch.Tensor, bj: torch.Tensor, angular: bool) -> torch.Tensor:
    """float64 distances of pairs (qx[ai], bx[bj]), bit-identical to knn._exact (see module doc)."""
    out = torch.empty(ai.shape[0], dtype=torch.float64, device=qx.device)
    d = qx.shape[1]
    d4 = d - d % 4
    step = max(1, _EXACT_ELEMENTS // max(1, d))
    for s0_ in range(0, ai.shape[0], step):
        x = qx[ai[s0_:s0_ + step]].to(torch.float64)
        y = bx[bj[s0_:s0_ + step]].to(torch.float64)
        if angular:
            t = x * y
        else:
            t = x - y
            t = t * t
        s = torch.zeros((x.shape[0], 4), dtype=torch.float64, device=qx.device)
        # One IEEE add per step, in knn.py's order: no fused multiply-add, no tree reduction.
        for c in range(0, d4, 4):
            s = s + t[:, c:c + 4]
        s0 = s[:, 0]
        for c in range(d4, d):
            s0 = s0 + t[:, c]
        tot = (s0 + s[:, 1]) + (s[:, 2] + s[:, 3])
        # The distance map on the host: torch's CPU sqrt is not correctly rounded (it differs from
        # numpy's in the last bit), and the device's arccos is not libm's.
        tot = tot.cpu().numpy()
        dist = arccos_over_pi(tot) if angular else np.sqrt(tot)
        out[s0_:s0_ + step] = torch.from_numpy(dist).to(qx.device)
    return out


def _key_of(r: torch.Tensor, angular: bool) -> torch.Tensor:
    """The key of distance r (knn._key_of), inf where r is inf."""
    k = -2.0 * torch.cos(math.pi * r) if angular else r * r
    return torch.where(torch.isfinite(r), k, torch.full_like(r, math.inf))


def _merge(top: torch.Tensor, rows: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest of each row's list `top` and its new distances d (rows ascending, as nonzero gives them).

    The new distances are laid out (rows x most candidates of a row), padded with inf:
    a few columns, where a dense (rows x tile) matrix would cost a full tile per merge.
    """
    counts = torch.bincount(rows, minlength=top.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.shape[0], device=rows.device) - starts[rows]
    width = int(counts.max())
    dd = torch.full((top.shape[0], width), math.inf, dtype=torch.float64, device=top.device)
    dd[rows, pos] = d
    return torch.topk(torch.cat([top, dd], dim=1), k, dim=1, largest=False).values


class _Setup:
    """Queries on the device, their ids, the key tolerance of each block, tile sizes."""

    def __init__(self, queries, angular: bool, ids, device, tile, query_tile):
        self.dev = _device_of(device)
        self.Q = _Queries(queries, angular, ids)
        self.angular = angular
        self.eps_of = _torch_eps(self.dev)
        self.qx = _tensor(self.Q.x, self.dev)
        self.qsq = _tensor(self.Q.sq, self.dev)
        self.tile = int(tile or _BLOCK_TILE["cuda" if self.dev.type == "cuda" else "cpu"])
        self.query_tile = int(query_tile or _QUERY_TILE)
        if self.tile < 1 or self.query_tile < 1:
            raise ValueError("tile and query_tile must be positive integers")
        self.f64 = False

    def blocks(self, blocks):
        """Yield (offset, rows on the device, squared norms on the device, tol, host rows); `keys` forms the
        yielded block's scores in float64 where float32 could overflow (tol is then float64's)."""
        for offset, block in _iter_blocks(blocks):
            b32, sq_b, tol, self.f64 = self.Q.block(block, self.eps_of)
            yield offset, _tensor(b32, self.dev), _tensor(sq_b, self.dev), tol, sq_b

    def keys(self, bt, bsq, r0, r1, g0):
        """float64 keys of queries r0..r1-1 x block rows bt (global first row g0); the self pair is +inf."""
        s = _mm(self.qx[r0:r1], bt, self.f64)
        key = self.qsq[r0:r1, None] + bsq[None, :] - 2.0 * s.to(torch.float64)
        local = self.Q.ids[r0:r1] - g0
        rows = np.nonzero((local >= 0) & (local < bt.shape[0]))[0]
        if rows.size:
            key[torch.from_numpy(rows).to(self.dev), torch.from_numpy(local[rows]).to(self.dev)] = math.inf
        return key


def knn_distances_torch(queries, blocks, k: int, *, distance: str = "euclidean", query_ids=None, device="cuda",
                        tile: int | None = None, query_tile: int | None = None) -> np.ndarray:
    """knn.knn_distances with the score GEMM and its filtering in torch on `device`; equal to it bit for bit.

    tile / query_tile: block rows / query rows per score tile (speed and memory only).
    """
    angular = _check_distance(distance)
    k = _check_k(k)
    S = _Setup(queries, angular, query_ids, device, tile, query_tile)
    n = S.qx.shape[0]
    f64 = dict(dtype=torch.float64, device=S.dev)
    with torch.inference_mode():
        top_key = torch.full((n, k), math.inf, **f64)
        top_d = torch.full((n, k), math.inf, **f64)
        dkey = torch.full((n,), math.inf, **f64)
        tol_max = 0.0
        for offset, bx, bsq, tol, _ in S.blocks(blocks):
            if bx.shape[0] == 0 or n == 0:
                continue
            # The lists carry keys of earlier blocks: the bound must cover them too.
            tol_max = tol = max(tol_max, tol)
            for c0 in range(0, bx.shape[0], S.tile):
                bt, bs = bx[c0:c0 + S.tile], bsq[c0:c0 + S.tile]
                for r0 in range(0, n, S.query_tile):
                    r1 = min(n, r0 + S.query_tile)
                    key = S.keys(bt, bs, r0, r1, offset + c0)
                    # Phase A: the running k smallest keys (the self pair is +inf, never among them
                    # while another pair is finite).
                    kk = min(k, key.shape[1])
                    both = torch.cat([top_key[r0:r1], torch.topk(key, kk, dim=1, largest=False).values], dim=1)
                    top_key[r0:r1] = torch.topk(both, k, dim=1, largest=False).values
                    # Phase B: the pairs that can still reach the k smallest exact distances (knn._knn_rows).
                    lim = torch.minimum(top_key[r0:r1, k - 1] + 2.0 * tol, dkey[r0:r1] + tol)
                    cand = ((key <= lim[:, None]) & (key < math.inf)).nonzero()
                    del key
                    if cand.shape[0] == 0:
                        continue
                    d = _exact(S.qx, cand[:, 0] + r0, bt, cand[:, 1], angular)
                    top_d[r0:r1] = _merge(top_d[r0:r1], cand[:, 0], d, k)
                    dkey[r0:r1] = _key_of(top_d[r0:r1, k - 1], angular)
        return top_d.cpu().numpy()


# Square tiles of the symmetric self-join: 2^22 float64 keys on the CPU (32 MiB), 2^26 on CUDA (512 MiB).
_SELF_TILE = {"cpu": 2048, "cuda": 8192}


def knn_self_torch(x, k: int, *, distance: str = "euclidean", device="cuda", tile: int | None = None) -> np.ndarray:
    """knn.knn_self with the score GEMM and its filtering in torch on `device`: each pair's score formed once
    (the upper triangle of x x^T, both sides' lists updated), equal bit for bit to knn_distances_torch(x, x,
    query_ids=arange(n)) and to knn.knn_self. tile: rows per square tile (speed and memory only)."""
    angular = _check_distance(distance)
    k = _check_k(k)
    S = _SymSetup(x, angular, device, tile)
    return _knn_sym_torch(S, k, self_spans(S.n, S.tile))


def knn_self_pair_torch(a, b, k: int, *, distance: str = "euclidean", device="cuda",
                        tile: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """knn.knn_self_pair with the score GEMM and its filtering in torch on `device`: the k smallest distances
    from each row of a to the rows of b and back, each pair's score formed once; inf where the other side
    has fewer than k rows."""
    angular = _check_distance(distance)
    k = _check_k(k)
    ab, na = pair_rows(a, b)
    S = _SymSetup(ab, angular, device, tile)
    top = _knn_sym_torch(S, k, pair_spans(na, S.n, S.tile))
    return top[:na], top[na:]


class _SymSetup:
    """One set's rows on the device with their squared norms, the key tolerance of its pairs, the tile size."""

    def __init__(self, x, angular: bool, device, tile):
        self.dev = _device_of(device)
        self.Q = _Queries(x, angular, None)
        self.angular = angular
        self.n = self.Q.x.shape[0]
        self.x = _tensor(self.Q.x, self.dev)
        self.sq = _tensor(self.Q.sq, self.dev)
        self.tol = self.Q.tol(self.Q.norm, self.Q.sq, _torch_eps(self.dev)) if self.n else 0.0
        self.f64 = self.Q.overflows(self.Q.norm)
        self.tile = int(tile or _SELF_TILE["cuda" if self.dev.type == "cuda" else "cpu"])
        if self.tile < 1:
            raise ValueError("tile must be a positive integer")


def _knn_sym_torch(S: _SymSetup, k: int, spans) -> np.ndarray:
    """The k smallest exact distances of every row over the pairs of the tiles `spans` (r0, r1, c0, c1), none
    below the diagonal (a diagonal tile's pairs j <= i are skipped).

    Each tile updates the lists of its rows and of its columns with knn_distances_torch's two phases: the
    running k smallest keys (phase A, rows then columns), then the exact distances of the pairs within
    tol of either side's bound (phase B), merged into both sides' lists. A list only ever gains exact
    distances of real pairs and skips only pairs provably beyond its k-th, as in knn._knn_sym_tile.
    """
    n, tol = S.n, S.tol
    f64 = dict(dtype=torch.float64, device=S.dev)
    with torch.inference_mode():
        top_key = torch.full((n, k), math.inf, **f64)
        top_d = torch.full((n, k), math.inf, **f64)
        dkey = torch.full((n,), math.inf, **f64)
        for r0, r1, c0, c1 in spans:
            s = _mm(S.x[r0:r1], S.x[c0:c1], S.f64)
            key = S.sq[r0:r1, None] + S.sq[None, c0:c1] - 2.0 * s.to(torch.float64)
            del s
            if r0 == c0:
                # A diagonal tile: each pair once (j > i), never a row with itself.
                key.masked_fill_(~torch.ones_like(key, dtype=torch.bool).triu(1), math.inf)
            for rows, view in ((slice(r0, r1), key), (slice(c0, c1), key.T)):
                kk = min(k, view.shape[1])
                both = torch.cat([top_key[rows], torch.topk(view, kk, dim=1, largest=False).values], dim=1)
                top_key[rows] = torch.topk(both, k, dim=1, largest=False).values
            lim_r = torch.minimum(top_key[r0:r1, k - 1] + 2.0 * tol, dkey[r0:r1] + tol)
            lim_c = torch.minimum(top_key[c0:c1, k - 1] + 2.0 * tol, dkey[c0:c1] + tol)
            cand = ((key <= lim_r[:, None]) | (key <= lim_c[None, :])) & (key < math.inf)
            del key
            pairs = cand.nonzero()
            del cand
            if pairs.shape[0] == 0:
                continue
            pi, pj = pairs[:, 0], pairs[:, 1]
            d = _exact(S.x, pi + r0, S.x, pj + c0, S.angular)
            top_d[r0:r1] = _merge(top_d[r0:r1], pi, d, k)
            dkey[r0:r1] = _key_of(top_d[r0:r1, k - 1], S.angular)
            # _merge takes its rows grouped in ascending order: the columns sorted (stable, any order of equal
            # columns gives the same k smallest values).
            order = torch.argsort(pj, stable=True)
            top_d[c0:c1] = _merge(top_d[c0:c1], pj[order], d[order], k)
            dkey[c0:c1] = _key_of(top_d[c0:c1, k - 1], S.angular)
        return top_d.cpu().numpy()


def ball_counts_torch(a, blocks, radii_a=None, radii_b=None, *, distance: str = "euclidean", a_ids=None,
                      device="cuda", tile: int | None = None, query_tile: int | None = None) -> BallCounts:
    """knn.ball_counts with the score GEMM and its filtering in torch on `device`; equal to it exactly.

    A pair whose key lies below a ball's key - tol is inside, at or above key + tol
    outside; in between its exact distance decides (strict: d < radius), as in knn._ball_rows.
    """
    angular = _check_distance(distance)
    S = _Setup(a, angular, a_ids, device, tile, query_tile)
    n = S.qx.shape[0]
    key_a, rad_a = ball_side(radii_a, n, "radii_a", angular)
    i64 = dict(dtype=torch.int64, device=S.dev)
    parts_a, parts_b = [], []
    with torch.inference_mode():
        key_a_t = _tensor(np.ascontiguousarray(key_a), S.dev)
        rad_a_t = _tensor(np.ascontiguousarray(rad_a), S.dev)
        cnt_a = torch.zeros(n, **i64)
        in_b = torch.zeros(n, **i64)
        for offset, bx, bsq, tol, _ in S.blocks(blocks):
            nb = bx.shape[0]
            key_b, rad_b = ball_side(radii_b, nb, "radii_b", angular, offset)
            in_a = torch.zeros(nb, **i64)
            cnt_b = torch.zeros(nb, **i64)
            parts_a.append((offset, in_a))
            parts_b.append((offset, cnt_b))
            if nb == 0 or n == 0:
                continue
            key_b_t = _tensor(np.ascontiguousarray(key_b), S.dev)
            rad_b_t = _tensor(np.ascontiguousarray(rad_b), S.dev)
            for c0 in range(0, nb, S.tile):
                bt, bs = bx[c0:c0 + S.tile], bsq[c0:c0 + S.tile]
                c1 = c0 + bt.shape[0]
                kb = key_b_t[None, c0:c1]
                for r0 in range(0, n, S.query_tile):
                    r1 = min(n, r0 + S.query_tile)
                    key = S.keys(bt, bs, r0, r1, offset + c0)
                    ka = key_a_t[r0:r1, None]
                    sure_a = key < ka - tol
                    band_a = (key < ka + tol) & ~sure_a
                    sure_b = key < kb - tol
                    band_b = (key < kb + tol) & ~sure_b
                    del key
                    cnt_a[r0:r1] += sure_a.sum(dim=1)
                    in_a[c0:c1] += sure_a.sum(dim=0)
                    cnt_b[c0:c1] += sure_b.sum(dim=0)
                    in_b[r0:r1] += sure_b.sum(dim=1)
                    del sure_a, sure_b
                    pairs = (band_a | band_b).nonzero()
                    if pairs.shape[0] == 0:
                        continue
                    pi, pj = pairs[:, 0], pairs[:, 1]
                    d = _exact(S.qx, pi + r0, bt, pj, angular)
                    # Integer index_add_: exact and deterministic in any order.
                    ins_a = (band_a[pi, pj] & (d < rad_a_t[pi + r0])).to(torch.int64)
                    ins_b = (band_b[pi, pj] & (d < rad_b_t[pj + c0])).to(torch.int64)
                    cnt_a.index_add_(0, pi + r0, ins_a)
                    in_a.index_add_(0, pj + c0, ins_a)
                    cnt_b.index_add_(0, pj + c0, ins_b)
                    in_b.index_add_(0, pi + r0, ins_b)
        total = max((o + p.shape[0] for o, p in parts_a), default=0)
        in_a_all = np.zeros(total, np.int64)
        cnt_b_all = np.zeros(total, np.int64)
        for (o, p), (_, c) in zip(parts_a, parts_b):
            in_a_all[o:o + p.shape[0]] += p.cpu().numpy()
            cnt_b_all[o:o + c.shape[0]] += c.cpu().numpy()
        return BallCounts(cnt_a.cpu().numpy(), in_a_all, cnt_b_all, in_b.cpu().numpy())
