"""The audit's steps as plain functions over a run store and a Dask client.

No Prefect here: `tasks/stages.py` wraps these as Prefect tasks and
`flows/audit.py` composes them. Tests call these directly.
"""
from __future__ import annotations

import os
import time


import numpy as np

from modeaudit.tasks import console
from modeaudit.tasks.join import parallel
from modeaudit.storage.layout import RunLayout
from modeaudit.tasks.config import AuditConfig
from modeaudit.tasks.plan import model_device
from modeaudit.tasks.errors import InputError
from modeaudit.tasks.stats.paper import paper_test, population_mccs
from modeaudit.tasks.join.kernels import mccs_from_sums
from modeaudit.tasks.models.shards import embed_rows, generate_shard, models
from modeaudit.tasks.join.sources import Source, check_scan, merge_scans, open_embeddings

from modeaudit import __version__ as VERSION  # noqa: E402  (result.json["modeaudit_version"])


def _with_device(registry, spec: str, options: dict, device: str) -> dict:
    # Torch models run where the plan computes ("cuda" with the CUDA kernel) unless -G/-D device says otherwise.
    entry, _ = registry.lookup(spec)
    if "device" in entry.options and "device" not in (options or {}):
        return {**(options or {}), "device": device}
    return dict(options or {})


def model_specs(cfg: AuditConfig) -> tuple[dict, dict]:
    """Validated {spec, options} of the generator and its descriptor (builds them once, here, to fail early)."""
    gen, desc, _ = model_specs_and_width(cfg)
    return gen, desc


def model_specs_and_width(cfg: AuditConfig) -> tuple[dict, dict, int]:
    """model_specs, and the width of the embeddings (from the trial row it embeds)."""
    from modeaudit.tasks.models.descriptors import DESCRIPTORS
    from modeaudit.tasks.models.generators import GENERATORS
    device = model_device(cfg.kernel)
    gen_opts = GENERATORS.resolve_options(cfg.generator, _with_device(GENERATORS, cfg.generator,
                                                                      cfg.generator_options, device))
    gen = {"spec": cfg.generator, "options": gen_opts}
    generator = GENERATORS.build(cfg.generator, gen_opts)
    # Before the trial row: the latents are drawn in blocks of rng.BLOCK_ROWS rows, so even one row of a
    # latent_dim=1e6 model is GiBs.
    check_shard_memory(cfg, generator.latent_dim, 0)
    dspec = cfg.descriptor or generator.default_descriptor
    if dspec is None:
        raise InputError(f"generator {cfg.generator!r} makes images: choose a descriptor with --descriptor "
                         "(e.g. torch:tiny-cnn or torchscript:PATH)")
    desc = {"spec": dspec, "options": DESCRIPTORS.resolve_options(
        dspec, _with_device(DESCRIPTORS, dspec, cfg.descriptor_options, device))}
    # Build both and embed one trial row now: a broken model, a wrong latent_dim or a wrong
    # output shape fails in seconds, before any cluster or shard starts.
    width = trial_embedding(gen, desc, cfg.seed, "generator").shape[1]
    check_shard_memory(cfg, generator.latent_dim, width)
    check_audit_width(width, f"--generator {cfg.generator}" + (f" with --descriptor {cfg.descriptor}"
                                                               if cfg.descriptor else ""))
    return gen, desc, width


def trial_embedding(gen: dict, desc: dict, seed: int, what: str) -> np.ndarray:
    """One row through the generator and descriptor; a model that raises becomes a one-line InputError."""
    from modeaudit.tasks.registry import ConfigError
    try:
        return embed_rows(gen, desc, seed, "probe", 0, 1)[1]
    except (ConfigError, InputError):
        raise
    except MemoryError:
        raise InputError(f"the {what} {gen['spec']!r} ran out of memory on its first sample; check its options "
                         "(-G/-R) or free memory") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise InputError(f"the {what} {gen['spec']!r} or descriptor {desc['spec']!r} failed on a first trial sample "
                         f"({type(e).__name__}: {first}); fix the model or its options") from None


def _arrays(cfg: AuditConfig, gen: dict, desc: dict):
    from modeaudit.storage.store import ArraySpec
    from modeaudit.tasks.models.shards import embed_rows
    generator, _ = models(gen, desc)
    z, emb, truth, _ = embed_rows(gen, desc, cfg.seed, "probe", 0, 1)
    arrays = [ArraySpec("latents", "float32", generator.latent_dim), ArraySpec("emb", cfg.store_dtype, emb.shape[1])]
    if truth is not None:
        arrays.append(ArraySpec("planted", "bool", None))
    return tuple(arrays)


