"""Audit configuration: defaults from the seed papers, presets, and validation.

Every check here runs before any work starts, so bad settings fail in a second
with a message that names the setting and the fix.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from modeaudit.tasks.errors import InputError
from modeaudit.tasks.registry import ConfigError

DEFAULT_RADII = tuple(float(r) for r in np.round(np.arange(0.10, 0.505, 0.01), 2))

# Presets set sizes only; any explicit option overrides them.
PRESETS = {
    # Seeds 000/001 at full scale: m = 1e5, M = 1e7, q = 1000, |A| = 1e4, |C| = 1e6.
    "paper": dict(m=100_000, M=10_000_000, q=1000, n_a=10_000, n_c=1_000_000),
    # The default: a tenth of the paper in S and T, a minute or two on a laptop.
    "standard": dict(m=10_000, M=1_000_000, q=1000, n_a=10_000, n_c=1_000_000),
    # The README demo and quick checks.
    "demo": dict(m=5_000, M=200_000, q=500, n_a=2_000, n_c=200_000),
}


class _Config(BaseModel):
    """Strict, closed settings: a wrong type or an unknown key is a one-line ConfigError (see `parse`)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)

    @classmethod
    def parse(cls, data) -> "_Config":
        """Validate a mapping (a deployment's parameters, a UI form, JSON) into the model, or raise ConfigError."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} must be a mapping of settings, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(_one_line(cls, e)) from None

    def to_dict(self) -> dict:
        """Plain-JSON view (tuples as lists)."""
        return self.model_dump(mode="json")

    def replace(self, **changes) -> "_Config":
        """A copy with some fields changed (no re-validation: callers validate sizes themselves)."""
        return self.model_copy(update=changes)


def _one_line(cls, e: ValidationError) -> str:
    err = e.errors()[0]
    key = ".".join(str(x) for x in err["loc"]) or "(config)"
    if err["type"] == "extra_forbidden":
        return (f"{cls.__name__}: unknown key {key!r}; known keys: {', '.join(cls.model_fields)}")
    got = " ".join(repr(err.get("input")).split())      # one line: an array's repr spans many
    got = got if len(got) <= 80 else got[:77] + "..."
    return f"{cls.__name__}: {key!r}: {err['msg'].rstrip('.')} (got {got} of type {type(err.get('input')).__name__})" + (
        f" and {len(e.errors()) - 1} more" if len(e.errors()) > 1 else "")


def _as_tuple(v):
    return tuple(v) if isinstance(v, list) else v


class AuditConfig(_Config):
    """Everything an audit run needs; see `modeaudit audit --help` for each field.

    Strict types (an `overwrite: "false"` string is refused, not truthy) and no unknown
    keys: this is the Prefect flow's parameter, so the UI shows it as a form.
    """
    out: str
    generator: str | None = None
    generator_options: dict[str, Any] = Field(default_factory=dict)
    descriptor: str | None = None
    descriptor_options: dict[str, Any] = Field(default_factory=dict)
    embeddings_s: str | None = None
    embeddings_t: str | None = None
    images_s: str | None = None        # a folder of images for S, embedded with --descriptor
    images_t: str | None = None        # ... for T
    preset: str = "standard"
    m: int | None = None
    M: int | None = None
    p: int = 1
    q: int | None = None
    n_a: int | None = None
    n_c: int | None = None
    d0: float = 0.25
    radii: tuple[float, ...] = DEFAULT_RADII
    alpha: float = 0.05
    theta: float = 0.3
    seed: int = 0
    shard_rows: int = 100_000
    store_dtype: str = "float16"
    workers: int = 1                  # Dask workers (the CLI default too); more on a bigger machine
    threads_per_worker: int | None = None
    scheduler: str | None = None
    kernel: str = "auto"
    overwrite: bool = False
    # Statistics beyond the paper (docs/statistics.md).
    tests: str | None = None           # default: paper,erl,selection (+ two_sample with a reference)
    reference: str | None = None       # reference: embeddings (.npy/Zarr), a folder of images, or an earlier run
    reference_generator: str | None = None
    reference_generator_options: dict[str, Any] = Field(default_factory=dict)
    n_ref: int | None = None           # rows drawn from --reference-generator (default min(M, 1e6))
    null_replicates: int | None = None  # default 99 with a reference set, 39 against the surrogate (each refits)
    selection_m: int | None = None     # the selection test re-selects on S[:selection_m] (default min(m, 1e4))
    selection_t: int | None = None     # ... and counts in T[:selection_t] (default min(M, 1e5))
    modes: int = 10                    # top-k distinct dense modes (two-sample test, report)
    diversity_rows: int = 10_000       # rows of T and of the reference for the peers' metrics (0: skip them)
    efficiency: bool = True            # sampling-efficiency curves
    # report.html, plots/ and the picture grids; False writes result.json only (a job that gates on the exit
    # code or reads the numbers). Never part of the run's fingerprint: the numbers do not depend on it.
    report: bool = True
    # Weight of a pair at exactly d0 in the dense-mode ranking: 1.0 counts it (inclusive,
    # d <= d0), 0.5 is seed 000's Eq. 2 ((1 + sgn(d0 - d)) / 2); docs/statistics.md.
    tie_weight: float = 1.0
    # Embeddings of image folders are cached here across runs (None: $MODEAUDIT_CACHE, else
    # $XDG_CACHE_HOME/modeaudit, else ~/.cache/modeaudit); cache=False neither reads nor writes it.
    cache_dir: str | None = None
    cache: bool = True

    _radii_tuple = field_validator("radii", mode="before")(_as_tuple)

    @field_validator("out")
    @classmethod
    def _out_without_dotdot(cls, v: str) -> str:
        # "X/new/.." is X (storage/layout.resolved_dir): resolved here, once for the CLI, the API and a
        # deployment alike, so nothing writes through a "new" made on the way or prints a path that is not there.
        if "://" not in v and ".." in Path(v).parts:
            from modeaudit.storage.layout import resolved_dir
            return os.fspath(resolved_dir(v))
        return v


class CalibrationConfig(_Config):
    """Everything a calibration run needs; see `modeaudit calibrate --help` for each field."""
    run: str
    method: str = "rejection"
    variant: str | None = None
    modes: int = 1
    clusters: int = 64
    n_fit: int = 200_000
    kernel: str = "auto"
    workers: int = 1
    scheduler: str | None = None
    fid_reference: str | None = None
    inception_weights: str | None = None
    image_range: str = "-1:1"
    fid_rows: int = 10_000


def default(model, name: str):
    """The model's default of a field: the CLI shows and uses these, never a second copy."""
    return model.model_fields[name].get_default(call_default_factory=True)


