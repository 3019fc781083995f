"""`modeaudit metrics`: precision, recall, density, coverage, KID and support size of a fake set against a real set.

Kept out of flows/cli.py (which hooks it in with two calls) so that the subcommand
needs no Prefect: it reads both sets into memory and runs the exact k-NN kernels of
tasks/metrics/ in this process, or with `--workers N` / `--scheduler ADDR` as Dask
tasks over groups of query rows (tasks/metrics/engine.py) on a cluster started as the
audit starts its own (tasks/plan.py decides its kind, flows/cluster.py starts it). On a
cluster, a .npy file, Zarr array or run folder is not read here: it is checked in one
streamed pass and the workers read it by path (tasks/metrics/rows.py).
"""
from __future__ import annotations

import argparse
import json
import numbers
import sys
from pathlib import Path

from modeaudit.flows.args import HelpFormatter


def add_metrics_parser(sub) -> argparse.ArgumentParser:
    """Add the `metrics` subcommand to the CLI's subparsers."""
    # kid.py is numpy only: building the CLI's parser must not load numba.
    from modeaudit.tasks.metrics.kid import KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS
    m = sub.add_parser("metrics", help="precision/recall, density/coverage, KID and birthday-paradox support size "
                       "of fake samples against real ones (exact k-NN, streamed)",
                       formatter_class=HelpFormatter)
    m.add_argument("--real", required=True, metavar="PATH", help="real (reference) feature rows: .npy, Zarr array, "
                   "an audit run folder (its store's T embeddings), or a folder of PNG/JPEG images (embedded with "
                   "--descriptor, cached)")
    m.add_argument("--fake", required=True, metavar="PATH", help="generated feature rows, same formats")
    m.add_argument("--descriptor", metavar="SPEC", help="image descriptor for image folders (e.g. torch:tiny-cnn or "
                   "torchscript:PATH; `modeaudit list`)")
    m.add_argument("-D", "--descriptor-option", action="append", metavar="KEY=VALUE", help="descriptor option")
    m.add_argument("--cache-dir", metavar="DIR", help="feature cache of image-folder embeddings (default: "
                   "$MODEAUDIT_CACHE, else $XDG_CACHE_HOME/modeaudit, else ~/.cache/modeaudit)")
    m.add_argument("--no-cache", dest="cache", action="store_false", help="neither read nor write the feature cache")
    m.add_argument("--k", type=int, default=5, help="nearest neighbour defining each sample's ball (prdc's nearest_k)")
    m.add_argument("--distance", default="euclidean", choices=["euclidean", "angular"],
                   help="euclidean on the rows as given (as prdc), or arccos(<a,b>)/pi on unit-normalised rows")
    m.add_argument("--out", required=True, metavar="DIR", help="directory for metrics.json")
    m.add_argument("--kid-subsets", type=int, default=KID_SUBSETS, help="KID: random subsets averaged")
    m.add_argument("--kid-subset-size", type=int, default=KID_SUBSET_SIZE, help="KID: rows per subset")
    m.add_argument("--kid-seed", type=int, default=KID_SEED, help="KID: RandomState seed (torch-fidelity's)")
    m.add_argument("--dup-quantile", type=float, default=None, help="support size: near-duplicate threshold = "
                   "this quantile of the real nearest-neighbour distances (default 0.01)")
    m.add_argument("--block-rows", type=int, default=65536, help="rows per streamed block of the point side")
    from modeaudit.flows.args import count
    from modeaudit.tasks.plan import METRIC_KERNELS
    m.add_argument("--workers", type=count, default=None, metavar="N", help="run the k-NN joins on N local Dask "
                   "worker processes; unset (and no --scheduler): in this process. The numbers do not change")
    m.add_argument("--scheduler", metavar="ADDRESS", help="run the k-NN joins on an existing Dask scheduler, e.g. "
                   "tcp://10.0.0.5:8786")
    m.add_argument("--kernel", default="auto", choices=METRIC_KERNELS, help="k-NN kernel: fast (numba), lowprec "
                   "(numba with a bfloat16 GEMM in torch), torch-cpu, torch-cuda; auto = torch-cuda on a GPU machine, "
                   "lowprec for 512+ columns and 1e4+ rows on a CPU with AMX or AVX512-BF16, else fast (all exact, "
                   "equal results)")
    m.add_argument("--group-rows", type=count, default=None, metavar="N", help="query rows per Dask task; unset: "
                   "about four tasks per worker thread")
    return m


