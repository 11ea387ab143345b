"""Named data sets: one call from a profile's data-set name to a manifest.

``load_dataset("nih_cxr14", data_root)`` finds the NIH subset under the real-data root; ``load_dataset(
"synthetic_shoulder", n_patients=200)`` generates (or reuses) the project's own synthetic X-rays. Pools for the
chest pretraining stage are lists of names (``load_pool(["kermany", "hannover"], data_root)``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from osteolib.data import manifest as mf
from osteolib.data import synthetic
from osteolib.paths import require_real_data_root

# folder names of the real data sets under the data root (the layout of ../shared/data)
REAL_FOLDERS = {
    "nih_cxr14": ("nih-cxr14-subset", "nih-cxr14", "ChestX-ray14"),
    "kermany": ("kermany-pediatric-cxr", "kermany", "chest_xray"),
    "hannover": ("hannover-covid-cxr", "hannover"),
}
SYNTHETIC = {"synthetic_shoulder": "shoulder", "synthetic_chest": "chest"}


def _real_builder(name: str) -> Callable[..., pd.DataFrame]:
    return {"nih_cxr14": mf.nih_cxr14, "kermany": mf.kermany, "hannover": mf.hannover}[name]


def known_datasets() -> list[str]:
    return sorted([*REAL_FOLDERS, *SYNTHETIC])


def locate(name: str, data_root: str | os.PathLike | None = None) -> Path:
    """The folder of a real data set under the data root (or the data root itself if it is that folder)."""
    root = require_real_data_root(data_root)
    for folder in REAL_FOLDERS[name]:
        if (root / folder).is_dir():
            return root / folder
    if root.name in REAL_FOLDERS[name]:
        return root
    raise FileNotFoundError(f"data set {name!r} not found under {root}: expected one of the folders "
                            f"{list(REAL_FOLDERS[name])}")


def load_dataset(name: str, data_root: str | os.PathLike | None = None, **options: Any) -> pd.DataFrame:
    """A manifest for a named data set. Synthetic sets take the generator's parameters as options."""
    if name in SYNTHETIC:
        manifest_csv = synthetic.ensure_synthetic(SYNTHETIC[name], **options)
        return mf.read_manifest(manifest_csv)
    if name in REAL_FOLDERS:
        return _real_builder(name)(locate(name, data_root), **options)
    raise ValueError(f"unknown data set {name!r}: known data sets are {known_datasets()}")


def load_pool(names: Sequence[str], data_root: str | os.PathLike | None = None,
              options: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    """Several data sets as one manifest (e.g. the chest pretraining pool)."""
    if isinstance(names, str):
        names = [names]
    options = options or {}
    return mf.concat_manifests(*(load_dataset(n, data_root, **options.get(n, {})) for n in names))
