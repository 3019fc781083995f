"""Data-parallel execution of the kernels on a Dask `distributed.Client`.

Work over a set of rows is split into fixed reduction blocks (REDUCE_ROWS rows,
independent of shard size and worker count); each block's partial result is
computed from one contiguous read and partials are merged in block order. Integer
counts would be exact under any split; the fixed split is what makes the float
MCCS sums bit-identical on 1 or N workers and any shard size.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from modeaudit.tasks import console
from modeaudit.tasks.join import backend
from modeaudit.tasks.join.shipping import Shipped, submit_unshipped
from modeaudit.tasks.join.sources import Source, merge_scans, reduction_ranges

def _group(ranges, n_tasks):
    # Consecutive groups keep each task's reads sequential in the store.
    k = max(1, -(-len(ranges) // max(1, n_tasks)))
    return [ranges[i:i + k] for i in range(0, len(ranges), k)]


def _prefetch(source: Source, ranges):
    """Yield (lo, rows) for each range, reading the next range while the caller computes on this one.

    Reading, converting float16 and normalising cost about half as much as the join
    itself; zarr and numpy release the GIL, so one reader thread hides most of it.
    """
    if not ranges:
        return
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(source.read, *ranges[0])
        for i, (lo, _) in enumerate(ranges):
            rows = nxt.result()
            if i + 1 < len(ranges):
                nxt = pool.submit(source.read, *ranges[i + 1])
            yield lo, rows


def _counts_task(anchors, anchor_ids, source: Source, ranges, radii, kernel):
    return [backend.range_counts(anchors, [(lo, rows)], radii, anchor_ids=anchor_ids, kernel=kernel)
            for lo, rows in _prefetch(source, ranges)]


def _sums_task(anchors, anchor_ids, source: Source, ranges, theta, kernel):
    return [backend.mccs_sums(anchors, [(lo, rows)], theta, anchor_ids=anchor_ids, kernel=kernel)
            for lo, rows in _prefetch(source, ranges)]


def _scan_task(source: Source, ranges):
    return source.scan_blocks(ranges)


# What a stage's progress line counts (rows of the set read by each kind of task).
_WHAT = {_counts_task: "rows joined", _sums_task: "rows summed (MCCS)", _scan_task: "rows scanned"}


def _n_tasks(client) -> int:
    if client is None:
        return 1
    return 4 * max(1, sum(client.nthreads().values()))


WORKER_LOSS_RETRIES = 2


def _group_rows(group) -> int:
    """Rows a group of (lo, hi) row ranges covers, for the progress line; 1 for a group of another shape."""
    try:
        return int(sum(hi - lo for lo, hi in group))
    except (TypeError, ValueError):
        return 1


def _run(client, fn, groups, *args, bind=None, what: str | None = None, scattered: dict | None = None,
         sizes: list | None = None, unit: str = "rows", finish=None):
    """Run fn(*args, group) for every group and return the per-group results in order.

    bind(args, group) -> the call's arguments (default: the joins' layout, _bind); what:
    the progress line's label (default: _WHAT's); sizes: each group's share of the progress
    line, in `unit`s (default: the rows of its ranges). finish(client, futures) -> futures
    reducing the groups' results on the cluster: their results are returned instead, and
    the groups' own results never reach the client. Arrays over 1 MiB are scattered to
    every worker once per call, or once per `scattered` dict (keyed by the array's id,
    the array kept alive there) when a caller runs several stages on the same rows.

    Inputs held only in workers' memory (scattered anchors) die with the workers; when
    workers are lost mid-stage, everything is scattered and submitted again (their
    restarted processes read the rest from the store), WORKER_LOSS_RETRIES times,
    then the run ends with one line instead of a Dask traceback.
    """
    bind = _bind if bind is None else bind
    if client is None:
        return [fn(*bind(args, g)) for g in groups]
    from modeaudit.tasks.errors import WorkerLost
    cache = {} if scattered is None else scattered
    for attempt in range(WORKER_LOSS_RETRIES + 1):
        try:
            big = [_scatter(client, a, cache) for a in args]
            futures = [submit_unshipped(client, fn, *bind(big, g)) for g in groups]
            label = what or _WHAT.get(fn, "rows")
            weights = [_group_rows(g) for g in groups] if sizes is None else sizes
            if finish is None:
                return console.gather(client, futures, weights, label, unit)
            final = finish(client, futures)
            console.wait(futures, weights, label, unit)
            return client.gather(final)
        except Exception as e:   # noqa: BLE001 -- only worker loss is retried, see _worker_lost
            if not worker_lost(e):
                raise
            last = e
            cache.clear()   # the scattered copies died with the workers
            client.wait_for_workers(1, timeout=120)
    raise WorkerLost(f"Dask workers died {WORKER_LOSS_RETRIES + 1} times in a row ({type(last).__name__}); "
                     "out of memory? Rerun with fewer --workers or smaller --shard-rows (finished shards are kept)")


def _scatter(client, a, cache: dict):
    """A future of `a` on every worker when it is an array over 1 MiB (once per cache), else `a` itself.

    Sent as a Shipped array (tasks/join/shipping.py): it arrives 64-byte aligned on every worker,
    not at whatever offset Dask's message put it, which made the GEMM 3x slower. Dask's active memory
    manager drops copies no task waits for (every 2 s): a worker that needs it again fetches it, and that
    copy arrives aligned too."""
    if not (isinstance(a, np.ndarray) and a.nbytes > 1 << 20):
        return a
    if id(a) not in cache:
        # The array is kept with its future, so its id cannot be reused by another array meanwhile.
        cache[id(a)] = (a, client.scatter(Shipped(a), broadcast=True, hash=False))
    return cache[id(a)][1]


def worker_lost(e: BaseException) -> bool:
    """Whether an error means workers (and the data held in them) were lost, not that the computation failed."""
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker
    try:
        from distributed.comm.core import CommClosedError
    except ImportError:   # pragma: no cover
        CommClosedError = OSError
    import concurrent.futures
    return isinstance(e, (KilledWorker, FutureCancelledError, CommClosedError, concurrent.futures.CancelledError))


def _bind(args, group):
    # args = (anchors, anchor_ids, source, <param>, kernel) for the joins, (source,) for scans.
    if len(args) == 1:
        return (args[0], group)
    return (args[0], args[1], args[2], group, args[3], args[4])


def range_counts(client, anchors: np.ndarray, source: Source, radii, *, anchor_ids=None,
                 start: int = 0, stop: int | None = None, kernel: str = "fast") -> np.ndarray:
    """N(anchor, source[start:stop], r) for every anchor and radius, int64 (a, R), computed on the cluster."""
    stop = source.rows if stop is None else stop
    groups = _group(reduction_ranges(start, stop), _n_tasks(client))
    parts = _run(client, _counts_task, groups, anchors, anchor_ids, source, np.asarray(radii, np.float64), kernel)
    out = np.zeros((len(anchors), len(radii)), np.int64)
    for group in parts:
        for p in group:
            out += p
    return out


def mccs_sums(client, anchors: np.ndarray, source: Source, theta: float, *, anchor_ids=None,
              start: int = 0, stop: int | None = None, kernel: str = "fast") -> np.ndarray:
    """Sum over source[start:stop] of the MCCS similarity s(anchor, row), float64 (a,), merged in fixed block order."""
    stop = source.rows if stop is None else stop
    groups = _group(reduction_ranges(start, stop), _n_tasks(client))
    parts = _run(client, _sums_task, groups, anchors, anchor_ids, source, float(theta), kernel)
    out = np.zeros(len(anchors), np.float64)
    for group in parts:
        for p in group:
            out += p
    return out


def scan(client, source: Source) -> dict:
    """Validity scan of a source (NaN/Inf, all-zero and non-unit rows), in parallel."""
    groups = _group(reduction_ranges(0, source.rows), _n_tasks(client))
    parts = _run(client, _scan_task, groups, source)
    return merge_scans([p for g in parts for p in g])
