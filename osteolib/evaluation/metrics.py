"""Metrics of a classifier from its saved predictions (scikit-learn metrics), per run and split.

Conventions
-----------
* Binary: predicted positive when ``p >= threshold`` (the convention of sklearn's ``roc_curve``, so a
  threshold read from the ROC curve reproduces that curve's point exactly).
* Undefined ratios (e.g. PPV when nothing is predicted positive) are NaN, never 0.
* Single-class splits make AUC undefined and are refused with an error, not reported as NaN.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from osteolib.evaluation.calibration import expected_calibration_error
from osteolib.evaluation.checks import binary_inputs, multiclass_inputs
from osteolib.evaluation.predictions import (
    SPLITS,
    PredictionError,
    class_names,
    plain_scalar,
    prob_columns,
    run_columns,
    validate_predictions,
)
from osteolib.evaluation.selection import choose_threshold

# Metrics of a binary evaluation that change with the threshold (reported twice: chosen threshold and 0.5).
THRESHOLD_DEPENDENT = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv",
                       "confusion_matrix")


def binary_metrics(y_true: Any, p_pos: Any, threshold: float) -> dict[str, Any]:
    """Metrics of a binary classifier at ``threshold`` (positive when ``p_pos >= threshold``).

    Returns accuracy, balanced_accuracy, sensitivity (recall of class 1), specificity (recall of class 0),
    ppv (precision of class 1), npv (precision of class 0), auc, confusion_matrix [[TN, FP], [FN, TP]],
    threshold, n and n_pos. Undefined ratios are NaN. Both classes must be present.
    """
    y, p = binary_inputs(y_true, p_pos)
    if not (isinstance(threshold, (int, float, np.floating)) and 0.0 <= float(threshold) <= 1.0):
        raise PredictionError(f"threshold must be a number in [0, 1]; got {threshold!r}")
    y_pred = (p >= threshold).astype(np.int64)
    return {
        "accuracy": float(accuracy_score(y, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, y_pred)),
        "sensitivity": float(recall_score(y, y_pred, pos_label=1, zero_division=np.nan)),
        "specificity": float(recall_score(y, y_pred, pos_label=0, zero_division=np.nan)),
        "ppv": float(precision_score(y, y_pred, pos_label=1, zero_division=np.nan)),
        "npv": float(precision_score(y, y_pred, pos_label=0, zero_division=np.nan)),
        "auc": float(roc_auc_score(y, p)),
        "confusion_matrix": confusion_matrix(y, y_pred, labels=[0, 1]).tolist(),
        "threshold": float(threshold),
        "n": int(len(y)),
        "n_pos": int(y.sum()),
    }


def multiclass_metrics(y_true: Any, probs: Any, classes: Sequence[str]) -> dict[str, Any]:
    """Metrics of a multi-class classifier (prediction = most probable class).

    Returns accuracy, balanced_accuracy, auc (macro one-vs-rest), per_class {class: {n, sensitivity,
    specificity, auc}}, confusion_matrix (rows = true class, in ``classes`` order), n. A class absent from
    ``y_true`` has NaN AUC and sensitivity; the macro AUC then averages the classes present, with a warning.
    """
    classes = [str(c) for c in classes]
    y, p = multiclass_inputs(y_true, probs, len(classes))
    labels = list(range(len(classes)))
    y_pred = p.argmax(axis=1)
    present = np.bincount(y, minlength=len(classes)) > 0
    if present.sum() < 2:
        raise PredictionError(f"AUC undefined: y_true holds only class {classes[int(y[0])]!r} ({len(y)} rows)")
    per_class: dict[str, dict[str, float]] = {}
    for k, name in enumerate(classes):
        # One-vs-rest: class k is "1", every other class "0"; specificity is the recall of the rest.
        is_k, called_k = (y == k).astype(np.int64), (y_pred == k).astype(np.int64)
        per_class[name] = {
            "n": int(is_k.sum()),
            "sensitivity": float(recall_score(is_k, called_k, labels=[0, 1], pos_label=1, zero_division=np.nan)),
            "specificity": float(recall_score(is_k, called_k, labels=[0, 1], pos_label=0, zero_division=np.nan)),
            "auc": float(roc_auc_score(is_k, p[:, k])) if present[k] else math.nan,
        }
    # Macro one-vs-rest AUC is the plain mean of the per-class AUCs, exactly what sklearn's
    # roc_auc_score(multi_class="ovr", average="macro") computes; averaging them here needs no second pass and
    # no exact row-sum check (sklearn's tolerance is ~1e-8, softmax outputs saved as float32 are not that exact).
    if not present.all():
        absent = [c for c, here in zip(classes, present) if not here]
        warnings.warn(f"class(es) {absent} absent from y_true: their AUC is undefined; the macro AUC averages the "
                      f"{int(present.sum())} classes present and balanced accuracy ignores the absent ones",
                      stacklevel=2)
    macro_auc = float(np.mean([per_class[c]["auc"] for c, here in zip(classes, present) if here]))
    with warnings.catch_warnings():
        # sklearn warns when a predicted class is absent from y_true; the warning above already says so.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(y, y_pred))
    return {
        "accuracy": float(accuracy_score(y, y_pred)),
        "balanced_accuracy": balanced,
        "auc": macro_auc,
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y, y_pred, labels=labels).tolist(),
        "n": int(len(y)),
        "n_classes_present": int(present.sum()),
    }


def roc_table(y_true: Any, p_pos: Any) -> pd.DataFrame:
    """The ROC curve as a table (fpr, tpr, threshold), from sklearn's ``roc_curve``."""
    y, p = binary_inputs(y_true, p_pos)
    fpr, tpr, thresholds = roc_curve(y, p)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thresholds})


