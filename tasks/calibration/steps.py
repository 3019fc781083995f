"""Calibration as steps: densities of the dense modes, fitting, and the before/after
comparison of a calibrated sampler with the model (no Prefect; flows/calibrate.py composes).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from modeaudit.tasks.join import parallel
from modeaudit.tasks.errors import InputError
from modeaudit.tasks.metrics.fid import StreamingStats, frechet_distance_stats
from modeaudit.tasks.join.kernels import mccs_from_sums
from modeaudit.storage.layout import RunLayout
from modeaudit.tasks.join.sources import Source

METHODS = {"cluster": ("gmm", "cells"), "rejection": ("descriptor", "latent")}
# cells: exact N(0, I) reweighted by cell (the GMM of the paper spills across cells);
# descriptor: the paper's Algorithm 2 as written (the latent proxy is an approximation of it).
DEFAULT_VARIANT = {"cluster": "cells", "rejection": "descriptor"}


def load_run(run_dir: str | Path, verify: bool = True):
    """result.json and the store of a finished generator audit (clear errors otherwise); with `verify`, every
    shard of S and T re-read against its recorded checksums (RunStore.verify_sets)."""
    from modeaudit.storage.store import RunStore
    run_dir = Path(run_dir)
    path = RunLayout(run_dir).result_json
    if not path.is_file():
        raise InputError(f"{run_dir} holds no finished audit (no result.json); run `modeaudit audit --out "
                         f"{run_dir}` first")
    try:
        result = json.loads(path.read_text())
        kind = result["source"]["kind"]
        for key in ("worst_case", "modes", "sizes", "settings", "radii", "d0", "curves"):
            result[key]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path} is not a complete modeaudit result ({type(e).__name__}: {e}); rerun the audit "
                         f"into {run_dir}") from None
    if kind != "generator":
        raise InputError(f"{run_dir} audited embedding files, not a generator: calibration reshapes a generator's "
                         "latent sampler, so audit the generator itself (--generator)")
    store = RunStore.open(run_dir)
    if verify:
        store.verify_sets(("S", "T"), str(run_dir))
    return result, store


def check_fit_sizes(method: str, clusters: int, n_fit: int, t_rows: int) -> None:
    """InputError when the cluster fit would ask for more cells than rows it fits (n_fit, at most T's rows)."""
    rows = min(n_fit, t_rows)
    if method == "cluster" and clusters > rows:
        raise InputError(f"--clusters {clusters} is more than the {rows} latent rows the fit uses (--n-fit {n_fit}, "
                         f"T has {t_rows}); lower --clusters or raise --n-fit")


def modes_with_mass(mode_idx: list, modes_emb, p1, p2: float, r0: float):
    """The modes rejection can flatten: those with T rows within r0 (p1 > 0; a listed mode T never visits has
    no excess), and a typical density p2 > 0 to flatten them to. Returns (mode_idx, modes_emb, p1, dropped)."""
    if not p2 > 0:
        raise InputError(f"the audit's typical density at r0={r0} is 0 (its median reference anchor has no T row "
                         "within r0): rejection has no level to flatten the modes to; audit with more T rows (--M) "
                         "or a larger --d0, or calibrate with --method cluster")
    keep = np.asarray(p1) > 0
    if not keep.any():
        raise InputError(f"none of the {len(mode_idx)} modes has a T row within r0={r0}: nothing to flatten")
    dropped = [int(i) for i, k in zip(mode_idx, keep) if not k]
    return [i for i, k in zip(mode_idx, keep) if k], modes_emb[keep], np.asarray(p1)[keep], dropped


def mode_densities(client, result, store, modes_emb, r0: float, kernel: str):
    """p1 per mode (share of T within r0 of it) and p2 (median share over the random reference anchors)."""
    T = Source.of_store(store, "T")
    p1 = parallel.range_counts(client, modes_emb, T, [r0], kernel=kernel)[:, 0] / T.rows
    radii = np.asarray(result["radii"])
    j = int(np.argmin(np.abs(radii - r0)))
    if abs(radii[j] - r0) > 1e-9:
        raise InputError(f"r0={r0} is not on the audit's radius grid; pick one of {radii.tolist()}")
    ref = store.read_array("results/curves")[len(result["r_obs"]):, j]
    return p1, float(np.median(ref)) / T.rows


def descriptor_stats(source: Source, n: int | None = None, block: int = 65536) -> StreamingStats:
    """Streaming mean/covariance of embedding rows (for FD (descriptor))."""
    n = source.rows if n is None else min(n, source.rows)
    st = StreamingStats(source.dim)
    for _, rows in source.blocks(0, n, block):
        st.update(rows)
    return st


def fd(a: StreamingStats, b: StreamingStats) -> float:
    """Frechet distance between two streamed feature statistics (from their rows when they kept them)."""
    return frechet_distance_stats(a, b)


def mccs_of(client, anchors, T: Source, n_c: int, theta: float, kernel: str) -> np.ndarray:
    """MCCS of anchor rows over T[:n_c]."""
    return mccs_from_sums(parallel.mccs_sums(client, anchors, T, theta, stop=n_c, kernel=kernel), n_c)


def reference_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of real data from a pytorch-fid .npz; a bad file is the user's error, with its reason."""
    from modeaudit.tasks.metrics.fid import load_reference_stats
    try:
        return load_reference_stats(path)
    except FileNotFoundError:
        raise InputError(f"--fid-reference {path}: no such file; give a pytorch-fid .npz with 'mu' and "
                         "'sigma'") from None
    except ValueError as e:
        raise InputError(f"--fid-reference: {e}") from None


def check_reference_width(ref: tuple, dim: int, path: str) -> None:
    """Refuse real-data statistics of another feature width before any work starts."""
    if len(ref[0]) != dim:
        raise InputError(f"--fid-reference {path} holds {len(ref[0])}-d statistics but the run's embeddings are "
                         f"{dim}-d; compute the reference with the same descriptor as the audit")


def fd_to_reference(before: StreamingStats, after: StreamingStats, ref: tuple, path: str) -> dict:
    """FD of the model before and after calibration to real-data statistics (width checked by the caller)."""
    mu, sigma = ref
    return {"before": frechet_distance_stats(before, (mu, sigma)),
            "after": frechet_distance_stats(after, (mu, sigma)),
            "features": "the audit's descriptor (FD, not Inception FID)", "file": str(path)}


def inception_fid(gen: dict, latents_before: np.ndarray, latents_after: np.ndarray, weights: str,
                  image_range: str = "-1:1", batch: int = 64, device: str = "cpu") -> dict:
    """Inception FID between images of the model before and after calibration.

    Both image sets are rendered by the *base* generator from the latents each audit
    stored (the calibrated sampler reshapes latents only), mapped from `image_range`
    to [0, 1] and embedded by the FID Inception-v3 loaded from `weights` (pytorch-fid's
    state dict). Features stream into float64 statistics, so memory is O(2048^2).
    """
    from modeaudit.tasks.models.inception import fid_inception_v3, inception_features
    g = _image_generator(gen["spec"], gen["options"])
    lo, hi = _image_range(image_range)
    try:
        net = fid_inception_v3(weights, device=device)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"--inception-weights {weights}: {e}") from None
    stats = []
    for z in (latents_before, latents_after):
        st = StreamingStats(2048)
        for i in range(0, len(z), batch):
            img = (np.asarray(g.generate(z[i:i + batch]), np.float32) - lo) / (hi - lo)
            st.update(inception_features(net, np.clip(img, 0.0, 1.0), batch_size=batch, device=device))
        stats.append(st)
    return {"fid": fd(stats[0], stats[1]), "rows": [len(latents_before), len(latents_after)],
            "features": "Inception-v3 pool3 (2048), pytorch-fid weights", "weights": str(weights),
            "image_range": image_range}