def store_layouts(cfg: AuditConfig, gen: dict, desc: dict, ref_gen: dict | None = None):
    """Zarr layouts of S and T (and R, the reference generator's draw) for a generator run."""
    from modeaudit.storage.store import SetLayout
    arrays = _arrays(cfg, gen, desc)
    out = [SetLayout(name, rows, min(cfg.shard_rows, rows), arrays) for name, rows in (("S", cfg.m), ("T", cfg.M))]
    if ref_gen is not None:
        out.append(SetLayout("R", cfg.n_ref, min(cfg.shard_rows, cfg.n_ref), _arrays(cfg, ref_gen, desc)))
    return out


def reference_spec(cfg: AuditConfig) -> dict | None:
    """{spec, options} of --reference-generator, validated (None without one)."""
    if not cfg.reference_generator:
        return None
    from modeaudit.tasks.models.generators import GENERATORS
    return {"spec": cfg.reference_generator,
            "options": GENERATORS.resolve_options(cfg.reference_generator, cfg.reference_generator_options)}


def check_reference_generator(cfg: AuditConfig, desc: dict, want: int) -> None:
    """Build --reference-generator and embed one trial row with the audited descriptor: width `want` (the
    audited generator's embeddings) or an error."""
    ref = reference_spec(cfg)
    if ref is None:
        return
    got = trial_embedding(ref, desc, cfg.seed, "reference generator").shape[1]
    if got != want:
        raise InputError(f"--reference-generator {cfg.reference_generator!r} gives embeddings of width {got}, the "
                         f"audited generator {want}: they must live in one descriptor space (same -R/-G dim)")


def store_identity(cfg: AuditConfig, gen: dict, desc: dict, ref_gen: dict | None = None,
                   inputs_fp: dict | None = None) -> tuple[dict, list]:
    """(fingerprint, layouts) of a generator run's store: what decides whether its shards can be reused.

    `inputs_fp` (Inputs.fingerprint()): content keys of an image-folder reference or an earlier
    run used as the reference; absent (not empty) otherwise, so older runs keep their fingerprint."""
    from modeaudit.tasks.models.shards import models as _m
    generator, descriptor = _m(gen, desc)
    fp = {"generator": generator.fingerprint(), "descriptor": descriptor.fingerprint(), "seed": cfg.seed,
          "store_dtype": cfg.store_dtype, "modeaudit_store": 1}
    if ref_gen is not None:
        fp["reference_generator"] = _m(ref_gen, desc)[0].fingerprint()
    if inputs_fp:
        fp["inputs"] = inputs_fp
    return fp, store_layouts(cfg, gen, desc, ref_gen)


def open_store(cfg: AuditConfig, gen: dict, desc: dict, ref_gen: dict | None = None, inputs_fp: dict | None = None):
    """Create or resume the run store of a generator run (store_identity)."""
    from modeaudit.storage.store import RunStore
    fp, layouts = store_identity(cfg, gen, desc, ref_gen, inputs_fp)
    _results_go_with_the_store(cfg)
    return RunStore.create_or_open(cfg.out, fp, layouts, overwrite=cfg.overwrite)


def _results_go_with_the_store(cfg: AuditConfig) -> None:
    """--overwrite replaces the store: the earlier run's result, report, plots and calibrations go first, so a
    run that then fails (bad rows found while generating) never leaves an old result.json over a new store."""
    if cfg.overwrite and RunLayout(cfg.out).run_json.is_file():
        from modeaudit.storage.layout import clear_derived
        clear_derived(cfg.out)


def result_store_identity(S: Source | None, T: Source | None, inputs_fp: dict | None = None) -> dict:
    """The fingerprint of an audit of user embeddings (files, or image folders whose rows it stores under
    inputs/): the input files (path, size, mtime) and the folders' content keys."""
    import os
    files = {}
    for name, src in (("S", S), ("T", T)):
        if src is None:        # an image folder: keyed by content in inputs_fp
            continue
        st = os.stat(src.path)
        files[name] = {"path": os.path.abspath(src.path), "rows": src.rows, "dim": src.dim,
                       "mtime_ns": st.st_mtime_ns, "size": st.st_size}
    fp = {"embeddings": files, "modeaudit_store": 1}
    if inputs_fp:
        fp["inputs"] = inputs_fp
    return fp