_FRAC_WHY = {"d0": "distances are normalised to [0, 1]", "alpha": "it is a test level (e.g. 0.05)",
             "theta": "it is the MCCS distance cut-off, and distances are normalised to [0, 1]"}


def _frac(name, v):
    if not (isinstance(v, (int, float)) and 0 < v < 1 and np.isfinite(v)):
        raise ConfigError(f"{name}={v} is outside (0, 1); {_FRAC_WHY.get(name, 'pick a value inside')}, "
                          "pick a value inside")


def apply_preset(cfg: AuditConfig) -> AuditConfig:
    """Fill unset sizes from the preset; q/|A|/|C| defaults are capped at m and M (the paper's q = 1000 'capped at m')."""
    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}; choose one of: {', '.join(PRESETS)}")
    pre = PRESETS[cfg.preset]
    c = cfg.replace()
    c.m = pre["m"] if c.m is None else c.m
    c.M = pre["M"] if c.M is None else c.M
    return c


# The CLI flag of each size, for messages (the config's names are not what users type).
SIZE_FLAGS = {"p": "--p", "q": "--q", "n_a": "--anchors", "n_c": "--mccs-set", "shard_rows": "--shard-rows",
              "workers": "--workers", "selection_m": "--selection-m", "selection_t": "--selection-t",
              "n_ref": "--n-ref", "null_replicates": "--null-replicates", "modes": "--modes"}

