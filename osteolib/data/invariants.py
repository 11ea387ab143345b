"""The run's data invariants, checked wherever a stage reads the run's manifest, not only in notebook 00.

A manifest edited by hand, a split file copied from another run, or files replaced after the audit would
otherwise reach fine-tuning and be scored as if nothing happened. :func:`check_split_data` asserts what the audit
established, cheaply enough to run in every notebook (file contents are hashed once per process and
remembered while the file is unchanged; see :func:`osteolib.data.cache.content_hash`):

* no patient in two splits, and no byte-identical image in two splits (:func:`osteolib.data.splits.check_no_leakage`);
* no byte-identical images with different labels (an annotation error the audit reports);
* every split holds images, and the training split holds every class.

:func:`read_split_manifest` is how notebooks 02-06 read ``data/manifest.csv``.
"""
from __future__ import annotations

import os
from typing import Mapping

import pandas as pd

from osteolib.data.manifest import SPLITS, read_manifest
from osteolib.data.splits import LeakageError, SplitError, check_no_leakage, file_hashes, label_conflicts

__all__ = ["check_split_data", "read_split_manifest"]


def check_split_data(df: pd.DataFrame, hashes: Mapping[str, str] | None = None, where: str = "the manifest"
                     ) -> pd.DataFrame:
    """Raise naming ``where`` and the images when an invariant fails; return images per split x class."""
    if hashes is None:
        hashes = file_hashes(df["path"])
    try:
        check_no_leakage(df, hashes=hashes)
    except (LeakageError, SplitError) as err:
        raise type(err)(f"{where}: {err}\nWhat to do: rerun notebook 00 (the audit makes the split) rather than "
                        "editing the manifest or the split by hand.") from err
    conflicts = label_conflicts(df, hashes=hashes)
    if len(conflicts):
        shown = "; ".join(f"{r.image_ids} labelled {r.labels}" for r in conflicts.head(10).itertuples())
        raise LeakageError(f"{where}: {len(conflicts)} image file(s) appear under two labels: {shown}. What to do: "
                           "correct the labels at the source and rerun notebook 00.")
    counts = df.groupby(["split", "label"]).size().unstack(fill_value=0)
    empty = [s for s in SPLITS if s not in counts.index]
    if empty:
        raise SplitError(f"{where}: split(s) {empty} hold no image. What to do: rerun notebook 00 with split "
                         "ratios that give every split images.")
    untrained = [c for c in counts.columns if counts.loc["train", c] == 0]
    if untrained:
        raise SplitError(f"{where}: class(es) {untrained} have no training image. What to do: rerun notebook 00 "
                         "(its split is stratified by class) or drop the class with label_map.")
    return counts


def read_split_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """A run's split manifest (``data/manifest.csv``), read and checked by :func:`check_split_data`."""
    manifest = read_manifest(path)
    check_split_data(manifest, where=str(path))
    return manifest
