"""Row 5: building the image cache (decode + resize) of NIH PNGs vs a plain PIL loop.

Both sides read files already in the operating system's page cache (every file is read once before either side is
timed), so the row compares decoding and resizing, not the disk. The osteolib side starts cold: a fresh cache root
in the suite's temporary folder and the process's remembered file hashes forgotten, so it hashes, decodes and
writes every image as a first build does; it uses as many worker processes as the suite's threads.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from osteolib.data import ImageCache, forget_content_hashes

from bench.data import manifest_of
from bench.goals import goal
from bench.plan import Plan
from bench.reference.decode import decode_and_resize
from bench.timing import timed

FULL_IMAGES = 1000


def _read_all(files) -> int:
    return sum(len(Path(f).read_bytes()) for f in files)


def plans(ctx) -> list[Plan]:
    settings = ctx.settings
    sources = ctx.sources(settings.images_for(FULL_IMAGES))
    files, size = list(sources.files), settings.image_size
    megabytes = _read_all(files) / 2**20  # into the page cache, for both sides alike

    def ours():
        forget_content_hashes()
        root = Path(tempfile.mkdtemp(prefix="cache-row-", dir=ctx.scratch))
        return timed(lambda: ImageCache.build(manifest_of(files), size, root=root, progress=False,
                                              workers=ctx.threads), len(files), ctx.device,
                     path="osteolib.data.ImageCache.build", workers=ctx.threads, includes="sha256 of every file, "
                     "decode, letterbox resize, region rasterising, memory-mapped arrays written")

    def theirs():
        return timed(lambda: decode_and_resize(files, size), len(files), ctx.device,
                     path="bench.reference.decode.decode_and_resize", workers=1)

    return [Plan("cache", f"cache build: {len(files)} PNGs -> {size} px", "images/s", ours, theirs,
                 settings={"images": len(files), "image_size": size, "files_megabytes": round(megabytes, 1),
                           "images_from": sources.description, "real_data": sources.real,
                           "page_cache": "every file read once before both sides"},
                 goal=goal("cache", ctx.tier))]
