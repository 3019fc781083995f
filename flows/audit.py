"""The audit flow: samples -> embeddings -> joins -> tests, MCCS -> report.

Composition only: every number is computed in tasks/.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from prefect import flow
from prefect.states import Failed

from modeaudit.storage.store import StoreError

from modeaudit.tasks import audit_steps as steps
from modeaudit.tasks import stages
from modeaudit.tasks.registry import ConfigError
from modeaudit.tasks.stats import steps as stats
from modeaudit.tasks.config import AuditConfig, apply_preset, finalize_sizes, kernel_for, tests_for
from modeaudit.tasks.stats.paper import ranking_counts, reference_anchors, top_anchors
from modeaudit.tasks.report.audit import verdict_text, write_report
from modeaudit.tasks.report.stats import stats_sections
from modeaudit.tasks.join.sources import Source

from modeaudit.flows.cluster import dask_client


class _OneLineUserErrors(logging.Filter):
    """Bad input is the user's to fix, not a crash: log its message without a traceback."""

    def filter(self, record):
        if record.exc_info and isinstance(record.exc_info[1], (ConfigError, StoreError)):
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("prefect.task_runs").addFilter(_OneLineUserErrors())

# Tied worst cases whose MCCS is computed (worst_case.tied_mccs_range): each adds |C| scores.
TIED_MCCS = 100


def _store_source(store, name: str) -> Source:
    emb = store.array(name, "emb")
    return Source("store", str(store.root), store.layout(name).rows, emb.shape[1], name, dtype=str(emb.dtype),
                  stored_unit=True)


def prepare(cfg: AuditConfig, client, t):
    """Samples in place: generated into the store (resuming), or user embeddings validated. Returns the sources."""
    ref = None
    if cfg.generator:
        cfg = apply_preset(cfg)
        cfg = finalize_sizes(cfg, cfg.m, cfg.M)
        gen, desc = steps.model_specs(cfg)
        ref_gen = steps.reference_spec(cfg)
        with t("open_store"):
            store = stages.open_store(cfg, gen, desc, ref_gen)
        with t("generate"):
            shards = {s: stages.generate_set(client, store, s, gen, desc, cfg.seed) for s in ("S", "T")}
            if ref_gen:
                shards["R"] = stages.generate_set(client, store, "R", ref_gen, desc, cfg.seed)
        S, T = _store_source(store, "S"), _store_source(store, "T")
        ref = _store_source(store, "R") if ref_gen else None
        scans = {s: steps.set_scan(store, s) for s in ("S", "T")}
        source = {"kind": "generator", "generator": cfg.generator, "generator_options": gen["options"],
                  "descriptor": desc["spec"], "descriptor_options": desc["options"], "seed": cfg.seed,
                  "embeddings_s": None, "embeddings_t": None, "shards": shards,
                  "reference_generator": ref_gen}
    else:
        S, T = steps.embedding_sources(cfg)
        cfg = finalize_sizes(cfg, S.rows, T.rows)
        store = steps.open_result_store(cfg, S, T)
        with t("validate"):
            scans = {"S": stages.validate_source(client, S, "--embeddings-s"),
                     "T": stages.validate_source(client, T, "--embeddings-t")}
        source = {"kind": "embeddings", "generator": None, "descriptor": None, "seed": cfg.seed,
                  "embeddings_s": os.path.abspath(cfg.embeddings_s), "embeddings_t": os.path.abspath(cfg.embeddings_t)}
    if cfg.reference:
        ref = steps.reference_source(cfg, S)
        with t("validate"):
            scans["reference"] = stages.validate_source(client, ref, "--reference")
        source["reference"] = os.path.abspath(cfg.reference)
    return cfg, store, S, T, ref, scans, source


