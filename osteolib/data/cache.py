"""The preprocessing cache: decode and resize every image once, train from memory-mapped arrays.

A cache is a folder ``<root>/<key[:16]>/`` holding

* ``images.npy``      (N, S, S) uint8, the images at the working size (bright = dense tissue),
* ``regions.npy``     (N, S, S) uint8 0/1 expert regions: the mask image (nearest-neighbour
  resized), else the union of the boxes, else zeros,
* ``has_region.npy``  (N,) bool, which rows have an expert region at all,
* ``index.csv``       the image ids in row order,
* ``meta.json``       the settings, the key and each image's geometry (how file pixels map to
  cache pixels) and boxes.

The key is a sha256 over the settings and, for every manifest row, the image id, a sha256 of the
image file's bytes, the mask file's likewise, and the boxes. A file replaced by another one, even
with the same size and modification time, or a changed setting therefore gives a new key and a new
build; the same content reuses the folder, wherever the files lie and whatever their time stamps
(a copied or touched data set is not decoded again). Hashing reads every byte (about 1.5 ms per MB
on one core); a file hashed before is not read again while its inode, size, modification and change
times stay the same (:func:`content_hash`): in memory for the process, and in
``<root>/content-hashes.json`` for the next process (a notebook, a rank) that keys a cache there. A build
is written into a temporary folder and renamed into place at the end, so an interrupted build is
never read.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from osteolib.data.io import XrayReadError, read_xray
from osteolib.data.manifest import boxes_or_none, is_missing
from osteolib.paths import cache_dir

# Part of the key: bump it whenever the preprocessing code changes what lands in the arrays,
# so caches made by older code are never read as if they were current.
# 2: 16-bit-per-channel colour files are read at full depth (osteolib.data.io); keys hash file contents.
CACHE_FORMAT_VERSION = 2
# Pillow's bilinear filter widens its support when shrinking, i.e. it anti-aliases, which keeps
# fine trabecular texture from turning into aliasing noise at small working sizes.
RESAMPLE = Image.Resampling.BILINEAR
MODES = ("letterbox", "stretch")
# Below this many images a worker pool costs more to start than it saves.
MIN_IMAGES_FOR_POOL = 64


class CacheBuildError(ValueError):
    """The cache cannot be built from this manifest; the message lists every file at fault."""


@dataclass(frozen=True)
class CacheSettings:
    """How images are brought to the working size.

    ``letterbox`` scales the longer side to ``size`` and pads the shorter one with black,
    centred, so anatomy keeps its proportions (black = no tissue in the bright-bone convention).
    ``stretch`` scales both sides to ``size`` independently.
    """

    size: int
    mode: str = "letterbox"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 8:
            raise ValueError(f"CacheSettings.size={self.size!r}: give the working size in pixels, an integer >= 8")
        if self.mode not in MODES:
            raise ValueError(f"CacheSettings.mode={self.mode!r}: use one of {MODES}")


class Geometry(NamedTuple):
    """Where file pixel (x, y) lands in the cache: (x * scale_x + pad_x, y * scale_y + pad_y)."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float


