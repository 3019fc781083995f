"""`modeaudit` command line: parse, validate early, run the Prefect flow, exit non-zero on bad input."""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys

# Before anything imports Prefect (it reads its settings once, at import). Its temporary
# server gets 20 s to start by default; a busy 2-core machine migrating a fresh database
# takes longer (seen here: 21 s timeouts while a benchmark held both cores).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from modeaudit.flows.args import HelpFormatter, OneLineParser, count as _count  # noqa: E402
from modeaudit import __version__  # noqa: E402
from modeaudit.flows.metrics_cli import add_metrics_parser, run_metrics  # noqa: E402
from modeaudit.flows.compare_cli import add_compare_parser, run_compare  # noqa: E402
from modeaudit.storage.layout import RunLayout, check_out_dir  # noqa: E402
from modeaudit.tasks.config import (PRESETS, AuditConfig, CalibrationConfig, apply_preset, default,  # noqa: E402
                                    finalize_sizes, kernel_for, parse_radii)
from modeaudit.tasks.plan import KERNELS  # noqa: E402
from modeaudit.tasks.registry import ConfigError, parse_kv  # noqa: E402
from modeaudit.flows.toy_cli import add_toy_parser, run_toy  # noqa: E402
from modeaudit.flows.watch_cli import add_watch_parser, check_watch, run_watch  # noqa: E402


def _radii(text: str) -> tuple:
    try:
        return parse_radii(text)
    except ConfigError as e:   # argparse would say "invalid parse_radii value"
        raise argparse.ArgumentTypeError(str(e)) from None


