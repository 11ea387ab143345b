"""The images every row works on: the real NIH ChestX-ray14 PNGs where osteolib finds them (its data-root setting:
``$OSTEOLIB_DATA_ROOT`` or ``../shared/data``, and the built-in data set's folder names), else synthetic chest
radiographs written to the suite's temporary folder at NIH's size (the rows then say so).

Training rows read the same files two ways: the plain reference decodes the PNGs every step; osteolib trains from
an :class:`~osteolib.data.ImageCache` of them at the working size, built once per suite in the temporary folder
before any timing (its build time is the ``cache`` row's subject, not the training rows').
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from osteolib.data import ImageCache, locate, read_manifest, write_chest_dataset


@dataclass(frozen=True)
class Sources:
    files: tuple[Path, ...]
    description: str
    real: bool


def nih_pngs() -> list[Path]:
    """The NIH PNGs under the real data root, sorted; empty where there is no such folder."""
    try:
        folder = locate("nih_cxr14")
    except FileNotFoundError:
        return []
    return sorted(folder.glob("images*/**/*.png"))


def source_images(count: int, scratch: Path, synthetic_size: int, workers: int) -> Sources:
    """``count`` PNG files: the first ``count`` NIH images, or synthetic chests when fewer real ones exist."""
    real = nih_pngs()
    if len(real) >= count:
        return Sources(tuple(real[:count]), f"NIH ChestX-ray14 PNGs ({real[0].parent})", True)
    folder = scratch / f"synthetic-chest-{count}-{synthetic_size}"
    if not folder.is_dir():
        print(f"bench: {len(real)} real NIH PNGs found, {count} needed; writing {count} synthetic "
              f"{synthetic_size}-px chest PNGs to {folder} ...", flush=True)
    manifest = read_manifest(write_chest_dataset(folder, n_images=count, size=synthetic_size, seed=0,
                                                 workers=workers) if not folder.is_dir() else folder / "manifest.csv")
    files = tuple(Path(p) for p in manifest["path"][:count])
    why = "no real NIH folder found" if not real else f"only {len(real)} real NIH PNGs"
    return Sources(files, f"synthetic {synthetic_size}-px chest PNGs ({why})", False)


def manifest_of(files: tuple[Path, ...] | list[Path]) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"{i:05d}" for i in range(len(files))], "path": [str(f) for f in files]})


def build_cache(files: tuple[Path, ...], size: int, root: Path, workers: int) -> tuple[ImageCache, list[str]]:
    """An ImageCache of ``files`` at ``size`` px under ``root`` and its image ids, in file order."""
    manifest = manifest_of(files)
    cache = ImageCache.build(manifest, size, root=root, progress=False, workers=workers)
    return cache, manifest["image_id"].tolist()