# Far beyond any audit's need (the paper's is 1e7 rows): a size above it is a typo, not a plan.
MAX_ROWS = 10 ** 11


def finalize_sizes(cfg: AuditConfig, m: int, M: int) -> AuditConfig:
    """Set the actual sizes (from the preset or from the embedding files) and validate everything."""
    pre = PRESETS.get(cfg.preset, PRESETS["standard"])
    c = cfg.replace(m=m, M=M)
    if m < 1 or M < 1:
        raise InputError(f"empty sample set (|S|={m}, |T|={M}); both need at least one row")
    if max(m, M) > MAX_ROWS:
        raise InputError(f"|S|={m:.3g} / |T|={M:.3g} rows: this tool handles at most {MAX_ROWS:.0e} rows per set "
                         "(a store of 1e11 rows of 128-d float16 is 25 TB); choose smaller --m / --M")
    if m < 2:
        raise InputError("S needs at least 2 rows: the dense-mode search counts each row's neighbours among the others")
    c.q = min(pre["q"], m) if c.q is None else c.q
    c.n_a = min(pre["n_a"], m) if c.n_a is None else c.n_a
    c.n_c = min(pre["n_c"], M) if c.n_c is None else c.n_c
    if c.null_replicates is None:
        # Against the surrogate each replicate draws two T-sized samples and refits the model
        # (about 0.7 s at the defaults here): 39 keeps the paper preset within its budget and
        # still resolves p to 1/40 at alpha = 0.05. A reference null is cheap: 99.
        base = 99 if (c.reference or c.reference_generator) else 39
        ok_alpha = isinstance(c.alpha, (int, float)) and 0 < c.alpha < 1
        c.null_replicates = max(base, int(np.ceil(2 / c.alpha)) - 1) if ok_alpha else base
    c.selection_m = min(m, 10_000) if c.selection_m is None else c.selection_m
    # Against the surrogate every replicate draws T* and a prediction sample of this size,
    # so it is halved there (the paper preset's budget); a reference pool only indexes rows.
    has_ref = bool(c.reference or c.reference_generator)
    c.selection_t = min(M, 100_000 if has_ref else 50_000) if c.selection_t is None else c.selection_t
    # Enough reference rows for the two-sample counts and for two disjoint selection-test draws.
    c.n_ref = max(min(M, 1_000_000), 2 * (c.selection_m + c.selection_t)) if c.n_ref is None else c.n_ref
    for name in ("p", "q", "n_a", "n_c", "shard_rows", "workers", "selection_m", "selection_t", "n_ref",
                 "null_replicates", "modes"):
        v = getattr(c, name)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{SIZE_FLAGS.get(name, name)} {v}: must be a positive whole number")
    if c.p > m:
        raise ConfigError(f"--p {c.p} is larger than m=|S|={m}; choose --p <= m")
    if c.q > m:
        raise ConfigError(f"--q {c.q} is larger than m=|S|={m}; choose --q <= m")
    if c.n_a > m:
        raise ConfigError(f"|A|={c.n_a} is larger than m=|S|={m}; A is taken from S, choose --anchors <= m")
    if c.n_c > M:
        raise ConfigError(f"|C|={c.n_c} is larger than M=|T|={M}; C is taken from T, choose --mccs-set <= M")
    if c.selection_m > m or c.selection_t > M:
        raise ConfigError(f"--selection-m {c.selection_m} / --selection-t {c.selection_t} exceed |S|={m} / |T|={M}")
    validate_settings(c)
    if "selection" in tests_for(c) and (c.null_replicates + 1) * c.alpha < 1:
        raise ConfigError(f"--null-replicates {c.null_replicates} is too few for alpha={c.alpha}: the smallest "
                          f"p-value is 1/(B+1); use at least {int(np.ceil(1 / c.alpha)) - 1}")
    if "erl" in tests_for(c) and (c.q + 1) * c.alpha < 1:
        raise ConfigError(f"q={c.q} reference anchors are too few for the erl test at alpha={c.alpha}: it needs "
                          f"(q + 1) * alpha >= 1; use --q {int(np.ceil(1 / c.alpha)) - 1} or more, or leave erl out "
                          "of --tests")
    return c


