"""Generators: black boxes that map latents to samples.

A generator owns its latent sampler (`latents`), maps a batch of latents to a
batch of samples (`generate`: embeddings or images), and may know the ground truth
(`truth`: which rows came from a planted mode). Real networks plug in through
`torchscript:PATH` (any TorchScript module, latents -> images, CPU or GPU, batched),
`onnx:PATH` and `python:MODULE:CALLABLE`. Images are the canonical batch: float32
(n, C, H, W), RGB, values in [-1, 1] (docs/models.md).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from numba import njit, prange
from scipy.special import ndtr

from modeaudit.tasks.registry import SEED_CHECK, ConfigError, Option, Registry, require_torch
from modeaudit.tasks.models.rng import latent_rows

# "calibrated:PATH" lives with the calibration code, which builds on this module:
# it is imported when the registry is first read, so neither module imports the other at load.
GENERATORS = Registry("generator", plugins=("modeaudit.tasks.calibration.samplers",
                                             "modeaudit.tasks.models.python_models", "modeaudit.tasks.toy.generators",
                                             "modeaudit.tasks.models.onnx_models"))

_pos = dict(check=lambda v: v > 0, check_msg="must be > 0")
_prob = dict(check=lambda v: 0 <= v < 1, check_msg="must be in [0, 1)")


class Generator:
    """Base black-box generator; subclasses implement `generate` (and `truth` when known)."""

    spec: str = ""
    latent_dim: int = 0
    sample_kind: str = "embedding"          # "embedding" or "image"
    default_descriptor: str | None = "identity"
    # Rows are generated in batches aligned to multiples of batch_size (global row
    # index), so a row always shares its batch with the same rows whatever the shard.
    batch_size: int = 4096
    has_truth: bool = False

    def __init__(self, spec: str, options: dict):
        self.spec, self.options = spec, dict(options)

    def latents(self, seed: int, stream: str, start: int, stop: int) -> np.ndarray:
        """Latents of rows [start, stop): z ~ N(0, I), a pure function of (seed, stream, row)."""
        return latent_rows(seed, stream, start, stop, self.latent_dim)

    def generate(self, z: np.ndarray) -> np.ndarray:
        """Samples for a batch of latents."""
        raise NotImplementedError

    def truth(self, z: np.ndarray) -> np.ndarray | None:
        """Bool per row: came from the planted mode (None when unknown)."""
        return None

    def fingerprint(self) -> dict:
        """What identifies this generator's output distribution (used to key the run store)."""
        return {"spec": self.spec, "options": self.options}


class IdentitySpace(Generator):
    """A world of identities on the unit sphere, optionally with one planted dense mode.

    z[0] picks the identity through its Gaussian CDF u = Phi(z0): u < planted_prob
    -> the planted identity, else one of `identities` equally likely ones. The rest
    of z moves the sample around its identity centre (spread; the planted one is
    `tightness` times tighter). The planted mode is a region of latent space, as a
    real generator's dense mode is, so latent-space calibration can find it.
    """

    def __init__(self, spec, *, dim, identities, spread, planted_prob, tightness, latent_dim, world_seed):
        super().__init__(spec, dict(dim=dim, identities=identities, spread=spread, planted_prob=planted_prob,
                                    tightness=tightness, latent_dim=latent_dim, world_seed=world_seed))
        if latent_dim < 2:
            raise ConfigError(f"generator {spec!r}: latent_dim must be >= 2 (one picks the identity)")
        # The world's tables (centres, permutations) are identities x dim: bound them before allocating.
        need = (identities + 1) * dim * 4 * 3
        if need > 2 << 30:
            raise ConfigError(f"generator {spec!r}: identities={identities} x dim={dim} needs {need / 2**30:.1f} GiB "
                              "of world tables; use at most about 1e6 identities at dim 128")
        self.latent_dim, self.dim = latent_dim, dim
        self.planted_prob, self.has_truth = planted_prob, planted_prob > 0
        rng = np.random.default_rng([world_seed, 20240611])
        centres = rng.standard_normal((identities + 1, dim))
        self.centres = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
        # One shared projection, but each identity sees it through its own signed
        # coordinate permutation, so identities vary along different directions.
        # Scaled so the noise has norm about 1: spread is then the noise-to-centre ratio.
        self.proj = (rng.standard_normal((latent_dim - 1, dim)) / np.sqrt((latent_dim - 1) * dim)).astype(np.float32)
        self.perm = np.stack([rng.permutation(dim) for _ in range(identities + 1)]).astype(np.int32)
        self.sign = rng.choice(np.array([-1.0, 1.0], np.float32), size=(identities + 1, dim))
        self.spreads = np.full(identities + 1, spread, np.float32)
        self.spreads[identities] = spread * tightness
        self.identities = identities

    def identity_of(self, z: np.ndarray) -> np.ndarray:
        """Identity index per row; index `identities` is the planted one."""
        u = ndtr(z[:, 0].astype(np.float64))
        pp = self.planted_prob
        ids = np.minimum(((u - pp) / (1 - pp) * self.identities).astype(np.int64), self.identities - 1)
        return np.where(u < pp, self.identities, np.maximum(ids, 0))

    def generate(self, z):
        ids = self.identity_of(z)
        out = np.empty((len(z), self.dim), np.float32)
        _identity_space_rows(np.ascontiguousarray(z, np.float32), ids, self.centres, self.proj, self.perm,
                             self.sign, self.spreads, out)
        return out

    def truth(self, z):
        return self.identity_of(z) == self.identities if self.has_truth else None