def check_inception_inputs(result: dict, weights: str, image_range: str) -> None:
    """Fail before any work when Inception FID cannot be computed for this run."""
    _image_range(image_range)
    if not Path(weights).is_file():
        raise InputError(f"--inception-weights {weights}: no such file; give pytorch-fid's "
                         "pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)")
    _image_generator(result["source"]["generator"], result["source"]["generator_options"])


def _image_generator(spec: str, options: dict):
    """The run's generator, refused unless it makes images (Inception FID needs pixels)."""
    from modeaudit.tasks.models.generators import build_generator
    g = build_generator(spec, options)
    if getattr(g, "sample_kind", "") != "image":
        raise InputError(f"--inception-weights needs an image generator; {spec!r} makes embeddings "
                         "(calibration.json reports FD (descriptor) instead)")
    return g


def _image_range(text: str) -> tuple[float, float]:
    """'-1:1' -> (-1.0, 1.0): the generator's pixel range (GANs: -1:1; torchvision-style: 0:1)."""
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise InputError(f"--image-range {text!r}: write LOW:HIGH, e.g. -1:1 or 0:1") from None
    if not hi > lo:
        raise InputError(f"--image-range {text!r}: HIGH must exceed LOW")
    return lo, hi


def band_overlap(before: dict, after: dict) -> dict:
    """How the reference bands of two audits overlap, radius by radius (diversity kept?)."""
    lo1, hi1 = np.asarray(before["ref_low"]), np.asarray(before["ref_high"])
    lo2, hi2 = np.asarray(after["ref_low"]), np.asarray(after["ref_high"])
    inter = np.clip(np.minimum(hi1, hi2) - np.maximum(lo1, lo2), 0, None)
    union = np.maximum(hi1, hi2) - np.minimum(lo1, lo2)
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 1.0)
    overlaps = (np.minimum(hi1, hi2) >= np.maximum(lo1, lo2))
    return {"radii_overlapping": int(overlaps.sum()), "radii": len(overlaps), "mean_iou": float(iou.mean()),
            "overlap_all": bool(overlaps.all())}


def null_world_options(gen_spec: str, options: dict) -> dict | None:
    """The collapse-free twin of a synthetic planted world (same identities): its 'real data'."""
    if gen_spec not in ("synthetic:planted", "synthetic:null"):
        return None
    keep = ("dim", "identities", "spread", "latent_dim", "world_seed")
    return {k: options[k] for k in keep if k in options}


def typical_share(gen_spec: str, options: dict) -> float | None:
    """A typical identity's share of samples in a synthetic world."""
    if gen_spec != "synthetic:planted":
        return None
    return (1 - options["planted_prob"]) / options["identities"]
