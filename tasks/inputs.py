"""The audit's user inputs: embedding files, image folders and earlier runs, planned, embedded, stored.

`plan_inputs` runs before anything is written (the CLI's preflight and the flow call it):
it lists and hashes image folders, checks the descriptor, recognises an earlier run given
as `--reference RUN_DIR` and checks it. `embed_folders` embeds the folders on the Dask client
(or takes them from the feature cache, `storage/cache.py`), `store_folders` keeps the rows
in the run store (`store.zarr/inputs/<S|T|reference>`, float32 as the descriptor gave them),
so a run never depends on the cache staying put.

`--reference RUN_DIR` (a folder with manifest/run.json): an earlier **generator** run's T
embeddings are reused as the reference set, after every T shard's checksum is verified and
its descriptor's fingerprint (options `device` and `batch_size` aside) matches this run's. An
earlier run of embedding files or image folders stores no reusable embeddings of its own:
it is refused with the input to pass instead (its T file or folder; a folder's embeddings
are in the feature cache, so passing it costs no embedding).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modeaudit.storage.layout import STORE_ZARR, RunLayout
from modeaudit.tasks.audit_steps import MIN_T_ROWS
from modeaudit.tasks.config import AuditConfig
from modeaudit.tasks.errors import InputError
from modeaudit.tasks.join.sources import Source, open_embeddings, scan_block
from modeaudit.tasks.models import image_folders as imf

OPTION = {"S": "--images-s", "T": "--images-t", "reference": "--reference"}
# Descriptor options that change where or how fast rows are computed, not what they mean.
_NOT_MEANING = ("device", "batch_size")


@dataclass(frozen=True)
class FolderPlan:
    """An image folder to embed: its listing, the size images are handed over at, its content key."""
    name: str                   # "S", "T" or "reference"
    what: str                   # the CLI option, for messages
    listing: imf.ImageListing
    size: tuple[int, int]
    key: str
    desc: dict

    def info(self) -> dict:
        """What result.json says about the folder before embedding (files, key, size)."""
        return {"kind": "images", "path": self.listing.root, "key": self.key, "files": len(self.listing.files),
                "ignored_files": self.listing.ignored, "image_size": list(self.size),
                "resized": sum((f.height, f.width) != self.size for f in self.listing.files),
                "descriptor": self.desc["spec"]}


@dataclass(frozen=True)
class ReferenceRun:
    """An earlier generator run whose T embeddings are the reference."""
    root: str
    source: Source
    n_shards: int
    info: dict


@dataclass
class Inputs:
    """Everything the audit reads that the user made."""
    desc: dict | None = None
    folders: dict[str, FolderPlan] = field(default_factory=dict)
    files: dict[str, Source] = field(default_factory=dict)     # "S", "T", "reference" -> embedding files
    ref_run: ReferenceRun | None = None

    def fingerprint(self) -> dict:
        """The part of the run store's key that names folders (by content) and an earlier run (by checksums)."""
        fp = {name: {"images": p.key} for name, p in sorted(self.folders.items())}
        if self.ref_run is not None:
            fp["reference"] = {"run": self.ref_run.info["checksum"]}
        return fp

    def rows(self, name: str) -> int:
        """Rows of S or T as far as known before embedding (a folder: its file count, an upper bound)."""
        if name in self.files:
            return self.files[name].rows
        return len(self.folders[name].listing.files)


def reference_kind(path: str) -> str:
    """'run' (a modeaudit run directory), 'images' (a folder that is not a Zarr array) or 'embeddings'."""
    p = Path(path).expanduser()
    if p.is_dir():
        if RunLayout(p).run_json.exists():
            return "run"
        if (p / "zarr.json").exists() or (p / ".zarray").exists():
            return "embeddings"
        return "images"
    return "embeddings"


def input_descriptor(cfg: AuditConfig) -> dict | None:
    """{spec, options} of --descriptor for a run without a generator (None when not given)."""
    if not cfg.descriptor:
        return None
    from modeaudit.tasks.audit_steps import _with_device
    from modeaudit.tasks.models.descriptors import DESCRIPTORS
    from modeaudit.tasks.plan import model_device
    device = model_device(cfg.kernel)
    return {"spec": cfg.descriptor,
            "options": DESCRIPTORS.resolve_options(cfg.descriptor, _with_device(DESCRIPTORS, cfg.descriptor,
                                                                                cfg.descriptor_options, device))}


def _image_descriptor(desc: dict | None, what: str, path: str):
    if desc is None:
        images, others = imf.count_images(path)
        if not images:
            raise InputError(f"{what} {path} is a folder with no PNG or JPEG images ({others} other file(s); "
                             "searched recursively) and is neither a Zarr array nor an audit run folder: give a .npy "
                             "file, a Zarr array, a run folder or a folder of images")
        raise InputError(f"{what} {path} is a folder of images: pass --descriptor SPEC (an image descriptor, e.g. "
                         "torch:tiny-cnn or torchscript:PATH) to embed them")
    descriptor = imf.descriptor_of(desc)
    if "image" not in getattr(descriptor, "accepts", ("image",)):
        raise InputError(f"{what} {path} is a folder of images but descriptor {desc['spec']!r} takes embeddings, "
                         "not images; pass an image descriptor with --descriptor (e.g. torch:tiny-cnn or "
                         "torchscript:PATH)")
    return descriptor


