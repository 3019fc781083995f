"""Reference GAN trainers for the toy worlds (seeds 003 and 004): small torch MLPs, CPU, minutes.

Methods (`METHODS`):

* ``gan`` -- Goodfellow et al.'s GAN (seed 003 eq. 4) with the non-saturating generator loss
  -log D(G(z)) that the GAN paper recommends in practice (the minimax form barely moves G early on).
* ``bigan`` -- Donahue et al. (seed 004 section 2.2): D(x, z) tells (x, E(x)) from (G(z), z);
  G and E are trained on the flipped labels (non-saturating, as in the BiGAN paper's code).
* ``invertgan`` -- seed 003 eq. 10 with the p-norm MD Gaussian loss (eqs. 5, 8, 9):
  V(G, D) + E|z - F(G(z))|_2 + E|x - G(F(x))|_2 + |mean(F(x))|_p + |Cov(F(x)) - I|_p, all terms
  weighted 1 as in eq. 10. The batch mean and (unbiased) batch covariance of F(x) stand for
  mu and Sigma; the matrix p-norm is (sum_ij |S_ij|^p)^(1/p) (the seed writes S_ij^p, which is
  not a norm for odd p; the absolute value makes it one). p = ``p_norm`` (default 2: seed 003
  does not say which p it used).
* ``lol1`` / ``lol2`` -- seed 004 section 3.1 (LOGAN) on the plain GAN, as its toy experiment
  4.1 does: D is a sigmoid classifier trained with cross entropy (lol1) or with
  sigma(D(G(z)))^2 + (1 - sigma(D(x)))^2 (lol2); the generator follows the logits,
  L_G = -E logit D(G(z)) (the E logit D(x) term of seed 004's L_{E,G} does not depend on G).
  Both add the WGAN-GP gradient penalty lambda E(|grad logit D(x~)| - 1)^2 at random
  interpolates of real and generated points (seed 004 prints the penalty without the square;
  we use Gulrajani et al.'s squared form, which seed 004 cites; computed on the logit, as seed
  004 section 3.3 recommends). lambda = ``gp_lambda`` = 0.1 (seed 004's toy value).
* ``lol1-pgp`` / ``lol2-pgp`` -- seed 004 section 3.2: a BiGAN with the logit loss
  (L_{E,G} = E logit D(x, E(x)) - E logit D(G(z), z)) and the pair-wise gradient penalty
  instead of WGAN-GP: with x^ = G(E(x)), x~ = eps x + (1 - eps) x^, x_unit = (x - x^)/|x - x^|,
  L_GPx = E|grad_x~ logit D(x~, E(x)) - x_unit|, and with z^ = E(G(z)), z~ = eps z + (1 - eps) z^,
  L_GPz = E|-grad_z~ logit D(G(z), z~) - z_unit|; L_D = L_adv + lambda (L_GPx + L_GPz). The
  norms are not squared (as printed). L_GPz is kept because our latents are Gaussian (the seed
  drops it only for uniform latents).

Choices where the seeds are silent or differ, made once for every method so they compare:
latents z ~ N(0, I) (seed 004 uses U(-1, 1); the audit feeds checkpoints N(0, I), so training
on it keeps the audited law the trained one); ``latent_dim`` = 2 (seed 004's toy setting);
every network a 4-layer MLP of width ``hidden`` = 128 (seeds 003 and 004), ReLU in G, E and F
(seed 003), LeakyReLU(0.2) in D (seed 004); batch 128 (seed 003); Adam(lr, betas (0.5, 0.9))
(seed 004's betas) with lr = 5e-4, higher than seed 004's 1e-4 because these runs are ~100x
shorter; one D step per G step (seed 004); the training set is 100,000 points of the world
(seed 003), drawn with the run's seed.

Determinism: every random draw (initial weights, batches, latents, eps) comes from one
``torch.Generator`` seeded with the run's seed, never from torch's global RNG, so other code
in the process cannot shift it. Library code does not touch torch's thread count: the CLI and
scripts wrap training in `torch_threads`, which sets threads and deterministic algorithms and
restores both afterwards.

Checkpoints: every ``every`` steps and at the last step, the generator is saved as TorchScript
(latents (n, latent_dim) float32 -> points (n, 2)) to ``ckpt_{step:06d}.pt``, written to a
temporary name and moved into place with os.replace, so a reader never sees half a file.
"""
from __future__ import annotations

import copy
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from modeaudit.tasks.registry import ConfigError
from modeaudit.tasks.toy.worlds import get_world

METHODS = ("gan", "bigan", "invertgan", "lol1", "lol2", "lol1-pgp", "lol2-pgp")