def add_audit_arguments(a, *, inputs: bool = True) -> None:
    """The audit's options on parser `a` (`audit`; `watch` passes inputs=False: its generators are the checkpoints)."""
    A = functools.partial(default, AuditConfig)        # defaults come from the config models
    src = a.add_argument_group("what to audit (a generator, or two embedding files)" if inputs else "models")
    if inputs:
        src.add_argument("--generator", help="generator spec, e.g. synthetic:planted, synthetic:null, torch:tiny, "
                         "torchscript:PATH (see `modeaudit list`)")
    src.add_argument("-G", "--generator-option", action="append", metavar="KEY=VALUE", help="generator option")
    src.add_argument("--descriptor", help="identity descriptor spec (default: the generator's own)")
    src.add_argument("-D", "--descriptor-option", action="append", metavar="KEY=VALUE", help="descriptor option")
    if inputs:
        src.add_argument("--embeddings-s", metavar="PATH", help="S embeddings (.npy or Zarr array), one row a sample")
        src.add_argument("--embeddings-t", metavar="PATH", help="T embeddings (.npy or Zarr array), one row a sample")
        src.add_argument("--images-s", metavar="DIR", help="S as a folder of PNG/JPEG images (recursive), embedded "
                         "with --descriptor; instead of --embeddings-s")
        src.add_argument("--images-t", metavar="DIR", help="T as a folder of PNG/JPEG images, embedded with "
                         "--descriptor; instead of --embeddings-t")
    s = a.add_argument_group("sizes (defaults from --preset)")
    s.add_argument("--preset", default=A("preset"), choices=sorted(PRESETS), help="size preset")
    s.add_argument("--m", type=_count, help="|S|: samples searched for the dense mode")
    s.add_argument("--M", type=_count, help="|T|: samples the curves are counted in")
    s.add_argument("--p", type=_count, default=A("p"), help="|R_obs|: densest anchors observed")
    s.add_argument("--q", type=_count, help="|R_ref|: random reference anchors (default min(1000, m))")
    s.add_argument("--anchors", dest="n_a", type=_count, help="|A|: MCCS anchors, first rows of S "
                   "(default min(m, 1e4))")
    s.add_argument("--mccs-set", dest="n_c", type=_count, help="|C|: MCCS sample set, first rows of T "
                   "(default min(M, 1e6))")
    st = a.add_argument_group("statistics")
    st.add_argument("--d0", type=float, default=A("d0"), help="distance of the dense-mode search")
    st.add_argument("--radii", type=_radii, default=None, metavar="START:STOP:STEP",
                    help="curve radii (default 0.1:0.5:0.01, 41 radii)")
    st.add_argument("--alpha", type=float, default=A("alpha"), help="test level")
    st.add_argument("--theta", type=float, default=A("theta"), help="MCCS theta")
    st.add_argument("--seed", type=int, default=A("seed"), help="root seed (latent row j depends only on seed and j)")
    st.add_argument("--tests", help="comma list of paper, erl, selection, two_sample, deficit "
                    "(default: paper,erl,selection, and two_sample when a reference is given; deficit, which "
                    "needs a reference, only when named)")
    st.add_argument("--reference", metavar="EMBEDDINGS|DIR|RUN_DIR", help="the reference set (real data or a "
                    "baseline checkpoint's samples; the null of the selection test and the two-sample test): "
                    "embeddings (.npy/Zarr), a folder of PNG/JPEG images (embedded with the run's descriptor, "
                    "cached), or an earlier generator run's directory (its T embeddings, same descriptor)")
    st.add_argument("--reference-generator", metavar="SPEC", help="reference generator (e.g. an earlier "
                    "checkpoint); its samples play the role of --reference")
    st.add_argument("-R", "--reference-generator-option", action="append", metavar="KEY=VALUE")
    st.add_argument("--n-ref", dest="n_ref", type=_count, help="rows drawn from --reference-generator "
                    "(default max(min(M, 1e6), 2 * (selection_m + selection_t)))")
    st.add_argument("--null-replicates", type=_count, help="null worst-case curves in the selection test (default "
                    "99 with a reference set, 39 against the parametric surrogate)")
    st.add_argument("--selection-m", type=_count, help="the selection test re-selects the worst case on the first "
                    "rows of S (default min(m, 1e4)); its cost is B * selection_m^2")
    st.add_argument("--selection-t", type=_count, help="rows of T (and of each null replicate) the selection "
                    "test counts in (default min(M, 1e5) with a reference set, min(M, 5e4) against the surrogate)")
    st.add_argument("--modes", type=_count, default=A("modes"), help="top-k distinct dense modes (no two within "
                    "d0): the two-sample test's balls and, with a reference, the selection test's contrast")
    st.add_argument("--tie-weight", type=float, default=A("tie_weight"), help="weight of a pair at exactly d0 in "
                    "the dense-mode ranking: 1 (inclusive count) or 0.5 (seed 000, Eq. 2)")
    st.add_argument("--diversity-rows", type=_count, default=A("diversity_rows"), help="rows of T and of the "
                    "reference for precision/recall, density/coverage, KID, support size (0: skip)")
    st.add_argument("--no-efficiency", dest="efficiency", action="store_false",
                    help="skip the sampling-efficiency curves")
    st.add_argument("--no-report", dest="report", action="store_false",
                    help="write result.json only: no report.html, plots or picture grids (a job that reads the "
                    "verdict or the exit code of --fail-on)")
    ex = a.add_argument_group("execution")
    ex.add_argument("--workers", type=_count, default=A("workers"), help="local Dask worker processes")
    ex.add_argument("--threads-per-worker", type=_count, default=None, help="BLAS/numba threads per worker "
                    "(default: cores / workers)")
    ex.add_argument("--scheduler", metavar="ADDRESS", help="existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    ex.add_argument("--shard-rows", type=_count, default=A("shard_rows"), help="rows per generation shard")
    ex.add_argument("--store-dtype", default=A("store_dtype"), choices=["float16", "float32"],
                    help="embedding storage dtype (statistics are computed in float32/float64)")
    ex.add_argument("--kernel", default=A("kernel"),
                    choices=KERNELS,
                    help="range-join kernel: auto = torch-cuda on a GPU machine, else fast (numba); "
                    "lowprec = bfloat16 first pass + exact re-check (same results; docs/lowprec.md)")
    ex.add_argument("--cache-dir", metavar="DIR", help="feature cache of image-folder embeddings, kept across "
                    "runs (default: $MODEAUDIT_CACHE, else $XDG_CACHE_HOME/modeaudit, else ~/.cache/modeaudit)")
    ex.add_argument("--no-cache", dest="cache", action="store_false", default=A("cache"),
                    help="neither read nor write the feature cache (image folders are embedded anew)")
    add_verbose_argument(ex)


def add_verbose_argument(a) -> None:
    """--verbose on parser (or group) `a`: the commands that run Prefect flows and Dask clusters."""
    a.add_argument("--verbose", action="store_true", help="show Prefect's and Dask's own logs (by default only "
                   "one progress line per stage, notes and the verdict go to stderr)")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (also documents every option)."""
    C = functools.partial(default, CalibrationConfig)  # defaults come from the config models
    p = OneLineParser(prog="modeaudit", description="Black-box audit of generative models for "
                                "intra-mode collapse (and calibration of their samplers).")
    p.add_argument("--version", action="version", version=f"modeaudit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("audit", help="audit a generator, or embeddings you already have",
                       formatter_class=HelpFormatter)
    a.add_argument("--out", required=True, metavar="DIR", help="run directory (store, report.html, result.json)")
    a.add_argument("--overwrite", action="store_true", help="replace a different run already in DIR")
    a.add_argument("--fail-on", choices=["collapse", "warning", "never"], default="never",
                   help="exit code 3 when the verdict reaches this level (CI gating): collapse = 'Collapse "
                   "detected'; warning = that or any amber verdict")
    add_audit_arguments(a)

    c = sub.add_parser("calibrate", help="reshape the latent sampler of an audited generator and audit the result",
                       formatter_class=HelpFormatter)
    c.add_argument("--run", required=True, metavar="DIR", help="a finished `modeaudit audit --generator` run")
    c.add_argument("--method", default=C("method"), choices=["cluster", "rejection"],
                   help="rejection (seed 001 Alg. 2; default: exact, keeps quality) or cluster (Alg. 1)")
    c.add_argument("--variant", choices=["gmm", "cells", "descriptor", "latent"],
                   help="cluster: gmm (the paper's mixture) or cells (exact cell-wise rejection, default); "
                   "rejection: descriptor (default) or latent (proxy, no embedding at sampling time)")
    c.add_argument("--modes", type=_count, default=C("modes"), help="how many distinct dense modes to flatten (from the "
                   "audit's top distinct modes)")
    c.add_argument("--clusters", type=_count, default=C("clusters"), help="k-means clusters of the latents")
    c.add_argument("--n-fit", type=_count, default=C("n_fit"), help="rows of T (latents and embeddings) to fit on")
    c.add_argument("--workers", type=_count, default=C("workers"), help="local Dask worker processes")
    c.add_argument("--scheduler", metavar="ADDRESS", help="existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    c.add_argument("--kernel", default=C("kernel"), choices=KERNELS)
    c.add_argument("--fid-reference", metavar="NPZ", help="real-data feature statistics (pytorch-fid .npz with mu, "
                   "sigma) in the audit's descriptor space: FD before/after to them goes into calibration.json")
    c.add_argument("--inception-weights", metavar="PTH", help="pytorch-fid's FID Inception-v3 state dict (no "
                   "download): image generators also get Inception FID between M and M' (fid_inception)")
    c.add_argument("--image-range", default=C("image_range"), help="the generator's pixel range LOW:HIGH, mapped to [0, 1]")
    c.add_argument("--fid-rows", type=_count, default=C("fid_rows"), help="images per side for Inception FID")
    add_verbose_argument(c)

    add_toy_parser(sub)
    add_watch_parser(sub)
    sub.add_parser("list", help="list generators and descriptors with their options")
    add_metrics_parser(sub)
    add_compare_parser(sub)
    return p


# Exit codes: 0 ok, 2 bad input or refused run, 3 the verdict reached --fail-on; anything else is a crash.
EXIT_GATED = 3


def gate(level: str, fail_on: str) -> int:
    """EXIT_GATED when the verdict level reaches --fail-on, else 0."""
    order = {"ok": 0, "warning": 1, "collapse": 2}
    limit = {"never": 3, "warning": 1, "collapse": 2}[fail_on]
    return EXIT_GATED if order.get(level, 0) >= limit else 0


def config_from_args(args) -> AuditConfig:
    """AuditConfig from parsed arguments (unset options keep the config defaults)."""
    kw = {k: v for k, v in vars(args).items() if k not in ("command", "generator_option", "descriptor_option",
                                                           "fail_on", "verbose") and v is not None}
    kw["generator_options"] = parse_kv(args.generator_option, "-G")
    kw["descriptor_options"] = parse_kv(args.descriptor_option, "-D")
    kw.pop("reference_generator_option", None)
    kw["reference_generator_options"] = parse_kv(args.reference_generator_option, "-R")
    return AuditConfig.parse(kw)


def preflight(cfg: AuditConfig) -> AuditConfig:
    """Every check that needs no cluster: settings, sizes, generator/descriptor options, input files."""
    from modeaudit.tasks import audit_steps as steps
    from modeaudit.tasks.config import validate_settings
    validate_settings(cfg)
    kernel_for(cfg.kernel)
    if cfg.scheduler:
        from modeaudit.flows.cluster import probe_scheduler
        probe_scheduler(cfg.scheduler)
    from modeaudit.tasks.inputs import check_width, plan_inputs, reference_kind
    if cfg.generator:
        cfg = apply_preset(cfg)
        cfg = finalize_sizes(cfg, cfg.m, cfg.M)
        gen, desc, width = steps.model_specs_and_width(cfg)
        steps.check_reference_generator(cfg, desc, width)
        inp = plan_inputs(cfg, desc)    # a reference folder or run: listed, hashed, checked (not embedded)
        if cfg.reference and reference_kind(cfg.reference) == "embeddings":
            from modeaudit.tasks.join.sources import open_embeddings
            check_width(open_embeddings(cfg.reference, "--reference").dim, width, "--reference")
        _check_same_run(cfg, lambda: steps.store_identity(cfg, gen, desc, steps.reference_spec(cfg),
                                                          inp.fingerprint()))
    else:
        inp = plan_inputs(cfg)
        if not (cfg.images_s or cfg.images_t):
            S, _ = steps.embedding_sources(cfg, inp.files["S"], inp.files["T"])
            if cfg.reference and reference_kind(cfg.reference) == "embeddings":
                steps.reference_source(cfg, S)
        for flag, given, side in (("--m", cfg.m, "S"), ("--M", cfg.M, "T")):
            rows = inp.rows(side)
            if given is not None and given != rows:
                raise ConfigError(f"{flag} {given}, but the {side} input has {rows} rows: "
                                  f"with embedding files or image folders the sizes are the inputs' (leave {flag} out)")
        finalize_sizes(cfg, inp.rows("S"), inp.rows("T"))
        _check_same_run(cfg, lambda: (steps.result_store_identity(inp.files.get("S"), inp.files.get("T"),
                                                                  inp.fingerprint()), []))
    return cfg


def _check_same_run(cfg: AuditConfig, identity) -> None:
    """Refuse here, before Prefect and the cluster start, a rerun into a --out that holds a different run (the
    flow's own check, RunStore.create_or_open, stays). identity() -> (fingerprint, layouts) of this run."""
    from modeaudit.storage.layout import resolved_dir
    root = resolved_dir(cfg.out)
    if cfg.overwrite or not RunLayout(root).run_json.is_file():
        return
    from modeaudit.storage.store import RunStore
    RunStore.check_same_run(root, *identity())


def check_calibration_inputs(cfg: CalibrationConfig) -> None:
    """Fail in a second, before Prefect starts: not an audit run, a bad FID reference or Inception inputs."""
    from modeaudit.tasks.calibration.steps import load_run
    from modeaudit.tasks.config import validate_calibration
    validate_calibration(cfg)
    # Shards are verified by the flow (a deployment's run comes there directly): reading T twice is not cheap.
    run_result, run_store = load_run(cfg.run, verify=False)
    from modeaudit.tasks.calibration.steps import check_fit_sizes
    check_fit_sizes(cfg.method, cfg.clusters, cfg.n_fit, run_store.layout("T").rows)
    if cfg.fid_reference:
        from modeaudit.tasks.calibration.steps import check_reference_width, reference_stats
        check_reference_width(reference_stats(cfg.fid_reference), run_store.array("T", "emb").shape[1],
                              cfg.fid_reference)
    if cfg.inception_weights:
        from modeaudit.tasks.calibration.steps import check_inception_inputs
        check_inception_inputs(run_result, cfg.inception_weights, cfg.image_range)


def _list() -> None:
    from modeaudit.tasks.models.descriptors import DESCRIPTORS
    from modeaudit.tasks.models.generators import GENERATORS
    for reg in (GENERATORS, DESCRIPTORS):
        print(f"{reg.kind}s:")
        for name in reg.names():
            entry, _ = reg.lookup(name.replace(":ARG", ":x"))
            print(f"  {name:22s} {entry.help}")
            for k, o in entry.options.items():
                print(f"      {k}={o.default!r:10s} {o.help}")


def main(argv=None) -> int:
    """Entry point of the `modeaudit` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "list":
        _list()
        return 0
    if args.command == "metrics":
        from modeaudit.tasks import console
        # Progress lines on stderr for the joins a cluster runs (the in-process kernels draw none).
        with console.terminal():
            return run_metrics(args)
    if args.command == "compare":
        return run_compare(args)
    if args.command == "toy":
        return run_toy(args)
    from modeaudit.tasks import console
    cfg = None
    if args.command in ("audit", "calibrate", "watch"):
        with console.terminal(verbose=args.verbose):
            cfg = _checked_config(args)
        if isinstance(cfg, int):
            return cfg
    from prefect.exceptions import FailedRun
    from modeaudit.storage.store import StoreError
    try:
        quiet_terminal(args.verbose)
        with console.terminal(verbose=args.verbose), no_heartbeats_on_a_temporary_server():
            return _run_command(args, FailedRun, StoreError, cfg)
    except RuntimeError as e:
        if "ephemeral Prefect API server" not in str(e):
            raise
        print("modeaudit: error: Prefect's temporary local server did not start in "
              f"{os.environ['PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS']} s; rerun when the machine is "
              "less busy, raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or point PREFECT_API_URL at a "
              "running Prefect server", file=sys.stderr)
        return 2


@contextlib.contextmanager
def no_heartbeats_on_a_temporary_server():
    """Flow-run heartbeats off when no Prefect server is configured (PREFECT_API_URL unset): CLI and API runs.

    Heartbeats let a server mark a crashed run; the temporary server a CLI run starts ends with the
    process, so they serve nothing there, and Prefect's engine joins its heartbeat thread at the end of
    every flow run, which sleeps in 1 s steps: up to a second of each command's wall time. A context
    (Prefect's temporary_settings), not the process's environment; against a real server they stay on.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    if PREFECT_API_URL.value():
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


class _DaskBelowError(logging.Filter):
    """Drops Dask's records below ERROR (nanny shutdown notices, comm warnings) from the terminal."""

    def filter(self, record):
        return not (record.name.startswith("distributed") and record.levelno < logging.ERROR)


def quiet_terminal(verbose: bool) -> None:
    """Prefect's INFO lines (temporary server banner, flow and task states) and Dask's warnings off the terminal,
    unless `verbose`. Set by each command (the process is the CLI's), not undone: Prefect's temporary server
    logs its stop at exit.

    Only Prefect's console handler is changed (raised to WARNING, Dask's records below ERROR filtered): the
    records still reach the Prefect API, so a server's UI keeps the run's full log. A filter, not Dask's logger
    level: starting a LocalCluster sets that level again.
    """
    import prefect.main  # noqa: F401  (configures Prefect's logging, whose console handler is set here)
    from prefect.logging.handlers import PrefectConsoleHandler
    for h in logging.getLogger().handlers:
        if isinstance(h, PrefectConsoleHandler):
            h.setLevel(logging.NOTSET if verbose else logging.WARNING)
            for f in [f for f in h.filters if isinstance(f, _DaskBelowError)]:
                h.removeFilter(f)
            if not verbose:
                h.addFilter(_DaskBelowError())


def _checked_config(args) -> AuditConfig | CalibrationConfig | int:
    """The command's config, checked before Prefect loads (~2 s of imports), so a refused run answers in a
    second or two and creates nothing: an audit's settings and inputs (`preflight`) and --out, a
    calibration's run and inputs, watch's base config and folders. A refusal prints its one line and
    returns exit code 2."""
    try:
        if args.command == "watch":
            return check_watch(args)
        if args.command == "calibrate":
            cfg = CalibrationConfig.parse({k: v for k, v in vars(args).items() if k in CalibrationConfig.model_fields})
            check_calibration_inputs(cfg)
            return cfg
        cfg = config_from_args(args)
        preflight(cfg)
        check_out_dir(cfg.out)
        return cfg
    except ConfigError as e:
        print(f"modeaudit: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from modeaudit.storage.store import StoreError     # loaded only here: zarr is not needed to refuse
        if not isinstance(e, StoreError):
            raise
        print(f"modeaudit: error: {e}", file=sys.stderr)
        return 2


def _run_command(args, FailedRun, StoreError, cfg: AuditConfig | CalibrationConfig) -> int:
    """audit, calibrate or watch (`cfg` from _checked_config), with user errors as one line and exit code 2."""
    from modeaudit.tasks import console
    if args.command == "watch":
        return run_watch(args, cfg)
    if args.command == "calibrate":
        try:
            from modeaudit.flows.calibrate import calibrate_flow
            cal = calibrate_flow(cfg)
        except (ConfigError, StoreError, FailedRun) as e:
            print(f"modeaudit: error: {e}", file=sys.stderr)
            return 2
        keep = ("method", "variant", "acceptance_rate", "mccs_worst_before", "mccs_worst_after", "fd_before_after",
                "truth")
        print(json.dumps({k: cal[k] for k in keep if k in cal}, indent=1))
        return 0
    try:
        from modeaudit.flows.audit import audit_flow
        result = audit_flow(cfg.to_dict())
    except (ConfigError, StoreError, FailedRun) as e:
        print(f"modeaudit: error: {e}", file=sys.stderr)
        return 2
    code = gate(result["verdict"].get("level", "ok"), args.fail_on)
    report = RunLayout(cfg.out).written_report
    console.note(f"{result['verdict']['headline']} ({'report' if report else 'result'}: "
                 f"{report or RunLayout(cfg.out).result_json})")
    verdict = {k: (any(b["reject"] for b in v) if isinstance(v, list) else v["reject"])
               for k, v in result["tests"].items()}
    print(json.dumps({"headline": result["verdict"]["headline"], "verdict": verdict,
                      "worst_case": result["worst_case"], "mccs_mean": result["mccs"]["mean"],
                      "report": str(report) if report else None}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
