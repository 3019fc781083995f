"""Python callables as generators and descriptors.

- `python:MODULE:CALLABLE` (CLI, deployments): imported by name in every worker process.
  With `factory=true` the callable is called once per worker (load weights there) and
  must return the function to use.
- `python-object:KEY` (Python API only): a callable object handed to `modeaudit.audit`
  that cannot be imported by name (defined in a notebook, a lambda, a closure). It
  lives in this process, so such an audit runs its Dask workers as threads here.

A generator function maps latents (n, latent_dim) float32 to samples: embedding rows
(n, D) or images (n, C, H, W) (canonical: float32 RGB in [-1, 1], docs/models.md); a
descriptor function maps samples to rows (n, D). On images, a descriptor applies its
declared preprocessing (input_range, resize, crop, channels, flip_average) first.
The fingerprint (run store key) holds the name and a hash of the function's source,
so an edited function is a different run.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import itertools
import threading

import numpy as np

from modeaudit.tasks.models.descriptors import DESCRIPTORS, ImageDescriptor
from modeaudit.tasks.models.generators import GENERATORS, Generator
from modeaudit.tasks.models.preprocess import preprocess_options
from modeaudit.tasks.registry import ConfigError, Option

_OBJECTS: dict[str, object] = {}
_ids = itertools.count(1)
_lock = threading.Lock()
_pos = dict(check=lambda v: v > 0, check_msg="must be > 0")


def register_object(fn) -> str:
    """Keep a callable in this process and return its spec `python-object:KEY` (Python API)."""
    if not callable(fn):
        raise ConfigError(f"{fn!r} is not callable; pass a function latents -> samples or samples -> embeddings")
    with _lock:
        for key, obj in _OBJECTS.items():
            if obj is fn:
                return f"python-object:{key}"
        key = f"{getattr(fn, '__qualname__', type(fn).__name__)}-{next(_ids)}"
        _OBJECTS[key] = fn
    return f"python-object:{key}"


def spec_for(fn) -> str:
    """`python:MODULE:QUALNAME` when a fresh process can import fn by name, else a process-local object spec."""
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if mod and mod != "__main__" and qual and "<" not in qual:
        try:
            if _import(f"{mod}:{qual}") is fn:
                return f"python:{mod}:{qual}"
        except ConfigError:
            pass
    return register_object(fn)


def _import(target: str):
    mod, sep, qual = target.partition(":")
    if not sep or not mod or not qual:
        raise ConfigError(f"python:{target}: give MODULE:CALLABLE, e.g. python:mypkg.models:generate")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ConfigError(f"python:{target}: cannot import module {mod!r} ({e}); put it on PYTHONPATH of the "
                          "workers too") from None
    for part in qual.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"python:{target}: module {mod!r} has no attribute {qual!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"python:{target}: {qual!r} is not callable")
    return obj


def _source_hash(fn) -> str | None:
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()
    except (OSError, TypeError):
        return None


def _resolve(spec: str, factory: bool):
    scheme, _, target = spec.partition(":")
    if scheme == "python-object":
        if target not in _OBJECTS:
            raise ConfigError(f"{spec}: this callable lives in another process; pass a callable importable by "
                              "name (python:MODULE:CALLABLE) to run on other processes")
        obj = _OBJECTS[target]
    else:
        obj = _import(target)
    fp = {"source_sha256": _source_hash(obj)}
    if factory:
        obj = obj()
        if not callable(obj):
            raise ConfigError(f"{spec}: factory=true but calling it returned {type(obj).__name__}, not a function")
    return obj, fp


def _as_array(out, spec: str, what: str) -> np.ndarray:
    if hasattr(out, "detach"):  # a torch tensor
        out = out.detach().cpu().numpy()
    a = np.asarray(out)
    if a.dtype.kind not in "fiu":
        raise ConfigError(f"{spec} returned {a.dtype} values; {what} must be real numbers")
    return a.astype(np.float32, copy=False)


class PythonGenerator(Generator):
    """A Python function latents -> samples."""

    def __init__(self, spec, options, fn, fp):
        super().__init__(spec, options)
        self.fn, self._fp = fn, fp
        self.latent_dim, self.batch_size = options["latent_dim"], options["batch_size"]
        self.sample_kind = options["kind"]
        self.default_descriptor = "identity" if self.sample_kind == "embedding" else None

    def generate(self, z):
        out = _as_array(self.fn(z), self.spec, "samples")
        want = 2 if self.sample_kind == "embedding" else 4
        if out.ndim != want or out.shape[0] != len(z):
            raise ConfigError(f"generator {self.spec} returned shape {out.shape} for {len(z)} latents; -G kind="
                              f"{self.sample_kind} expects {'(n, D) rows' if want == 2 else '(n, C, H, W) images'}")
        return out

    def fingerprint(self):
        return {**super().fingerprint(), **self._fp}


class PythonDescriptor(ImageDescriptor):
    """A Python function samples -> embedding rows (images get the declared preprocessing first)."""

    accepts = ("embedding", "image")

    def __init__(self, spec, options, fn, fp):
        super().__init__(spec, options)
        self.fn, self._fp, self.batch_size = fn, fp, options["batch_size"]

    def embed(self, samples):
        if np.ndim(samples) == 4:
            return super().embed(samples)
        if not self.preprocess.identity or self.preprocess.flip_average:
            raise ConfigError(f"descriptor {self.spec}: image preprocessing options are set but the samples are "
                              f"{np.ndim(samples)}-d embeddings, not images (n, C, H, W); drop those options")
        return self.forward(samples)

    def forward(self, samples):
        outs = []
        for i in range(0, len(samples), self.batch_size):
            part = samples[i:i + self.batch_size]
            e = _as_array(self.fn(part), self.spec, "embeddings")
            if e.ndim != 2 or e.shape[0] != len(part):
                raise ConfigError(f"descriptor {self.spec} returned shape {e.shape} for {len(part)} samples; "
                                  "it must return one row per sample, (n, D)")
            outs.append(e)
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)

    def fingerprint(self):
        return {**super().fingerprint(), **self._fp}


_gen_opts = {
    "latent_dim": Option(int, 0, "latent dimension the function takes (required)", **_pos),
    "batch_size": Option(int, 4096, "latents per call", **_pos),
    "kind": Option(str, "embedding", "what it returns: embedding rows (n, D) or image (n, C, H, W)",
                   check=lambda v: v in ("embedding", "image"), check_msg="must be embedding or image"),
    "factory": Option(bool, False, "call it once per worker to get the function (load weights there)"),
}
_desc_opts = {
    "batch_size": Option(int, 1024, "samples per call", **_pos),
    "factory": Option(bool, False, "call it once per worker to get the function (load weights there)"),
    **preprocess_options(),
}


def _gen(scheme):
    def build(target, *, latent_dim, batch_size, kind, factory):
        spec = f"{scheme}:{target}"
        fn, fp = _resolve(spec, factory)
        return PythonGenerator(spec, dict(latent_dim=latent_dim, batch_size=batch_size, kind=kind, factory=factory),
                               fn, fp)
    return build


def _desc(scheme):
    def build(target, *, batch_size, factory, **pre):
        spec = f"{scheme}:{target}"
        fn, fp = _resolve(spec, factory)
        return PythonDescriptor(spec, dict(batch_size=batch_size, factory=factory, **pre), fn, fp)
    return build


for _scheme, _help in (("python", "a Python function MODULE:CALLABLE imported in each worker"),
                       ("python-object", "a callable passed to the Python API (runs in this process)")):
    GENERATORS.register(_scheme, _gen_opts, prefix=True, help=_help + ": latents -> samples")(_gen(_scheme))
    DESCRIPTORS.register(_scheme, _desc_opts, prefix=True, help=_help + ": samples -> embedding rows")(_desc(_scheme))