@dataclass
class TrainConfig:
    """One training run; see the module docstring for where each default comes from."""
    world: str
    method: str
    steps: int
    seed: int = 0
    every: int = 500
    batch: int = 128
    latent_dim: int = 2
    hidden: int = 128
    lr: float = 5e-4
    gp_lambda: float = 0.1
    p_norm: float = 2.0
    n_data: int = 100_000
    world_sd: float | None = None

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the bad setting and the fix."""
        get_world(self.world, self.world_sd)
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        for name in ("steps", "every", "batch", "latent_dim", "hidden", "n_data"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be a whole number >= 1")
        for name in ("lr", "gp_lambda", "p_norm"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise ConfigError(f"{name}={v!r} must be > 0")
        return self


@contextmanager
def torch_threads(n: int = 1):
    """For CLIs and scripts only: n torch threads and deterministic algorithms, restored on exit."""
    old_n, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_n)
        torch.use_deterministic_algorithms(old_det)


def mlp(n_in: int, n_out: int, hidden: int, act: type[nn.Module], gen: torch.Generator) -> nn.Sequential:
    """4 linear layers; weights drawn from `gen` with torch's default Linear bounds (1/sqrt(fan_in))."""
    dims = [n_in, hidden, hidden, hidden, n_out]
    layers: list[nn.Module] = []
    for i in range(4):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < 3:
            layers.append(act())
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                bound = 1.0 / m.in_features ** 0.5
                m.weight.uniform_(-bound, bound, generator=gen)
                m.bias.uniform_(-bound, bound, generator=gen)
    return net


class _Leaky(nn.LeakyReLU):
    def __init__(self):
        super().__init__(0.2)


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _d_adv(real: torch.Tensor, fake: torch.Tensor, lol2: bool) -> torch.Tensor:
    # lol2 is applied to the sigmoid outputs (seed 004): bounded gradients, same optimum.
    if lol2:
        return (torch.sigmoid(fake) ** 2).mean() + ((1 - torch.sigmoid(real)) ** 2).mean()
    return _bce(real, 1.0) + _bce(fake, 0.0)


