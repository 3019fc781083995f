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

from modeaudit.storage.layout import (RESULT_JSON, RunLayout, check_out_dir, clear_derived, discard_unstarted_run,
                                      resolved_dir, run_lock)
from modeaudit.storage.store import RunStore, StoreError

from modeaudit.tasks import audit_steps as steps
from modeaudit.tasks import inputs
from modeaudit.tasks import stages
from modeaudit.tasks.registry import ConfigError
from modeaudit.tasks.stats import steps as stats
from modeaudit.tasks.config import AuditConfig, apply_preset, finalize_sizes, tests_for
from modeaudit.tasks.stats.paper import ranking_counts, reference_anchors, top_anchors
from modeaudit.tasks.report.audit import verdict_level, verdict_text, write_report
from modeaudit.tasks.report.pictures import safe_pictures
from modeaudit.tasks.report.stats import stats_sections
from modeaudit.tasks.report.style import plots_to
from modeaudit.tasks.stats.registry import TestContext
from modeaudit.tasks.join.parallel import worker_lost
from modeaudit.tasks.join.sources import Source

from modeaudit.flows.cluster import dask_client
from modeaudit.tasks.errors import disk_full
from modeaudit.tasks.plan import plan_execution


class _OneLineUserErrors(logging.Filter):
    """Bad input is the user's to fix, not a crash: log its message without a traceback."""

    def filter(self, record):
        if record.exc_info and user_facing(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


def user_facing(e: BaseException) -> bool:
    """Errors the run reports as one line (bad input, a full disk, lost workers), never as a traceback."""
    return (isinstance(e, (ConfigError, StoreError)) or worker_lost(e)
            or disk_full(e))


logging.getLogger("prefect.task_runs").addFilter(_OneLineUserErrors())

# Tied worst cases whose MCCS is computed (worst_case.tied_mccs_range): each adds |C| scores.
TIED_MCCS = 100


def prepare(cfg: AuditConfig, client, t):
    """Samples in place: generated into the store (resuming), or user embeddings / image folders validated and
    embedded (image folders through the feature cache). Returns the sources."""
    ref = None
    cache = {}
    if cfg.generator:
        cfg = apply_preset(cfg)
        cfg = finalize_sizes(cfg, cfg.m, cfg.M)
        gen, desc = steps.model_specs(cfg)
        ref_gen = steps.reference_spec(cfg)
        inp = inputs.plan_inputs(cfg, desc)
        folders, cache = _embed_folders(cfg, client, inp, t)
        with t("open_store"):
            store = stages.open_store(cfg, gen, desc, ref_gen, inp.fingerprint())
        with t("generate"):
            shards = {s: stages.generate_set(client, store, s, gen, desc, cfg.seed) for s in ("S", "T")}
            if ref_gen:
                shards["R"] = stages.generate_set(client, store, "R", ref_gen, desc, cfg.seed)
        S, T = Source.of_store(store, "S"), Source.of_store(store, "T")
        ref = Source.of_store(store, "R") if ref_gen else None
        scans = {s: steps.set_scan(store, s) for s in ("S", "T")}
        source = {"kind": "generator", "generator": cfg.generator, "generator_options": gen["options"],
                  "descriptor": desc["spec"], "descriptor_options": desc["options"], "seed": cfg.seed,
                  "embeddings_s": None, "embeddings_t": None, "shards": shards,
                  "reference_generator": ref_gen}
    else:
        inp = inputs.plan_inputs(cfg)
        cfg = finalize_sizes(cfg, inp.rows("S"), inp.rows("T"))     # checked again with the rows embedded
        folders, cache = _embed_folders(cfg, client, inp, t)
        store = steps.open_result_store(cfg, inp.files.get("S"), inp.files.get("T"), inp.fingerprint())
        sides = {n: inp.files[n] if n in inp.files else inputs.store_folder(store, n, folders[n][0]) for n in "ST"}
        S, T = steps.embedding_sources(cfg, sides["S"], sides["T"])
        cfg = finalize_sizes(cfg, S.rows, T.rows)
        scans = {}
        with t("validate"):
            for n, what in (("S", "--embeddings-s"), ("T", "--embeddings-t")):
                scans[n] = (inputs.folder_scan(folders[n][0]) if n in folders else
                            stages.validate_source(client, sides[n], what))
        kind = "embeddings" if not (cfg.images_s or cfg.images_t) else "images"
        source = {"kind": kind, "generator": None, "descriptor": inp.desc["spec"] if inp.desc else None,
                  "seed": cfg.seed,
                  "embeddings_s": os.path.abspath(cfg.embeddings_s) if cfg.embeddings_s else None,
                  "embeddings_t": os.path.abspath(cfg.embeddings_t) if cfg.embeddings_t else None}
        if inp.desc:
            source["descriptor_options"] = inp.desc["options"]
        for side in ("s", "t"):
            if getattr(cfg, f"images_{side}"):
                source[f"images_{side}"] = os.path.abspath(getattr(cfg, f"images_{side}"))
    if cfg.reference:
        if inp.ref_run is not None:
            with t("validate"):
                inputs.verify_reference_run(client, inp.ref_run)
            ref = inp.ref_run.source
            scans["reference"] = steps.set_scan(RunStore.open(inp.ref_run.root), "T")
        elif "reference" in folders:
            ref = inputs.store_folder(store, "reference", folders["reference"][0])
            scans["reference"] = inputs.folder_scan(folders["reference"][0])
        else:
            ref = steps.reference_source(cfg, S)
            with t("validate"):
                scans["reference"] = stages.validate_source(client, ref, "--reference")
        inputs.check_width(ref.dim, S.dim, "--reference")
        source["reference"] = os.path.abspath(cfg.reference)
    details = {n: f[1] for n, f in folders.items()}
    if inp.ref_run is not None:
        details["reference"] = inp.ref_run.info
    if details:
        # What each folder or earlier run contributed (deterministic); `cache` (hit/miss/off) is the run's
        # history, like `shards`, and is left out when two runs' numbers are compared.
        source["inputs"] = details
        source["cache"] = cache
    return cfg, store, S, T, ref, scans, source


def _embed_folders(cfg: AuditConfig, client, inp, t) -> tuple[dict, dict]:
    """Embed (or take from the feature cache) every image folder of the run: ({name: (rows, info)}, {name: status})."""
    folders, cache = {}, {}
    if inp.folders:
        with t("embed_images"):
            for name, plan in inp.folders.items():
                rows, info, status = inputs.embed_folder(client, plan, cfg)
                folders[name], cache[name] = (rows, info), status
    return folders, cache


def run_audit(cfg: AuditConfig, client) -> dict:
    """Run every stage of one audit on a Dask client and write DIR/report.html and DIR/result.json."""
    out = Path(cfg.out)
    t = steps.Timer()
    cfg, store, S, T, ref, scans, source = prepare(cfg, client, t)
    # Validated, fingerprint checked, samples in place: only now may the earlier run's
    # outputs go (a stale result must never look like this run's).
    clear_derived(out)
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
    ctx = TestContext(cfg=cfg, client=client, S_rows=S_rows, T=T, ref=ref, counts=counts, curves=curves,
                      modes=modes, result=result)
    for name in tests:
        with t(name):
            result["tests"][name] = stages.stat_test(name, ctx)
    if ref is not None and cfg.diversity_rows:
        with t("diversity"):
            result["diversity"] = stages.diversity(client, ref, T, cfg.diversity_rows)
    if cfg.efficiency:
        with t("efficiency"):
            result["sampling_efficiency"] = stages.efficiency(
                client, S_rows, T, worst=int(r_obs[0]), random_anchor=int(r_ref[0]), self_counts=counts,
                mccs_a=mccs_a, n_c=cfg.n_c, theta=cfg.theta, d0=cfg.d0, kernel=cfg.kernel, planted=planted)
    result["settings"]["tests"] = list(tests)
    headline, why = verdict_text(result["tests"])
    # The report's verdict, for programs; level is what `--fail-on` gates on.
    result["verdict"] = {"headline": headline, "explanation": why, "level": verdict_level(result["tests"])}
    # Pictures (a report stage: reads the result, never changes it; a failure is reported, not raised).
    if cfg.report:
        with t("pictures"):
            generator = models_of(source)
            pictures = safe_pictures(out, result, store, generator, S_rows=S_rows)
    result["run_info"] = steps.run_info(source)
    result = steps.json_safe(result)

    store.write_array(RunLayout.result_array("self_counts"), counts)
    store.write_array(RunLayout.result_array("curves"), curves)
    store.write_array(RunLayout.result_array("mccs_A"), mccs_a)
    if cfg.report:
        with plots_to(RunLayout(out).plots):   # the sections' figures are saved as plots/*.png and *.svg too
            sections = stats_sections(result)
        write_report(out, result, obs_curves=curves[:cfg.p], ref_curves=curves[cfg.p:], mccs_values=mccs_a,
                     extra_sections=sections, pictures=pictures)
    store.write_json(RESULT_JSON, result)  # last: its presence means the audit completed
    return result


def models_of(source: dict):
    """The run's generator, built in this process (cached), or None for embedding runs or when it cannot be built."""
    if source.get("kind") != "generator":
        return None
    try:
        from modeaudit.tasks.models.shards import models
        return models({"spec": source["generator"], "options": source["generator_options"]},
                      {"spec": source["descriptor"], "options": source["descriptor_options"]})[0]
    except Exception:  # noqa: BLE001 - the pictures stage reports it
        return None


def config_out(config) -> str:
    """The run directory named by a config or a mapping (for messages)."""
    return str(getattr(config, "out", None) or (config.get("out") if isinstance(config, dict) else "") or "--out")


def in_process_models(cfg: AuditConfig) -> bool:
    """Whether a model is a callable living in this process (Python API), so workers must be threads here."""
    specs = (cfg.generator, cfg.descriptor, cfg.reference_generator)
    return any(str(s).startswith("python-object:") for s in specs if s)


VERDICT_EVENT = "modeaudit.verdict"
VERDICT_ARTIFACT = "modeaudit-verdict"


def verdict_markdown(result: dict, out: str) -> str:
    """The run's verdict as markdown: the headline, why, and where the report and result.json are."""
    v, layout = result["verdict"], RunLayout(out)
    w = result["worst_case"]
    return "\n".join([
        f"## {v['headline']}", "", v.get("explanation", ""), "",
        "| | |", "|---|---|",
        f"| level | `{v['level']}` |",
        f"| worst case | S row {w.get('s_index')}, {w.get('count_d0')} neighbours at d0, MCCS "
        f"{result['mccs']['worst_case']:.4g} |",
        (f"| report | `{layout.written_report.resolve()}` |" if layout.written_report
         else "| report | none (run with --no-report) |"),
        f"| result.json | `{layout.result_json.resolve()}` |"])


def publish_verdict(result: dict, out: str) -> None:
    """Tell Prefect the verdict: a markdown artifact on the flow run and the event `modeaudit.verdict` (payload:
    headline, level, report), which an automation can alert on. Both go to the Prefect API only: result.json is
    already written and unchanged. An API that refuses them costs a warning, not the finished audit."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event
    from prefect.logging import get_run_logger
    v, layout = result["verdict"], RunLayout(out)
    report = str(layout.written_report.resolve()) if layout.written_report else None
    try:
        create_markdown_artifact(markdown=verdict_markdown(result, out), key=VERDICT_ARTIFACT,
                                 description=f"modeaudit: {v['headline']}")
        emit_event(event=VERDICT_EVENT,
                   resource={"prefect.resource.id": f"modeaudit.run.{Path(out).resolve()}",
                             "prefect.resource.name": Path(out).name},
                   payload={"headline": v["headline"], "level": v["level"], "report": report,
                            "result": str(layout.result_json.resolve()),
                            "worst_case_count_d0": result["worst_case"].get("count_d0"),
                            "mccs_worst_case": result["mccs"]["worst_case"]})
    except Exception as e:  # noqa: BLE001 - the audit finished; only the notification failed
        get_run_logger().warning("could not publish the verdict to Prefect (%s: %s)", type(e).__name__, e)


@flow(name="modeaudit-audit", log_prints=True, validate_parameters=False)
def audit_flow(config: AuditConfig) -> dict:
    """Prefect flow: one audit of a generator or of given embeddings.

    `config` is an AuditConfig (its schema is the deployment's form) or a mapping of its
    fields; a wrong type or an unknown key ends the run with a one-line error naming it.
    Prefect's own parameter validation is off so that error is ours, not a traceback.
    """
    # What --out held before this run, by the resolved path ("X/new/.." is X): a failing run that found no run
    # there takes back only what it wrote (never an entry that was there, never a folder that existed).
    root = resolved_dir(config_out(config))
    fresh = not RunLayout(root).run_json.exists()
    existed = root.is_dir()
    before = {p.name for p in RunLayout(root).owned_entries()} if existed else set()
    try:
        cfg = AuditConfig.parse(config)    # "X/new/.." is resolved to X there (AuditConfig._out_without_dotdot)
        # The CLI and the API ran it already; a deployment's run comes here directly.
        check_out_dir(cfg.out)
        plan = plan_execution(cfg.kernel, cfg.workers, cfg.threads_per_worker, cfg.scheduler,
                              in_process=in_process_models(cfg))
        cfg.kernel = plan.kernel
        with run_lock(root):
            try:
                with dask_client(plan) as client:
                    result = run_audit(cfg, client)
            except BaseException:
                # Under the lock, so no other run's directory can be taken for ours.
                if fresh:
                    discard_unstarted_run(root, keep=before, remove_dir=not existed)
                raise
        publish_verdict(result, cfg.out)
        return result
    except (ConfigError, StoreError) as e:
        # A Failed state (not a raise) keeps the traceback out of the log; callers get FailedRun(message).
        return Failed(message=str(e))
    except Exception as e:
        # (Dask's CommClosedError is an OSError too: worker loss is tested first.)
        if disk_full(e) and not worker_lost(e):
            return Failed(message=f"no space left on the device of {config_out(config)} ({e.strerror}); free some "
                                  "space and rerun with the same --out (finished shards are kept), or choose another "
                                  "--out")
        if not worker_lost(e):
            raise
        return Failed(message=f"Dask workers died during the run ({type(e).__name__}); out of memory? Rerun with "
                              "the same --out (finished shards are kept), fewer --workers or smaller --shard-rows")
