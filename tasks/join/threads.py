"""How many threads one kernel call may use (one place, read at call time).

A Dask worker sets MODEAUDIT_THREADS to its share of the cores; without it a
kernel uses every core this process may run on. Thread counts of libraries
(BLAS, numba) are read here and set only where a process starts (flows/cluster.py's
worker setup, benchmark scripts), never by library code while other threads compute.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_budget = threading.local()


@contextlib.contextmanager
def thread_budget(n: int):
    """Within this block, kernels called from this thread use at most n threads (thread-local)."""
    old = getattr(_budget, "n", None)
    _budget.n = max(1, int(n))
    try:
        yield
    finally:
        _budget.n = old


def compute_threads() -> int:
    """Threads for one kernel call: this thread's budget, else $MODEAUDIT_THREADS, else the usable cores."""
    if getattr(_budget, "n", None):
        return _budget.n
    env = os.environ.get("MODEAUDIT_THREADS")
    return max(1, int(env)) if env else usable_cores()


_controller = None
_controller_lock = threading.Lock()


def blas_threads() -> int:
    """Threads numpy's BLAS uses in this process now (read only: never set here); 1 if unknown."""
    global _controller
    with _controller_lock:
        if _controller is None:
            try:
                import numpy  # noqa: F401  (its BLAS must be loaded before the scan)
                from threadpoolctl import ThreadpoolController
                _controller = ThreadpoolController()   # scans the loaded libraries once
            except Exception:   # no threadpoolctl, or a library it cannot read: assume the worst case
                _controller = False
    if not _controller:
        return usable_cores()
    n = [lib.num_threads for lib in _controller.select(user_api="blas").lib_controllers]
    return max(n) if n else 1


def run_in_threads(fn, items, threads: int | None = None) -> list:
    """[fn(x) for x in items] on up to `threads` threads (None: one per item), in order; one after the other
    on this thread when that is one. The first exception is raised once every call has ended."""
    items = list(items)
    n = min(len(items), threads or len(items))
    if n <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(n) as ex:
        futures = [ex.submit(fn, x) for x in items]
        return [f.result() for f in futures]


def shared_items(items):
    """A function returning an iterator over `items` that several threads may draw from at once, each item going
    to exactly one of them (the worker loops' work queue: a thread busy with something else takes fewer)."""
    it = iter(items)
    lock = threading.Lock()
    end = object()

    def draw():
        while True:
            with lock:
                x = next(it, end)
            if x is end:
                return
            yield x
    return draw


@contextlib.contextmanager
def openmp_threads(n: int | None):
    """Within this block, OpenMP parallel regions started from this thread (torch's CPU GEMMs) run on at
    most n threads (never more than this thread would use anyway): for several tile threads each running
    their own GEMMs, or one kernel call kept to its thread budget. None: no limit (a no-op).

    Thread-local, so no other thread's GEMMs change: OpenMP keeps the thread count of new parallel
    regions per thread (the nthreads-var ICV), and omp_set_num_threads sets the calling thread's.
    torch sets a thread's own count once, at its first parallel call, which would undo ours: that
    call happens first. Without torch, or where torch does not use a loaded OpenMP runtime, this
    does nothing (the GEMMs then share the cores, measured no slower in total, only less evenly).
    """
    ctl = None if n is None else _openmp_controller()
    if ctl is None:
        yield
        return
    import torch
    now = torch.get_num_threads()   # also torch's per-thread initialisation, which would overwrite the limit
    limiter = ctl.limit(limits=max(1, min(int(n), now)))
    try:
        yield
    finally:
        limiter.restore_original_limits()


_openmp_lock = threading.Lock()
_openmp_ctl = None


def _openmp_controller():
    """threadpoolctl's controller of the OpenMP runtimes loaded once torch is (None: no torch, none loaded)."""
    global _openmp_ctl
    with _openmp_lock:
        if _openmp_ctl is None:
            _openmp_ctl = False
            try:
                import torch  # noqa: F401  (its OpenMP runtime must be loaded before the scan)
                from threadpoolctl import ThreadpoolController
                ctl = ThreadpoolController().select(user_api="openmp")
                _openmp_ctl = ctl if ctl.lib_controllers else False
            except Exception:   # no torch or threadpoolctl, or a library it cannot read
                _openmp_ctl = False
        return _openmp_ctl or None