def evaluate(df: pd.DataFrame, threshold: float | None = None) -> dict[str, Any]:
    """Metrics of ONE run's ONE split of a prediction table, dispatching on the number of classes.

    Binary: metrics at ``threshold`` (chosen beforehand on this run's validation rows with
    :func:`choose_threshold`; 0.5 when None) plus the threshold-dependent ones again at 0.5 (keys suffixed
    ``_at_0.5``), and ECE. Multi-class: :func:`multiclass_metrics` plus top-label ECE; ``threshold`` must be
    None. For a table of many runs use :func:`evaluate_runs`.
    """
    validate_predictions(df)
    keys = run_columns(df) + ["split"]
    groups = df[keys].drop_duplicates()
    if len(groups) != 1:
        raise PredictionError(f"evaluate() takes the rows of one run and one split; this table holds {len(groups)} "
                              f"run/split combinations: use evaluate_runs(df)")
    classes = class_names(df)
    y = df["target"].to_numpy(dtype=np.int64)
    probs = df[prob_columns(classes)].to_numpy(dtype=np.float64)
    out: dict[str, Any] = {k: plain_scalar(v) for k, v in groups.iloc[0].items()}
    out.update(classes=classes, n_classes=len(classes))
    if len(classes) == 2:
        p = probs[:, 1]
        chosen = binary_metrics(y, p, 0.5 if threshold is None else threshold)
        at_half = binary_metrics(y, p, 0.5)
        out.update(positive_class=classes[1], threshold_source="default 0.5" if threshold is None else "given")
        out.update(chosen)
        out.update({f"{k}_at_0.5": at_half[k] for k in THRESHOLD_DEPENDENT})
        out["ece"] = expected_calibration_error(y, p)
        return out
    if threshold is not None:
        raise PredictionError(f"a threshold applies to binary problems only; this table has {len(classes)} classes "
                              f"{classes} (prediction = most probable class)")
    metrics = multiclass_metrics(y, probs, classes)
    out.update(metrics)
    out["ece"] = expected_calibration_error(y, probs)
    return out


def evaluate_runs(df: pd.DataFrame, threshold_method: str | None = "youden") -> pd.DataFrame:
    """One row of metrics per run and split of a (concatenated) prediction table.

    Binary problems: each run's threshold is chosen with ``threshold_method`` on that run's own "val" rows and
    applied to both its splits (its val metrics are therefore optimistic; report the test rows). With
    ``threshold_method=None`` every metric is at 0.5. Per-class metrics of multi-class problems become columns
    ``<metric>_<class>``. Filter ``split == "test"`` before :func:`summarise_runs`.
    """
    validate_predictions(df)
    classes = class_names(df)
    runs = run_columns(df)
    rows: list[dict[str, Any]] = []
    for key, run in df.groupby(runs, dropna=False, sort=False):
        threshold = None
        if len(classes) == 2 and threshold_method is not None:
            val = run[run["split"] == "val"]
            if val.empty:
                raise PredictionError(f"run {dict(zip(runs, key))} has no 'val' rows, so no threshold can be chosen "
                                      f"honestly; save its validation predictions or use threshold_method=None")
            threshold = choose_threshold(val["target"], val[prob_columns(classes)[1]], method=threshold_method)
        for split in [s for s in SPLITS if (run["split"] == s).any()]:
            result = evaluate(run[run["split"] == split], threshold=threshold)
            if threshold is not None:
                result["threshold_source"] = f"val ({threshold_method})"
            for name, metrics in result.pop("per_class", {}).items():
                result.update({f"{metric}_{name}": value for metric, value in metrics.items()})
            rows.append(result)
    return pd.DataFrame(rows)


def with_validation_thresholds(df: pd.DataFrame, threshold_method: str = "youden") -> pd.DataFrame:
    """The prediction table with a ``threshold`` column: each run's decision threshold, chosen on that run's own
    validation rows (as :func:`evaluate_runs` does), so that test accuracy and McNemar tests downstream use the
    validation-chosen operating point rather than 0.5. Multi-class tables have no threshold (the prediction is the
    most probable class) and come back without the column."""
    if len(class_names(df)) != 2:
        return df.drop(columns=["threshold"], errors="ignore")
    keys = run_columns(df)
    metrics = evaluate_runs(df, threshold_method=threshold_method)
    thresholds = metrics.loc[metrics["split"] == "val", [*keys, "threshold"]]
    return df.drop(columns=["threshold"], errors="ignore").merge(thresholds, on=keys, how="left", validate="m:1")