@njit(cache=True, parallel=True)
def _identity_space_rows(z, ids, centres, proj, perm, sign, spreads, out):
    # One fused pass (10^7 rows must generate in seconds). Each row is summed in a
    # fixed order with no BLAS, so its bits do not depend on the batch it came in.
    k1, dim = proj.shape
    for i in prange(z.shape[0]):
        c = ids[i]
        p = np.zeros(dim, np.float32)
        for k in range(k1):  # contiguous over d: vectorises
            zk = z[i, k + 1]
            for d in range(dim):
                p[d] += zk * proj[k, d]
        s = spreads[c]
        for d in range(dim):
            out[i, d] = centres[c, d] + s * sign[c, d] * p[perm[c, d]]


_world_opts = {
    "dim": Option(int, 128, "embedding dimension", **_pos),
    "identities": Option(int, 1000, "number of equally likely identities", **_pos),
    "spread": Option(float, 0.75, "within-identity spread (noise norm relative to the centre)", **_pos),
    "latent_dim": Option(int, 16, "latent dimension", check=lambda v: v >= 2, check_msg="must be >= 2"),
    "world_seed": Option(int, 0, "seed of the identity world (centres, directions)", **SEED_CHECK),
}


@GENERATORS.register("synthetic:planted", {
    **_world_opts,
    "planted_prob": Option(float, 0.02, "probability mass of the planted identity", **_prob),
    "tightness": Option(float, 0.5, "planted spread = spread * tightness", **_pos),
}, help="identity-space generator with one planted dense mode (records ground truth)")
def _planted(**kw):
    return IdentitySpace("synthetic:planted", **kw)


@GENERATORS.register("synthetic:null", _world_opts, help="the same identity world with no planted mode")
def _null(**kw):
    return IdentitySpace("synthetic:null", planted_prob=0.0, tightness=1.0, **kw)


class TorchGenerator(Generator):
    """Wraps a torch module mapping latents (n, latent_dim) to images (n, C, H, W), batched on a device."""

    sample_kind = "image"
    default_descriptor = None

    def __init__(self, spec, options, module, latent_dim, batch_size, device, extra_fp=None):
        super().__init__(spec, options)
        torch = require_torch("this generator")
        self.torch, self.device = torch, torch_device(torch, device, f"generator {spec}")
        self.module = module.to(self.device).eval()
        self.latent_dim, self.batch_size = latent_dim, batch_size
        self._extra_fp = extra_fp or {}

    def generate(self, z):
        torch = self.torch
        outs = []
        with torch.inference_mode():
            for i in range(0, len(z), self.batch_size):
                zb = torch.from_numpy(np.ascontiguousarray(z[i:i + self.batch_size])).to(self.device)
                try:
                    out = self.module(zb)
                except RuntimeError as e:   # a wrong latent_dim, mostly
                    raise ConfigError(f"generator {self.spec} failed on latents of shape {tuple(zb.shape)} "
                                      f"({str(e).splitlines()[0]}); check -G latent_dim") from None
                if not hasattr(out, "dim") or out.dim() not in (2, 4) or out.shape[0] != zb.shape[0]:
                    raise ConfigError(f"generator {self.spec} returned {getattr(out, 'shape', type(out).__name__)} "
                                      f"for {zb.shape[0]} latents; it must return images (n, C, H, W) or "
                                      "rows (n, D)")
                outs.append(out.float().cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)

    def fingerprint(self):
        return {**super().fingerprint(), **self._extra_fp}


def tiny_image_module(latent_dim: int = 8, size: int = 16, world_seed: int = 0):
    """A small fixed-weight torch image generator (latents -> 3 x size x size in [-1, 1]) for tests and demos."""
    torch = require_torch("this generator")
    from torch import nn
    g = torch.Generator().manual_seed(world_seed)
    net = nn.Sequential(nn.Linear(latent_dim, 64), nn.Tanh(), nn.Linear(64, 3 * size * size), nn.Tanh(),
                        nn.Unflatten(1, (3, size, size)))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 / max(1, p.shape[-1]) ** 0.5))
    return net


_torch_opts = {
    "batch_size": Option(int, 256, "images per forward pass", **_pos),
    "device": Option(str, "cpu", "torch device (cpu, cuda, cuda:1, ...)"),
}


@GENERATORS.register("torch:tiny", {**_torch_opts, "latent_dim": Option(int, 8, "latent dimension", **_pos),
                                    "size": Option(int, 16, "image side in pixels", **_pos),
                                    "world_seed": Option(int, 0, "weight seed", **SEED_CHECK)},
                     help="small fixed-weight torch image generator (exercises the image -> embedding path)")
