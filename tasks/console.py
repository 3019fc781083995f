"""The terminal of a command-line run: one progress line per stage (tqdm) and short notes, on stderr.

Off unless the CLI opens `terminal()`: the Python API, flows run by a Prefect worker and
the tests print nothing here (notes go to the "modeaudit" logger instead). Progress only
watches futures complete; results are always gathered in submission order, so no number
depends on whether (or how fast) a bar was drawn. Nothing here touches result.json.
"""
from __future__ import annotations

import contextlib
import logging
import sys

log = logging.getLogger("modeaudit")

# One CLI command per process, so module state (not a thread-local: Prefect may run a task in
# another thread) is enough; terminal() restores the previous state on the way out.
_state: dict = {"on": False, "verbose": False, "stream": None, "dashboard": False, "stage": None}


@contextlib.contextmanager
def terminal(*, verbose: bool = False, stream=None, dashboard: bool = True):
    """Show progress lines and notes on `stream` (stderr) inside the block; `dashboard`: local clusters started
    inside serve Dask's dashboard when bokeh is installed."""
    prev = dict(_state)
    _state.update(on=True, verbose=verbose, stream=stream or sys.stderr, dashboard=dashboard)
    try:
        yield
    finally:
        _state.clear()
        _state.update(prev)


def active() -> bool:
    """Whether a CLI terminal is open (progress and notes are shown)."""
    return _state["on"]


def verbose() -> bool:
    """Whether the user asked for Prefect's and Dask's own logs (`--verbose`)."""
    return _state["on"] and _state["verbose"]


def wants_dashboard() -> bool:
    """Whether a local cluster started now should serve Dask's dashboard (an interactive CLI run)."""
    return _state["on"] and _state["dashboard"]


def note(message: str) -> None:
    """One line for the user: on stderr in a CLI run, else an INFO record of the "modeaudit" logger."""
    if _state["on"]:
        # Written, not print()ed: a flow with log_prints=True would turn a print into a Prefect log record.
        _state["stream"].write(f"modeaudit: {message}\n")
        _state["stream"].flush()
    else:
        log.info(message)


@contextlib.contextmanager
def stage(name: str):
    """Name the progress lines of the work done inside (an audit stage: "generate", "self_join", ...)."""
    prev = _state["stage"]
    _state["stage"] = name
    try:
        yield
    finally:
        _state["stage"] = prev


def _bar(total: float, what: str, unit: str):
    from tqdm import tqdm
    stream = _state["stream"]
    label = f"{_state['stage']}: {what}" if _state["stage"] else what
    # On a terminal the line redraws in place; in a log file (CI) each redraw is kept, so fewer.
    tty = getattr(stream, "isatty", lambda: False)()
    return tqdm(total=total, desc=label, unit=unit, unit_scale=True, file=stream, leave=True, dynamic_ncols=tty,
                mininterval=0.5 if tty else 10.0, ascii=not tty)


def _watch(futures: list, sizes: list, what: str, unit: str) -> None:
    """Draw one progress line while the futures complete (sizes[i] `unit`s when futures[i] does); stop at an error."""
    from distributed import as_completed
    size = {f.key: s for f, s in zip(futures, sizes)}
    with _bar(sum(sizes), what, unit) as bar:
        for f in as_completed(futures):
            bar.update(size[f.key])
            if f.status == "error":
                break       # the caller's gather/result raises it, as without progress


def wait(futures: list, sizes: list, what: str, unit: str = "rows") -> None:
    """In a CLI run, a progress line while the futures complete (sizes[i] `unit`s when futures[i] does); else, or
    for plain values (a caller's in-process stand-in for a client), nothing."""
    if _state["on"] and futures and hasattr(futures[0], "key"):
        _watch(futures, sizes, what, unit)


def gather(client, futures: list, sizes: list, what: str, unit: str = "rows") -> list:
    """client.gather(futures), with a progress line (sizes[i] `unit`s done when futures[i] finishes) in a CLI run."""
    wait(futures, sizes, what, unit)
    return client.gather(futures)


def results(futures: list, sizes: list, what: str, unit: str = "rows") -> list:
    """[f.result() for f in futures] (Dask futures, or plain values when run without a cluster), with a progress
    line in a CLI run."""
    if _state["on"] and futures and hasattr(futures[0], "key"):
        _watch(futures, sizes, what, unit)
    return [f.result() if hasattr(f, "key") else f for f in futures]