def geometry_for(width: int, height: int, settings: CacheSettings) -> tuple[Geometry, tuple[int, int]]:
    """The mapping of a width x height file into the cache, and the resized content's (width, height)."""
    size = settings.size
    if settings.mode == "stretch":
        return Geometry(size / width, size / height, 0.0, 0.0), (size, size)
    scale = size / max(width, height)
    new_w = min(size, max(1, round(width * scale)))
    new_h = min(size, max(1, round(height * scale)))
    # One scale for both axes (the content may be up to half a pixel narrower than width*scale).
    return Geometry(scale, scale, float((size - new_w) // 2), float((size - new_h) // 2)), (new_w, new_h)


def scale_boxes(boxes: list[dict] | None, geometry: Geometry) -> list[dict]:
    """Boxes in file pixels -> boxes in cache pixels (other keys, e.g. the label, kept)."""
    out = []
    for box in boxes or []:
        moved = dict(box)
        moved["x"] = box["x"] * geometry.scale_x + geometry.pad_x
        moved["y"] = box["y"] * geometry.scale_y + geometry.pad_y
        moved["w"] = box["w"] * geometry.scale_x
        moved["h"] = box["h"] * geometry.scale_y
        out.append(moved)
    return out


def rasterise_boxes(boxes: list[dict], size: int) -> np.ndarray:
    """The union of boxes (cache pixels) as a size x size uint8 0/1 mask.

    A pixel belongs to a box when its centre lies inside; a box thinner than a pixel still marks
    the pixel under its centre, so no expert region vanishes at small working sizes.
    """
    mask = np.zeros((size, size), dtype=np.uint8)
    for box in boxes:
        x0, y0, x1, y1 = box["x"], box["y"], box["x"] + box["w"], box["y"] + box["h"]
        cols = _covered(x0, x1, size)
        rows = _covered(y0, y1, size)
        if cols is not None and rows is not None:
            mask[rows[0]:rows[1], cols[0]:cols[1]] = 1
    return mask


def _covered(start: float, stop: float, size: int) -> tuple[int, int] | None:
    first, last = math.ceil(start - 0.5), math.floor(stop - 0.5)
    if last < first:  # thinner than a pixel: the pixel under the centre
        first = last = math.floor((start + stop) / 2)
    first, last = max(first, 0), min(last, size - 1)
    return (first, last + 1) if first <= last else None


class ImageCache:
    """Memory-mapped arrays of a manifest's images at one working size; see the module docstring.

    Make one with :meth:`build` (reuses a matching folder) or open a folder with :meth:`open`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        for name in ("images.npy", "regions.npy", "has_region.npy", "index.csv", "meta.json"):
            if not (self.path / name).is_file():
                raise CacheBuildError(f"{self.path}: not a complete cache folder ({name} missing); rebuild it "
                                      f"with ImageCache.build")
        self.meta: dict[str, Any] = json.loads((self.path / "meta.json").read_text())
        self.key: str = self.meta["key"]
        self.settings = CacheSettings(**self.meta["settings"])
        self.size: int = self.settings.size
        self.images: np.ndarray = np.load(self.path / "images.npy", mmap_mode="r")
        self.regions: np.ndarray = np.load(self.path / "regions.npy", mmap_mode="r")
        self.has_region: np.ndarray = np.load(self.path / "has_region.npy")
        self.image_ids: list[str] = pd.read_csv(self.path / "index.csv", dtype=str,
                                                keep_default_na=False)["image_id"].tolist()
        self.index: dict[str, int] = {image_id: row for row, image_id in enumerate(self.image_ids)}
        n = len(self.image_ids)
        if self.images.shape != (n, self.size, self.size) or self.regions.shape != self.images.shape \
                or self.has_region.shape != (n,) or len(self.meta["images"]) != n:
            raise CacheBuildError(f"{self.path}: arrays and index disagree in shape; delete the folder and rebuild")

    @classmethod
    def open(cls, path: str | os.PathLike) -> ImageCache:
        return cls(path)

    @classmethod
    def build(cls, manifest: pd.DataFrame, settings_or_size: CacheSettings | int,
              root: str | os.PathLike | None = None, progress: bool = True, workers: int = 2) -> ImageCache:
        """The cache of ``manifest`` (rows in manifest order) at these settings, built if not there yet.

        Every missing or undecodable file is listed in one :class:`CacheBuildError` before
        anything is cached.
        """
        if isinstance(settings_or_size, CacheSettings):
            settings = settings_or_size
        elif isinstance(settings_or_size, (int, np.integer)):
            settings = CacheSettings(int(settings_or_size))
        else:
            raise ValueError(f"settings_or_size={settings_or_size!r}: give a CacheSettings or an integer size")
        missing = [c for c in ("image_id", "path") if c not in manifest.columns]
        if missing:
            raise CacheBuildError(f"the manifest lacks column(s) {missing}")
        duplicated = manifest["image_id"][manifest["image_id"].duplicated()].unique().tolist()
        if duplicated:
            raise CacheBuildError(f"duplicate image ids {duplicated[:10]}: the cache indexes rows by image id")
        root = Path(root) if root is not None else cache_dir()
        key = cache_key(manifest, settings, hash_memo=root / HASH_MEMO_NAME)
        folder = root / key[:16]
        if (folder / "meta.json").is_file():
            cache = cls(folder)
            if cache.key == key:
                if progress:
                    print(f"cache: reusing {folder} ({len(cache)} images at {settings.size} px)", flush=True)
                return cache
            raise CacheBuildError(f"{folder} holds a cache with another key ({cache.key[:16]}...); delete it")
        if folder.exists():
            raise CacheBuildError(f"{folder} exists but is not a complete cache (no meta.json; it was not made by "
                                  f"ImageCache.build); delete it and build again")
        root.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".building-{key[:16]}-", dir=root))
        try:
            _write_cache(manifest, settings, key, temp, progress, workers)
            try:
                os.rename(temp, folder)
            except OSError:
                if not (folder / "meta.json").is_file():
                    raise
                # Another process finished the same build first; its result is identical.
                shutil.rmtree(temp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return cls(folder)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return f"ImageCache({len(self)} images, {self.size} px {self.settings.mode}, {self.path})"

    def row(self, image_id: str) -> int:
        try:
            return self.index[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in this cache ({self.path}); was the manifest "
                           f"changed after the cache was built?") from None

    def geometry(self, image_id: str) -> tuple[float, float, float]:
        """(scale, pad_x, pad_y): file pixel (x, y) lands at (x * scale + pad_x, y * scale + pad_y).

        One scale holds for letterbox caches; a stretch cache scales the axes differently, so
        use :meth:`geometry_xy` there.
        """
        geometry = self.geometry_xy(image_id)
        if not math.isclose(geometry.scale_x, geometry.scale_y, rel_tol=1e-9):
            raise ValueError(f"{image_id!r}: this {self.settings.mode} cache scales x by {geometry.scale_x:.4g} and "
                             f"y by {geometry.scale_y:.4g}; use geometry_xy()")
        return geometry.scale_x, geometry.pad_x, geometry.pad_y

    def geometry_xy(self, image_id: str) -> Geometry:
        entry = self.meta["images"][self.row(image_id)]
        return Geometry(entry["scale_x"], entry["scale_y"], entry["pad_x"], entry["pad_y"])

    def boxes(self, image_id: str) -> list[dict]:
        """The image's expert boxes in cache pixel coordinates (empty list when it has none)."""
        entry = self.meta["images"][self.row(image_id)]
        return scale_boxes(entry["boxes"], self.geometry_xy(image_id))

    def pixel_stats(self, ids: Iterable[str] | None = None) -> tuple[float, float]:
        """Mean and standard deviation of the images / 255 over these ids (all when None).

        The letterbox padding is counted: it is part of every image the network sees.
        """
        rows = np.arange(len(self)) if ids is None else np.array(sorted(self.row(i) for i in ids), dtype=int)
        if rows.size == 0:
            raise ValueError("pixel_stats needs at least one image id")
        total = 0.0
        squares = 0.0
        for start in range(0, rows.size, 256):  # chunks keep memory flat for large caches
            block = np.asarray(self.images[rows[start:start + 256]], dtype=np.float64) / 255.0
            total += float(block.sum())
            squares += float(np.square(block).sum())
        count = rows.size * self.size * self.size
        mean = total / count
        return mean, math.sqrt(max(squares / count - mean * mean, 0.0))


# Content hashes already computed in this process: path -> ((device, inode, size, mtime, ctime), digest).
_CONTENT_HASHES: dict[str, tuple[tuple[int, ...], str]] = {}
# A hash is remembered only for a file whose last change (ctime) lies this long before the hashing began: a
# file changed within the same clock tick as its hashing could otherwise change again unseen (git's "racy
# clean" rule). Windows' st_ctime is the creation time, which a rewrite keeps, so nothing is remembered there.
RACY_SECONDS = 2.0


def content_hash(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes; remembered for the process while ``os.stat`` says the file did not change.

    Any write to a file, or a move of another file onto its path, changes its ctime (or inode), which a user
    cannot set back the way ``touch`` sets back the modification time; so a file replaced by another of the
    same size and mtime is read and hashed again.
    """
    key = os.fspath(path)
    info = os.stat(key)
    identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    known = _CONTENT_HASHES.get(key)
    if known is not None and known[0] == identity:
        return known[1]
    started = time.time_ns()
    with open(key, "rb") as handle:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11: the loop runs in C
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        else:
            hasher = hashlib.sha256()
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
            digest = hasher.hexdigest()
    if os.name == "posix" and info.st_ctime_ns < started - int(RACY_SECONDS * 1e9):
        _CONTENT_HASHES[key] = (identity, digest)
    return digest


def forget_content_hashes() -> None:
    """Drop the hashes :func:`content_hash` remembers in this process (``content-hashes.json`` files stay)."""
    _CONTENT_HASHES.clear()


HASH_MEMO_NAME = "content-hashes.json"


def _load_hash_memo(path: Path) -> None:
    """Take a memo file's entries into the process memo (an unreadable memo is only a slower key)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(entries, dict):
        return
    for file, entry in entries.items():
        if file not in _CONTENT_HASHES and isinstance(entry, list) and len(entry) == 2 \
                and isinstance(entry[1], str) and isinstance(entry[0], list):
            _CONTENT_HASHES[file] = (tuple(entry[0]), entry[1])


def _save_hash_memo(path: Path, files: Iterable[str]) -> None:
    """Add these files' remembered hashes to a memo file (written whole, then renamed: never half-written)."""
    try:
        entries = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    added = {f: [list(_CONTENT_HASHES[f][0]), _CONTENT_HASHES[f][1]] for f in files if f in _CONTENT_HASHES}
    if all(entries.get(f) == entry for f, entry in added.items()):
        return
    entries.update(added)
    temp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=".content-hashes-", dir=path.parent)
        with os.fdopen(handle, "w") as out:
            json.dump(entries, out)
        os.replace(temp, path)
    except OSError:  # a read-only or full cache folder: the key stays right, only the next one is slower
        if temp is not None and os.path.exists(temp):
            os.unlink(temp)


def cache_key(manifest: pd.DataFrame, settings: CacheSettings, hash_memo: str | os.PathLike | None = None) -> str:
    """sha256 over the settings and every row's id, file contents (:func:`content_hash`) and regions.

    Paths and time stamps are not part of it: the same bytes give the same arrays. ``hash_memo`` (a JSON
    file; :meth:`ImageCache.build` uses ``<root>/content-hashes.json``) carries the file hashes from one
    process to the next. Raises :class:`CacheBuildError` listing every image or mask file that does not
    exist or cannot be read.
    """
    if hash_memo is not None:
        _load_hash_memo(Path(hash_memo))
    hashed: list[str] = []
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT_VERSION, "resample": RESAMPLE.name,
                              "settings": asdict(settings)}, sort_keys=True).encode())
    problems = []
    masks, boxes = _regions_of(manifest)
    for image_id, path, mask, box in zip(manifest["image_id"], manifest["path"], masks, boxes):
        record: list[Any] = [str(image_id)]
        for file, what in ((path, "image"), (mask, "mask")):
            if file is None:
                record.append(None)
                continue
            try:
                record.append(content_hash(str(file)))
                hashed.append(str(file))
            except FileNotFoundError:
                problems.append(f"{image_id!r}: {what} file not found: {file}")
            except OSError as err:
                problems.append(f"{image_id!r}: {what} file cannot be read ({type(err).__name__}: {err}): {file}")
        record.append(box)
        digest.update(json.dumps(record, sort_keys=True, default=_plain).encode())
        digest.update(b"\n")
    if problems:
        raise CacheBuildError(f"{len(problems)} file(s) of the manifest are missing or unreadable:\n  "
                              + "\n  ".join(problems[:50]))
    if hash_memo is not None:
        _save_hash_memo(Path(hash_memo), hashed)
    return digest.hexdigest()


