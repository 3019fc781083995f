"""The calibration flow: fit a reshaped latent sampler on a finished audit, audit the
calibrated generator on fresh seeds, and compare before and after.

Composition only: the numbers come from tasks/calibration/samplers.py, tasks/calibration/steps.py
and the audit flow's own steps.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from modeaudit.storage.store import StoreError
from modeaudit.tasks.calibration import steps as cs
from modeaudit.tasks.calibration.samplers import fit_cluster, fit_rejection, save_params
from modeaudit.tasks.config import AuditConfig, CalibrationConfig, validate_calibration
from modeaudit.tasks.models.generators import build_generator
from modeaudit.tasks.registry import ConfigError
from modeaudit.tasks.report.audit import refresh_calibration_links
from modeaudit.tasks.report.calibration import write_calibration_report

from modeaudit.flows.audit import run_audit
from modeaudit.flows.cluster import dask_client
from modeaudit.tasks.plan import plan_execution
from modeaudit.tasks.join.sources import Source
from modeaudit.storage.layout import RunLayout, atomic_write_json, run_lock

fit_task = task(cache_policy=NO_CACHE, name="fit-calibration")


def _audit_config(result: dict, out: Path, generator: str, seed: int, kernel: str, workers: int) -> AuditConfig:
    """The original audit's settings, for a fair re-audit of the calibrated sampler.

    Same sizes, d0, radii, alpha, theta, tests and the same reference (--reference file or
    --reference-generator with its options) as the audit being calibrated, so the two
    verdicts answer the same question. A result.json written before `settings` carried the
    tests and the reference falls back to `source` for the reference and to the default tests.
    """
    s, st, src = result["sizes"], result["settings"], result["source"]
    ref_gen = st.get("reference_generator", (src.get("reference_generator") or {}).get("spec"))
    ref_gen_opts = st.get("reference_generator_options", (src.get("reference_generator") or {}).get("options"))
    opt = {k: st[k] for k in ("n_ref", "null_replicates", "selection_m", "selection_t", "modes", "tie_weight")
           if st.get(k) is not None}
    return AuditConfig(out=str(out), generator=generator, descriptor=src["descriptor"],
                       descriptor_options=src["descriptor_options"], m=s["S"], M=s["T"],
                       p=st["p"], q=st["q"], n_a=s["A"], n_c=s["C"], d0=result["d0"], radii=tuple(result["radii"]),
                       alpha=st["alpha"], theta=st["theta"], seed=seed, shard_rows=st["shard_rows"],
                       store_dtype=st["store_dtype"], workers=workers, kernel=kernel, overwrite=True,
                       tests=",".join(st["tests"]) if st.get("tests") else None,
                       reference=st.get("reference", src.get("reference")), reference_generator=ref_gen,
                       reference_generator_options=dict(ref_gen_opts or {}), efficiency=False, **opt)


def run_calibration(run: str, method: str, variant: str | None, n_modes: int, clusters: int, n_fit: int,
                    client, kernel: str, workers: int, fid_reference: str | None = None,
                    inception_weights: str | None = None, image_range: str = "-1:1", fid_rows: int = 10_000) -> dict:
    """Fit, save, re-audit and compare; writes DIR/calibration/<method>/{calibration.json, report.html}."""
    if method not in cs.METHODS:
        raise ConfigError(f"unknown --method {method!r}; choose cluster or rejection")
    variant = variant or cs.DEFAULT_VARIANT[method]
    if variant not in cs.METHODS[method]:
        raise ConfigError(f"--variant {variant!r} does not belong to --method {method}; choose one of "
                          f"{', '.join(cs.METHODS[method])}")
    result, store = cs.load_run(run)
    ref_stats = cs.reference_stats(fid_reference) if fid_reference else None
    if ref_stats is not None:
        cs.check_reference_width(ref_stats, store.array("T", "emb").shape[1], fid_reference)
    cs.check_fit_sizes(method, clusters, n_fit, store.layout("T").rows)
    lay = RunLayout(run)
    out = lay.calibration(method)
    src = result["source"]
    r0, theta, n_c = result["d0"], result["settings"]["theta"], result["sizes"]["C"]
    mode_idx = [m["s_index"] for m in result["modes"][:n_modes]]
    S_rows = store.read("S", "emb")
    modes_emb = S_rows[mode_idx]
    T = Source.of_store(store, "T")
    n_fit = min(n_fit, T.rows)
    Z, E = store.read("T", "latents", 0, n_fit), store.read("T", "emb", 0, n_fit)

    p1, p2 = cs.mode_densities(client, result, store, modes_emb, r0, kernel)
    dropped = []
    if method == "rejection":
        mode_idx, modes_emb, p1, dropped = cs.modes_with_mass(mode_idx, modes_emb, p1, p2, r0)
    if method == "cluster":
        params = fit_task(fit_cluster)(Z, E, modes_emb, r0, p2, K=clusters, seed=src["seed"],
                                       alpha=result["settings"]["alpha"])
    else:
        params = fit_task(fit_rejection)(Z, E, modes_emb, r0, p1, p2, seed=src["seed"])
    meta = {"method": method, "variant": variant, "r0": r0, "modes": mode_idx,
            "base": {"spec": src["generator"], "options": src["generator_options"]},
            "descriptor": {"spec": src["descriptor"], "options": src["descriptor_options"]},
            "run": str(Path(run).resolve())}
    if dropped:
        meta["modes_without_mass"] = dropped
    # Fitted: only now does the earlier calibration go (its calibration.json would describe another sampler);
    # a fit that fails leaves it whole.
    lay.calibration_json(method).unlink(missing_ok=True)
    save_params(lay.calibration_sampler(method), params, meta)
    spec = f"calibrated:{lay.calibration_sampler(method).resolve()}"

    # Acceptance: proposals per accepted sample, measured on a fresh stream in this process.
    gen = build_generator(spec)
    gen.latents(src["seed"] + 7, "acceptance", 0, 20_000)
    acc = gen.stats()

    # The calibrated sampler is a generator: audit it on fresh seeds with the same settings.
    cfg2 = _audit_config(result, lay.calibration_audit(method), spec, src["seed"] + 1, kernel, workers)
    after = run_audit(cfg2, client)
    store2 = cs.load_run(lay.calibration_audit(method), verify=False)[1]   # written by this flow just now
    T2 = Source.of_store(store2, "T")

    w_before = S_rows[result["worst_case"]["s_index"]][None]
    w_after = store2.read("S", "emb")[after["worst_case"]["s_index"]][None]
    radii = result["radii"]
    from modeaudit.tasks.join import parallel
    curves = {
        "worst_before_in_T": result["curves"]["obs"][0],
        "worst_before_in_T_after": parallel.range_counts(client, w_before, T2, radii, kernel=kernel)[0].tolist(),
        "worst_after_in_T_after": after["curves"]["obs"][0],
        "worst_after_in_T": parallel.range_counts(client, w_after, T, radii, kernel=kernel)[0].tolist(),
    }
    mccs_worst_after = float(cs.mccs_of(client, w_before, T2, min(n_c, T2.rows), theta, kernel)[0])
    st_before, st_after = cs.descriptor_stats(T), cs.descriptor_stats(T2)
    cal = {
        "method": method, "variant": variant, "generator": spec,
        "acceptance_rate": acc["accepted"] / max(1, acc["attempts"]),
        "cost_per_accepted": acc["attempts"] / max(1, acc["accepted"]),
        "mccs_worst_before": result["worst_case"]["mccs"],
        "mccs_worst_after": mccs_worst_after,
        "mccs_new_worst_after": after["worst_case"]["mccs"],
        "count_d0_worst_before": result["worst_case"]["count_d0"],
        "count_d0_new_worst_after": after["worst_case"]["count_d0"],
        "mccs_population_before": {"mean": result["mccs"]["mean"], "std": result["mccs"]["std"]},
        "mccs_population_after": {"mean": after["mccs"]["mean"], "std": after["mccs"]["std"]},
        "fd_before_after": cs.fd(st_before, st_after),
        "fd_kind": "FD (descriptor): Frechet distance of identity-descriptor features, not Inception FID",
        "band_overlap": cs.band_overlap(result["curves"], after["curves"]),
        "curves": curves, "radii": radii,
        "modes_used": mode_idx, "modes_without_mass": dropped, "p1": np.asarray(p1).tolist(), "p2": p2,
        "fit": {k: (v if isinstance(v, (int, float, str, bool)) else None) for k, v in params.items()
                if np.ndim(v) == 0},
        "audit_after": str(RunLayout(lay.calibration_audit(method)).result_json),
        # The verdict headlines side by side: the re-audit ran the same tests against the same reference.
        "verdict_before": (result.get("verdict") or {}).get("headline"),
        "verdict_after": (after.get("verdict") or {}).get("headline"),
    }
    if inception_weights:
        n_fid = min(fid_rows, T.rows, T2.rows)
        cal["fid_inception"] = cs.inception_fid(
            {"spec": src["generator"], "options": src["generator_options"]}, store.read("T", "latents", 0, n_fid),
            store2.read("T", "latents", 0, n_fid), inception_weights, image_range)
    if ref_stats is not None:
        # Real-data statistics (pytorch-fid .npz) in the same feature space as the stored embeddings.
        cal["fd_reference"] = cs.fd_to_reference(st_before, st_after, ref_stats, fid_reference)
    null_opts = cs.null_world_options(src["generator"], src["generator_options"])
    if null_opts is not None and "truth" in result:
        from modeaudit.tasks.models.shards import embed_rows
        n_null = min(T.rows, 200_000)
        _, null_emb, _, _ = embed_rows({"spec": "synthetic:null", "options": null_opts},
                                       {"spec": "identity", "options": {}}, src["seed"] + 99, "null", 0, n_null)
        st_null = cs.StreamingStats(null_emb.shape[1]).update(null_emb)
        cal["truth"] = {
            "planted_share_before": float(store.read("T", "planted").mean()),
            "planted_share_after": float(store2.read("T", "planted").mean()),
            "typical_share": cs.typical_share(src["generator"], src["generator_options"]),
            "fd_null_before": cs.fd(st_before, st_null), "fd_null_after": cs.fd(st_after, st_null),
            "new_worst_is_planted": after.get("truth", {}).get("worst_case_is_planted"),
        }
    mccs_a = RunLayout.result_array("mccs_A")
    write_calibration_report(out, cal, result, after, store.read_array(mccs_a), store2.read_array(mccs_a),
                             run_dir=run, after_dir=lay.calibration_audit(method))
    atomic_write_json(lay.calibration_json(method), cal)   # last: its presence means calibration completed
    # Links both ways: the audit's report and the re-audit's report now point to this calibration.
    for report_dir in (run, lay.calibration_audit(method)):
        refresh_calibration_links(report_dir)
    return cal


@flow(name="modeaudit-calibrate", log_prints=True, validate_parameters=False)
def calibrate_flow(config: CalibrationConfig) -> dict:
    """Prefect flow: calibrate the generator audited in `config.run` and audit the result.

    `config` is a CalibrationConfig or a mapping of its fields (one-line error on a wrong
    type or an unknown key, as for the audit flow).
    """
    try:
        c = CalibrationConfig.parse(config)
        validate_calibration(c)
        plan = plan_execution(c.kernel, c.workers, None, c.scheduler)
        with run_lock(c.run), dask_client(plan) as client:
            return run_calibration(c.run, c.method, c.variant, c.modes, c.clusters, c.n_fit, client, plan.kernel,
                                   c.workers, c.fid_reference, c.inception_weights, c.image_range, c.fid_rows)
    except (ConfigError, StoreError) as e:
        return Failed(message=str(e))


__all__ = ["calibrate_flow", "run_calibration"]
