"""Per-run results that respect patients: intervals over patients, and patient-level (averaged) results.

:func:`patient_auc_table` gives, per run, the image-level AUC and accuracy with intervals that resample patients
(DeLong and Wilson when every patient has one image, where they are valid; the patient cluster bootstrap otherwise),
and the patient-level AUC and accuracy (probabilities averaged per patient; DeLong and Wilson on patients).
:func:`compare_patients` runs the paired tests of :func:`compare_scenarios` on the patient-level table, which is what
DeLong and McNemar need when a patient has several images.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from osteolib.evaluation.stats.clusters import cluster_bootstrap_ci, one_per_cluster
from osteolib.evaluation.stats.comparisons import auc_table, compare_scenarios
from osteolib.evaluation.stats.delong import delong_auc, rank_auc
from osteolib.evaluation.stats.intervals import wilson_ci
from osteolib.evaluation.stats.patients import PATIENT_COLUMN, patient_predictions
from osteolib.evaluation.stats.views import RUN_KEYS, require_columns, run_label, run_view, select_split


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def _image_level(view: Any, patients: np.ndarray, alpha: float, n_boot: int, seed: int) -> dict[str, Any]:
    """Image-level AUC and accuracy with intervals over patients (DeLong/Wilson when one image each)."""
    y, score, correct = view.y.to_numpy(), view.score.to_numpy(), view.correct.to_numpy().astype(float)
    if one_per_cluster(patients):
        auc = delong_auc(y, score, alpha=alpha)
        acc_low, acc_high = wilson_ci(int(correct.sum()), correct.size, alpha)
        return {"auc": auc.auc, "auc_ci_low": auc.ci_low, "auc_ci_high": auc.ci_high,
                "accuracy": _mean(correct), "accuracy_ci_low": acc_low, "accuracy_ci_high": acc_high,
                "image_ci_method": "DeLong / Wilson (one image per patient)"}
    auc = cluster_bootstrap_ci(rank_auc, patients, y, score, n_boot=n_boot, seed=seed, alpha=alpha)
    acc = cluster_bootstrap_ci(_mean, patients, correct, n_boot=n_boot, seed=seed, alpha=alpha)
    return {"auc": auc.estimate, "auc_ci_low": auc.ci_low, "auc_ci_high": auc.ci_high,
            "accuracy": acc.estimate, "accuracy_ci_low": acc.ci_low, "accuracy_ci_high": acc.ci_high,
            "image_ci_method": f"patient cluster bootstrap ({auc.n_defined} of {n_boot} resamples defined)"}


def patient_auc_table(predictions_df: pd.DataFrame, split: str | None = "test", positive: str | None = None,
                      alpha: float = 0.05, n_boot: int = 2000, seed: int = 0,
                      run_keys: Sequence[str] = RUN_KEYS) -> pd.DataFrame:
    """One row per run: images and patients, image-level AUC/accuracy with patient-resampling intervals, and
    patient-level AUC (DeLong CI) and accuracy (Wilson CI) of the probabilities averaged per patient.

    ``predictions_df`` needs a ``patient_id`` column (:func:`with_patients`). ``positive`` names the class whose
    one-vs-rest AUC is reported (required with more than two classes); accuracy is at the run's ``threshold``
    (binary) or of the most probable class.
    """
    require_columns(predictions_df, ["image_id", "label", "target", PATIENT_COLUMN, *run_keys], "prediction table")
    df = select_split(predictions_df, split)
    per_patient = auc_table(patient_predictions(df), split=None, positive=positive, alpha=alpha, run_keys=run_keys)
    rows = []
    for (values, run), (_, patient_row) in zip(df.groupby(list(run_keys), sort=True, dropna=False),
                                               per_patient.iterrows()):
        values = values if isinstance(values, tuple) else (values,)
        view = run_view(run, positive, run_label(run_keys, values))
        patients = run.set_index(run["image_id"].astype(str)).loc[view.y.index, PATIENT_COLUMN].astype(str).to_numpy()
        counts = pd.Series(patients).value_counts()
        rows.append({**dict(zip(run_keys, values)), "n_images": int(patients.size), "n_patients": int(counts.size),
                     "max_images_per_patient": int(counts.max()), "positive": view.positive,
                     **_image_level(view, patients, alpha, n_boot, seed),
                     "patient_auc": patient_row["auc"], "patient_auc_ci_low": patient_row["auc_ci_low"],
                     "patient_auc_ci_high": patient_row["auc_ci_high"], "patient_accuracy": patient_row["accuracy"],
                     "patient_accuracy_ci_low": patient_row["accuracy_ci_low"],
                     "patient_accuracy_ci_high": patient_row["accuracy_ci_high"],
                     # several classes: the most probable class is the prediction, no threshold (NaN)
                     "threshold": view.threshold})
    return pd.DataFrame(rows)


def compare_patients(predictions_df: pd.DataFrame, reference: str = "random", alpha: float = 0.05,
                     positive: str | None = None, **kwargs: Any) -> pd.DataFrame:
    """:func:`compare_scenarios` (paired DeLong and McNemar, Holm) on patients: each patient's probabilities
    averaged over its images first, so every test counts a patient once. ``n`` counts patients."""
    require_columns(predictions_df, [PATIENT_COLUMN], "prediction table")
    split = kwargs.pop("split", "test")
    patients = patient_predictions(select_split(predictions_df, split))
    return compare_scenarios(patients, reference=reference, alpha=alpha, positive=positive, split=None, **kwargs)
