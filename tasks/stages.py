"""Prefect task wrappers: one per audit stage, thin by design.

Stages get retries only where the failure is I/O (a flaky disk or object store),
never on compute errors: a NaN is not fixed by running again. Array results are
not cached by Prefect; shard reuse is the run store's manifest (keyed on the
generator fingerprint, seed and shard), which survives across flow runs.
"""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from modeaudit.tasks.errors import disk_full

from modeaudit.tasks import audit_steps as steps
from modeaudit.tasks.stats import steps as stats


def _io_only(task, task_run, state) -> bool:
    # A flaky disk or object store, yes; a full disk, no (retrying only fills it again).
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not disk_full(exc)


io_task = task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=_io_only)
compute_task = task(cache_policy=NO_CACHE)

open_store = io_task(steps.open_store, name="open-store")
generate_set = io_task(steps.generate_set, name="generate-set")
validate_source = compute_task(steps.validate_source, name="validate-embeddings")
self_join = compute_task(steps.self_join, name="self-join")
anchor_curves = compute_task(steps.anchor_curves, name="anchor-curves")
mccs_values = compute_task(steps.mccs_values, name="mccs")


def _stat_test(name: str, ctx):
    from modeaudit.tasks.stats.registry import STAT_TESTS
    return STAT_TESTS[name].run(ctx)


# One task for every registered test; the run is named after the test in Prefect's UI.
stat_test = compute_task(_stat_test, name="stat-test", task_run_name="{name}-test")
efficiency = compute_task(stats.sampling_efficiency, name="sampling-efficiency")
diversity = compute_task(stats.diversity, name="diversity-metrics")