def _config_error():
    from modeaudit.tasks.registry import ConfigError
    return ConfigError


class _Bad(_config_error()):
    """A user error: the CLI prints it as one line and exits 2; the Python API raises it (a ConfigError)."""


def _run_folder_source(p: Path, what: str):
    """The T embeddings of a finished audit run folder, as a Source of its rows as stored."""
    from modeaudit.storage.store import RunStore, StoreError
    from modeaudit.tasks.join.sources import Source
    try:
        store = RunStore.open(p)
    except StoreError as e:
        raise _Bad(f"{what} {p}: {e}") from None
    if "T" not in store.set_names:
        src = store.fingerprint.get("embeddings", {}).get("T", {}).get("path")
        hint = f"pass that file ({src}) instead" if src else "pass a .npy or Zarr array of features instead"
        raise _Bad(f"{what} {p} is an audit of embedding files and stores no T embeddings; {hint}")
    try:
        store.shard_checksums("T")  # raises when the run is unfinished
    except StoreError as e:
        raise _Bad(f"{what} {p}: {e}") from None
    return Source.of_store(store, "T")


class _InProcess:
    """The two Dask client calls image_folders.embed_on_cluster makes, run here in order: this
    command starts no cluster, and the blocks come back in the order they were submitted."""

    def submit(self, fn, *args, pure=False):
        return fn(*args)

    def gather(self, results):
        return list(results)


def image_descriptor(args) -> dict | None:
    """{spec, options} of --descriptor with its -D options resolved (None when not given); _Bad if unknown."""
    if not getattr(args, "descriptor", None):
        if getattr(args, "descriptor_option", None):
            raise _Bad("-D/--descriptor-option needs --descriptor SPEC")
        return None
    from modeaudit.tasks.registry import ConfigError, parse_kv
    try:
        opts = parse_kv(args.descriptor_option, "-D")
    except ConfigError as e:
        raise _Bad(str(e)) from None
    return resolve_descriptor(args.descriptor, opts)


def resolve_descriptor(spec: str, options: dict | None) -> dict:
    """{spec, options} of an image descriptor with its options resolved and the model built once
    (a bad spec or option fails before any image is read); _Bad otherwise."""
    from modeaudit.tasks.models import image_folders as imf
    from modeaudit.tasks.models.descriptors import DESCRIPTORS
    from modeaudit.tasks.registry import ConfigError
    try:
        desc = {"spec": spec, "options": DESCRIPTORS.resolve_options(spec, dict(options or {}))}
        imf.descriptor_of(desc)
    except (ConfigError, ValueError) as e:
        raise _Bad(str(e)) from None
    return desc


def _folder_rows(p: Path, what: str, desc: dict | None, cache: bool, cache_dir: str | None):
    """The embeddings of an image folder, from the feature cache or embedded here (the audit's code path)."""
    from types import SimpleNamespace

    from modeaudit.tasks import inputs
    from modeaudit.tasks.errors import InputError
    from modeaudit.tasks.models import image_folders as imf
    from modeaudit.tasks.models.descriptors import DESCRIPTORS
    from modeaudit.tasks.registry import ConfigError
    try:
        # tasks/inputs.folder_plan's steps, with this command's option names in the messages.
        descriptor = inputs._image_descriptor(desc, what, str(p))
        listing = imf.list_images(p, what)
        takes_resize = "resize" in DESCRIPTORS.lookup(desc["spec"])[0].options
        size = imf.target_size(listing, descriptor, desc["spec"], what, takes_resize)
        plan = inputs.FolderPlan("reference", what, listing, size,
                                 imf.content_key(listing, descriptor.fingerprint(), size), desc)
        rows, _, _ = inputs.embed_folder(_InProcess(), plan, SimpleNamespace(cache=cache, cache_dir=cache_dir))
    except (InputError, ConfigError) as e:
        raise _Bad(str(e)) from None
    return rows


