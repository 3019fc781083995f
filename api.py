"""The Python API: `modeaudit.audit(...)`, `modeaudit.calibrate(...)` and `modeaudit.metrics(...)`, the CLI's twins.

    import modeaudit
    if __name__ == "__main__":          # Dask starts worker processes: scripts need the guard
        r = modeaudit.audit(generator="synthetic:planted", preset="demo", out="runs/demo")
        print(r.headline, r.worst_case, r.report)

Both run the same Prefect flows as the CLI and return a result object; bad input raises
`modeaudit.ConfigError` (a ValueError) with the same one-line message the CLI prints.
A generator or descriptor may be a spec string ("synthetic:planted", "torchscript:G.pt",
"python:pkg.mod:fn") or a Python callable (latents -> samples, samples -> embedding rows).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from modeaudit.tasks.config import AuditConfig, CalibrationConfig  # noqa: E402
from modeaudit.tasks.registry import ConfigError  # noqa: E402


@dataclass
class AuditResult:
    """A finished audit: the verdict, the numbers of result.json, and where its files are."""
    data: dict = field(repr=False)
    out: Path

    @property
    def headline(self) -> str:
        """The verdict's headline, e.g. "Collapse detected"."""
        return self.data["verdict"]["headline"]

    @property
    def verdict(self) -> dict:
        """{headline, explanation}."""
        return self.data["verdict"]

    @property
    def worst_case(self) -> dict:
        """{s_index, count_d0, mccs} of the densest sample."""
        return self.data["worst_case"]

    @property
    def tests(self) -> dict:
        """The statistical tests' results (result.json["tests"])."""
        return self.data["tests"]

    @property
    def report(self) -> Path | None:
        """report.html of the run (None when it ran with report=False)."""
        from modeaudit.storage.layout import RunLayout
        return RunLayout(self.out).written_report

    @property
    def result_json(self) -> Path:
        """result.json of the run."""
        return self.out / "result.json"

    def __getitem__(self, key):
        return self.data[key]


@dataclass
class CalibrationResult:
    """A finished calibration: calibration.json's numbers and where the calibrated sampler is."""
    data: dict = field(repr=False)
    out: Path

    @property
    def generator(self) -> str:
        """The calibrated sampler's generator spec (`calibrated:PATH`), usable in a new audit."""
        return self.data["generator"]

    @property
    def report(self) -> Path:
        """The calibration report."""
        return self.out / "report.html"

    def __getitem__(self, key):
        return self.data[key]


def _model_spec(model, what: str):
    if model is None or isinstance(model, str):
        return model
    from modeaudit.tasks.models.python_models import spec_for
    if not callable(model):
        raise ConfigError(f"{what} must be a spec string or a callable, got {type(model).__name__}")
    return spec_for(model)


def _raise_failed(e) -> None:
    raise ConfigError(str(e)) from None


def audit(generator=None, *, out: str | os.PathLike, descriptor=None, reference_generator=None,
          latent_dim: int | None = None, **settings) -> AuditResult:
    """Audit a generator (spec or callable) or embeddings; returns an AuditResult.

    Every other keyword is an AuditConfig field (`modeaudit audit --help` lists them under
    their CLI names): m, M, preset, d0, tests, reference (embeddings, a folder of images or
    an earlier run), embeddings_s, embeddings_t, images_s, images_t, cache_dir, cache,
    workers, overwrite, generator_options, ... `latent_dim` is a shorthand for the
    generator option of that name (needed by callables and TorchScript files).
    A callable that a fresh process cannot import by name (defined in a notebook or in
    __main__) runs on worker threads of this process instead of worker processes.
    """
    fields = dict(settings)
    fields["out"] = str(out)
    fields["generator"] = _model_spec(generator, "generator")
    fields["descriptor"] = _model_spec(descriptor, "descriptor")
    fields["reference_generator"] = _model_spec(reference_generator, "reference_generator")
    if latent_dim is not None:
        fields["generator_options"] = {**fields.get("generator_options", {}), "latent_dim": latent_dim}
    fields = {k: v for k, v in fields.items() if v is not None}
    if isinstance(fields.get("radii"), list):
        fields["radii"] = tuple(fields["radii"])
    cfg = AuditConfig.parse(fields)
    from prefect.exceptions import FailedRun

    from modeaudit.flows.cli import no_heartbeats_on_a_temporary_server, preflight
    from modeaudit.storage.layout import check_out_dir
    from modeaudit.storage.store import StoreError
    try:
        preflight(cfg)
        check_out_dir(cfg.out)
        from modeaudit.flows.audit import audit_flow
        with no_heartbeats_on_a_temporary_server():
            data = audit_flow(cfg)
    except (FailedRun, StoreError) as e:
        _raise_failed(e)
    return AuditResult(data, Path(cfg.out))


