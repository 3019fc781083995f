"""Statistics beyond the paper as steps over arrays and sources: the tests (registered in
tasks/stats/registry.py), the distinct dense modes, and the sampling-efficiency curves.

No Prefect here (tasks/stages.py wraps these). Every test returns a dict with at least
`reject`; `two_sample` returns one dict per dense ball.
"""
from __future__ import annotations

import functools

import numpy as np

from modeaudit.tasks import console
from modeaudit.tasks.join import backend
from modeaudit.tasks.join import parallel
from modeaudit.tasks.join.shipping import Shipped, submit_unshipped
from modeaudit.tasks.join.threads import blas_threads, compute_threads, run_in_threads, thread_budget
from modeaudit.tasks.stats.envelope import erl_test
from modeaudit.tasks.join.kernels import mccs_from_sums, arccos_over_pi
from modeaudit.tasks.stats.modes import distinct_modes
from modeaudit.tasks.stats.paper import population_mccs, top_anchors
from modeaudit.tasks.stats.selection import (NullSampler, pool_sampler, replicate_curves, replicate_stats,
                                             selection_test, split_statistics, surrogate_sampler, worst_case_curve)
from modeaudit.tasks.stats.two_sample import density_ratio_test

def erl(obs_curve, ref_curves, alpha: float) -> dict:
    """Global envelope (ERL) test of the worst-case curve against the random reference anchors' curves."""
    r = erl_test(np.asarray(obs_curve, np.float64), np.asarray(ref_curves, np.float64), alpha=alpha,
                 alternative="greater")
    r["note"] = "global over radii, but the observed curve is a selected maximum: not a valid collapse test"
    return r


def permutation_null(S_sel, T, n_t: int, ref, n_ref: int, seed: int, describe: str, modes: int = 0) -> NullSampler:
    """Null (a) built where it is used: the pooled rows S_sel + T[:n_t] + reference[:n_ref].

    Under H0 the generated and the reference rows are draws of one law, so every split of
    the pool into (S*, T*) is as likely as the observed one (S_sel, T[:n_t]): replicates of
    the selection on random splits give an exact permutation test whatever the reference's
    size (the observed rows are part of the pool). With `modes` > 0 each split is also scored by
    the contrast of its top-k modes between T* and R* (the pool's remaining rows).
    """
    # float32 once (exact for float16 rows): each replicate would otherwise convert its draw again.
    parts = [np.asarray(S_sel, np.float32), T.read(0, n_t).astype(np.float32, copy=False),
             ref.read(0, n_ref).astype(np.float32, copy=False)]
    return pool_sampler(np.concatenate(parts), seed, describe, modes)


def _fit_surrogate(S_sel):
    from modeaudit.tasks.stats.surrogate import fit_projected_normal
    fit = fit_projected_normal(S_sel)
    return fit, fit.describe()


def _replicates_task(factory, indices, m, n_t, d0, radii, kernel):
    null, indices = factory(), list(indices)
    n = min(compute_threads(), len(indices)) if blas_threads() == 1 else 1

    def part(chunk):
        # One thread per chunk, each kernel call single-threaded: BLAS is single-threaded
        # here and stays so, so the chunks' EM refits give the same bits in any split.
        with thread_budget(1):
            f = replicate_stats if null.modes else replicate_curves
            return f(null, chunk, m=m, n_t=n_t, d0=d0, radii=radii, kernel=kernel)
    if n <= 1:
        return part(indices)
    bounds = np.linspace(0, len(indices), n + 1).astype(int)
    return np.concatenate(run_in_threads(part, [indices[a:b] for a, b in zip(bounds[:-1], bounds[1:])]))


def _observed_task(factory, S_sel, T, n_t, d0, radii, replicates, alpha, kernel, curves):
    null, contrast, extra = factory(), None, {}
    if null.modes:
        # The observed split is the pool in its own order: S_sel, then T[:n_t], then the reference rows.
        st = split_statistics(null.pool, np.arange(len(null.pool)), len(S_sel), n_t, d0, radii, null.modes, kernel)
        w, curve = st["w"], st["curve"]
        curves, contrast = curves[:, :len(radii)], {"obs_z": st["z"], "z": curves[:, len(radii)]}
        extra = {"contrast_modes": [int(i) for i in st["modes"]], "contrast_x_t": st["x_t"].tolist(),
                 "contrast_x_r": st["x_r"].tolist(), "contrast_n_r": int(st["n_r"])}
    else:
        w, curve = worst_case_curve(S_sel, T.blocks(0, n_t), n_t, d0, radii, kernel)
    res = selection_test(curve, null, m=len(S_sel), n_t=n_t, d0=d0, radii=radii, replicates=replicates,
                         alpha=alpha, kernel=kernel, obs_S=S_sel, obs_w=w, curves=curves, contrast=contrast)
    res.update({"s_index": int(w), "obs_curve_fraction": curve.tolist(), **extra})
    return res