def validate_calibration(c: "CalibrationConfig") -> None:
    """A calibration's settings, checked before its run folder is read."""
    for name, flag in (("modes", "--modes"), ("clusters", "--clusters"), ("n_fit", "--n-fit"),
                       ("fid_rows", "--fid-rows"), ("workers", "--workers")):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{flag} {v}: must be a positive whole number")
    if c.scheduler is None:
        from modeaudit.tasks.plan import check_local_workers
        check_local_workers(c.workers)
    if c.method not in ("cluster", "rejection"):
        raise ConfigError(f"method={c.method!r}; choose cluster or rejection")
    from modeaudit.tasks.calibration.steps import _image_range
    _image_range(c.image_range)
    if c.scheduler is not None:
        check_scheduler_address(c.scheduler)


def validate_settings(c: AuditConfig) -> None:
    """Checks that need no sizes: distances, alpha, theta, radii, kernel, storage."""
    _frac("d0", c.d0)
    _frac("alpha", c.alpha)
    _frac("theta", c.theta)
    if not (isinstance(c.tie_weight, (int, float)) and not isinstance(c.tie_weight, bool)
            and 0.0 <= c.tie_weight <= 1.0):
        raise ConfigError(f"tie_weight={c.tie_weight} must be in [0, 1]: 1 counts a pair at exactly d0 (the "
                          "default), 0.5 counts it half (seed 000, Eq. 2)")
    r = np.asarray(c.radii, np.float64)
    if r.ndim != 1 or len(r) == 0:
        raise ConfigError("radii must be a non-empty list of distances, e.g. --radii 0.1:0.5:0.01")
    if not np.all(np.isfinite(r)) or r.min() <= 0 or r.max() >= 1:
        bad = next(x for x in r if not (np.isfinite(x) and 0 < x < 1))
        raise ConfigError(f"radius {bad} is outside (0, 1); distances are normalised to [0, 1], pick radii inside")
    if np.any(np.diff(r) <= 0):
        raise ConfigError("radii must be strictly increasing (e.g. --radii 0.1:0.5:0.01)")
    if r.size > MAX_RADII:
        raise ConfigError(f"{r.size} radii; at most {MAX_RADII} (each is a column of every curve)")
    if not isinstance(c.seed, int) or c.seed < 0:
        raise ConfigError(f"seed={c.seed} is negative; seeds are whole numbers >= 0 (e.g. --seed 0)")
    if c.seed >= 2 ** 63:
        raise ConfigError(f"seed={c.seed} is too large; seeds are whole numbers below 2**63 (stored as int64)")
    if c.tests is not None and not str(c.tests).strip(" ,"):
        raise ConfigError("--tests is empty; give a comma list of tests (paper, erl, selection, two_sample, "
                          "deficit) or leave it out for the defaults")
    if c.threads_per_worker is not None and c.threads_per_worker < 1:
        raise ConfigError(f"threads_per_worker={c.threads_per_worker}; give at least 1, or leave it unset "
                          "(cores / workers)")
    if not isinstance(c.diversity_rows, int) or c.diversity_rows < 0:
        raise ConfigError(f"diversity_rows={c.diversity_rows}; give a whole number >= 0 (0 skips the diversity metrics)")
    if c.workers < 1:
        raise ConfigError(f"workers={c.workers}; give at least 1")
    if c.scheduler is None:
        from modeaudit.tasks.plan import check_local_workers
        check_local_workers(c.workers)
    else:
        check_scheduler_address(c.scheduler)
    from modeaudit.tasks.plan import KERNELS
    if c.kernel not in KERNELS:
        raise ConfigError(f"kernel={c.kernel!r}; choose one of: {', '.join(KERNELS)}")
    if c.store_dtype not in ("float16", "float32"):
        raise ConfigError(f"store dtype {c.store_dtype!r}; choose float16 or float32")
    for side in ("s", "t"):
        if getattr(c, f"embeddings_{side}") is not None and getattr(c, f"images_{side}") is not None:
            raise ConfigError(f"give --embeddings-{side} or --images-{side}, not both")
    s_in = c.embeddings_s if c.embeddings_s is not None else c.images_s
    t_in = c.embeddings_t if c.embeddings_t is not None else c.images_t
    if (c.generator is None) == (s_in is None and t_in is None):
        raise ConfigError("give either --generator SPEC or both --embeddings-s and --embeddings-t "
                          "(or --images-s and --images-t)")
    from modeaudit.tasks.stats.registry import STAT_TESTS, has_reference, parse_tests
    tests = parse_tests(c.tests) if c.tests else ()
    needs = [t for t in tests if STAT_TESTS[t].needs_reference]
    if needs and not has_reference(c):
        raise ConfigError(f"the {needs[0]} test needs a reference set: pass --reference EMBEDDINGS or "
                          "--reference-generator SPEC")
    if c.reference_generator and c.generator is None:
        raise ConfigError("--reference-generator needs --generator (its samples are embedded with the audited "
                          "model's descriptor); with --embeddings-s/-t pass reference embeddings with --reference")
    if c.reference and c.reference_generator:
        raise ConfigError("give --reference or --reference-generator, not both")
    if c.generator is None and (s_in is None or t_in is None):
        raise ConfigError("--embeddings-s and --embeddings-t go together; give both files"
                          if c.images_s is None and c.images_t is None else
                          "S and T both need an input: give --images-s (or --embeddings-s) and --images-t (or "
                          "--embeddings-t)")
    if (c.images_s or c.images_t) and c.generator is None and not c.descriptor:
        raise ConfigError("--images-s/--images-t need --descriptor SPEC (an image descriptor, e.g. torch:tiny-cnn "
                          "or torchscript:PATH) to embed the images")


