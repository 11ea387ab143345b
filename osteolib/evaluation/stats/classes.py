"""Several classes: per-class one-vs-rest AUCs and their macro mean with intervals, and the confusion counts.

Per class, the one-vs-rest AUC gets a DeLong CI when every patient has one image (valid there, and the interval
the binary tables use) and a patient cluster bootstrap CI otherwise. The macro AUC (the plain mean of the per-class
AUCs, as scikit-learn's ``multi_class="ovr"``) has no DeLong formula: its interval is always a percentile
bootstrap, over patients when a ``patient_id`` column is given (each image its own patient otherwise).

A class with fewer than two test images (or a rest with fewer than two), or too few patients for the bootstrap,
keeps its AUC without an interval (NaN bounds, ``ci_method`` says why): a rare class in a small test split should
not stop the notebook after the training.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from osteolib.evaluation.stats.clusters import cluster_bootstrap_ci, one_per_cluster
from osteolib.evaluation.stats.delong import delong_auc, rank_auc
from osteolib.evaluation.stats.patients import PATIENT_COLUMN
from osteolib.evaluation.stats.views import PROB_PREFIX, RUN_KEYS, require_columns, select_split

MACRO = "macro"


def _class_names(df: pd.DataFrame) -> list[str]:
    return [str(c)[len(PROB_PREFIX):] for c in df.columns if str(c).startswith(PROB_PREFIX)]


def _macro_auc(targets: np.ndarray, probs: np.ndarray) -> float:
    present = np.unique(targets)
    if present.size < 2:
        return float("nan")
    return float(np.mean([rank_auc(targets == k, probs[:, k]) for k in present]))


def _no_interval(estimate: float, why: str) -> dict[str, Any]:
    return {"auc": estimate, "auc_ci_low": math.nan, "auc_ci_high": math.nan, "ci_method": f"none: {why}"}


def _one_class(y: np.ndarray, score: np.ndarray, patients: np.ndarray, alpha: float, n_boot: int,
               seed: int) -> dict[str, Any]:
    n_class, n_rest = int(y.sum()), int(y.size - y.sum())
    if n_class < 2 or n_rest < 2:
        # a rare class in a small test split: the AUC (if defined) without an interval, rather than no table
        return _no_interval(rank_auc(y, score), f"{n_class} image(s) of the class and {n_rest} of the rest; an "
                                                "interval needs at least 2 of each")
    if one_per_cluster(patients):
        result = delong_auc(y, score, alpha=alpha)
        return {"auc": result.auc, "auc_ci_low": result.ci_low, "auc_ci_high": result.ci_high, "ci_method": "DeLong"}
    try:
        result = cluster_bootstrap_ci(rank_auc, patients, y, score, n_boot=n_boot, seed=seed, alpha=alpha)
    except ValueError as err:  # too few patients of the class for the resamples to define the AUC
        return _no_interval(rank_auc(y, score), str(err))
    return {"auc": result.estimate, "auc_ci_low": result.ci_low, "auc_ci_high": result.ci_high,
            "ci_method": "patient cluster bootstrap"}


def class_auc_table(predictions_df: pd.DataFrame, split: str | None = "test", alpha: float = 0.05,
                    n_boot: int = 2000, seed: int = 0, run_keys: Sequence[str] = RUN_KEYS) -> pd.DataFrame:
    """One row per run and class (one-vs-rest AUC with CI, n, sensitivity) plus a ``macro`` row per run.

    Patients come from a ``patient_id`` column when the table has one (each image its own patient otherwise).
    """
    require_columns(predictions_df, ["image_id", "target", *run_keys], "prediction table")
    df = select_split(predictions_df, split)
    classes = _class_names(df)
    rows = []
    for values, run in df.groupby(list(run_keys), sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        ident = dict(zip(run_keys, values))
        targets = run["target"].to_numpy(dtype=np.int64)
        probs = run[[PROB_PREFIX + c for c in classes]].to_numpy(dtype=np.float64)
        patients = (run[PATIENT_COLUMN] if PATIENT_COLUMN in run.columns else run["image_id"]).astype(str).to_numpy()
        predicted = probs.argmax(axis=1)
        for k, name in enumerate(classes):
            y = (targets == k).astype(int)
            row = {**ident, "class": name, "n": int(y.size), "n_class": int(y.sum()),
                   "n_patients": int(np.unique(patients).size),
                   "sensitivity": float(np.mean(predicted[y == 1] == k)) if y.any() else float("nan")}
            rows.append({**row, **_one_class(y, probs[:, k], patients, alpha, n_boot, seed)})
        # the statistic gets row positions, so that a resample takes whole probability rows
        try:
            macro = cluster_bootstrap_ci(lambda t, i: _macro_auc(t, probs[i]), patients, targets,
                                         np.arange(targets.size), n_boot=n_boot, seed=seed, alpha=alpha)
            interval = {"auc": macro.estimate, "auc_ci_low": macro.ci_low, "auc_ci_high": macro.ci_high,
                        "ci_method": "patient cluster bootstrap" if not one_per_cluster(patients) else "bootstrap"}
        except ValueError as err:  # one class only, or too few patients for the resamples
            interval = _no_interval(_macro_auc(targets, probs), str(err))
        rows.append({**ident, "class": MACRO, "n": int(targets.size), "n_class": int(targets.size),
                     "n_patients": int(np.unique(patients).size),
                     "sensitivity": float(np.mean([r["sensitivity"] for r in rows[-len(classes):]])), **interval})
    return pd.DataFrame(rows)


def confusion_table(predictions_df: pd.DataFrame, split: str | None = "test",
                    run_keys: Sequence[str] = RUN_KEYS) -> pd.DataFrame:
    """Confusion counts of the most probable class, one row per run and true class, one column per predicted
    class (``predicted_<class>``)."""
    require_columns(predictions_df, ["target", *run_keys], "prediction table")
    df = select_split(predictions_df, split)
    classes = _class_names(df)
    rows = []
    for values, run in df.groupby(list(run_keys), sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        targets = run["target"].to_numpy(dtype=np.int64)
        predicted = run[[PROB_PREFIX + c for c in classes]].to_numpy(dtype=np.float64).argmax(axis=1)
        for k, name in enumerate(classes):
            counts = np.bincount(predicted[targets == k], minlength=len(classes))
            rows.append({**dict(zip(run_keys, values)), "true": name,
                         **{f"predicted_{c}": int(n) for c, n in zip(classes, counts)}})
    return pd.DataFrame(rows)
