"""Folders of images as sample sets: list, check, decode, embed in fixed blocks.

A folder given as `--reference DIR`, `--images-s DIR` or `--images-t DIR` is read with the
run's descriptor. The rules (also in the README):

- **Which files.** Every `*.png`, `*.jpg`, `*.jpeg` (suffix case-insensitive) under DIR,
  **recursively** (class sub-folders, as torchvision's ImageFolder lays them out, are
  included). Names starting with "." (hidden files and folders) and symlinked folders are
  skipped; other files are ignored and counted. Files are ordered by their relative POSIX
  path (plain code-point order), so row i of the embeddings is always the same file.
- **Decoding.** Pillow, first frame, converted to RGB with `Image.convert("RGB")` (what
  torchvision's default loader does): grayscale is replicated to three channels, alpha is
  dropped (not composited), palettes are expanded; 16-bit grayscale is scaled to 8 bits.
  EXIF orientation is not applied.
- **Size.** When the descriptor declares `input_size` (an int N or (H, W)), every image of
  another size is resized to it (bicubic, aspect ratio not kept: crop beforehand if that
  matters). When it declares none, all images must have one size: a folder of mixed sizes
  is refused with a one-line error naming two files of different sizes.
- **The batch** handed to the descriptor is float32 (n, 3, H, W), RGB, values in [-1, 1]
  (the canonical image batch between generators and descriptors).
- **Checks before any work:** a missing or empty folder, a file Pillow cannot identify or
  whose PNG chunks fail their checksums is a one-line error naming the file (a JPEG cut
  short is found when it is decoded: still one line naming the file).
- **Content, not dates.** Every file's bytes are hashed (sha256); the hashes key the
  feature cache and the run store, and the worker that decodes a file checks its hash, so a
  file changed during a run is an error, never a silently mixed embedding.
- **Blocks.** Embedding runs on the Dask client in fixed, ordered blocks of files (their
  size depends only on the number of files and the image size), so the bits do not depend
  on the number of workers or on --shard-rows.
- **Refusals.** A descriptor may refuse an image (`Descriptor.embed_masked`, e.g. a face
  descriptor that finds no face): refused files are skipped, counted and listed, never
  embedded as rows.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modeaudit.tasks import console
from modeaudit.tasks.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Rows per embedding block: at most this many images ...
BLOCK_IMAGES = 256
# ... and at most about this many bytes of canonical float32 batch per block.
BLOCK_BYTES = 256 << 20
# Files hashed in parallel while listing (hashlib and file reads release the GIL).
HASH_THREADS = 8
# Refused files named in result.json.
SHOW_REFUSED = 20
# Bump when decoding, resizing or the block plan changes: it is part of every content key.
PIPELINE_VERSION = 1


@dataclass(frozen=True)
class ImageFile:
    """One image of a folder: relative POSIX path, bytes, sha256, pixel size (W, H) and Pillow mode."""
    rel: str
    size: int
    sha256: str
    width: int
    height: int
    mode: str


@dataclass(frozen=True)
class ImageListing:
    """The images of a folder, in row order."""
    root: str                        # absolute path of the folder
    files: tuple[ImageFile, ...]
    ignored: int                     # other files (not PNG/JPEG) under the folder

    def sizes(self) -> set[tuple[int, int]]:
        """Distinct (W, H) sizes."""
        return {(f.width, f.height) for f in self.files}


def is_image_name(name: str) -> bool:
    """PNG or JPEG by suffix, case-insensitive."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def _walk(root: Path) -> tuple[list[str], int]:
    rels, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if not p.is_file():
                continue
            if is_image_name(name):
                rels.append(p.relative_to(root).as_posix())
            else:
                ignored += 1
    rels.sort()
    return rels, ignored


def _inspect(root: Path, rel: str, what: str) -> ImageFile:
    """Hash a file and read its image header (PNG chunk checksums verified)."""
    from PIL import Image, UnidentifiedImageError
    path = root / rel
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{what} {root}: cannot read {rel} ({e.strerror or e}); fix its permissions or remove "
                         "it from the folder") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            mode = im.mode
            im.verify()          # PNG: every chunk's CRC; JPEG: the header only
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{what} {root}: {rel} is not a readable image ({_first_line(e)}); replace or remove "
                         "that file") from None
    return ImageFile(rel, len(data), hashlib.sha256(data).hexdigest(), int(w), int(h), mode)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# In-process memo: a folder listed again in the same process (the CLI's check, then the flow)