def load_rows(path, what: str, distance: str, desc: dict | None = None, cache: bool = True,
              cache_dir: str | None = None, by_path: bool = False):
    """Feature rows as float32 from a .npy file, a Zarr array, an audit run folder, or a folder of images
    (embedded with the descriptor `desc`, through the feature cache), or an in-memory (n, d) array;
    _Bad on bad input.

    by_path: a .npy file, Zarr array or run folder comes back as a FeatureFile (checked in one
    streamed pass, never held whole here) for Dask workers to read themselves."""
    import dataclasses

    import numpy as np
    from modeaudit.tasks.errors import InputError
    from modeaudit.tasks.inputs import reference_kind
    from modeaudit.tasks.join.sources import open_embeddings, rows_as
    from modeaudit.tasks.metrics.rows import FeatureFile
    if not isinstance(path, (str, Path)):
        try:
            x = np.asarray(path)
        except (TypeError, ValueError) as e:
            raise _Bad(f"{what} is neither a path nor an array of feature rows ({e})") from None
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0 or not (np.issubdtype(x.dtype, np.floating)
                                                  or np.issubdtype(x.dtype, np.integer)):
            raise _Bad(f"{what} must be an (n, d) array of numbers with n, d >= 1, got shape {x.shape} dtype {x.dtype}")
        x = rows_as(x, np.float32)
        _check_rows([(0, x)], f"{what} array {x.shape}", distance)
        return x
    p = Path(path)
    if p.is_dir() and reference_kind(str(p)) == "images" and not (p / "store.zarr").is_dir():
        x = _folder_rows(p, what, desc, cache, cache_dir)
        _check_rows([(0, x)], f"{what} {path}", distance)
        return x
    if p.is_dir() and (p / "store.zarr").is_dir():
        src = _run_folder_source(p, what)
        if src.rows == 0:
            raise _Bad(f"{what} {p}: its T embeddings are empty; finish the audit first")
    else:
        try:
            src = open_embeddings(p, what)
        except InputError as e:
            raise _Bad(str(e)) from None
    # The rows exactly as stored, in float32 (a Source renormalises otherwise); the path made
    # absolute, as workers started in another directory must open the same file.
    rows = FeatureFile.of(dataclasses.replace(src, path=str(Path(src.path).resolve())))
    if by_path:
        _check_rows(rows.blocks(), f"{what} {path}", distance)
        return rows
    x = rows.read()
    _check_rows([(0, x)], f"{what} {path}", distance)
    return x


def _check_rows(blocks, what: str, distance: str) -> None:
    """_Bad when the rows hold NaN/Inf, or (angular) an all-zero row; blocks: (offset, rows) pairs,
    checked one after another (a whole array is [(0, x)])."""
    import numpy as np
    from modeaudit.tasks.join.sources import row_norms
    found = {"bad": [0, None], "zero": [0, None]}
    for lo, block in blocks:
        norms = row_norms(block)
        finite = np.isfinite(norms)
        for key, hits in (("bad", np.flatnonzero(~finite)), ("zero", np.flatnonzero(finite & (norms == 0)))):
            if hits.size:
                found[key][0] += hits.size
                found[key][1] = lo + int(hits[0]) if found[key][1] is None else found[key][1]
    n, first = found["bad"]
    if n:
        raise _Bad(f"{what} has {n} row(s) with NaN or Inf (first: row {first}), or values too "
                   "large for float32; remove or re-embed those samples")
    n, first = found["zero"]
    if distance == "angular" and n:
        raise _Bad(f"{what} has {n} all-zero row(s) (first: row {first}); they have no "
                   "direction for --distance angular: remove them or use --distance euclidean")


