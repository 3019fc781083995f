"""Sample-based generative-model metrics: FID (fid.py) and the k-NN / kernel metrics
(precision & recall, density & coverage, KID, birthday-paradox support size) on the
exact streamed k-NN kernels of knn.py. See docs/metrics.md.

`compute_metrics` is loaded on first use, so importing the FID module does not pull
in numba.
"""
__all__ = ["compute_metrics"]


def __getattr__(name):
    if name == "compute_metrics":
        from modeaudit.tasks.metrics.suite import compute_metrics
        return compute_metrics
    raise AttributeError(f"module 'modeaudit.tasks.metrics' has no attribute {name!r}")