def open_result_store(cfg: AuditConfig, S: Source | None, T: Source | None, inputs_fp: dict | None = None):
    """Create or reopen the run store of an audit of user embeddings (result_store_identity)."""
    from modeaudit.storage.store import RunStore
    _results_go_with_the_store(cfg)
    return RunStore.create_or_open(cfg.out, result_store_identity(S, T, inputs_fp), [], overwrite=cfg.overwrite)


def _shard_intact(root: str, set_name: str, index: int) -> bool:
    from modeaudit.storage.store import RunStore
    return RunStore.open(root).is_complete(set_name, index, verify=True)


def generate_set(client, store, set_name: str, gen: dict, desc: dict, seed: int) -> dict:
    """Generate every missing shard of a set on the cluster; complete shards are reused only when their bytes
    still match the checksums recorded at completion (resume), damaged ones are generated again."""
    layout = store.layout(set_name)
    missing = store.missing_shards(set_name)
    recorded = [s for s in layout.shards() if s not in missing]
    ok = client.gather([client.submit(_shard_intact, str(store.root), set_name, i, pure=False)
                        for i, _, _ in recorded])
    damaged = [s for s, good in zip(recorded, ok) if not good]
    todo = sorted(missing + damaged)
    futures = [client.submit(generate_shard, str(store.root), set_name, i, lo, hi, gen, desc, seed,
                             pure=False, retries=2) for i, lo, hi in todo]
    console.gather(client, futures, [hi - lo for _, lo, hi in todo], f"{set_name} generated")
    return {"shards": len(layout.shards()), "generated": len(todo), "skipped": len(layout.shards()) - len(todo),
            "reused": [i for (i, _, _), good in zip(recorded, ok) if good],
            "damaged_regenerated": [i for i, _, _ in damaged]}


def set_scan(store, set_name: str) -> dict:
    """Merged validity scans saved by the shards of a set."""
    return merge_scans([store.read_json(RunLayout.scan(set_name, i)) for i, _, _ in store.layout(set_name).shards()])


# Fewer rows in T leave every ball nearly empty: no statistic here can say anything.
MIN_T_ROWS = 100


def embedding_sources(cfg: AuditConfig, s: Source | None = None, t: Source | None = None) -> tuple[Source, Source]:
    """Sources for user embeddings (the files of --embeddings-s/-t, or given sources: an image folder's rows),
    with widths checked against each other."""
    s = s if s is not None else open_embeddings(cfg.embeddings_s, "--embeddings-s")
    t = t if t is not None else open_embeddings(cfg.embeddings_t, "--embeddings-t")
    if os.path.samefile(s.path, t.path):
        raise InputError(f"--embeddings-s and --embeddings-t are the same file ({t.path}); S and T must be "
                         "independent samples (a row would count itself): split the samples or draw T anew")
    if t.rows < MIN_T_ROWS:
        raise InputError(f"--embeddings-t has {t.rows} rows; the curves and MCCS count neighbours in T, which "
                         f"needs at least {MIN_T_ROWS} rows (the paper uses 1e7)")
    if s.dim != t.dim:
        raise InputError(f"S rows have width {s.dim} but T rows have width {t.dim}; both must come from the same "
                         "descriptor")
    check_audit_width(s.dim, "--images-s" if cfg.images_s else "--embeddings-s")
    return s, t


