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
    emb = np.concatenate([descriptor.embed(generator.generate(z_all[i:i + bs]))
                          for i in range(0, hi - lo, bs)])[start - lo:stop - lo]
    z = z_all[start - lo:stop - lo]
    norms = row_norms(emb)
    scan = scan_block(emb, start, norms)
    if scan["nonfinite"] or scan["zero"]:
        row = scan["first_nonfinite"] if scan["nonfinite"] else scan["first_zero"]
        where = "a trial sample" if set_name == "probe" else f"set {set_name}, row {row}"
        raise InputError(f"the generator/descriptor produced an invalid embedding (NaN, Inf or all zero) at {where} "
                         f"(seed {seed}); check the model or its inputs")
    emb = unit_rows(emb, norms)
    truth = generator.truth(z)
    return z.astype(np.float32), emb, truth, scan


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