# is not hashed twice when every file's size, mtime and inode are unchanged.
_MEMO: dict[str, tuple[tuple, ImageListing]] = {}


def count_images(folder: str | os.PathLike) -> tuple[int, int]:
    """(images, other files) in a folder by the module's rules, without reading any image."""
    rels, ignored = _walk(Path(folder).expanduser().resolve())
    return len(rels), ignored


def list_images(folder: str | os.PathLike, what: str) -> ImageListing:
    """Every image of a folder (see the module's rules), hashed and header-checked; one-line errors."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise InputError(f"{what} {folder}: no such directory; give a folder of PNG/JPEG images")
    if not root.is_dir():
        raise InputError(f"{what} {folder} is not a directory; give a folder of PNG/JPEG images")
    root = root.resolve()
    rels, ignored = _walk(root)
    if not rels:
        raise InputError(f"{what} {folder} holds no PNG or JPEG images (searched recursively"
                         + (f"; {ignored} other file(s) ignored" if ignored else "") + "); give a folder of images")
    try:
        stamp = tuple((r, st.st_size, st.st_mtime_ns, st.st_ino)
                      for r, st in ((r, os.stat(root / r)) for r in rels))
    except OSError:
        stamp = None
    memo = _MEMO.get(str(root))
    if stamp is not None and memo is not None and memo[0] == stamp:
        return memo[1]
    with ThreadPoolExecutor(HASH_THREADS) as ex:
        files = tuple(ex.map(lambda r: _inspect(root, r, what), rels))
    listing = ImageListing(str(root), files, ignored)
    if stamp is not None:
        _MEMO[str(root)] = (stamp, listing)
    return listing


def declared_size(descriptor) -> tuple[int, int] | None:
    """The descriptor's declared input size as (H, W), or None when it declares none."""
    s = getattr(descriptor, "input_size", None)
    if s is None:
        return None
    if isinstance(s, (int, np.integer)):
        return int(s), int(s)
    h, w = s
    return int(h), int(w)


def target_size(listing: ImageListing, descriptor, spec: str, what: str, takes_resize: bool = False) -> tuple[int, int]:
    """(H, W) the images are handed to the descriptor at; a one-line error for mixed sizes without a declared size."""
    want = declared_size(descriptor)
    if want is not None:
        return want
    first = listing.files[0]
    other = next((f for f in listing.files if (f.width, f.height) != (first.width, first.height)), None)
    if other is not None:
        fix = ("pass -D resize=N to have the descriptor resize them" if takes_resize else
               f"resize them to one size first (descriptor {spec!r} declares no input size"
               " and has no resize option)")
        raise InputError(f"{what} {listing.root}: images of different sizes ({first.rel} is {first.width}x"
                         f"{first.height}, {other.rel} is {other.width}x{other.height}); {fix}")
    return first.height, first.width


def block_rows(size: tuple[int, int]) -> int:
    """Images per embedding block for images of (H, W): fixed by the size alone."""
    h, w = size
    return max(1, min(BLOCK_IMAGES, BLOCK_BYTES // (12 * h * w)))


def content_key(listing: ImageListing, descriptor_fp: dict, size: tuple[int, int]) -> str:
    """sha256 naming what the embeddings of this folder are a function of (the feature cache and run store key)."""
    from PIL import __version__ as pil_version
    doc = {"pipeline": PIPELINE_VERSION, "pillow": pil_version, "descriptor": descriptor_fp, "size": list(size),
           "files": [[f.rel, f.size, f.sha256] for f in listing.files]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def to_canonical(im, size: tuple[int, int]) -> np.ndarray:
    """A Pillow image as a float32 (3, H, W) RGB array in [-1, 1], resized to size=(H, W) when it differs."""
    from PIL import Image
    h, w = size
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, np.float64)
        scale = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(np.round(a * (255.0 / scale)), 0, 255).astype(np.uint8), "L")
    if im.mode != "RGB":
        im = im.convert("RGB")
    if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.BICUBIC)
    a = np.asarray(im, np.float32)                    # (H, W, 3) in 0..255
    return np.ascontiguousarray(a.transpose(2, 0, 1)) / np.float32(127.5) - np.float32(1.0)


