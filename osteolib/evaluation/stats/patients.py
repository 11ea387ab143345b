"""Predictions per patient: a patient's images' probabilities averaged into one row.

Tests that assume independent cases (DeLong, McNemar, Wilson) are valid on a test set with several images per
patient only once each patient is one case. :func:`patient_predictions` turns a prediction table (one row per
run and image, with a ``patient_id`` column, e.g. joined from the run's manifest by :func:`with_patients`) into
one of the same shape with one row per run and patient: ``image_id`` becomes the patient id, every
``prob_<class>`` is the mean over the patient's images (rows still sum to 1), and ``n_images`` counts them.
Every other table function of this package then works on it unchanged.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from osteolib.evaluation.stats.views import PROB_PREFIX, require_columns

PATIENT_COLUMN = "patient_id"
# columns that identify a run (and the split and threshold, which are constant within a run's split)
_KEEP = ("split", "scenario", "backbone", "seed", "fold", "label_fraction", "threshold")


def with_patients(predictions_df: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """The prediction table with the manifest's ``patient_id`` of each image (a table that has one is kept)."""
    if PATIENT_COLUMN in predictions_df.columns:
        return predictions_df
    require_columns(manifest, ["image_id", PATIENT_COLUMN], "manifest")
    ids = manifest[["image_id", PATIENT_COLUMN]].astype(str).drop_duplicates("image_id")
    joined = predictions_df.merge(ids, on="image_id", how="left", validate="m:1")
    missing = joined[PATIENT_COLUMN].isna()
    if missing.any():
        raise ValueError(f"{int(missing.sum())} prediction row(s) have no image in the manifest (e.g. image_id "
                         f"{joined.loc[missing, 'image_id'].tolist()[:5]}); use the manifest the run was trained on")
    return joined


def images_per_patient(predictions_df: pd.DataFrame, keys: Sequence[str] = ("scenario", "backbone", "seed")) -> int:
    """The largest number of images any patient has within one run's split (1: one image per patient)."""
    require_columns(predictions_df, [PATIENT_COLUMN], "prediction table")
    by = [c for c in (*keys, "split") if c in predictions_df.columns] + [PATIENT_COLUMN]
    return int(predictions_df.groupby(by, dropna=False).size().max())


def patient_predictions(predictions_df: pd.DataFrame) -> pd.DataFrame:
    """One row per run, split and patient: probabilities averaged over the patient's images.

    A patient whose images carry different labels (a follow-up film after the finding changed, as in NIH
    ChestX-ray14) is one case per label: the images of each label are averaged separately, the case's id is
    ``"<patient> (<label>)"`` and ``several_labels`` marks it, so no image is dropped and no label is averaged away.
    """
    require_columns(predictions_df, ["image_id", "label", "target", PATIENT_COLUMN], "prediction table")
    probs = [c for c in predictions_df.columns if str(c).startswith(PROB_PREFIX)]
    keys = [c for c in _KEEP if c in predictions_df.columns]
    by = keys + [PATIENT_COLUMN]
    df = predictions_df.assign(**{PATIENT_COLUMN: predictions_df[PATIENT_COLUMN].astype(str)})
    several = df.groupby(by, dropna=False, sort=False)["label"].transform("nunique") > 1
    df = df.assign(several_labels=several.to_numpy(),
                   case=df[PATIENT_COLUMN].where(~several, df[PATIENT_COLUMN] + " (" + df["label"].astype(str) + ")"))
    grouped = df.groupby(keys + ["case"], dropna=False, sort=False)
    out = grouped[probs].mean()
    out.insert(0, "several_labels", grouped["several_labels"].first())
    out.insert(0, "n_images", grouped.size())
    out.insert(0, "target", grouped["target"].first())
    out.insert(0, "label", grouped["label"].first())
    out.insert(0, PATIENT_COLUMN, grouped[PATIENT_COLUMN].first())
    out = out.reset_index()
    out.insert(0, "image_id", out.pop("case"))
    return out