def _grad(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(out.sum(), inp, create_graph=True)[0]


def _pnorm(t: torch.Tensor, p: float) -> torch.Tensor:
    # A small floor keeps the gradient of |.|_p finite at 0 (p < 1 never occurs: p_norm > 0 is
    # validated, and the loss is only used with p >= 1 in practice).
    return (t.abs().pow(p).sum() + 1e-12).pow(1.0 / p)


class _Trainer:
    def __init__(self, cfg: TrainConfig, gen: torch.Generator):
        self.cfg, self.g = cfg, gen
        l, h = cfg.latent_dim, cfg.hidden
        bi = cfg.method in ("bigan", "lol1-pgp", "lol2-pgp")
        self.G = mlp(l, 2, h, nn.ReLU, gen)
        self.D = mlp(2 + (l if bi else 0), 1, h, _Leaky, gen)
        # E (BiGAN encoder) and F (InvertGAN inverse) are the same shape: points -> latents.
        self.E = mlp(2, l, h, nn.ReLU, gen) if (bi or cfg.method == "invertgan") else None
        ge = list(self.G.parameters()) + (list(self.E.parameters()) if self.E is not None else [])
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
        self.opt_g = torch.optim.Adam(ge, lr=cfg.lr, betas=(0.5, 0.9))

    def _eps(self, n: int) -> torch.Tensor:
        return torch.rand(n, 1, generator=self.g)

    def step(self, x: torch.Tensor, z: torch.Tensor) -> tuple[float, float]:
        m = self.cfg.method
        if m in ("gan", "invertgan", "lol1", "lol2"):
            d_loss = self._d_plain(x, z)
        else:
            d_loss = self._d_joint(x, z)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        g_loss = self._g_loss(x, z)
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        return d_loss.item(), g_loss.item()

    def _d_plain(self, x, z):
        m, fake = self.cfg.method, self.G(z).detach()
        real_s, fake_s = self.D(x), self.D(fake)
        if m in ("gan", "invertgan"):
            return _bce(real_s, 1.0) + _bce(fake_s, 0.0)
        e = self._eps(len(x))
        xt = (e * x + (1 - e) * fake).requires_grad_(True)
        gp = ((_grad(self.D(xt), xt).norm(dim=1) - 1) ** 2).mean()
        return _d_adv(real_s, fake_s, m == "lol2") + self.cfg.gp_lambda * gp

    def _d_joint(self, x, z):
        m = self.cfg.method
        ex, gz = self.E(x).detach(), self.G(z).detach()
        real_s = self.D(torch.cat([x, ex], 1))
        fake_s = self.D(torch.cat([gz, z], 1))
        if m == "bigan":
            return _bce(real_s, 1.0) + _bce(fake_s, 0.0)
        # Pair-wise gradient penalty between each point and its reconstruction (seed 004, 3.2).
        with torch.no_grad():
            xh, zh = self.G(ex), self.E(gz)
        e = self._eps(len(x))
        xt = (e * x + (1 - e) * xh).requires_grad_(True)
        x_unit = (x - xh) / ((x - xh).norm(dim=1, keepdim=True) + 1e-8)
        gpx = (_grad(self.D(torch.cat([xt, ex], 1)), xt) - x_unit).norm(dim=1).mean()
        e = self._eps(len(z))
        zt = (e * z + (1 - e) * zh).requires_grad_(True)
        z_unit = (z - zh) / ((z - zh).norm(dim=1, keepdim=True) + 1e-8)
        gpz = (-_grad(self.D(torch.cat([gz, zt], 1)), zt) - z_unit).norm(dim=1).mean()
        return _d_adv(real_s, fake_s, m == "lol2-pgp") + self.cfg.gp_lambda * (gpx + gpz)

    def _g_loss(self, x, z):
        m, c = self.cfg.method, self.cfg
        if m in ("gan", "invertgan"):
            gz = self.G(z)
            loss = _bce(self.D(gz), 1.0)
            if m == "gan":
                return loss
            fx = self.E(x)
            cons = (z - self.E(gz)).norm(dim=1).mean() + (x - self.G(fx)).norm(dim=1).mean()
            mu = fx.mean(0)
            cov = torch.cov(fx.T)
            eye = torch.eye(c.latent_dim)
            return loss + cons + _pnorm(mu, c.p_norm) + _pnorm(cov - eye, c.p_norm)
        if m in ("lol1", "lol2"):
            return -self.D(self.G(z)).mean()
        real_s = self.D(torch.cat([x, self.E(x)], 1))
        fake_s = self.D(torch.cat([self.G(z), z], 1))
        if m == "bigan":
            return _bce(real_s, 0.0) + _bce(fake_s, 1.0)
        return real_s.mean() - fake_s.mean()


def save_generator(G: nn.Module, path: str | Path) -> None:
    """TorchScript of a copy of G (eval mode) at path, atomically (temporary name, then os.replace)."""
    path = Path(path)
    scripted = torch.jit.script(copy.deepcopy(G).eval())
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.jit.save(scripted, str(tmp))
    os.replace(tmp, path)


def train(cfg: TrainConfig, out: str | Path, log=None) -> dict:
    """Train cfg.method on cfg.world; checkpoints and train.json in `out`. Returns the run summary."""
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = get_world(cfg.world, cfg.world_sd)
    data = torch.from_numpy(world.sample(cfg.n_data, cfg.seed))
    gen = torch.Generator().manual_seed(cfg.seed)
    tr = _Trainer(cfg, gen)
    history, ckpts, t0 = [], [], time.perf_counter()
    for step in range(1, cfg.steps + 1):
        x = data[torch.randint(0, len(data), (cfg.batch,), generator=gen)]
        z = torch.randn(cfg.batch, cfg.latent_dim, generator=gen)
        d_loss, g_loss = tr.step(x, z)
        if not (np.isfinite(d_loss) and np.isfinite(g_loss)):
            raise ConfigError(f"training diverged at step {step} (loss NaN/Inf); lower --lr or change --seed")
        if step % cfg.every == 0 or step == cfg.steps:
            path = out / f"ckpt_{step:06d}.pt"
            save_generator(tr.G, path)
            ckpts.append(path.name)
            history.append({"step": step, "d_loss": d_loss, "g_loss": g_loss,
                            "seconds": round(time.perf_counter() - t0, 2)})
            if log:
                log(f"step {step}/{cfg.steps}  d_loss {d_loss:.4f}  g_loss {g_loss:.4f}  -> {path.name}")
    summary = {"config": asdict(cfg), "checkpoints": ckpts, "final": ckpts[-1], "history": history,
               "seconds": round(time.perf_counter() - t0, 2), "latent_dim": cfg.latent_dim,
               "truth": world.truth()}
    tmp = out / ".train.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "train.json")
    return summary


def sample_checkpoint(path: str | Path, n: int, latent_dim: int, seed: int = 0) -> np.ndarray:
    """n points from a TorchScript generator checkpoint, latents z ~ N(0, I) drawn with `seed`."""
    module = torch.jit.load(str(path), map_location="cpu").eval()
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return module(z).float().numpy()