def load_images(root: str, files: list[tuple[str, str]], size: tuple[int, int], what: str) -> np.ndarray:
    """Decode files [(rel, sha256)] of root into the canonical batch (n, 3, H, W); each file's hash is checked."""
    from PIL import Image
    out = np.empty((len(files), 3, size[0], size[1]), np.float32)
    for i, (rel, sha) in enumerate(files):
        path = Path(root) / rel
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"{what} {root}: cannot read {rel} ({e.strerror or e})") from None
        if hashlib.sha256(data).hexdigest() != sha:
            raise InputError(f"{what} {root}: {rel} changed while the audit ran; rerun when the folder is "
                             "no longer being written")
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                out[i] = to_canonical(im, size)
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InputError(f"{what} {root}: {rel} cannot be decoded ({_first_line(e)}); replace or remove "
                             "that file") from None
    return out


@functools.lru_cache(maxsize=4)
def _descriptor(desc_json: str):
    from modeaudit.tasks.models.descriptors import build_descriptor
    d = json.loads(desc_json)
    return build_descriptor(d["spec"], d["options"])


def descriptor_of(desc: dict):
    """The descriptor for {spec, options}, built once per process."""
    return _descriptor(json.dumps(desc, sort_keys=True))


def embed_block(desc: dict, root: str, files: list[tuple[str, str]], size: tuple[int, int],
                what: str) -> tuple[np.ndarray, np.ndarray]:
    """Worker task: (rows float32 (n, D) with refused rows zero, ok bool (n,)) for one block of files."""
    descriptor = descriptor_of(desc)
    batch = load_images(root, files, size, what)
    rows, ok = descriptor.embed_masked(batch)
    rows, ok = np.asarray(rows, np.float32), np.asarray(ok, bool).reshape(-1)
    if rows.ndim != 2 or rows.shape[0] != len(files) or ok.shape[0] != len(files):
        raise InputError(f"descriptor {desc['spec']} returned rows of shape {rows.shape} and a mask of "
                         f"{ok.shape[0]} for {len(files)} images; it must return one row and one flag per image")
    rows = rows.copy()
    rows[~ok] = 0.0
    return rows, ok


def embed_on_cluster(client, desc: dict, listing: ImageListing, size: tuple[int, int], what: str):
    """Embed every file of a listing on the Dask client in fixed ordered blocks: (rows of every file, ok mask)."""
    files = [(f.rel, f.sha256) for f in listing.files]
    step = block_rows(size)
    futures = [client.submit(embed_block, desc, listing.root, files[lo:lo + step], size, what, pure=False)
               for lo in range(0, len(files), step)]
    parts = console.gather(client, futures, [len(files[lo:lo + step]) for lo in range(0, len(files), step)],
                           f"{what} images embedded", unit="images")
    widths = {p[0].shape[1] for p in parts}
    if len(widths) != 1:
        raise InputError(f"descriptor {desc['spec']} returned rows of different widths {sorted(widths)} for "
                         f"{what} {listing.root}; it must return one width")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def check_rows(rows: np.ndarray, names: list[str], what: str, root: str, spec: str) -> None:
    """NaN/Inf or all-zero embedding rows are an error naming the file (rows[i] belongs to names[i])."""
    from modeaudit.tasks.join.sources import row_norms
    norms = row_norms(rows)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        i = int(bad[0])
        kind = "NaN or Inf" if not np.isfinite(norms[i]) else "all zero"
        raise InputError(f"descriptor {spec} gave an invalid embedding ({kind}) for {what} {root}: {names[i]}"
                         + (f" and {len(bad) - 1} more file(s)" if len(bad) > 1 else "")
                         + "; check that file, or remove it from the folder")
