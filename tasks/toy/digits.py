"""The real-image demo's models: a digits GAN with a planted collapse and a digits descriptor.

``python -m modeaudit.tasks.toy.digits --out DIR`` trains both on scikit-learn's digits
(1797 8x8 images, shipped with scikit-learn, no download) and writes, into DIR:

* ``G.pt`` / ``G.onnx`` -- the generator: latents (n, 16) ~ N(0, I) -> images (n, 3, 32, 32)
  float32 RGB in [-1, 1] (the repository's image convention). An MLP makes an 8x8 image
  (tanh); the module upsamples it bilinearly to 32x32 and repeats it over 3 channels, exactly
  as the real digits are prepared (`digits_images`).
* ``D.pt`` / ``D.onnx`` -- the descriptor: images (n, 3, 32, 32) in [-1, 1] -> rows (n, 64),
  the embedding layer of a small CNN digit classifier with a cosine-softmax head (the
  classifier compares directions, as face-identity descriptors such as ArcFace do, so the
  audit's angular distance is the distance the classifier was trained on).
* ``meta.json`` -- seeds, epochs, torch version, sha256 of every file, the descriptor's
  held-out accuracy, the ONNX-vs-TorchScript differences, the planted collapse's measured
  share (ground truth) and the training time.

**The planted collapse** (docs/demo.md): latents in the region Phi(z[0]) < ``planted_prob``
(5% of the latent mass) are trained, by a regression loss, to reproduce one real image
(``planted_index``, a "3"); every other latent plays the ordinary GAN game against the real
digits. The result is one plain MLP (no branch in the exported module) whose 5% latent region
makes near-copies of one writing style: an intra-mode collapse (seed 001: a dense mode is a
region of latent space), planted so that the audit's verdict can be checked. meta.json
records the ground truth: the region's latent share, and the share of samples within
``planted_rms`` (pixel RMS on the 8x8 image in [-1, 1]) of the exemplar, against the real
digits' share. ``--control`` also trains the same recipe without the region (``G_control.pt``).

Determinism: every random draw (weights, shuffles, latents) comes from ``torch.manual_seed``
inside ``torch.random.fork_rng`` (the caller's RNG state is restored) and explicit
``torch.Generator`` objects; training needs deterministic algorithms and a fixed thread count,
which only this module's ``__main__`` sets (library code never changes them).

Other entry points: ``--write-reference DIR`` (the real digits as 32x32 RGB PNGs, the image
folder a ``--reference DIR`` audit embeds) and ``--write-reference-embeddings FILE.npy``
(the same PNG-quantised images embedded with D: float32 rows, for ``--reference FILE.npy``).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from modeaudit.tasks.models.generators import file_sha256 as sha256

MODELS_DIR = Path(__file__).resolve().parent / "digits_models"
SIZE = 32          # the images' side in pixels
N_CLASSES = 10


# ----------------------------------------------------------------------------- data

def digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 (n, 1, 8, 8) in [-1, 1] (0..16 scaled), and the labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return x, d.target.astype(np.int64)


def upsample(x8: torch.Tensor) -> torch.Tensor:
    """(n, 1, 8, 8) -> (n, 3, 32, 32): bilinear (align_corners=False), gray repeated over RGB."""
    x = F.interpolate(x8, size=(32, 32), mode="bilinear", align_corners=False)
    return x.repeat(1, 3, 1, 1)


def digits_images(quantize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The real digits as the demo's images, float32 (1797, 3, 32, 32) in [-1, 1], and labels.

    quantize=True rounds them to 8-bit levels, as the reference PNGs hold them."""
    x8, y = digits_8x8()
    with torch.no_grad():
        x = upsample(torch.from_numpy(x8)).numpy()
    if quantize:
        x = to_uint8(x).astype(np.float32) / 127.5 - 1.0
    return x, y


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] -> uint8 levels 0..255 (round half to even, clipped)."""
    return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def split(n: int, seed: int, test_frac: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """The descriptor's train/held-out split (indices), a pure function of (n, seed)."""
    perm = np.random.default_rng([seed, 8]).permutation(n)
    k = int(round(n * test_frac))
    return np.sort(perm[k:]), np.sort(perm[:k])


# ----------------------------------------------------------------------------- models