def shard_bytes_max() -> int:
    """What one generation shard (a worker holds its latents and embeddings, float32, at once) may take: a
    quarter of this machine's memory, at least 2 GiB (workers of a remote cluster: size --shard-rows yourself)."""
    try:
        import psutil
        total = int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - no psutil or no /proc: the floor
        total = 0
    return max(2 << 30, total // 4)


def check_shard_memory(cfg: AuditConfig, latent_dim: int, width: int = 0) -> None:
    """InputError when one generation shard would not fit a worker: shard rows x (latent_dim + width) x 4 bytes
    above shard_bytes_max() (a -G latent_dim=1e6 at the default 100,000-row shards is 400 GB; it was killed for
    memory). Latents are drawn in whole blocks of rng.BLOCK_ROWS rows: that many rows is the least a shard holds."""
    from modeaudit.tasks.models.rng import BLOCK_ROWS
    limit = shard_bytes_max()
    rows = min(cfg.shard_rows, max(cfg.m or 0, cfg.M or 0)) or cfg.shard_rows
    need = max(rows, BLOCK_ROWS) * latent_dim * 4 + rows * width * 4
    if need <= limit:
        return
    if BLOCK_ROWS * latent_dim * 4 > limit // 2:
        raise InputError(f"latent_dim={latent_dim:,} is too large for this machine: latents are drawn in blocks of "
                         f"{BLOCK_ROWS} rows, {BLOCK_ROWS * latent_dim * 4 / 2**30:.1f} GiB a block, and a shard may "
                         f"take {limit / 2**30:.1f} GiB (a quarter of its memory): at most "
                         f"{limit // 2 // (BLOCK_ROWS * 4):,} latent dimensions here")
    fit = max(1, limit // ((latent_dim + width) * 4))
    embeddings = f" and {width}-d embeddings" if width else ""
    raise InputError(f"a generation shard of {rows:,} rows holds latent_dim={latent_dim:,} latents{embeddings}, "
                     f"{need / 2**30:.1f} GiB in a worker (at most {limit / 2**30:.1f} GiB here, a quarter of this "
                     f"machine's memory); pass --shard-rows {fit:,} or less (or a smaller latent_dim)")


def check_audit_width(width: int, what: str) -> None:
    """The audit works on directions: rows of one column have two (+1, -1), and its tests need >= 2 columns."""
    if width < 2:
        raise InputError(f"{what} gives embeddings of width {width}; an audit compares directions, which needs at "
                         "least 2 columns (a 1-column row normalises to +1 or -1)")


def reference_source(cfg: AuditConfig, S: Source) -> Source:
    """--reference embeddings as a source, width checked against S."""
    ref = open_embeddings(cfg.reference, "--reference")
    if ref.dim != S.dim:
        raise InputError(f"--reference rows have width {ref.dim} but S rows have width {S.dim}; embed the reference "
                         "set with the same descriptor")
    return ref


def null_spec(cfg: AuditConfig, ref: Source | None) -> tuple:
    """The selection test's null, as data a worker can rebuild it from: a permutation null over the generated
    and reference rows when there is a reference, else the parametric surrogate fitted to S[:selection_m]
    (see stats.steps.selection). A reference of any size works: the observed rows are part of the pool."""
    if ref is None:
        return ("surrogate", cfg.seed)
    # The whole reference, up to a few times one replicate: beyond that, more rows add nothing but reads.
    n_ref = min(ref.rows, max(4 * (cfg.selection_m + cfg.selection_t), 200_000))
    what = "reference generator" if cfg.reference_generator else "reference set"
    return ("reference", ref, n_ref, cfg.seed,
            f"permutation null: random splits of the generated and {what} rows, each scored by its worst case "
            f"and by its top modes' excess over the {what} rows (exact under 'same law')")


def validate_source(client, source: Source, what: str) -> dict:
    """Full validity scan of user embeddings; raises InputError on NaN/Inf or all-zero rows."""
    scan = parallel.scan(client, source)
    check_scan(scan, what)
    return scan


def self_join(client, S_rows: np.ndarray, S: Source, d0: float, kernel: str) -> np.ndarray:
    """N(I, S minus I, d0) for every row I of S (self excluded by index); S_rows = S.read()."""
    counts = parallel.range_counts(client, S_rows, S, [d0], anchor_ids=np.arange(S.rows), kernel=kernel)
    return counts[:, 0]


def anchor_curves(client, anchors: np.ndarray, T: Source, radii, kernel: str) -> np.ndarray:
    """N(anchor, T, d) for every anchor row and radius, int64 (len(anchors), R)."""
    return parallel.range_counts(client, anchors, T, radii, kernel=kernel)


def mccs_values(client, anchors: np.ndarray, T: Source, n_c: int, theta: float, kernel: str) -> np.ndarray:
    """MCCS of anchor rows over C = T[:n_c] (anchors come from S, a draw disjoint from T: no self pair)."""
    sums = parallel.mccs_sums(client, anchors, T, theta, stop=n_c, kernel=kernel)
    return mccs_from_sums(sums, n_c)


def json_safe(obj):
    """Strict JSON: +-inf and NaN become null (envelopes are -inf below for one-sided tests)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def assemble_result(cfg: AuditConfig, *, source: dict, self_counts, r_obs, r_ref, curves, mccs_a, mccs_worst,
                    scans: dict, truth: dict | None, timings: dict, ranking: dict | None = None) -> dict:
    """The result.json document (the public contract keys plus settings and provenance).

    `ranking` (optional): {counts (what the dense-mode search ranked by), ties (rows sharing
    the top count), tied_mccs (MCCS of the worst case and of further tied rows),
    pairs_at_d0 ({row: pairs at exactly d0} for the rows re-checked when tie_weight != 1)}.
    """
    obs, ref = curves[:len(r_obs)], curves[len(r_obs):]
    paper = paper_test(obs, ref, cfg.alpha)  # every R_obs curve: the test rejects if any leaves the band
    band = paper.pop("band")
    mean, std = population_mccs(mccs_a)
    w = int(r_obs[0])
    result = {
        "modeaudit_version": VERSION,
        "source": source,
        "sizes": {"S": cfg.m, "T": cfg.M, "A": cfg.n_a, "C": cfg.n_c},
        "d0": cfg.d0,
        "radii": list(cfg.radii),
        "settings": {"p": cfg.p, "q": cfg.q, "alpha": cfg.alpha, "theta": cfg.theta, "seed": cfg.seed,
                     "shard_rows": cfg.shard_rows, "workers": cfg.workers, "kernel": cfg.kernel,
                     "store_dtype": cfg.store_dtype, "preset": cfg.preset, "tie_weight": cfg.tie_weight,
                     # what a re-audit (calibrate) needs to run the same tests against the same null
                     "reference": os.path.abspath(cfg.reference) if cfg.reference else None,
                     "reference_generator": cfg.reference_generator,
                     "reference_generator_options": cfg.reference_generator_options, "n_ref": cfg.n_ref,
                     "null_replicates": cfg.null_replicates, "selection_m": cfg.selection_m,
                     "selection_t": cfg.selection_t, "modes": cfg.modes},
        "worst_case": {"s_index": w, "count_d0": int(self_counts[w]), "mccs": float(mccs_worst)},
        "r_obs": [int(i) for i in r_obs],
        "r_ref": [int(i) for i in r_ref],
        "curves": {"obs": obs.astype(int).tolist(), "ref_low": band["low"], "ref_high": band["high"],
                   "ref_median": band["median"]},
        "tests": {"paper": paper},
        "mccs": {"theta": cfg.theta, "mean": mean, "std": std, "worst_case": float(mccs_worst)},
        "normalization": {k: {"renormalized_rows": v["renormalized"], "rows": v["rows"],
                              **({"rejected_by_descriptor": v["rejected_by_descriptor"]}
                                 if "rejected_by_descriptor" in v else {})} for k, v in scans.items()},
        "timings": timings,
    }
    wc = result["worst_case"]
    if ranking is None:
        wc.update(ties=1, tied_mccs_range=[float(mccs_worst)] * 2, tied_mccs_rows=1)
    else:
        tm = np.asarray(ranking["tied_mccs"], np.float64)
        wc.update(ties=int(ranking["ties"]), tied_mccs_range=[float(tm.min()), float(tm.max())],
                  tied_mccs_rows=len(tm))
        if cfg.tie_weight != 1.0:
            wc["count_d0_weighted"] = float(ranking["counts"][w])
            wc["pairs_at_d0"] = int(ranking["pairs_at_d0"].get(w, 0))
    if truth is not None:
        result["truth"] = truth
    return result


def _sha_of(fp: dict | None) -> str | None:
    """The weights file's sha256 in a model fingerprint (torchscript:), or in the base model's (calibrated:)."""
    if not isinstance(fp, dict):
        return None
    return fp.get("sha256") or _sha_of(fp.get("base"))


def run_info(source: dict) -> dict:
    """Provenance that is not part of the result's numbers: when and where the audit finished, and the sha256 of
    the model files (None for built-in models and embedding files). Not byte-identical across runs by design:
    comparisons of result.json leave `run_info` out, as they leave out `timings`."""
    import datetime
    import socket
    shas = {"generator": None, "descriptor": None}
    if source.get("kind") == "generator":
        generator, descriptor = models({"spec": source["generator"], "options": source["generator_options"]},
                                       {"spec": source["descriptor"], "options": source["descriptor_options"]})
        shas = {"generator": _sha_of(generator.fingerprint()), "descriptor": _sha_of(descriptor.fingerprint())}
    return {"finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "model_sha256": shas}


class Timer:
    """Collects wall-clock seconds per named step."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name):
        timer = self

        class _T:
            def __enter__(self):
                self.stage = console.stage(name)    # names the progress lines of the step
                self.stage.__enter__()
                self.t = time.perf_counter()

            def __exit__(self, *a):
                timer.times[name] = round(timer.times.get(name, 0) + time.perf_counter() - self.t, 3)
                self.stage.__exit__(*a)
        return _T()
