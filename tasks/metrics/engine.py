"""Where the exact k-NN joins of the metrics run: in this process, or as Dask tasks over groups of query rows.

`KnnEngine` gives the metrics (manifold.py, birthday.py, suite.py) the two joins they
need, k-NN distances of a set within itself and strict ball counts between sets,
with a kernel (tasks/join/backend.py chooses numba or torch, and the device) and
optionally a Dask client.

On a client, a ball-count join splits the query rows into contiguous groups
(`group_rows` rows, by default about four groups per worker thread, never under 512
rows), one task per group, each streaming every block (`block_rows` rows) of the other
set through the kernel; a self-join runs one task per pair of row groups, each pair of
rows formed once, and a merge task per group (`KnnEngine.knn_self`). A set held in memory is scattered to every worker once per engine (the join's
`parallel._run` machinery, whose worker-loss retries scatter it again); a set given as a
`FeatureFile` (tasks/metrics/rows.py) is not sent at all: each task reads its query
rows and streams the other set's blocks from the file. Every
result is an exact float64 value or an integer count, so it is bit-identical to the
single-process path on any number of workers, any group size and any block size;
per-query results are concatenated in group order, per-point counts (sent back as
their nonzero entries) summed.
"""
from __future__ import annotations

import numpy as np

from modeaudit.tasks.join import backend
from modeaudit.tasks.metrics.rows import FeatureFile, rows_of, shape_of

__all__ = ["KnnEngine", "query_groups", "pair_groups"]

# Fewer rows per task leave the GEMM tiles (512 query rows in knn.py) part empty.
MIN_GROUP_ROWS = 512


