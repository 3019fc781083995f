"""`onnx:PATH` generators and descriptors through onnxruntime.

The model's inputs and outputs are checked when it is loaded (count, rank, static
dims), so a wrong file fails in one line before any shard runs:

- generator: one input (n, latent_dim) -> one output, images (n, C, H, W) in the
  canonical convention (float32 RGB in [-1, 1], docs/models.md) or rows (n, D).
  latent_dim is read from the model when its dim is static (-G latent_dim may only
  repeat it); a dynamic latent dim needs -G latent_dim.
- descriptor: one input (n, C, H, W) -> one output (n, D), after the declared
  preprocessing (tasks/models/preprocess.py).
Only single-input models are supported; a model with several outputs names the one
to use with `output=NAME`.

Determinism: sessions run with intra_op_num_threads = inter_op_num_threads =
`threads` (default 1) and sequential execution. onnxruntime may split a reduction
over its threads, so the thread count can change an output's last bits; a fixed
count (part of the fingerprint) keeps a run's numbers independent of the machine's
core count, and Dask gives the parallelism across shards. A static batch dim (a model
exported without dynamic axes) is honoured by feeding exactly that many rows per
call (the last call padded with zeros, its padding dropped).

onnxruntime is optional: `pip install onnxruntime` (or `modeaudit[onnx]`), or
`onnxruntime-gpu` for the CUDA provider. With device=cuda the CUDA provider is used
when this onnxruntime has it, else the CPU provider (the fingerprint records which).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from modeaudit.tasks.models.descriptors import DESCRIPTORS, ImageDescriptor
from modeaudit.tasks.models.generators import GENERATORS, Generator, file_sha256
from modeaudit.tasks.models.preprocess import preprocess_options
from modeaudit.tasks.registry import ConfigError, Option

_pos = dict(check=lambda v: v > 0, check_msg="must be > 0")
_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def require_onnxruntime(what: str):
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"{what} needs onnxruntime, which is not installed; pip install onnxruntime "
                          "(or onnxruntime-gpu on a GPU node, or pip install 'modeaudit[onnx]')") from None
    return onnxruntime


def _providers(ort, device: str, what: str) -> list:
    dev = device.strip().lower()
    if dev == "cpu":
        return ["CPUExecutionProvider"]
    kind, _, idx = dev.partition(":")
    if kind != "cuda" or (idx and not idx.isdigit()):
        raise ConfigError(f"{what}: device={device!r} is not a device; use cpu, cuda or cuda:N")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": int(idx or 0)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]   # this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)


def open_session(path: str, device: str, threads: int, what: str):
    """An onnxruntime InferenceSession with deterministic options, or a one-line ConfigError."""
    ort = require_onnxruntime(f"{what} onnx:{path}")
    if not Path(path).is_file():
        raise ConfigError(f"{what} onnx:{path}: no such file; give the path of a .onnx model "
                          "(torch.onnx.export(model, example, path))")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3                     # errors only; no warnings on the user's terminal
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=_providers(ort, device, f"{what} onnx:{path}"))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{what} onnx:{path} is not a loadable ONNX model ({msg[:160]}); export it with "
                          "torch.onnx.export(model, example, path) or check the file") from None
    return sess


def _pick(items, name: str, kind: str, what: str):
    names = [i.name for i in items]
    if name:
        if name not in names:
            raise ConfigError(f"{what} has no {kind} named {name!r}; its {kind}s are: {', '.join(names)}")
        return items[names.index(name)]
    if len(items) != 1:
        raise ConfigError(f"{what} has {len(items)} {kind}s ({', '.join(names)}); it must have one, or name the one "
                          f"to use with {kind}=NAME")
    return items[0]


def _dims(arg) -> list:
    """Declared dims: ints for static ones, None for symbolic or unknown ones."""
    return [d if isinstance(d, int) and d > 0 else None for d in (arg.shape or [])]


def _fmt(dims) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


class _OnnxModel:
    """A checked single-input, single-output session, run in batches."""

    def __init__(self, path, device, threads, output_name, what):
        self.what = f"{what} onnx:{path}"
        self.sess = open_session(path, device, threads, what)
        inputs, outputs = self.sess.get_inputs(), self.sess.get_outputs()
        if len(inputs) != 1:
            raise ConfigError(f"{self.what} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                              "only single-input models are supported: export the model with one input")
        self.inp = inputs[0]
        self.out = _pick(outputs, output_name, "output", self.what)
        if self.inp.type not in _DTYPES:
            raise ConfigError(f"{self.what}: input {self.inp.name!r} is {self.inp.type}; it must be a float tensor")
        self.in_dtype = _DTYPES[self.inp.type]
        self.in_dims, self.out_dims = _dims(self.inp), _dims(self.out)
        self.provider = self.sess.get_providers()[0]

    @property
    def static_batch(self):
        return self.in_dims[0] if self.in_dims else None

    def run(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        x = np.ascontiguousarray(x, self.in_dtype)
        step = self.static_batch or batch_size
        outs = []
        for i in range(0, len(x), step):
            xb = x[i:i + step]
            n = len(xb)
            if self.static_batch and n < step:        # pad to the model's fixed batch
                xb = np.concatenate([xb, np.zeros((step - n, *xb.shape[1:]), xb.dtype)])
            try:
                y = self.sess.run([self.out.name], {self.inp.name: xb})[0]
            except Exception as e:  # noqa: BLE001 -- onnxruntime's own error types
                msg = (str(e).splitlines() or [type(e).__name__])[0]
                raise ConfigError(f"{self.what} failed on input of shape {xb.shape} ({msg[:160]}); check the "
                                  "model's input shape against the options (`modeaudit list`)") from None
            y = np.asarray(y)
            if y.ndim < 1 or y.shape[0] != len(xb):
                raise ConfigError(f"{self.what} returned shape {y.shape} for {len(xb)} inputs; it must return "
                                  "one output per input row")
            outs.append(y[:n].astype(np.float32, copy=False))
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


class OnnxGenerator(Generator):
    """An ONNX model latents (n, latent_dim) -> images (n, C, H, W) or rows (n, D)."""

    def __init__(self, spec, options, model: _OnnxModel, latent_dim, batch_size, sha256):
        super().__init__(spec, options)
        self.model, self.latent_dim, self.batch_size = model, latent_dim, batch_size
        self.sample_kind = "image" if len(model.out_dims) == 4 else "embedding"
        self.default_descriptor = None if self.sample_kind == "image" else "identity"
        self._fp = {"sha256": sha256, "provider": model.provider}

    def generate(self, z):
        out = self.model.run(z, self.batch_size)
        want = 4 if self.sample_kind == "image" else 2
        if out.ndim != want:
            raise ConfigError(f"generator {self.spec} returned shape {out.shape}; its declared output is "
                              f"{_fmt(self.model.out_dims)}")
        return out

    def fingerprint(self):
        return {**super().fingerprint(), **self._fp}


class OnnxDescriptor(ImageDescriptor):
    """An ONNX model images (n, C, H, W) -> rows (n, D), after the declared preprocessing."""

    def __init__(self, spec, options, model: _OnnxModel, batch_size, sha256):
        super().__init__(spec, options)
        self.model, self.batch_size = model, batch_size
        self._fp = {"sha256": sha256, "provider": model.provider}

    def forward(self, x):
        _, c, h, w = self.model.in_dims
        for got, want, what in ((x.shape[1], c, "channels"), (x.shape[2], h, "height"), (x.shape[3], w, "width")):
            if want is not None and got != want:
                hint = (f"pass -D resize={h}" if what != "channels" and h == w and h is not None
                        else "check the generator and the preprocessing options")
                raise ConfigError(f"descriptor {self.spec} takes images {_fmt(self.model.in_dims)} but gets "
                                  f"{tuple(x.shape)} after preprocessing (wrong {what}); {hint}")
        return self.model.run(x, self.batch_size)

    def fingerprint(self):
        return {**super().fingerprint(), **self._fp}


_common = {
    "device": Option(str, "cpu", "cpu, or cuda / cuda:N (onnxruntime-gpu's CUDA provider when present)"),
    "threads": Option(int, 1, "onnxruntime threads per session (fixed: the count can change the last bits)", **_pos),
    "output": Option(str, "", "output name (empty: the model's only output)"),
}


@GENERATORS.register("onnx", {
    **_common, "batch_size": Option(int, 256, "latents per call", **_pos),
    "latent_dim": Option(int, 0, "latent dimension (0: read it from the model; required when the model's is dynamic)",
                         check=lambda v: v >= 0, check_msg="must be >= 0 (0 = read from the model)"),
}, prefix=True, help="an ONNX model file via onnxruntime: latents (n, latent_dim) -> images (n, C, H, W) or rows")
def _onnx_generator(path, *, device, threads, output, batch_size, latent_dim):
    spec = f"onnx:{path}"
    model = _OnnxModel(path, device, threads, output, "generator")
    if len(model.in_dims) != 2:
        raise ConfigError(f"generator {spec}: its input {model.inp.name!r} has shape {_fmt(model.in_dims)}; a generator "
                          "takes latents (n, latent_dim): export it with a 2-d latent input")
    if len(model.out_dims) not in (2, 4):
        raise ConfigError(f"generator {spec}: its output {model.out.name!r} has shape {_fmt(model.out_dims)}; it must "
                          "be images (n, C, H, W) or rows (n, D)")
    declared = model.in_dims[1]
    if declared is not None and latent_dim not in (0, declared):
        raise ConfigError(f"generator {spec} takes latents of dim {declared}, not -G latent_dim={latent_dim}; "
                          f"drop the option or set latent_dim={declared}")
    if declared is None and not latent_dim:
        raise ConfigError(f"generator {spec}: its latent dim is dynamic; give it with -G latent_dim=K")
    k = latent_dim or declared
    opts = dict(device=device, threads=threads, output=output, batch_size=batch_size, latent_dim=k)
    return OnnxGenerator(spec, opts, model, k, batch_size, file_sha256(path))


@DESCRIPTORS.register("onnx", {
    **_common, "batch_size": Option(int, 256, "images per call", **_pos), **preprocess_options(),
}, prefix=True, help="an ONNX model file via onnxruntime: images (n, C, H, W) -> embedding rows (n, D)")
def _onnx_descriptor(path, *, device, threads, output, batch_size, **pre):
    spec = f"onnx:{path}"
    model = _OnnxModel(path, device, threads, output, "descriptor")
    if len(model.in_dims) != 4:
        raise ConfigError(f"descriptor {spec}: its input {model.inp.name!r} has shape {_fmt(model.in_dims)}; an "
                          "image descriptor takes images (n, C, H, W)")
    if len(model.out_dims) != 2:
        raise ConfigError(f"descriptor {spec}: its output {model.out.name!r} has shape {_fmt(model.out_dims)}; it "
                          "must return one embedding row per image, (n, D)")
    opts = dict(device=device, threads=threads, output=output, batch_size=batch_size, **pre)
    return OnnxDescriptor(spec, opts, model, batch_size, file_sha256(path))