def check_scheduler_address(address: str) -> None:
    """A Dask scheduler address must be PROTOCOL://HOST:PORT (tcp, tls, ws, wss, inproc, ucx)."""
    import re
    if not re.fullmatch(r"(tcp|tls|ws|wss|ucx)://[^\s:/]+(:\d{1,5})|inproc://\S+", str(address)):
        raise ConfigError(f"--scheduler {address!r} is not a Dask scheduler address; write it as "
                          "tcp://HOST:PORT, e.g. tcp://10.0.0.5:8786")


def tests_for(c: AuditConfig) -> tuple:
    """The tests to run: --tests, or every registered default that applies (tasks/stats/registry.py)."""
    from modeaudit.tasks.stats.registry import default_tests, parse_tests
    return parse_tests(c.tests) if c.tests else default_tests(c)


def kernel_for(kernel: str) -> str:
    """The concrete kernel ("auto" resolved on this machine), or a ConfigError saying what to use instead."""
    from modeaudit.tasks.join.backend import resolve_kernel
    try:
        return resolve_kernel(kernel)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# More radii than this is a typo (a step of 1e-9), not a grid: each radius is a column of every curve.
MAX_RADII = 10_000


def parse_radii(text: str) -> tuple:
    """'0.1:0.5:0.01' (inclusive start:stop:step) or '0.1,0.2,0.3' -> tuple of floats."""
    try:
        if ":" in text:
            a, b, s = (float(x) for x in text.split(":"))
            if not (s > 0 and math.isfinite(a) and math.isfinite(b) and math.isfinite(s)):
                raise ValueError
            q = (b - a) / s
            if not math.isfinite(q) or q + 1 > MAX_RADII:
                raise OverflowError(q + 1)
            n = int(round(q)) + 1
            return tuple(float(x) for x in np.round(a + s * np.arange(n), 10))
        return tuple(float(x) for x in text.split(","))
    except OverflowError as e:
        raise ConfigError(f"--radii {text!r} makes {e.args[0]:.4g} radii; at most {MAX_RADII} (each is a column of every "
                          "curve): use a larger step") from None
    except ValueError:
        raise ConfigError(f"--radii {text!r} is not START:STOP:STEP (e.g. 0.1:0.5:0.01) or a comma list") from None
