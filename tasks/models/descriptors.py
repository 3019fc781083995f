"""Identity descriptors: map a batch of samples to embedding rows.

Rows need not come out unit length: the caller normalises (and records how many
rows it had to). Real networks plug in through `torchscript:PATH`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from modeaudit.tasks.models.generators import file_sha256, load_torchscript, torch_device
from modeaudit.tasks.registry import ConfigError, Option, Registry, require_torch

DESCRIPTORS = Registry("descriptor", plugins=("modeaudit.tasks.models.python_models", "modeaudit.tasks.toy.rff"))
_pos = dict(check=lambda v: v > 0, check_msg="must be > 0")


class Descriptor:
    """Base descriptor: `embed` maps samples (n, ...) to float32 rows (n, dim)."""

    spec = ""
    accepts = ("embedding", "image")

    def __init__(self, spec: str, options: dict):
        self.spec, self.options = spec, dict(options)

    def embed(self, samples: np.ndarray) -> np.ndarray:
        """Embedding rows for a batch of samples."""
        raise NotImplementedError

    def embed_masked(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, ok): embedding rows and a bool per sample, False where the descriptor refuses the sample (e.g. a
        face descriptor that finds no face); refused rows are skipped by the caller, whatever their values."""
        return self.embed(samples), np.ones(len(samples), bool)

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


class TorchDescriptor(Descriptor):
    """Wraps a torch module mapping images (n, C, H, W) to rows (n, dim), batched on a device."""

    accepts = ("image",)

    def __init__(self, spec, options, module, batch_size, device, flip_average=False, extra_fp=None):
        super().__init__(spec, options)
        torch = require_torch("this descriptor")
        self.torch, self.device = torch, torch_device(torch, device, f"descriptor {spec}")
        self.module, self.batch_size = module.to(self.device).eval(), batch_size
        self.flip_average, self._extra_fp = flip_average, extra_fp or {}

    def embed(self, samples):
        torch = self.torch
        if samples.ndim != 4:
            raise ConfigError(f"descriptor {self.spec!r} needs images (n, C, H, W); got shape {samples.shape}")
        outs = []
        with torch.inference_mode():
            for i in range(0, len(samples), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(samples[i:i + self.batch_size], np.float32)).to(self.device)
                try:
                    e = self.module(x).float()
                except RuntimeError as err:
                    raise ConfigError(f"descriptor {self.spec} failed on images of shape {tuple(x.shape)} "
                                      f"({str(err).splitlines()[0]})") from None
                if e.dim() != 2 or e.shape[0] != x.shape[0]:
                    raise ConfigError(f"descriptor {self.spec} returned shape {tuple(e.shape)} for {x.shape[0]} "
                                      "images; it must return one row per image, (n, D)")
                if self.flip_average:
                    # As the seed paper's code does: average with the mirrored image's embedding.
                    e = torch.nn.functional.normalize(e, dim=1) + torch.nn.functional.normalize(
                        self.module(torch.flip(x, dims=[3])).float(), dim=1)
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
    "flip_average": Option(bool, False, "average with the horizontally flipped image's embedding"),
}


@DESCRIPTORS.register("torch:tiny-cnn", {**_torch_opts, "dim": Option(int, 32, "embedding dim", **_pos),
                                         "world_seed": Option(int, 1, "weight seed")},
                      help="small fixed-weight CNN descriptor (tests, demos)")
def _tiny_cnn(*, batch_size, device, flip_average, dim, world_seed):
    opts = dict(batch_size=batch_size, device=device, flip_average=flip_average, dim=dim, world_seed=world_seed)
    return TorchDescriptor("torch:tiny-cnn", opts, tiny_cnn_module(dim, world_seed), batch_size, device, flip_average)


@DESCRIPTORS.register("torchscript", _torch_opts, prefix=True,
                      help="any TorchScript module file: images -> embedding rows")
def _torchscript(path, *, batch_size, device, flip_average):
    torch = require_torch(f"descriptor torchscript:{path}")
    if not Path(path).is_file():
        raise ConfigError(f"descriptor torchscript:{path}: no such file; give the path of a torch.jit.save'd module")
    module = load_torchscript(torch, path, device, "descriptor")
    return TorchDescriptor(f"torchscript:{path}", dict(batch_size=batch_size, device=device, flip_average=flip_average),
                           module, batch_size, device, flip_average, extra_fp={"sha256": file_sha256(path)})


def build_descriptor(spec: str, options: dict | None = None) -> Descriptor:
    """Build a descriptor from its registry spec and options."""
    return DESCRIPTORS.build(spec, options)