def folder_plan(path: str, name: str, desc: dict | None) -> FolderPlan:
    """List, hash and check one image folder; fix the size its images are embedded at and its content key."""
    from modeaudit.tasks.models.descriptors import DESCRIPTORS
    what = OPTION[name]
    descriptor = _image_descriptor(desc, what, path)
    listing = imf.list_images(path, what)
    takes_resize = "resize" in DESCRIPTORS.lookup(desc["spec"])[0].options
    size = imf.target_size(listing, descriptor, desc["spec"], what, takes_resize)
    return FolderPlan(name, what, listing, size, imf.content_key(listing, descriptor.fingerprint(), size), desc)


def _meaning(fp) -> dict:
    """A descriptor fingerprint without the options that do not change what its rows mean."""
    fp = dict(fp or {})
    fp["options"] = {k: v for k, v in (fp.get("options") or {}).items() if k not in _NOT_MEANING}
    return fp


def reference_run(cfg: AuditConfig, desc: dict | None) -> ReferenceRun:
    """An earlier generator run as the reference: complete T, same descriptor (its checksums are verified on the
    cluster by `verify_reference_run`)."""
    import json
    from modeaudit.storage.store import RunStore, StoreError, fingerprint_hash
    path = cfg.reference
    root = Path(path).expanduser().resolve()
    if root == Path(cfg.out).expanduser().resolve():
        raise InputError(f"--reference {path} is this run's own --out; give an earlier run's directory")
    try:
        store = RunStore.open(root)
    except StoreError as e:
        raise InputError(f"--reference {path} looks like a modeaudit run but cannot be opened ({e})") from None
    fp = store.fingerprint
    if "generator" not in fp or "T" not in store.set_names:
        ins = (fp.get("inputs") or {}).get("T") or {}
        t_in = ((fp.get("embeddings") or {}).get("T") or {}).get("path")
        hint = (f"pass its T embeddings file ({t_in}) as --reference instead" if t_in else
                "pass its --images-t folder as --reference instead (its embeddings are in the feature cache)"
                if ins else "pass the embeddings or images it audited as --reference instead")
        raise InputError(f"--reference {path} is an audit of embedding files or image folders: it stores no "
                         f"embeddings of its own to reuse; {hint}")
    if desc is None:
        raise InputError(f"--reference {path} reuses embeddings made by descriptor {fp['descriptor'].get('spec')!r}: "
                         "pass --descriptor (the descriptor your --embeddings-s/-t came from) so that it can be "
                         "checked to be the same")
    mine = imf.descriptor_of(desc).fingerprint()
    theirs = json.loads(json.dumps(fp["descriptor"]))
    if _meaning(json.loads(json.dumps(mine, default=str))) != _meaning(theirs):
        raise InputError(f"--reference {path} was embedded with descriptor {theirs.get('spec')!r} "
                         f"{_meaning(theirs)['options']} but this run uses {mine.get('spec')!r} "
                         f"{_meaning(mine)['options']}"
                         "; embeddings of different descriptors are not comparable: use the same --descriptor and -D "
                         "options, or another reference")
    try:
        checksums = store.shard_checksums("T")
    except StoreError as e:
        raise InputError(f"--reference {path}: {e}") from None
    source = Source.of_store(store, "T")
    info = {"kind": "run", "run_dir": str(store.root), "fingerprint": fingerprint_hash(fp),
            "descriptor": theirs, "set": "T", "rows": source.rows, "checksum": fingerprint_hash({"T": checksums})}
    return ReferenceRun(str(store.root), source, len(checksums), info)


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def plan_inputs(cfg: AuditConfig, desc: dict | None = None) -> Inputs:
    """Check every user input before anything is written; list and hash image folders (no embedding yet).

    `desc`: the generator run's descriptor; without a generator, --descriptor's (when given)."""
    from modeaudit.storage.cache import cache_root
    if cfg.generator is None:
        desc = input_descriptor(cfg)
    inp = Inputs(desc=desc)
    if cfg.generator is None:
        for name, side in (("S", "s"), ("T", "t")):
            emb, img = getattr(cfg, f"embeddings_{side}"), getattr(cfg, f"images_{side}")
            if emb is not None:
                inp.files[name] = open_embeddings(emb, f"--embeddings-{side}")
            else:
                inp.folders[name] = folder_plan(img, name, desc)
    if cfg.reference:
        kind = reference_kind(cfg.reference)
        if kind == "run":
            inp.ref_run = reference_run(cfg, desc)
        elif kind == "images":
            inp.folders["reference"] = folder_plan(cfg.reference, "reference", desc)
        else:
            inp.files["reference"] = open_embeddings(cfg.reference, "--reference")
    out = Path(cfg.out).expanduser().resolve()
    for p in inp.folders.values():
        if _inside(out, Path(p.listing.root)):
            raise InputError(f"--out {cfg.out} is inside {p.what} {p.listing.root}: the run would write into the "
                             "folder it reads (its plots would become images of a later run); choose an --out "
                             "outside it")
    if inp.folders and cfg.cache and _inside(cache_root(cfg.cache_dir).resolve(), out):
        raise InputError(f"the feature cache {cache_root(cfg.cache_dir)} is inside --out {cfg.out}; a run "
                         "directory holds only its run: choose another --cache-dir")
    if "T" in inp.folders and len(inp.folders["T"].listing.files) < MIN_T_ROWS:
        raise InputError(f"--images-t {cfg.images_t} holds {len(inp.folders['T'].listing.files)} images; the curves "
                         f"and MCCS count neighbours in T, which needs at least {MIN_T_ROWS} (the paper uses 1e7)")
    if "S" in inp.folders and "T" in inp.folders and inp.folders["S"].listing.root == inp.folders["T"].listing.root:
        raise InputError(f"--images-s and --images-t are the same folder ({inp.folders['T'].listing.root}); S and T "
                         "must be independent samples: split the images into two folders")
    return inp


