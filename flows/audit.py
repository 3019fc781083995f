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

from storage.store import StoreError

from tasks import audit_steps as steps
from tasks import stages
from tasks.registry import ConfigError
from tasks.config import AuditConfig, apply_preset, finalize_sizes, kernel_for
from tasks.paper_test import reference_anchors, top_anchors
from tasks.report import write_report
from tasks.sources import Source

from .cluster import dask_client


class _OneLineUserErrors(logging.Filter):
    """Bad input is the user's to fix, not a crash: log its message without a traceback."""

    def filter(self, record):
        if record.exc_info and isinstance(record.exc_info[1], (ConfigError, StoreError)):
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("prefect.task_runs").addFilter(_OneLineUserErrors())


def run_audit(cfg: AuditConfig, client) -> dict:
    """Run every stage of one audit on a Dask client and write DIR/report.html and DIR/result.json."""
    out = Path(cfg.out)
    (out / "result.json").unlink(missing_ok=True)  # a stale result must never look like this run's
    t = steps.Timer()
    if cfg.generator:
        cfg = apply_preset(cfg)
        cfg = finalize_sizes(cfg, cfg.m, cfg.M)
        gen, desc = steps.model_specs(cfg)
        with t("open_store"):
            store = stages.open_store(cfg, gen, desc)
        with t("generate"):
            gen_stats = {s: stages.generate_set(client, store, s, gen, desc, cfg.seed) for s in ("S", "T")}
        S, T = (Source("store", str(store.root), store.layout(s).rows, store.array(s, "emb").shape[1], s,
                       dtype=str(store.array(s, "emb").dtype), stored_unit=True) for s in ("S", "T"))
        scans = {s: steps.set_scan(store, s) for s in ("S", "T")}
        source = {"kind": "generator", "generator": cfg.generator, "generator_options": gen["options"],
                  "descriptor": desc["spec"], "descriptor_options": desc["options"], "seed": cfg.seed,
                  "embeddings_s": None, "embeddings_t": None, "shards": gen_stats}
    else:
        S, T = steps.embedding_sources(cfg)
        cfg = finalize_sizes(cfg, S.rows, T.rows)
        store = steps.open_result_store(cfg, S, T)
        with t("validate"):
            scans = {"S": stages.validate_source(client, S, "--embeddings-s"),
                     "T": stages.validate_source(client, T, "--embeddings-t")}
        source = {"kind": "embeddings", "generator": None, "descriptor": None, "seed": cfg.seed,
                  "embeddings_s": os.path.abspath(cfg.embeddings_s), "embeddings_t": os.path.abspath(cfg.embeddings_t)}

    S_rows = S.read()  # m rows: held once, anchors are picked from it
    with t("self_join"):
        counts = stages.self_join(client, S_rows, S, cfg.d0, cfg.kernel)
    r_obs = top_anchors(counts, cfg.p)
    r_ref = reference_anchors(cfg.seed, cfg.m, cfg.q)
    with t("curves"):
        curves = stages.anchor_curves(client, S_rows[np.concatenate([r_obs, r_ref])], T, cfg.radii, cfg.kernel)
    with t("mccs"):
        mccs = stages.mccs_values(client, S_rows[np.r_[0:cfg.n_a, r_obs[0]]], T, cfg.n_c, cfg.theta, cfg.kernel)
    truth = None
    if cfg.generator and "planted" in {a.kind for a in store.layout("S").arrays}:
        planted = store.read("S", "planted")
        truth = {"worst_case_is_planted": bool(planted[r_obs[0]]), "planted_fraction_S": float(planted.mean()),
                 "r_obs_planted": [bool(planted[i]) for i in r_obs]}
    result = steps.assemble_result(cfg, source=source, self_counts=counts, r_obs=r_obs, r_ref=r_ref, curves=curves,
                                   mccs_a=mccs[:-1], mccs_worst=mccs[-1], scans=scans, truth=truth, timings=t.times)
    store.write_array("results/self_counts", counts)
    store.write_array("results/curves", curves)
    store.write_array("results/mccs_A", mccs[:-1])
    write_report(out, result, obs_curves=curves[:cfg.p], ref_curves=curves[cfg.p:], mccs_values=mccs[:-1])
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