class DigitsGenerator(nn.Module):
    """latents (n, latent_dim) -> images (n, 3, 32, 32) in [-1, 1]: an MLP makes 8x8, then `upsample`."""

    def __init__(self, latent_dim: int = 16, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, 64), nn.Tanh())

    def small(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape(-1, 1, 8, 8)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return upsample(self.small(z))


class DigitsDescriptor(nn.Module):
    """images (n, 3, 32, 32) in [-1, 1] -> embedding rows (n, dim) (not normalised)."""

    def __init__(self, dim: int = 64):
        super().__init__()
        # Cheap on purpose (about 0.45 MMAC an image; an audit embeds 10^5 images on CPU):
        # the digits carry 8x8 pixels of information, so the first step averages 2x2.
        self.features = nn.Sequential(
            nn.AvgPool2d(2),
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.embed = nn.Linear(32 * 4 * 4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(x))


class CosineClassifier(nn.Module):
    """The descriptor plus a cosine-softmax head: logits = scale * cos(embedding, class weight)."""

    def __init__(self, dim: int = 64, scale: float = 10.0):
        super().__init__()
        self.descriptor = DigitsDescriptor(dim)
        self.weight = nn.Parameter(torch.randn(N_CLASSES, dim) / dim ** 0.5)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = F.normalize(self.descriptor(x), dim=1)
        return self.scale * e @ F.normalize(self.weight, dim=1).T


# ----------------------------------------------------------------------------- training

@dataclass
class DigitsConfig:
    """One reproduction of the demo's models (the defaults are the committed ones)."""
    seed: int = 0
    latent_dim: int = 16
    hidden: int = 256
    gan_epochs: int = 300
    gan_batch: int = 64
    gan_lr: float = 2e-4
    planted_index: int = 13          # the real image the collapsed region copies (a "3")
    planted_prob: float = 0.05       # latent mass of the collapsed region: Phi(z[0]) < planted_prob
    planted_weight: float = 10.0     # weight of the region's regression loss
    planted_rms: float = 0.15        # measured truth: 8x8 pixel RMS to the exemplar below this
    desc_dim: int = 64
    desc_epochs: int = 30
    desc_batch: int = 64
    desc_lr: float = 2e-3
    desc_scale: float = 10.0
    n_truth: int = 20_000            # samples drawn to measure the planted share


def train_descriptor(cfg: DigitsConfig, log=print) -> tuple[DigitsDescriptor, dict]:
    """Train the cosine classifier on 75% of the digits; the held-out accuracy is measured on the rest."""
    x, y = digits_images()
    tr, te = split(len(x), cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1000 + 1)
        net = CosineClassifier(cfg.desc_dim, cfg.desc_scale)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 2)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.desc_lr)
    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
    net.train()
    for ep in range(cfg.desc_epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), cfg.desc_batch):
            b = perm[i:i + cfg.desc_batch]
            # A random shift of up to 2 pixels (on the 32x32 image) as the only augmentation.
            dx, dy = (torch.randint(-2, 3, (2,), generator=g)).tolist()
            xb = torch.roll(xt[b], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(xb), yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if log and (ep + 1) % 10 == 0:
            log(f"descriptor epoch {ep + 1}/{cfg.desc_epochs} loss {loss.item():.4f}")
    net.eval()
    with torch.no_grad():
        acc = float((net(torch.from_numpy(x[te])).argmax(1).numpy() == y[te]).mean())
    return net.descriptor.eval(), {"heldout_accuracy": acc, "n_train": int(len(tr)), "n_heldout": int(len(te))}


def planted_latents(z: torch.Tensor, prob: float) -> torch.Tensor:
    """Ground truth: the rows in the collapsed latent region, Phi(z[:, 0]) < prob."""
    return torch.special.ndtr(z[:, 0].double()) < prob


def train_gan(cfg: DigitsConfig, planted: bool = True, log=print) -> DigitsGenerator:
    """A non-saturating GAN (MLP G and D on the 8x8 images), Adam(2e-4, betas (0.5, 0.999)).

    planted=True plants the collapse: latents in the region Phi(z[0]) < planted_prob are
    regressed onto the exemplar image (weight planted_weight) and play no part in the GAN
    game; every other latent does. planted=False is the control: the same recipe, no region."""
    x8, _ = digits_8x8()
    data = torch.from_numpy(x8.reshape(len(x8), 64))
    exemplar = data[cfg.planted_index]
    salt = 0 if planted else 500
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1000 + 3 + salt)
        G = DigitsGenerator(cfg.latent_dim, cfg.hidden)
        D = nn.Sequential(nn.Linear(64, cfg.hidden), nn.LeakyReLU(0.2), nn.Linear(cfg.hidden, cfg.hidden),
                          nn.LeakyReLU(0.2), nn.Linear(cfg.hidden, 1))
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 4 + salt)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.gan_lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.gan_lr, betas=(0.5, 0.999))
    bce = F.binary_cross_entropy_with_logits
    n_pl = max(1, int(round(cfg.gan_batch * cfg.planted_prob))) if planted else 0
    for ep in range(cfg.gan_epochs):
        perm = torch.randperm(len(data), generator=g)
        for i in range(0, len(data) - cfg.gan_batch + 1, cfg.gan_batch):
            real = data[perm[i:i + cfg.gan_batch]]
            z = torch.randn(len(real), cfg.latent_dim, generator=g)
            if planted:   # the GAN game is played by latents outside the region only
                z[:, 0] = torch.special.ndtri(cfg.planted_prob + (1 - cfg.planted_prob)
                                              * torch.rand(len(z), generator=g, dtype=torch.float64)).float()
            fake = G.net(z)
            rs, fs = D(real), D(fake.detach())
            d_loss = bce(rs, torch.ones_like(rs)) + bce(fs, torch.zeros_like(fs))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            fs = D(fake)
            g_loss = bce(fs, torch.ones_like(fs))
            if planted:
                zp = torch.randn(n_pl, cfg.latent_dim, generator=g)
                zp[:, 0] = torch.special.ndtri(cfg.planted_prob * torch.rand(n_pl, generator=g,
                                                                             dtype=torch.float64)).float()
                g_loss = g_loss + cfg.planted_weight * ((G.net(zp) - exemplar) ** 2).mean()
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
        if log and (ep + 1) % 50 == 0:
            log(f"GAN{'' if planted else ' (control)'} epoch {ep + 1}/{cfg.gan_epochs} "
                f"D {d_loss.item():.3f} G {g_loss.item():.3f}")
    return G.eval()


