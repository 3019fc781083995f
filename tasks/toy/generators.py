"""Toy worlds as generators ``toy:WORLD``: latents -> 2-D points, the world's true law.

Registered through the generator registry's plugins, so ``--generator toy:ring8`` or
``--reference-generator toy:ring8`` works in an audit. The samples are 2-D points, so the
default descriptor is ``rff`` (random Fourier features): the identity descriptor would
normalise a point onto the unit circle and keep only its angle.
"""
from __future__ import annotations

import numpy as np

from modeaudit.tasks.models.generators import GENERATORS, Generator
from modeaudit.tasks.registry import ConfigError, Option
from modeaudit.tasks.toy.worlds import WORLDS, get_world


class ToyWorldGenerator(Generator):
    """The true law of a toy world: z[0] picks the mode (normal CDF), z[1:3] place the point."""

    default_descriptor = "rff"

    def __init__(self, world: str, *, latent_dim: int, sd: float):
        super().__init__(f"toy:{world}", dict(latent_dim=latent_dim, sd=sd))
        if world not in WORLDS:
            raise ConfigError(f"generator toy:{world}: unknown world; choose one of: "
                              + ", ".join(f"toy:{w}" for w in WORLDS))
        self.world = get_world(world, sd if sd > 0 else None)
        self.latent_dim = latent_dim

    def generate(self, z: np.ndarray) -> np.ndarray:
        """2-D points (float32, (n, 2))."""
        return self.world.from_latents(z)


@GENERATORS.register("toy", {
    "latent_dim": Option(int, 3, "latent dimension (z0 picks the mode, z1, z2 the point in it)",
                         check=lambda v: v >= 3, check_msg="must be >= 3"),
    "sd": Option(float, 0.0, "mode sd (0 = the seed's value: ring8 0.001, grid25 0.0025)",
                 check=lambda v: v >= 0, check_msg="must be >= 0"),
}, prefix=True, help="toy world WORLD (ring8, grid25, ring8-imbalanced, moons): its true law as 2-D points")
def _toy(world, *, latent_dim, sd):
    return ToyWorldGenerator(world, latent_dim=latent_dim, sd=sd)
