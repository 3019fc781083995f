"""modeaudit: black-box audit of generative models for intra-mode collapse, and calibration of their samplers.

The Python API (the CLI's twin): `modeaudit.audit(...)` and `modeaudit.calibrate(...)`
return result objects, `modeaudit.metrics(...)` the metrics.json dict; see README.md. Heavy modules (Prefect, Dask, torch) load only
when a function that needs them is called.
"""
from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["__version__", "audit", "calibrate", "metrics", "AuditConfig", "CalibrationConfig", "AuditResult",
           "CalibrationResult", "ConfigError"]


def __getattr__(name):
    # Lazy: `import modeaudit` stays cheap and never imports Prefect, Dask or torch.
    if name in ("audit", "calibrate", "metrics", "AuditResult", "CalibrationResult"):
        from modeaudit import api
        return getattr(api, name)
    if name in ("AuditConfig", "CalibrationConfig"):
        from modeaudit.tasks import config
        return getattr(config, name)
    if name == "ConfigError":
        from modeaudit.tasks.registry import ConfigError
        return ConfigError
    raise AttributeError(f"module 'modeaudit' has no attribute {name!r}")