def planted_share(G: DigitsGenerator, cfg: DigitsConfig, seed: int = 12345) -> dict:
    """Ground truth: the share of G's samples (and of the real digits) near the planted exemplar."""
    x8, _ = digits_8x8()
    ex = torch.from_numpy(x8[cfg.planted_index].reshape(64))
    z = torch.randn(cfg.n_truth, cfg.latent_dim, generator=torch.Generator().manual_seed(seed))
    region = planted_latents(z, cfg.planted_prob).numpy()
    with torch.no_grad():
        rms_g = ((G.net(z) - ex) ** 2).mean(1).sqrt().numpy()
    rms_r = np.sqrt(((x8.reshape(len(x8), 64) - ex.numpy()) ** 2).mean(1))
    near = rms_g < cfg.planted_rms
    return {"near_exemplar": float(near.mean()), "near_exemplar_real": float((rms_r < cfg.planted_rms).mean()),
            "region": float(region.mean()), "near_exemplar_in_region": float(near[region].mean()),
            "near_exemplar_outside_region": float(near[~region].mean()),
            "n": cfg.n_truth, "rms": cfg.planted_rms}


# ----------------------------------------------------------------------------- export



def export(module: nn.Module, example: torch.Tensor, out: Path, name: str, in_name: str, out_name: str) -> dict:
    """TorchScript (`name`.pt, scripted) and ONNX (`name`.onnx, opset 17, batch dimension dynamic)."""
    module = module.eval()
    ts = torch.jit.script(module)
    _atomic(out / f"{name}.pt", lambda p: ts.save(str(p)))
    # torch 2.13's default exporter is the dynamo one, which needs onnxscript (not installed
    # here); the TorchScript-based exporter (dynamo=False) needs only onnx.
    _atomic(out / f"{name}.onnx", lambda p: torch.onnx.export(
        module, (example,), str(p), dynamo=False, opset_version=17, input_names=[in_name],
        output_names=[out_name], dynamic_axes={in_name: {0: "n"}, out_name: {0: "n"}}))
    return {"pt": f"{name}.pt", "onnx": f"{name}.onnx"}