def _execution(kernel: str, workers, scheduler, group_rows):
    """(kernel, the metrics' execution plan (tasks/plan.py) or None to run in this process, group_rows as an
    int or None); _Bad on a bad setting or an unreachable scheduler."""
    from modeaudit.tasks.join.backend import metric_kernel
    from modeaudit.tasks.registry import ConfigError
    try:
        # Checked here; "auto" stays "auto" for the joins, which resolve it with their width and size.
        resolved = metric_kernel(kernel)
    except ValueError as e:
        raise _Bad(f"--kernel: {e}") from None
    workers, group_rows = (None if v is None else _positive_int(v, option)
                           for option, v in (("--workers", workers), ("--group-rows", group_rows)))
    if workers is not None and scheduler:
        raise _Bad("--workers starts a local cluster and --scheduler uses an existing one; give one of them")
    if workers is None and not scheduler:
        return kernel, None, group_rows
    from modeaudit.flows.cluster import probe_scheduler
    from modeaudit.tasks.plan import plan_execution
    try:
        if scheduler:
            probe_scheduler(scheduler)
        return kernel, plan_execution(resolved, workers or 1, scheduler=scheduler or None), group_rows
    except ConfigError as e:
        raise _Bad(str(e)) from None


def _positive_int(v, option: str) -> int:
    """v as a Python int (numpy integers accepted), or _Bad unless it is a whole number >= 1."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise _Bad(f"{option} must be a positive integer, got {v!r}")
    return int(v)


# KID's subsets are drawn up front (an index array each): more than this is a typo, not a setting
# (torch-fidelity's default is 100); 10**30 ran the machine out of memory.
MAX_KID_SUBSETS = 10_000


def _check_settings(k, distance, kid_subsets, kid_subset_size, dup_quantile, block_rows, kid_seed) -> tuple:
    """The settings checked (types too: the Python API passes values argparse never saw, block_rows=2.5 was a
    TypeError inside numpy; numpy integers and floats are accepted) and returned as Python ints and floats."""
    k = _positive_int(k, "--k")
    if distance not in ("euclidean", "angular"):
        raise _Bad(f"--distance must be euclidean or angular, got {distance!r}")
    kid_subsets = _positive_int(kid_subsets, "--kid-subsets")
    if kid_subsets > MAX_KID_SUBSETS:
        raise _Bad(f"--kid-subsets {kid_subsets}: at most {MAX_KID_SUBSETS} (torch-fidelity's default is 100)")
    kid_subset_size = _positive_int(kid_subset_size, "--kid-subset-size")
    if kid_subset_size < 2:
        raise _Bad("--kid-subsets must be >= 1 and --kid-subset-size >= 2")
    if isinstance(kid_seed, bool) or not isinstance(kid_seed, numbers.Integral) or not 0 <= kid_seed < 2 ** 32:
        raise _Bad(f"--kid-seed must be a whole number in [0, 2**32) (a numpy RandomState seed), got {kid_seed!r}")
    if dup_quantile is not None:
        if isinstance(dup_quantile, bool) or not isinstance(dup_quantile, numbers.Real) or not 0.0 < dup_quantile < 1.0:
            raise _Bad(f"--dup-quantile must lie in (0, 1), got {dup_quantile!r}")
        dup_quantile = float(dup_quantile)
    block_rows = _positive_int(block_rows, "--block-rows")
    return k, kid_subsets, kid_subset_size, dup_quantile, block_rows, int(kid_seed)


def metrics_of(real, fake, *, k: int = 5, distance: str = "euclidean", desc: dict | None = None, out=None,
               cache: bool = True, cache_dir: str | None = None, block_rows: int = 65536, kid_subsets: int | None = None,
               kid_subset_size: int | None = None, kid_seed: int | None = None,
               dup_quantile: float | None = None, kernel: str = "auto", workers: int | None = None,
               scheduler: str | None = None, group_rows: int | None = None, client=None) -> dict:
    """The metrics.json dict of `fake` against `real` (each a path, as `--real`/`--fake` take, or an
    array); with `out`, also written to out/metrics.json. Every input is checked before `out` is
    created. Bad input raises _Bad (a ConfigError) with the CLI's message.

    The k-NN joins run in this process, or on `client` (a distributed.Client), or on a cluster
    started for the call (`workers` local processes) or reached at `scheduler`; the numbers are
    the same on each (exact joins)."""
    from modeaudit.tasks.metrics.kid import KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS
    kid_subsets = KID_SUBSETS if kid_subsets is None else kid_subsets
    kid_subset_size = KID_SUBSET_SIZE if kid_subset_size is None else kid_subset_size
    kid_seed = KID_SEED if kid_seed is None else kid_seed
    k, kid_subsets, kid_subset_size, dup_quantile, block_rows, kid_seed = _check_settings(
        k, distance, kid_subsets, kid_subset_size, dup_quantile, block_rows, kid_seed)
    kernel, plan, group_rows = _execution(kernel, workers, scheduler, group_rows)
    if plan is not None and client is not None:
        raise _Bad("pass a client, or workers/scheduler, not both")
    if client is not None and not callable(getattr(client, "submit", None)):
        raise _Bad(f"client must be a distributed.Client, got {type(client).__name__}")
    if out is not None:
        from modeaudit.storage.layout import resolved_dir
        if not str(out).strip():
            raise _Bad("--out is empty; give a directory for metrics.json, e.g. --out runs/metrics1")
        out = resolved_dir(out)
        if out.exists() and not out.is_dir():
            raise _Bad(f"--out {out} is a file; choose a directory")
    # On a cluster, files stay files: the workers read them (tasks/metrics/rows.py).
    by_path = plan is not None or client is not None
    from modeaudit.storage.store import StoreError
    try:
        real_rows = load_rows(real, "--real", distance, desc, cache, cache_dir, by_path=by_path)
        fake_rows = load_rows(fake, "--fake", distance, desc, cache, cache_dir, by_path=by_path)
    except StoreError as e:      # a run folder's damaged store: a ConfigError for the CLI and the API
        raise _Bad(str(e)) from None
    if real_rows.shape[1] != fake_rows.shape[1]:
        raise _Bad(f"--real rows have width {real_rows.shape[1]} but --fake rows have width {fake_rows.shape[1]}; "
                   "extract both with the same feature extractor")
    for what, x in (("--real", real_rows), ("--fake", fake_rows)):
        if x.shape[0] <= k:
            raise _Bad(f"{what} has {x.shape[0]} rows; --k {k} needs at least {k + 1} (a row is not "
                       "its own neighbour): pass more samples or a smaller --k")
    made = []        # the folders this call creates for --out, innermost first: taken back if it fails
    if out is not None:
        # Every input checked: only now is anything created.
        made = [p for p in (out, *out.parents) if not p.exists()]
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _Bad(f"cannot create --out {out} ({e.strerror or e}); choose a writable directory") from None
    try:
        return _compute_and_write(real, fake, real_rows, fake_rows, out, k, distance, block_rows, kid_subsets,
                                  kid_subset_size, kid_seed, dup_quantile, kernel, group_rows, plan, client)
    except BaseException:
        for p in made:       # only empty ones: a folder the run made and nothing else wrote to
            try:
                p.rmdir()
            except OSError:
                break
        raise


def _compute_and_write(real, fake, real_rows, fake_rows, out, k, distance, block_rows, kid_subsets, kid_subset_size,
                       kid_seed, dup_quantile, kernel, group_rows, plan, client) -> dict:
    """metrics_of's joins and metrics.json, once every input is checked."""
    from modeaudit.tasks.metrics.suite import compute_metrics
    extra = {} if dup_quantile is None else {"dup_quantile": dup_quantile}

    def run(cl):
        r, f = real_rows, fake_rows
        if cl is not None:
            r, f = (_readable_on_workers(cl, x, what) for x, what in ((r, "--real"), (f, "--fake")))
        return compute_metrics(r, f, k, distance, block_rows=block_rows, kid_subsets=kid_subsets,
                               kid_subset_size=kid_subset_size, kid_seed=kid_seed, client=cl, kernel=kernel,
                               group_rows=group_rows, **extra)
    from modeaudit.tasks.registry import ConfigError
    try:
        if plan is None:
            result = run(client)
        else:
            from modeaudit.flows.cluster import dask_client
            with dask_client(plan) as cl:
                result = run(cl)
    except ValueError as e:
        raise _Bad(str(e)) from None
    except ConfigError as e:   # a cluster that cannot be reached, or workers lost again and again
        raise _Bad(str(e)) from None
    except OSError as e:       # a worker's read of a file that changed or vanished after the checks
        raise _Bad(f"reading the feature rows failed ({e}); keep --real and --fake unchanged while the "
                   "metrics run") from None
    for key, given, rows in (("real", real, real_rows), ("fake", fake, fake_rows)):
        result[key] = str(given) if isinstance(given, (str, Path)) else f"array {tuple(rows.shape)}"
    if out is not None:
        from modeaudit.storage.layout import atomic_write_text
        path = out / "metrics.json"
        try:
            atomic_write_text(path, json.dumps(result, indent=1) + "\n")
        except OSError as e:
            raise _Bad(f"cannot write {path} ({e.strerror or e}); choose a writable --out") from None
    return result