def selection(client, S_rows, T, *, m_sel: int, n_t: int, null, d0, radii, replicates, alpha, kernel,
              modes: int = 0) -> dict:
    """Re-run the selection on S[:m_sel] against T[:n_t], and test that worst case against the null's worst cases.

    `null` is ("reference", source, rows, seed, describe) or ("surrogate", seed). Every
    step runs as a task on the Dask client (a worker's BLAS is single-threaded and nobody
    changes it, so the surrogate's EM gives the same bits on 1 or N workers); the null is
    rebuilt inside each task from the store, never held only in a worker's memory. `modes` > 0
    (a reference null): each split is also scored by its top-`modes` balls' excess in T over
    the reference, and the test combines both statistics (selection_test's `contrast`).
    """
    S_sel = np.ascontiguousarray(S_rows[:m_sel])
    submit = (lambda f, *a: f(*a)) if client is None else (lambda f, *a: submit_unshipped(client, f, *a))
    get = (lambda x: x) if client is None else (lambda x: x.result())
    # Shipped: the rows arrive 64-byte aligned on the worker (tasks/join/shipping.py).
    S_in = S_sel if client is None else client.scatter(Shipped(S_sel), hash=False)
    if null[0] == "surrogate":
        fit, describe = get(submit(_fit_surrogate, S_in))
        factory = functools.partial(surrogate_sampler, fit, null[1], describe)
    else:
        _, ref, n_ref, seed, describe = null
        factory = functools.partial(permutation_null, S_sel, T, n_t, ref, n_ref, seed, describe, modes)
    n_groups = 1 if client is None else max(1, min(replicates, sum(client.nthreads().values())))
    bounds = np.linspace(0, replicates, n_groups + 1).astype(int)
    parts = [submit(_replicates_task, factory, range(lo, hi), m_sel, n_t, d0, tuple(radii), kernel)
             for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    curves = np.concatenate(console.results(parts, sizes, "null replicates", unit="replicates"))
    return get(submit(_observed_task, factory, S_in, T, n_t, d0, tuple(radii), replicates, alpha, kernel, curves))


def dense_modes(S_rows, counts, k: int, d0: float) -> np.ndarray:
    """Top-k distinct dense modes of S (no two within d0)."""
    return distinct_modes(np.asarray(S_rows), counts, k, d0)


def two_sample(client, S_rows, modes, T, Ref, radius: float, alpha: float, kernel: str) -> list[dict]:
    """Density-ratio test of each mode's ball: mass in T (the model) vs in the reference set."""
    anchors = np.asarray(S_rows)[modes]
    x_t = parallel.range_counts(client, anchors, T, [radius], kernel=kernel)[:, 0]
    x_r = parallel.range_counts(client, anchors, Ref, [radius], kernel=kernel)[:, 0]
    out = density_ratio_test(x_t, T.rows, x_r, Ref.rows, alpha=alpha, alternative="greater")
    for d, i in zip(out, modes):
        d["s_index"] = int(i)
    return out


def deficit(client, T, Ref, radius: float, alpha: float, kernel: str, k: int) -> dict:
    """Deficit test (tasks/stats/deficit.py): the k densest distinct balls of the reference's selection rows,
    counted in T and in the held-out reference rows, one-sided "less" with Holm."""
    from modeaudit.tasks.stats.deficit import deficit_test, reference_balls, split_reference, summary
    if Ref.rows < 2:
        return {"reject": False, "skipped": f"the reference set has {Ref.rows} row(s); the deficit test needs 2 or more"}
    n_sel = split_reference(Ref.rows)
    sel = Ref.read(0, n_sel)
    counts = parallel.range_counts(client, sel, Ref, [radius], anchor_ids=np.arange(n_sel), stop=n_sel,
                                   kernel=kernel)[:, 0]
    centres = reference_balls(sel, counts, k, radius)
    anchors = np.ascontiguousarray(sel[centres])
    x_t = parallel.range_counts(client, anchors, T, [radius], kernel=kernel)[:, 0]
    x_r = parallel.range_counts(client, anchors, Ref, [radius], start=n_sel, kernel=kernel)[:, 0]
    balls = deficit_test(x_t, T.rows, x_r, Ref.rows - n_sel, alpha)
    return summary(balls, centres=centres, select_counts=counts[centres], n_sel=n_sel, n_r=Ref.rows - n_sel,
                   n_t=T.rows, d0=radius, alpha=alpha)


def _grid(n: int, start: int = 100) -> list[int]:
    g, v = [], start
    while v < n:
        g.append(v)
        v *= 10
    return g + [n]


def sampling_efficiency(client, S_rows, T, *, worst: int, random_anchor: int, self_counts, mccs_a, n_c: int,
                        theta: float, d0: float, kernel: str, planted=None, a_cap: int = 1000) -> dict:
    """How the answers settle as the samples grow (seed 001 Figs. 2-3, seed 000 Fig. 2).

    - MCCS of the worst case and of a random anchor as |C| grows;
    - mean/std of MCCS as |A| grows (|C| full) and as |C| grows (first a_cap anchors);
    - the worst case found in S[:k] as k grows, and whether it is the same identity (within d0).
    """
    S_rows = np.asarray(S_rows)
    c_grid = _grid(n_c)
    two = S_rows[[worst, random_anchor]]
    A = S_rows[:min(a_cap, len(mccs_a))]
    mc_two, mc_pop = [], []
    for c in c_grid:
        v = mccs_from_sums(parallel.mccs_sums(client, np.concatenate([two, A]), T, theta, stop=c, kernel=kernel), c)
        mc_two.append(v[:2].tolist())
        mc_pop.append(population_mccs(v[2:]))
    a_grid = _grid(len(mccs_a), 10)
    s_grid = _grid(len(S_rows), 1000)
    ws = []
    for k in s_grid:
        cnt = self_counts if k == len(S_rows) else backend.range_counts(
            S_rows[:k], [(0, S_rows[:k])], [d0], anchor_ids=np.arange(k), kernel=kernel)[:, 0]
        w = int(top_anchors(cnt, 1)[0])
        dot = float(np.dot(S_rows[w].astype(np.float64), S_rows[worst].astype(np.float64)))
        dist = float(arccos_over_pi(dot))
        ws.append({"S_size": k, "s_index": w, "distance_to_final": dist, "same_identity": dist <= d0,
                   **({"planted": bool(planted[w])} if planted is not None else {})})
    return {
        "C_sizes": c_grid,
        "mccs_worst_vs_C": [x[0] for x in mc_two], "mccs_random_vs_C": [x[1] for x in mc_two],
        "random_anchor": int(random_anchor),
        "mccs_mean_vs_C": [x[0] for x in mc_pop], "mccs_std_vs_C": [x[1] for x in mc_pop], "A_for_C_curve": len(A),
        "A_sizes": a_grid,
        "mccs_mean_vs_A": [population_mccs(mccs_a[:a])[0] for a in a_grid],
        "mccs_std_vs_A": [population_mccs(mccs_a[:a])[1] for a in a_grid],
        "worst_case_vs_S": ws,
    }


def diversity(client, ref, T, rows: int, k: int = 5) -> dict:
    """The peers' diversity metrics of T against the reference set, on the first `rows` rows of each.

    Precision/recall, density/coverage, KID and the birthday support size (tasks/metrics/),
    Euclidean on the unit rows as the peers compute them; run as one task on the cluster
    (a worker's single-threaded BLAS, its tile threads). k-NN radii cost rows^2 scores, so
    the audit uses a sample, as the peers do (their default is 1e4 to 5e4 rows).
    """
    n_r, n_t = min(rows, ref.rows), min(rows, T.rows)
    if min(n_r, n_t) <= k:
        return {"skipped": f"fewer than {k + 1} rows in T or in the reference", "rows_reference": n_r, "rows_T": n_t}

    def run(ref_, T_):
        from modeaudit.tasks.metrics.suite import compute_metrics
        return compute_metrics(ref_.read(0, n_r), T_.read(0, n_t), k, "euclidean")
    m = run(ref, T) if client is None else client.submit(run, ref, T, pure=False).result()
    keys = ("precision", "recall", "density", "coverage", "kid", "support_size")
    return {"metrics": {key: m.get(key) for key in keys}, "details": m, "rows_reference": n_r, "rows_T": n_t}