def _regions_of(manifest: pd.DataFrame) -> tuple[list[str | None], list[list[dict] | None]]:
    """Each row's mask path and boxes, parsed the manifest's way (boxes may still be JSON text)."""
    n = len(manifest)
    masks = manifest["mask_path"] if "mask_path" in manifest.columns else [None] * n
    boxes = manifest["boxes"] if "boxes" in manifest.columns else [None] * n
    return [None if is_missing(m) else str(m) for m in masks], [boxes_or_none(b) for b in boxes]


def _write_cache(manifest: pd.DataFrame, settings: CacheSettings, key: str, folder: Path, progress: bool,
                 workers: int) -> None:
    n, size = len(manifest), settings.size
    started = time.perf_counter()
    images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
    regions = np.lib.format.open_memmap(folder / "regions.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
    has_region = np.zeros(n, dtype=bool)
    masks, boxes = _regions_of(manifest)
    jobs = [(row, str(path), mask, box, settings)
            for row, (path, mask, box) in enumerate(zip(manifest["path"], masks, boxes))]
    entries: list[dict[str, Any]] = [{} for _ in range(n)]
    failures: list[str] = []
    done = 0
    step = max(1, n // 10)
    for row, image, region, entry, error in _run(jobs, workers):
        done += 1
        if error is not None:
            failures.append(error)
        else:
            images[row] = image
            regions[row] = region
            has_region[row] = entry["region_source"] is not None
            entries[row] = entry
        if progress and (done % step == 0 or done == n):
            print(f"cache: {done}/{n} images decoded ({time.perf_counter() - started:.1f} s)", flush=True)
    if failures:
        raise CacheBuildError(f"{len(failures)} of {n} file(s) could not be decoded; nothing was cached:\n  "
                              + "\n  ".join(failures[:50])
                              + (f"\n  ... and {len(failures) - 50} more" if len(failures) > 50 else ""))
    images.flush()
    regions.flush()
    del images, regions
    np.save(folder / "has_region.npy", has_region)
    pd.DataFrame({"image_id": manifest["image_id"].astype(str).tolist()}).to_csv(folder / "index.csv", index=False)
    for entry, image_id in zip(entries, manifest["image_id"].astype(str)):
        entry["image_id"] = image_id
    meta = {"format": CACHE_FORMAT_VERSION, "key": key, "settings": asdict(settings), "n_images": n,
            "build_seconds": round(time.perf_counter() - started, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "images": entries}
    (folder / "meta.json").write_text(json.dumps(meta, default=_plain))


def _plain(value: Any) -> Any:
    """numpy scalars (e.g. box coordinates computed with numpy) as plain JSON numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in the cache's meta.json")


def _run(jobs: list[tuple], workers: int):
    if workers <= 1 or len(jobs) < MIN_IMAGES_FOR_POOL:
        yield from map(_prepare_one, jobs)
        return
    # fork starts workers in milliseconds; forkserver/spawn re-import the package in every worker
    # (about a second each), which cost more than it saved in our measurements. The workers use
    # only PIL and numpy, never torch, so forking a process that has run torch is safe here.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    chunksize = max(1, min(16, len(jobs) // (workers * 8)))
    with multiprocessing.get_context(method).Pool(workers) as pool:
        yield from pool.imap_unordered(_prepare_one, jobs, chunksize=chunksize)


def _prepare_one(job: tuple) -> tuple[int, np.ndarray | None, np.ndarray | None, dict | None, str | None]:
    """Decode, resize and place one image (and its region); errors come back as text, not exceptions."""
    row, path, mask_path, boxes, settings = job
    try:
        xray = read_xray(path)
        height, width = xray.pixels.shape
        geometry, (new_w, new_h) = geometry_for(width, height, settings)
        resized = Image.fromarray(xray.pixels.astype(np.float32)).resize((new_w, new_h), RESAMPLE)
        content = np.round(np.clip(np.asarray(resized), 0.0, 1.0) * 255.0).astype(np.uint8)
        image = np.zeros((settings.size, settings.size), dtype=np.uint8)
        px, py = int(geometry.pad_x), int(geometry.pad_y)
        image[py:py + new_h, px:px + new_w] = content
        region = np.zeros_like(image)
        source = None
        if mask_path is not None:
            mask = read_xray(mask_path).pixels
            if mask.shape != (height, width):
                return row, None, None, None, (f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                               f"{path} is {width}x{height}; masks must share the image's pixel grid")
            small = Image.fromarray((mask >= 0.5).astype(np.uint8)).resize((new_w, new_h), Image.Resampling.NEAREST)
            region[py:py + new_h, px:px + new_w] = np.asarray(small)
            source = "mask"
        elif boxes:
            region = rasterise_boxes(scale_boxes(boxes, geometry), settings.size)
            source = "boxes"
        entry = {"width": width, "height": height, **geometry._asdict(), "region_source": source,
                 "boxes": boxes or []}
        return row, image, region, entry, None
    except XrayReadError as err:
        return row, None, None, None, f"{err.path}: {err.reason}"
    except Exception as err:  # any other failure is reported with the file, never swallowed
        return row, None, None, None, f"{path}: {type(err).__name__}: {err}"