def query_groups(n: int, n_tasks: int, group_rows: int | None = None) -> list[list[tuple[int, int]]]:
    """Contiguous [lo, hi) groups of n query rows, each as a one-range list (parallel._run's progress unit)."""
    if group_rows is None:
        group_rows = max(MIN_GROUP_ROWS, -(-n // max(1, n_tasks)))
    if group_rows < 1:
        raise ValueError(f"group_rows must be a positive integer, got {group_rows}")
    return [[(lo, min(n, lo + group_rows))] for lo in range(0, n, group_rows)]


def pair_groups(n: int, n_tasks: int, group_rows: int | None = None) -> list[list[tuple[int, int]]]:
    """The tasks of a self-join on a cluster: every pair [(lo, hi), (lo2, hi2)] of contiguous row groups
    with lo <= lo2, the diagonal ones included (G groups: G (G + 1) / 2 tasks, G the fewest with at
    least n_tasks of them, never under MIN_GROUP_ROWS rows a group unless group_rows says)."""
    if group_rows is None:
        g = 1
        while g * (g + 1) // 2 < n_tasks:
            g += 1
        group_rows = max(MIN_GROUP_ROWS, -(-n // g))
    ranges = [r for (r,) in query_groups(n, 1, group_rows)]
    return [[ranges[i], ranges[j]] for i in range(len(ranges)) for j in range(i, len(ranges))]


def _pairs_in(group) -> int:
    (lo, hi), (lo2, hi2) = group
    return (hi - lo) * (hi - lo - 1) // 2 if lo == lo2 else (hi - lo) * (hi2 - lo2)


def _blocks(x, block_rows: int | None):
    if isinstance(x, FeatureFile):
        return x.blocks(block_rows)
    from modeaudit.tasks.metrics.manifold import blocks_of
    return blocks_of(x, block_rows)


def _knn_pair_group(x, k, distance, kernel, group):
    """One task of a symmetric self-join: the k smallest distances between two row groups of x, each
    pair formed once (the groups' own pairs on a diagonal task), as {first row of a group: (rows, k)}."""
    (lo, hi), (lo2, hi2) = group
    if lo == lo2:
        return {lo: backend.knn_self(rows_of(x, lo, hi), k, distance=distance, kernel=kernel)}
    a, b = backend.knn_self_pair(rows_of(x, lo, hi), rows_of(x, lo2, hi2), k, distance=distance, kernel=kernel)
    return {lo: a, lo2: b}


def _merge_group(lo, k, *parts):
    """A group's k-NN distances: the k smallest over the pair tasks it took part in (knn.merge_knn)."""
    from modeaudit.tasks.metrics.knn import merge_knn
    return merge_knn([p[lo] for p in parts], k)


def _ball_group(a, b, radii_a, radii_b, distance, a_ids, block_rows, kernel, group):
    """Strict ball counts of a[lo:hi] against all of b (one task): the per-query arrays, the per-b ones sparse."""
    (lo, hi), = group
    ra = radii_a[lo:hi] if radii_a is not None and np.ndim(radii_a) else radii_a
    ids = None if a_ids is None else a_ids[lo:hi]
    c = backend.ball_counts(rows_of(a, lo, hi), _blocks(b, block_rows), ra, radii_b, distance=distance, a_ids=ids,
                            kernel=kernel)
    # The per-row-of-b counts of one group are mostly zero: sent back sparse, so the client
    # holds O(pairs inside balls) per group, not O(|b|) (|b| = 1e6 x hundreds of groups).
    return (c.in_a_balls_count, _sparse(c.a_balls_containing), _sparse(c.in_b_balls_count), c.b_balls_containing)


def _sparse(x: np.ndarray):
    nz = np.flatnonzero(x)
    return nz, x[nz]


def _dense_sum(parts, n: int) -> np.ndarray:
    out = np.zeros(n, np.int64)
    for idx, vals in parts:
        out[idx] += vals   # indices are unique within a part
    return out


def _bind(args, group):
    return (*args, group)


class KnnEngine:
    """The exact k-NN joins of one metrics computation, in process (client None) or on a Dask client.

    kernel: "auto", "fast", "lowprec", "torch-cpu" or "torch-cuda" (tasks/plan.METRIC_KERNELS),
    checked here and resolved per join on the calling machine ("auto" depends on the rows'
    width: backend.metric_kernel); block_rows: rows per streamed block of the point side;
    group_rows: query rows per Dask task (None: about four tasks per worker thread).
    """

    def __init__(self, client=None, kernel: str = "fast", block_rows: int | None = 65536,
                 group_rows: int | None = None):
        self.client = client
        backend.metric_kernel(kernel)
        self.kernel = kernel
        self.block_rows = block_rows
        self.group_rows = group_rows
        # Arrays scattered to the workers, reused by every join of this engine.
        self._scattered: dict = {}

    def _groups(self, n: int):
        from modeaudit.tasks.join.parallel import _n_tasks
        return query_groups(n, _n_tasks(self.client), self.group_rows)

    def _run(self, fn, groups, what: str, *args, **kw):
        """parallel._run of fn over groups on this engine's client, its arrays scattered once per engine."""
        from modeaudit.tasks.join.parallel import _run
        return _run(self.client, fn, groups, *args, bind=_bind, what=what, scattered=self._scattered, **kw)

    def knn_self(self, x, k: int, distance: str = "euclidean") -> np.ndarray:
        """k-NN distances of every row of x within x, self excluded, (n, k) ascending.

        In process this is the kernel's own self-join (each pair's score formed once). On a
        cluster the rows are cut into G contiguous groups and each of the G (G + 1) / 2
        pairs of groups is one task that forms each of its pairs once (backend.knn_self_pair;
        knn_self on the diagonal), updating the lists of both sides; a merge task per group
        keeps the k smallest over its G tasks (distances only, so the merge is exact in any
        order), and only the merged radii reach the client. Equal to the in-process result
        bit for bit. x: an (n, d) array or a FeatureFile (read whole in process, by the tasks
        on a cluster).
        """
        kernel = backend.metric_kernel(self.kernel, *(backend.join_size(x, x) or ()))
        if self.client is None:
            return backend.knn_self(rows_of(x), k, distance=distance, kernel=kernel)
        from modeaudit.tasks.join.parallel import _n_tasks
        from modeaudit.tasks.join.shipping import submit_unshipped
        groups = pair_groups(shape_of(x)[0], _n_tasks(self.client), self.group_rows)

        def merge(client, futures):
            touching: dict[int, list] = {}
            for ((lo, _), (lo2, _)), f in zip(groups, futures):
                for g in {lo, lo2}:
                    touching.setdefault(g, []).append(f)
            return [submit_unshipped(client, _merge_group, g, k, *touching[g]) for g in sorted(touching)]

        parts = self._run(_knn_pair_group, groups, "k-NN radii", x, k, distance, kernel,
                          sizes=[_pairs_in(g) for g in groups], unit="pairs", finish=merge)
        return np.concatenate(parts, axis=0) if parts else np.empty((0, k))

    def ball_counts(self, a, b, radii_a=None, radii_b=None, distance: str = "euclidean", a_ids=None):
        """Strict ball counts between the rows of a and of b (metrics.knn.BallCounts; see knn.ball_counts).

        a, b: arrays or FeatureFiles; in process a is read whole and b streamed in blocks."""
        from modeaudit.tasks.metrics.knn import BallCounts
        kernel = backend.metric_kernel(self.kernel, *(backend.join_size(a, b) or ()))
        if self.client is None:
            return backend.ball_counts(rows_of(a), _blocks(b, self.block_rows), radii_a, radii_b,
                                       distance=distance, a_ids=a_ids, kernel=kernel)
        ra = None if radii_a is None else np.asarray(radii_a, np.float64)
        ids = None if a_ids is None else np.asarray(a_ids, np.int64)
        parts = self._run(_ball_group, self._groups(shape_of(a)[0]), "rows' ball counts", a, b, ra, radii_b,
                          distance, ids, self.block_rows, kernel)
        n_b = shape_of(b)[0]
        if not parts:
            z = np.zeros(0, np.int64)
            return BallCounts(z, np.zeros(n_b, np.int64), np.zeros(n_b, np.int64), z.copy())
        # Per query row: the groups' arrays in order; per row of b: integer sums (any order is exact).
        return BallCounts(np.concatenate([p[0] for p in parts]), _dense_sum([p[1] for p in parts], n_b),
                          _dense_sum([p[2] for p in parts], n_b), np.concatenate([p[3] for p in parts]))