def calibrate(run: str | os.PathLike, **settings) -> CalibrationResult:
    """Calibrate the sampler of a finished generator audit in `run`; returns a CalibrationResult.

    Keywords are CalibrationConfig fields: method ("rejection" or "cluster"), variant,
    modes, clusters, n_fit, workers, kernel, fid_reference, inception_weights, ...
    """
    cfg = CalibrationConfig.parse({"run": str(run), **settings})
    from prefect.exceptions import FailedRun

    from modeaudit.flows.cli import no_heartbeats_on_a_temporary_server, check_calibration_inputs
    from modeaudit.storage.store import StoreError
    try:
        check_calibration_inputs(cfg)
        from modeaudit.flows.calibrate import calibrate_flow
        with no_heartbeats_on_a_temporary_server():
            data = calibrate_flow(cfg)
    except (FailedRun, StoreError) as e:
        _raise_failed(e)
    return CalibrationResult(data, Path(cfg.run) / "calibration" / cfg.method)


def metrics(real, fake, *, k: int = 5, distance: str = "euclidean", descriptor=None, descriptor_options=None,
            out: str | os.PathLike | None = None, cache: bool = True, cache_dir: str | None = None,
            **settings) -> dict:
    """Precision, recall, density, coverage, KID and support size of `fake` against `real` (`modeaudit metrics`).

    real, fake: (n, d) arrays of feature rows, or paths as the CLI takes them: a .npy file,
    a Zarr array, an audit run folder (its T embeddings) or a folder of images, embedded
    with `descriptor` (a spec string or a callable, with `descriptor_options`) through the
    feature cache. Returns the metrics.json dict (docs/metrics.md); with `out`, also writes
    out/metrics.json. Other keywords: block_rows, kid_subsets, kid_subset_size, kid_seed,
    dup_quantile; kernel ("auto", "fast", "torch-cpu", "torch-cuda"); and where the k-NN joins
    run: client (a distributed.Client), workers (a local cluster started for the call) or
    scheduler (an address), group_rows (query rows per Dask task). On a cluster, paths to a
    .npy file, Zarr array or run folder are read by the workers themselves (this process
    never holds those sets; arrays are sent to the workers). By default it runs in this
    process (no Prefect, no Dask) and leaves its BLAS threads as they are; the numbers are the
    same everywhere. Bad input raises ConfigError with the CLI's one-line message.
    """
    from modeaudit.flows.metrics_cli import metrics_of, resolve_descriptor
    known = ("block_rows", "kid_subsets", "kid_subset_size", "kid_seed", "dup_quantile", "kernel", "workers",
             "scheduler", "group_rows", "client")
    unknown = set(settings) - set(known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))}; modeaudit.metrics takes "
                          f"{', '.join(known)}")
    if descriptor_options and descriptor is None:
        raise ConfigError("descriptor_options needs a descriptor")
    desc = None
    if descriptor is not None:
        desc = resolve_descriptor(_model_spec(descriptor, "descriptor"), descriptor_options)
    paths = tuple(str(x) if isinstance(x, os.PathLike) else x for x in (real, fake))
    return metrics_of(*paths, k=k, distance=distance, desc=desc, out=out, cache=cache, cache_dir=cache_dir,
                      **settings)