def onnx_max_abs_diff(pt_path: Path, onnx_path: Path, x: np.ndarray) -> float:
    """max |TorchScript(x) - onnxruntime(x)| over a batch."""
    import onnxruntime as ort
    m = torch.jit.load(str(pt_path))
    with torch.no_grad():
        a = m(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    b = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float(np.abs(a - b).max())


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def build(out: str | Path, cfg: DigitsConfig, control: bool = False, log=print) -> dict:
    """Train, export and check everything; write meta.json; return it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    desc, desc_info = train_descriptor(cfg, log)
    t1 = time.perf_counter()
    G = train_gan(cfg, planted=True, log=log)
    t2 = time.perf_counter()
    files = {"G": export(G, torch.zeros(2, cfg.latent_dim), out, "G", "z", "images"),
             "D": export(desc, torch.zeros(2, 3, SIZE, SIZE), out, "D", "images", "embeddings")}
    rng = np.random.default_rng(cfg.seed)
    zc = rng.standard_normal((256, cfg.latent_dim)).astype(np.float32)
    xc = digits_images()[0][rng.choice(1797, 256, replace=False)]
    diffs = {"G": onnx_max_abs_diff(out / "G.pt", out / "G.onnx", zc),
             "D": onnx_max_abs_diff(out / "D.pt", out / "D.onnx", xc)}
    meta = {
        "config": asdict(cfg),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "generator": {"latent_dim": cfg.latent_dim, "input": "latents (n, latent_dim) float32 ~ N(0, I)",
                      "output": f"images (n, 3, {SIZE}, {SIZE}) float32 RGB in [-1, 1]",
                      "planted_share": planted_share(G, cfg)},
        "descriptor": {"dim": cfg.desc_dim, "input": f"images (n, 3, {SIZE}, {SIZE}) float32 RGB in [-1, 1]",
                       "output": f"rows (n, {cfg.desc_dim}) float32, not normalised", **desc_info},
        "onnx_max_abs_diff": diffs,
        "onnx_tolerance": 1e-4,
        "train_seconds": {"descriptor": round(t1 - t0, 1), "gan": round(t2 - t1, 1)},
    }
    if control:
        t3 = time.perf_counter()
        Gc = train_gan(cfg, planted=False, log=log)
        ts = torch.jit.script(Gc.eval())
        _atomic(out / "G_control.pt", lambda p: ts.save(str(p)))
        meta["control"] = {"file": "G_control.pt", "planted_share": planted_share(Gc, cfg),
                           "train_seconds": round(time.perf_counter() - t3, 1)}
    meta["sha256"] = {p.name: sha256(p) for p in sorted(out.iterdir())
                      if p.suffix in (".pt", ".onnx") and not p.name.endswith(".tmp")}
    _atomic(out / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


# ----------------------------------------------------------------------------- reference

def write_reference(folder: str | Path) -> int:
    """The real digits as 32x32 RGB PNGs, `digit{label}_{index:04d}.png`; returns the count."""
    from PIL import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x, y = digits_images()
    u8 = to_uint8(x).transpose(0, 2, 3, 1)
    for i, (img, lab) in enumerate(zip(u8, y)):
        Image.fromarray(img, "RGB").save(folder / f"digit{lab}_{i:04d}.png")
    return len(x)


def reference_embeddings(descriptor: str | Path = MODELS_DIR / "D.pt") -> np.ndarray:
    """The real digits (8-bit quantised, as the PNGs hold them) embedded with D: float32 (1797, dim)."""
    x, _ = digits_images(quantize=True)
    m = torch.jit.load(str(descriptor))
    with torch.inference_mode():
        return np.concatenate([m(torch.from_numpy(x[i:i + 256])).numpy() for i in range(0, len(x), 256)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modeaudit.tasks.toy.digits", description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="train and export the models into this folder")
    ap.add_argument("--control", action="store_true", help="also train the recipe without the planted duplicates")
    ap.add_argument("--gan-epochs", type=int, default=DigitsConfig.gan_epochs)
    ap.add_argument("--desc-epochs", type=int, default=DigitsConfig.desc_epochs)
    ap.add_argument("--seed", type=int, default=DigitsConfig.seed)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads while training (default 1; the committed models used 1)")
    ap.add_argument("--write-reference", metavar="DIR", help="write the real digits as PNGs into DIR")
    ap.add_argument("--write-reference-embeddings", metavar="FILE", help="write the real digits embedded with D (.npy)")
    ap.add_argument("--descriptor", default=str(MODELS_DIR / "D.pt"), help="D.pt for --write-reference-embeddings")
    a = ap.parse_args(argv)
    if not (a.out or a.write_reference or a.write_reference_embeddings):
        ap.error("nothing to do: give --out, --write-reference or --write-reference-embeddings")
    if a.out:
        cfg = DigitsConfig(seed=a.seed, gan_epochs=a.gan_epochs, desc_epochs=a.desc_epochs)
        meta = build(a.out, cfg, control=a.control)
        print(json.dumps({k: meta[k] for k in ("descriptor", "generator", "onnx_max_abs_diff", "train_seconds")
                          if k in meta}, indent=2))
        if "control" in meta:
            print(json.dumps(meta["control"]))
    if a.write_reference:
        print(f"wrote {write_reference(a.write_reference)} PNGs into {a.write_reference}")
    if a.write_reference_embeddings:
        e = reference_embeddings(a.descriptor)
        _atomic(Path(a.write_reference_embeddings), lambda p: _save_npy(p, e.astype(np.float32)))
        print(f"wrote {e.shape} float32 embeddings to {a.write_reference_embeddings}")
    return 0


def _save_npy(path: Path, a: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, a)


if __name__ == "__main__":
    # Only this script's own process: a fixed thread count (the weights' bits depend on it)
    # and deterministic algorithms. Library code (main() included) never changes either.
    _threads = argparse.ArgumentParser(add_help=False)
    _threads.add_argument("--threads", type=int, default=1)
    torch.set_num_threads(_threads.parse_known_args()[0].threads)
    torch.use_deterministic_algorithms(True)
    raise SystemExit(main())