def embed_folder(client, plan: FolderPlan, cfg: AuditConfig) -> tuple[np.ndarray, dict, str]:
    """(rows of the accepted files, info for result.json, cache status 'hit'/'miss'/'off') of one folder."""
    from modeaudit.storage.cache import FeatureCache, cache_root
    import datetime
    cache = FeatureCache(cache_root(cfg.cache_dir)) if cfg.cache else None
    hit = cache.get(plan.key) if cache is not None else None
    files = [f.rel for f in plan.listing.files]
    if hit is not None:
        rows, meta = hit
        refused = list(meta.get("refused", []))
        status = "hit"
    else:
        rows_all, ok = imf.embed_on_cluster(client, plan.desc, plan.listing, plan.size, plan.what)
        kept = [f for f, good in zip(files, ok) if good]
        refused = [f for f, good in zip(files, ok) if not good]
        if not kept:
            raise InputError(f"descriptor {plan.desc['spec']} refused every image of {plan.what} {plan.listing.root} "
                             f"({len(files)} files); check that the images are what the descriptor expects")
        rows = np.ascontiguousarray(rows_all[ok], np.float32)
        imf.check_rows(rows, kept, plan.what, plan.listing.root, plan.desc["spec"])
        status = "miss"
        if cache is not None:
            cache.put(plan.key, rows, {
                "folder": plan.listing.root, "files": [[f.rel, f.size, f.sha256] for f in plan.listing.files],
                "refused": refused, "descriptor": imf.descriptor_of(plan.desc).fingerprint(),
                "image_size": list(plan.size),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        else:
            status = "off"
    info = {**plan.info(), "rows": int(rows.shape[0]), "dim": int(rows.shape[1]), "refused": len(refused),
            "refused_files": refused[:imf.SHOW_REFUSED]}
    return rows, info, status


def store_folder(store, name: str, rows: np.ndarray) -> Source:
    """Keep a folder's rows in the run store (store.zarr/inputs/<name>) and describe them as a source."""
    arr_name = f"inputs/{name}"
    store.write_array(arr_name, rows, chunks=(min(len(rows), 65536), rows.shape[1]))
    return Source("zarr", str(Path(store.root) / STORE_ZARR / arr_name), int(rows.shape[0]), int(rows.shape[1]))


def folder_scan(rows: np.ndarray) -> dict:
    """The validity scan of a folder's rows (already checked row by row: only `renormalized` can be non-zero)."""
    return scan_block(rows, 0)


def _shard_intact(root: str, index: int) -> bool:
    from modeaudit.storage.store import RunStore
    return RunStore.open(root).is_complete("T", index, verify=True)


def verify_reference_run(client, ref: ReferenceRun) -> None:
    """Re-read every T shard of the earlier run and compare it with its recorded checksum (on the cluster)."""
    ok = client.gather([client.submit(_shard_intact, ref.root, i, pure=False) for i in range(ref.n_shards)])
    bad = [i for i, good in enumerate(ok) if not good]
    if bad:
        raise InputError(f"--reference {ref.root}: T shard(s) {', '.join(map(str, bad[:10]))} no longer match their "
                         "checksums; rerun that audit with the same --out to repair them, or choose another reference")


def check_width(src_dim: int, S_dim: int, what: str) -> None:
    """A reference (or T) of another width than S is an error."""
    if src_dim != S_dim:
        raise InputError(f"{what} rows have width {src_dim} but S rows have width {S_dim}; embed it with the same "
                         "descriptor")

