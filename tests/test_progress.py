"""The CLI's terminal (tasks/console.py): progress lines that change no result, notes, the Dask dashboard's
address (or why there is none); Prefect task retries only on I/O errors."""
import errno
import io
import re
import urllib.request

import numpy as np
import pytest

from modeaudit.flows import cluster
from modeaudit.tasks import console
from modeaudit.tasks.plan import ExecutionPlan

THREADS = ExecutionPlan("fast", "local-threads", workers=2, threads_per_worker=1)


def _square(x):
    return x * x


def test_progress_counts_rows_and_keeps_submission_order(capsys):
    from distributed import Client
    with cluster.local_cluster(THREADS) as c, Client(c) as client:
        futures = [client.submit(_square, np.arange(i, i + 3), pure=False) for i in range(5)]
        plain = client.gather(futures)
        buf = io.StringIO()
        with console.terminal(stream=buf), console.stage("self_join"):
            shown = console.gather(client, futures, [10] * 5, "rows joined")
            reps = console.results(futures[:2], [3, 4], "null replicates", unit="replicates")
        assert all((a == b).all() for a, b in zip(plain, shown)) and len(shown) == 5
        assert all((a == b).all() for a, b in zip(plain[:2], reps))
        text = buf.getvalue()
        assert re.search(r"self_join: rows joined: 100%.*\b50(\.0)?/50(\.0)? \[.*<.*rows/s\]", text), text
        assert re.search(r"self_join: null replicates: 100%.*\b7(\.00)?/7(\.00)? ", text), text
        # Outside a CLI terminal: the same results, and nothing on stderr or stdout.
        capsys.readouterr()
        again = console.gather(client, futures, [10] * 5, "rows joined")
        assert all((a == b).all() for a, b in zip(plain, again)) and not console.active()
        assert capsys.readouterr() == ("", "")


def test_dashboard_address_printed_and_served():
    buf = io.StringIO()
    with console.terminal(stream=buf):
        c = cluster._start_local(THREADS)
    try:
        link = c.dashboard_link
        assert buf.getvalue() == f"modeaudit: Dask dashboard: {link}\n"
        with urllib.request.urlopen(link, timeout=30) as r:        # bokeh really serves it
            assert r.status == 200
    finally:
        c.close()


def test_no_dashboard_without_bokeh_says_how_to_get_it(monkeypatch):
    asked = []
    real = cluster.local_cluster
    monkeypatch.setattr(cluster, "local_cluster", lambda plan, dashboard=False: asked.append(dashboard) or
                        real(plan, dashboard=dashboard))
    monkeypatch.setattr(cluster, "dashboard_available", lambda: False)
    buf = io.StringIO()
    with console.terminal(stream=buf):
        cluster._start_local(THREADS).close()
    assert buf.getvalue() == ("modeaudit: no Dask dashboard: bokeh >= 3.1 is not installed "
                              "(pip install 'modeaudit[dashboard]')\n")
    # The API (no terminal) asks for no dashboard even with bokeh installed, and says nothing.
    monkeypatch.setattr(cluster, "dashboard_available", lambda: True)
    cluster._start_local(THREADS).close()
    assert asked == [False, False]


@pytest.mark.parametrize("exc,retried", [(OSError(errno.EIO, "flaky disk"), True),
                                         (OSError(errno.ENOSPC, "No space left on device"), False),
                                         (ValueError("NaN in the embeddings"), False)])
def test_tasks_retry_only_on_io_errors(exc, retried):
    from prefect.states import Failed
    from modeaudit.tasks import stages
    assert stages._io_only(None, None, Failed(data=exc)) is retried
    assert stages.generate_set.retries == 2 and stages.self_join.retries in (0, None)