def run_audit(cfg: AuditConfig, client) -> dict:
    """Run every stage of one audit on a Dask client and write DIR/report.html and DIR/result.json."""
    out = Path(cfg.out)
    (out / "result.json").unlink(missing_ok=True)  # a stale result must never look like this run's
    t = steps.Timer()
    cfg, store, S, T, ref, scans, source = prepare(cfg, client, t)
    tests = tests_for(cfg)

    # The paper: dense-mode search in S, curves in T, MCCS over A x C.
    S_rows = S.read()  # m rows: held once, anchors are picked from it
    with t("self_join"):
        counts = stages.self_join(client, S_rows, S, cfg.d0, cfg.kernel)
    with t("ranking"):
        rank, at_d0 = ranking_counts(S_rows, counts, cfg.d0, cfg.tie_weight, cfg.p)
    r_obs = top_anchors(rank, cfg.p)
    # Rows sharing the top count: the worst case is the lowest index among them (top_anchors),
    # and their MCCS (up to TIED_MCCS rows, lowest indices first) shows how much that choice matters.
    tied = np.flatnonzero(rank == rank[r_obs[0]])
    r_ref = reference_anchors(cfg.seed, cfg.m, cfg.q)
    with t("curves"):
        curves = stages.anchor_curves(client, S_rows[np.concatenate([r_obs, r_ref])], T, cfg.radii, cfg.kernel)
    with t("mccs"):
        extra = tied[tied != r_obs[0]][:TIED_MCCS - 1]
        mccs = stages.mccs_values(client, S_rows[np.r_[0:cfg.n_a, r_obs[0], extra]], T, cfg.n_c, cfg.theta,
                                  cfg.kernel)
    mccs_a, mccs_worst, tied_mccs = mccs[:cfg.n_a], mccs[cfg.n_a], mccs[cfg.n_a:]
    planted = store.read("S", "planted") if cfg.generator and "planted" in {
        a.kind for a in store.layout("S").arrays} else None
    truth = None if planted is None else {
        "worst_case_is_planted": bool(planted[r_obs[0]]), "planted_fraction_S": float(planted.mean()),
        "r_obs_planted": [bool(planted[i]) for i in r_obs]}
    result = steps.assemble_result(cfg, source=source, self_counts=counts, r_obs=r_obs, r_ref=r_ref, curves=curves,
                                   mccs_a=mccs_a, mccs_worst=mccs_worst, scans=scans, truth=truth, timings=t.times,
                                   ranking={"counts": rank, "ties": len(tied), "tied_mccs": tied_mccs,
                                            "pairs_at_d0": at_d0})

    # Beyond the paper: tests with a controlled error rate, distinct modes, sampling efficiency.
    modes = stats.dense_modes(S_rows, rank, cfg.modes, cfg.d0)
    result["modes"] = [{"s_index": int(i), "count_d0": int(counts[i]),
                        **({"planted": bool(planted[i])} if planted is not None else {})} for i in modes]
    if "erl" in tests:
        result["tests"]["erl"] = stats.erl(curves[0], curves[cfg.p:], cfg.alpha)
    if "selection" in tests:
        with t("selection"):
            result["tests"]["selection"] = stages.selection(
                S_rows, T, m_sel=cfg.selection_m, n_t=cfg.selection_t, null=steps.null_sampler(cfg, S_rows, ref),
                d0=cfg.d0, radii=cfg.radii, replicates=cfg.null_replicates, alpha=cfg.alpha, kernel=cfg.kernel)
    if "two_sample" in tests:
        with t("two_sample"):
            result["tests"]["two_sample"] = stages.two_sample(client, S_rows, modes, T, ref, cfg.d0, cfg.alpha,
                                                               cfg.kernel)
    if cfg.efficiency:
        with t("efficiency"):
            result["sampling_efficiency"] = stages.efficiency(
                client, S_rows, T, worst=int(r_obs[0]), random_anchor=int(r_ref[0]), self_counts=counts,
                mccs_a=mccs_a, n_c=cfg.n_c, theta=cfg.theta, d0=cfg.d0, kernel=cfg.kernel, planted=planted)
    result["settings"]["tests"] = list(tests)
    headline, why = verdict_text(result["tests"])
    result["verdict"] = {"headline": headline, "explanation": why}   # the report's verdict, for programs
    result = steps.json_safe(result)

    store.write_array("results/self_counts", counts)
    store.write_array("results/curves", curves)
    store.write_array("results/mccs_A", mccs_a)
    write_report(out, result, obs_curves=curves[:cfg.p], ref_curves=curves[cfg.p:], mccs_values=mccs_a,
                 extra_sections=stats_sections(result))
    store.write_json("result.json", result)  # last: its presence means the audit completed
    return result


@flow(name="modeaudit-audit", log_prints=True)
def audit_flow(config: dict) -> dict:
    """Prefect flow: one audit of a generator or of given embeddings (config = AuditConfig fields)."""
    cfg = AuditConfig(**config)
    try:
        cfg.kernel = kernel_for(cfg.kernel)
        gpus = cfg.kernel == "torch-cuda" and not cfg.scheduler
        with dask_client(cfg.workers, cfg.threads_per_worker, cfg.scheduler, gpus=gpus) as client:
            return run_audit(cfg, client)
    except (ConfigError, StoreError) as e:
        # A Failed state (not a raise) keeps the traceback out of the log; callers get FailedRun(message).
        return Failed(message=str(e))
