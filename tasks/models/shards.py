"""Worker-side shard work: latents -> samples -> embeddings -> run store.

Runs inside Dask workers. Generators and descriptors are built once per worker
process (building a neural network per shard would dominate small shards).
"""
from __future__ import annotations

import functools
import json

import numba
import numpy as np

from modeaudit.storage.layout import RunLayout
from modeaudit.tasks.models.descriptors import build_descriptor
from modeaudit.tasks.errors import InputError
from modeaudit.tasks.models.generators import build_generator
from modeaudit.tasks.join.sources import row_norms, scan_block, unit_rows
from modeaudit.tasks.join.threads import compute_threads


# A sample the descriptor cannot embed (dlib:face: no face in it) is redrawn: row j's
# k-th redraw uses latent row j of stream f"{set}/redraw{k}", so it is a pure function of
# (seed, set, j, k). After this many draws in a row the shard fails with an InputError.
MAX_DRAWS = 64


@functools.lru_cache(maxsize=4)
def _models(gen_json: str, desc_json: str):
    g, d = json.loads(gen_json), json.loads(desc_json)
    return build_generator(g["spec"], g["options"]), build_descriptor(d["spec"], d["options"])


def models(gen: dict, desc: dict):
    """(generator, descriptor) for {spec, options} dicts, cached per process."""
    return _models(json.dumps(gen, sort_keys=True), json.dumps(desc, sort_keys=True))


def embed_rows(gen: dict, desc: dict, seed: int, set_name: str, start: int, stop: int):
    """Latents, unit embeddings, ground truth and a validity scan for rows [start, stop) of a set."""
    generator, descriptor = models(gen, desc)
    numba.set_num_threads(min(compute_threads(), numba.config.NUMBA_NUM_THREADS))
    if generator.sample_kind == "image" and "image" not in descriptor.accepts:
        raise InputError(f"generator {gen['spec']!r} makes images but descriptor {desc['spec']!r} takes embeddings; "
                         "pass an image descriptor with --descriptor (e.g. torch:tiny-cnn or torchscript:PATH)")
    # Networks and BLAS may give a row different bits in a different batch, so the
    # work runs in batches aligned to global multiples of batch_size and is then cut
    # to [start, stop): a row's embedding does not depend on the shard size.
    bs = generator.batch_size
    lo, hi = start // bs * bs, -(-stop // bs) * bs
    z_all = generator.latents(seed, set_name, lo, hi)
    if not z_all.flags.writeable:     # redraws replace refused rows in place
        z_all = z_all.copy()
    embs, draws = [], np.ones(hi - lo, np.int64)
    for i in range(0, hi - lo, bs):
        e, draws[i:i + bs] = _embed_block(generator, descriptor, seed, set_name, lo + i, z_all[i:i + bs])
        embs.append(e)
    emb = np.concatenate(embs)[start - lo:stop - lo]
    z = z_all[start - lo:stop - lo]
    norms = row_norms(emb)
    scan = scan_block(emb, start, norms)
    # Samples the descriptor refused (no face) and that were redrawn: counted, never embedded.
    scan["rejected_by_descriptor"] = int(draws[start - lo:stop - lo].sum() - (stop - start))
    if scan["nonfinite"] or scan["zero"]:
        row = scan["first_nonfinite"] if scan["nonfinite"] else scan["first_zero"]
        where = "a trial sample" if set_name == "probe" else f"set {set_name}, row {row}"
        raise InputError(f"the generator/descriptor produced an invalid embedding (NaN, Inf or all zero) at {where} "
                         f"(seed {seed}); check the model or its inputs")
    emb = unit_rows(emb, norms)
    truth = generator.truth(z)
    return z.astype(np.float32), emb, truth, scan


def _embed_block(generator, descriptor, seed: int, set_name: str, b0: int, z: np.ndarray):
    """Embeddings of one aligned batch starting at global row b0, and draws per row.

    Rows the descriptor refuses (embed_masked ok=False) are redrawn in place in `z`:
    attempt k of row j takes latent row j of stream f"{set_name}/redraw{k}". The
    pending rows of a batch depend on the batch alone, so each retry's batch (and its
    bits) is the same whatever the shard."""
    emb, ok = descriptor.embed_masked(generator.generate(z))
    draws = np.ones(len(z), np.int64)
    pending = np.flatnonzero(~ok)
    for k in range(1, MAX_DRAWS):
        if not len(pending):
            return emb, draws
        p0 = int(pending[0])
        zk = generator.latents(seed, f"{set_name}/redraw{k}", b0 + p0, b0 + int(pending[-1]) + 1)[pending - p0]
        ek, okk = descriptor.embed_masked(generator.generate(zk))
        draws[pending] += 1
        got = pending[okk]
        z[got], emb[got] = zk[okk], ek[okk]
        pending = pending[~okk]
    if not len(pending):
        return emb, draws
    where = "a trial sample" if set_name == "probe" else f"set {set_name}, row {b0 + int(pending[0])}"
    raise InputError(f"descriptor {descriptor.spec!r} refused {MAX_DRAWS} draws in a row at {where} ({len(pending)} "
                     f"row(s) of its batch; e.g. no face found): the generator rarely makes samples it can embed; "
                     "check the generator's output (images float32 RGB in [-1, 1]) and the descriptor's "
                     "preprocessing options")


def generate_shard(root: str, set_name: str, index: int, start: int, stop: int,
                   gen: dict, desc: dict, seed: int) -> dict:
    """Generate one shard into the run store and record its completion; returns its checksum and scan."""
    from modeaudit.storage.store import RunStore
    store = RunStore.open(root)
    z, emb, truth, scan = embed_rows(gen, desc, seed, set_name, start, stop)
    kinds = {a.kind for a in store.layout(set_name).arrays}
    data = {"latents": z, "emb": emb.astype(store.array(set_name, "emb").dtype)}
    if "planted" in kinds:
        data["planted"] = truth.astype(bool)
    # The scan is saved before completion is recorded, so a resumed run still knows it.
    store.write_json(RunLayout.scan(set_name, index), scan)
    checksum = store.write_shard(set_name, index, data)
    return {"index": index, "checksum": checksum, "scan": scan}