def _probe_read(rows, want: tuple) -> str | None:
    """On a worker: None when it sees the file this process checked (the same kind, rows, width and,
    for .npy, size: FeatureFile.identity) and can read it; else why not."""
    try:
        got = rows.identity()
        rows.read(0, 1)
    except Exception as e:  # noqa: BLE001 - any failure means this worker cannot read the file
        return f"{type(e).__name__}: {e}"
    return None if got == want else f"it sees {got}, this process {want}"


def _readable_on_workers(client, rows, what: str):
    """rows itself when every worker can read it (or it is an array); otherwise its rows read here,
    to be scattered as before, with one line on stderr saying why (a cluster without the path)."""
    from modeaudit.tasks.metrics.rows import FeatureFile
    if not isinstance(rows, FeatureFile):
        return rows
    failed = {w: why for w, why in client.run(_probe_read, rows, rows.identity()).items() if why is not None}
    if not failed:
        return rows
    worker, why = sorted(failed.items())[0]
    print(f"modeaudit: {what} {rows.path}: {len(failed)} worker(s) cannot open it ({worker}: {why}); reading it "
          "here and sending it to the workers instead (the whole set in this process and in every worker, twice "
          "there while it arrives). Put it on a path every worker sees to avoid that.", file=sys.stderr)
    return rows.read()


def run_metrics(args) -> int:
    """Run `modeaudit metrics`: write DIR/metrics.json, print it; user errors -> one line on stderr, exit 2."""
    try:
        desc = image_descriptor(args)
        # This command's own process, nothing else computing yet: one BLAS thread, so the
        # kernels run one tile thread per core (tasks/join/threads.py), as in Dask workers.
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=1, user_api="blas")
        result = metrics_of(args.real, args.fake, k=args.k, distance=args.distance, desc=desc, out=args.out,
                            cache=args.cache, cache_dir=args.cache_dir, block_rows=args.block_rows,
                            kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                            kid_seed=args.kid_seed, dup_quantile=args.dup_quantile, kernel=args.kernel,
                            workers=args.workers, scheduler=args.scheduler, group_rows=args.group_rows)
    except _config_error() as e:      # _Bad, and an InputError from reading the rows (a damaged chunk)
        print(f"modeaudit: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: result[k] for k in ("precision", "recall", "density", "coverage", "kid", "support_size")},
                     indent=1))
    return 0
