"""The external test set: a second data set that no stage trains or selects on, scored once after selection.

Notebook 00's ``external_test`` names it: a built-in name (``"kermany"``), a data-set spec of one's own
(``{"kind": "folder", ...}``), or ``{"dataset": <name or spec>, "label_map": {...}, "options": {...},
"fraction": 0.5}``. Its labels must map onto the target's classes. With ``fraction`` < 1 a seeded, label-stratified
share of its *patients* is taken (the rest stays usable elsewhere, e.g. in the chest pretraining pool); notebook 01
then drops every image of the external set, and every other image of its patients, from its pool
(:func:`exclude_external`), so no external image is seen by any stage before the final evaluation.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from osteolib.data.manifest import ManifestError
from osteolib.runs import Run

__all__ = ["EXTERNAL_KEYS", "EXTERNAL_MANIFEST", "external_spec", "build_external_set", "read_external_set",
           "exclude_external"]

EXTERNAL_KEYS = ("dataset", "label_map", "options", "fraction")
WHERE = "external_test"
EXTERNAL_MANIFEST = "data/external_manifest.csv"  # in the run folder, written by notebook 00


def external_spec(value: Any) -> dict[str, Any]:
    """``external_test`` in its long form ``{"dataset", "label_map", "options", "fraction"}``; a clear error for
    anything else."""
    if isinstance(value, str) or (isinstance(value, dict) and "kind" in value):
        value = {"dataset": value}
    if not isinstance(value, dict) or "dataset" not in value:
        raise ValueError(f"{WHERE} must be a data-set name, a data-set spec with 'kind', or a mapping with "
                         f"'dataset' (and optionally {list(EXTERNAL_KEYS[1:])}); got {value!r}")
    unknown = sorted(set(value) - set(EXTERNAL_KEYS))
    if unknown:
        raise ValueError(f"{WHERE}: unknown key(s) {unknown}; known: {list(EXTERNAL_KEYS)}")
    fraction = value.get("fraction", 1.0)
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ValueError(f"{WHERE}.fraction must be a number in (0, 1] (the share of its patients used); "
                         f"got {fraction!r}")
    options = value.get("options") or {}
    if not isinstance(options, dict):
        raise ValueError(f"{WHERE}.options must be a mapping of builder options; got {options!r}")
    return {"dataset": value["dataset"], "label_map": value.get("label_map"), "options": options,
            "fraction": float(fraction)}


def build_external_set(value: Any, data_root: str | os.PathLike | None, classes: list[str], target: pd.DataFrame,
                       seed: int = 0, target_hashes: dict[str, str] | None = None) -> pd.DataFrame:
    """The external test set's manifest (no ``split``), checked against the target data.

    Refused: a label that is not one of ``classes`` after the label map (name it in ``label_map``, or map it to
    ``"drop"``); a set without both a positive and a negative image (no AUC); a file byte-identical to a target
    image; a patient id shared with the target data of the same source. ``attrs["chosen_from"]`` holds the
    images and patients before the ``fraction`` was taken.
    """
    from osteolib.data import sources, splits

    spec = external_spec(value)
    manifest = sources.load_dataset(spec["dataset"], data_root, label_map=spec["label_map"], **spec["options"])
    name = spec["dataset"] if isinstance(spec["dataset"], str) else spec["dataset"].get("kind", "spec")
    unknown = sorted(set(manifest["label"].astype(str)) - set(classes))
    if unknown:
        counts = manifest["label"].value_counts()
        raise ManifestError(f"{WHERE} ({name}): label(s) {unknown} ({', '.join(f'{k}: {counts[k]}' for k in unknown)} "
                            f"images) are not target classes {classes}; map them in {WHERE}'s label_map, e.g. "
                            f"{{{unknown[0]!r}: {classes[-1]!r}}} or {{{unknown[0]!r}: 'drop'}}")
    absent = [c for c in (classes[0], classes[-1]) if c not in set(manifest["label"])]
    if absent:
        raise ManifestError(f"{WHERE} ({name}): no image of class(es) {absent}, so no AUC can be computed on it; "
                            f"check its label_map")
    shared = sorted(set(zip(manifest["source"], manifest["patient_id"].astype(str)))
                    & set(zip(target["source"], target["patient_id"].astype(str))))
    if shared:
        raise ManifestError(f"{WHERE} ({name}): {len(shared)} patient(s) are in the target data too (e.g. "
                            f"{shared[:3]}); an external test set must hold other patients")
    hashes = splits.file_hashes(manifest["path"])
    target_hashes = target_hashes if target_hashes is not None else splits.file_hashes(target["path"])
    same = sorted(set(hashes.values()) & set(target_hashes.values()))
    if same:
        paths = [p for p, h in hashes.items() if h in set(same)]
        raise ManifestError(f"{WHERE} ({name}): {len(paths)} file(s) are byte-identical to target images "
                            f"(e.g. {paths[:3]}); an external test set must be other images")
    chosen_from = {"images": int(len(manifest)), "patients": int(manifest["patient_id"].nunique())}
    if spec["fraction"] < 1:
        halves = splits.patient_split(manifest.drop(columns="split", errors="ignore"),
                                      ratios=[spec["fraction"], 1 - spec["fraction"], 0.0], seed=seed,
                                      keep_existing=False, hashes=hashes)
        manifest = manifest[(halves["split"] == "train").to_numpy()]
    out = manifest.assign(split="").reset_index(drop=True)
    out.attrs.update(manifest.attrs, chosen_from=chosen_from, fraction=spec["fraction"], seed=int(seed),
                     dataset=name)
    return out


def read_external_set(run: Run) -> pd.DataFrame | None:
    """The external test set notebook 00 wrote into ``run`` (or a parent; its files checked), or None when the run
    has none."""
    from osteolib.data.manifest import read_manifest

    path = run.find_optional(EXTERNAL_MANIFEST)
    return None if path is None else read_manifest(path)


def exclude_external(pool: pd.DataFrame, external: pd.DataFrame | None) -> tuple[pd.DataFrame, int]:
    """The pool without the external test images and without any other image of their patients (same source);
    returns it and how many images were dropped."""
    if external is None or external.empty:
        return pool, 0
    paths = {os.path.realpath(p) for p in external["path"]}
    patients = set(zip(external["source"].astype(str), external["patient_id"].astype(str)))
    drop = np.array([os.path.realpath(p) in paths or (str(s), str(q)) in patients
                     for p, s, q in zip(pool["path"], pool["source"], pool["patient_id"])], dtype=bool)
    kept = pool[~drop].reset_index(drop=True)
    kept.attrs.update(pool.attrs)
    return kept, int(drop.sum())
