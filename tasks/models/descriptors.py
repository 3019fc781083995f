"""Identity descriptors: map a batch of samples to embedding rows.

Rows need not come out unit length: the caller normalises (and records how many
rows it had to). Real networks plug in through `torchscript:PATH`, `onnx:PATH`
(tasks/models/onnx_models.py), `python:MODULE:CALLABLE` (python_models.py) and
`dlib:face` (dlib_face.py). Every image descriptor declares its preprocessing of the
canonical image batch (float32 (n, C, H, W), RGB, [-1, 1]) with the options of
tasks/models/preprocess.py; docs/models.md.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from modeaudit.tasks.models.generators import file_sha256, load_torchscript, torch_device
from modeaudit.tasks.models.preprocess import Preprocess, combine_flip, flip_horizontal, preprocess_options
from modeaudit.tasks.registry import SEED_CHECK, ConfigError, Option, Registry, require_torch

DESCRIPTORS = Registry("descriptor", plugins=("modeaudit.tasks.models.python_models", "modeaudit.tasks.toy.rff",
                                               "modeaudit.tasks.models.onnx_models",
                                               "modeaudit.tasks.models.dlib_face"))
_pos = dict(check=lambda v: v > 0, check_msg="must be > 0")


class Descriptor:
    """Base descriptor: `embed` maps samples (n, ...) to float32 rows (n, dim)."""

    spec = ""
    accepts = ("embedding", "image")
    # The declared resize of an image descriptor (None when not declared): readers of
    # image files resize to it.
    input_size: int | None = None

    def __init__(self, spec: str, options: dict):
        self.spec, self.options = spec, dict(options)

    def embed(self, samples: np.ndarray) -> np.ndarray:
        """Embedding rows for a batch of samples."""
        raise NotImplementedError

    def embed_masked(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, ok): rows for a batch, and per row whether the descriptor could embed it.

        Rows with ok=False (dlib:face: no face found) hold no embedding and must not be
        used. The default embeds every sample (all True)."""
        rows = self.embed(samples)
        return rows, np.ones(len(rows), bool)

    def fingerprint(self) -> dict:
        """What identifies this descriptor (part of the run's fingerprint)."""
        return {"spec": self.spec, "options": self.options}


class IdentityDescriptor(Descriptor):
    """For generators whose samples already are identity embeddings."""

    accepts = ("embedding",)

    def embed(self, samples):
        if samples.ndim != 2:
            raise ConfigError("descriptor 'identity' needs 2-d embedding samples; this generator makes "
                              f"{samples.ndim}-d samples: pass --descriptor for images (e.g. torch:tiny-cnn)")
        return np.asarray(samples, np.float32)


@DESCRIPTORS.register("identity", help="samples are embeddings already")
def _identity():
    return IdentityDescriptor("identity", {})


class ImageDescriptor(Descriptor):
    """A network on images: the declared preprocessing (tasks/models/preprocess.py), then `forward`.

    Subclasses implement `forward(x)`: the preprocessed float32 (n, C, H, W) batch -> rows
    (n, D). With flip_average the mirrored batch is embedded too and the two unit rows are
    summed (preprocess.combine_flip)."""

    accepts = ("image",)

    def __init__(self, spec: str, options: dict):
        super().__init__(spec, options)
        self.preprocess = Preprocess.from_options(options)
        self.input_size = self.preprocess.input_size

    @property
    def flip_average(self) -> bool:
        return self.preprocess.flip_average

    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed(self, samples):
        x = self.preprocess(samples, f"descriptor {self.spec!r}")
        e = self.forward(x)
        if self.preprocess.flip_average:
            # As the seed paper's code does: average with the mirrored image's embedding.
            e = combine_flip(e, self.forward(flip_horizontal(x)))
        return e


class TorchDescriptor(ImageDescriptor):
    """Wraps a torch module mapping images (n, C, H, W) to rows (n, dim), batched on a device."""

    def __init__(self, spec, options, module, batch_size, device, extra_fp=None):
        super().__init__(spec, options)
        torch = require_torch("this descriptor")
        self.torch, self.device = torch, torch_device(torch, device, f"descriptor {spec}")
        self.module, self.batch_size = module.to(self.device).eval(), batch_size
        self._extra_fp = extra_fp or {}

    def forward(self, samples):
        torch = self.torch
        outs = []
        with torch.inference_mode():
            for i in range(0, len(samples), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(samples[i:i + self.batch_size], np.float32)).to(self.device)
                try:
                    e = self.module(x).float()
                except RuntimeError as err:
                    raise ConfigError(f"descriptor {self.spec} failed on images of shape {tuple(x.shape)} "
                                      f"({str(err).splitlines()[0]}); check its preprocessing options "
                                      "(-D resize=..., `modeaudit list`)") from None
                if e.dim() != 2 or e.shape[0] != x.shape[0]:
                    raise ConfigError(f"descriptor {self.spec} returned shape {tuple(e.shape)} for {x.shape[0]} "
                                      "images; it must return one row per image, (n, D)")
                outs.append(e.cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)

    def fingerprint(self):
        return {**super().fingerprint(), **self._extra_fp}


def tiny_cnn_module(dim: int = 32, world_seed: int = 1):
    """A small fixed-weight CNN descriptor (3-channel images -> dim) for tests and demos."""
    torch = require_torch("this descriptor")
    from torch import nn
    g = torch.Generator().manual_seed(world_seed)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                        nn.Linear(16 * 16, dim))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


_torch_opts = {
    "batch_size": Option(int, 256, "images per forward pass", **_pos),
    "device": Option(str, "cpu", "torch device"),
    **preprocess_options(),
}


@DESCRIPTORS.register("torch:tiny-cnn", {**_torch_opts, "dim": Option(int, 32, "embedding dim", **_pos),
                                         "world_seed": Option(int, 1, "weight seed", **SEED_CHECK)},
                      help="small fixed-weight CNN descriptor (tests, demos)")
def _tiny_cnn(*, batch_size, device, dim, world_seed, **pre):
    opts = dict(batch_size=batch_size, device=device, dim=dim, world_seed=world_seed, **pre)
    return TorchDescriptor("torch:tiny-cnn", opts, tiny_cnn_module(dim, world_seed), batch_size, device)


@DESCRIPTORS.register("torchscript", {**_torch_opts, "trust_pickle": Option(
    bool, False, "also load a pickled torch.save'd nn.Module (runs the file's code: only for files you trust)")},
                      prefix=True, help="any TorchScript module file: images -> embedding rows")
def _torchscript(path, *, batch_size, device, trust_pickle, **pre):
    torch = require_torch(f"descriptor torchscript:{path}")
    if not Path(path).is_file():
        raise ConfigError(f"descriptor torchscript:{path}: no such file; give the path of a torch.jit.save'd module")
    module = load_torchscript(torch, path, device, "descriptor", trust_pickle=trust_pickle)
    opts = dict(batch_size=batch_size, device=device, trust_pickle=trust_pickle, **pre)
    return TorchDescriptor(f"torchscript:{path}", opts, module, batch_size, device,
                           extra_fp={"sha256": file_sha256(path)})


def build_descriptor(spec: str, options: dict | None = None) -> Descriptor:
    """Build a descriptor from its registry spec and options."""
    return DESCRIPTORS.build(spec, options)