def _tiny(*, batch_size, device, latent_dim, size, world_seed):
    opts = dict(batch_size=batch_size, device=device, latent_dim=latent_dim, size=size, world_seed=world_seed)
    return TorchGenerator("torch:tiny", opts, tiny_image_module(latent_dim, size, world_seed), latent_dim, batch_size, device)


def file_sha256(path: str | Path) -> str:
    """Checksum of a weights file, so a new checkpoint gets a new fingerprint."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@GENERATORS.register("torchscript", {
    **_torch_opts, "latent_dim": Option(int, 512, "latent dimension", **_pos),
    "trust_pickle": Option(bool, False, "also load a pickled torch.save'd nn.Module (runs the file's code: only "
                                        "for files you trust)")},
                     prefix=True, help="any TorchScript module file: latents (n, latent_dim) -> images")
def _torchscript(path, *, batch_size, device, latent_dim, trust_pickle):
    torch = require_torch(f"generator torchscript:{path}")
    if not Path(path).is_file():
        raise ConfigError(f"generator torchscript:{path}: no such file; give the path of a torch.jit.save'd module")
    module = load_torchscript(torch, path, device, "generator", trust_pickle=trust_pickle)
    return TorchGenerator(f"torchscript:{path}", dict(batch_size=batch_size, device=device, latent_dim=latent_dim,
                                                      trust_pickle=trust_pickle),
                          module, latent_dim, batch_size, device, extra_fp={"sha256": file_sha256(path)})


def torch_device(torch, device: str, what: str):
    """A torch.device that exists here, or a ConfigError naming the option (device=bogus, cuda without a GPU)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{what}: device={device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}: device={device!r} but no CUDA GPU is visible here; use device=cpu")
    return dev


def _looks_pickled(path: str) -> bool:
    """A torch.save file: a zip archive holding data.pkl but no TorchScript code, or a bare pickle."""
    import zipfile
    try:
        if zipfile.is_zipfile(path):
            names = zipfile.ZipFile(path).namelist()
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in names) and \
                not any("/code/" in n or n.endswith("constants.pkl") for n in names)
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"        # pickle protocol >= 2 opcode
    except (OSError, zipfile.BadZipFile):
        return False


def load_torchscript(torch, path: str, device: str, what: str, trust_pickle: bool = False):
    """torch.jit.load of a TorchScript file, with a one-line error for anything else.

    A pickled checkpoint (torch.save of a module) is refused: unpickling runs code
    from the file. With trust_pickle=True it is loaded with torch.load(weights_only=False)
    and must hold a whole nn.Module. A weights-only file (a state_dict) is refused either
    way: it has no network in it."""
    dev = torch_device(torch, device, f"{what} torchscript:{path}")
    opt = "-G" if what == "generator" else "-D"
    try:
        return torch.jit.load(path, map_location=dev)
    except (RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
    if not _looks_pickled(path):
        raise ConfigError(f"{what} torchscript:{path} is not a TorchScript file ({reason}); "
                          "save the model with torch.jit.script(...).save() or torch.jit.trace(...).save()")
    import zipfile
    try:   # safe: the restricted unpickler runs no code from the file
        if not zipfile.is_zipfile(path):
            # A bare pickle (legacy torch.save or pickle.dump): torch's weights-only probe of it
            # only warns about the protocol; it is refused below either way.
            raise ValueError("not a zip archive")
        torch.load(path, map_location="cpu", weights_only=True)
        raise ConfigError(f"{what} torchscript:{path} is not a TorchScript file but torch.save'd weights (a "
                          "state_dict, no network); build the model, load the weights, and save it with "
                          "torch.jit.script(model).save(path)")
    except ConfigError:
        raise
    except Exception:   # noqa: BLE001 -- needs the full unpickler: a pickled module
        pass
    if not trust_pickle:
        raise ConfigError(f"{what} torchscript:{path} is not a TorchScript file but a pickled torch checkpoint; "
                          "loading a pickle runs arbitrary code from the file, so it is refused (torch weights_only "
                          "rules): save it as TorchScript (torch.jit.script(model).save(path)), or pass "
                          f"{opt} trust_pickle=true if you trust the file")
    try:
        obj = torch.load(path, map_location=dev, weights_only=False)
    except Exception as e:  # noqa: BLE001 -- a missing class, a corrupt file
        raise ConfigError(f"{what} torchscript:{path}: trust_pickle=true but torch.load cannot read it "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); save the model "
                          "with torch.save(model, path) with its classes importable here, or better as TorchScript") \
            from None
    if not isinstance(obj, torch.nn.Module):
        raise ConfigError(f"{what} torchscript:{path}: trust_pickle=true but the pickle holds "
                          f"{type(obj).__name__}, not a torch.nn.Module; torch.save the whole model "
                          "(or better, torch.jit.script(model).save(path))")
    return obj


def build_generator(spec: str, options: dict | None = None) -> Generator:
    """Build a generator from its registry spec and options (strings from the CLI are coerced and validated)."""
    return GENERATORS.build(spec, options)

