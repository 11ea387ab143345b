"""Threshold and epoch selection, on the validation split only.

The checkpoint (epoch) and the decision threshold are chosen on the VALIDATION split only
(:func:`select_epoch`, :func:`choose_threshold`); the test split is predicted once, after that choice, and
its metrics are reported at the validation-chosen threshold and at 0.5. Nothing here ever picks the best
of several test scores: :func:`select_epoch` refuses any column whose name contains "test", and
:func:`evaluate_runs` takes every run's threshold from that run's own validation rows.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from osteolib.evaluation.checks import binary_inputs
from osteolib.evaluation.predictions import PredictionError

THRESHOLD_METHODS = ("youden", "f1")


def choose_threshold(y_true: Any, p_pos: Any, method: str = "youden") -> float:
    """The decision threshold, chosen on VALIDATION predictions only (never on test).

    ``"youden"``: maximises Youden's J = sensitivity + specificity - 1 over every point of sklearn's
    ``roc_curve``; ``"f1"``: maximises F1 over sklearn's ``precision_recall_curve``. The result is one of the
    predicted probabilities; classify positive when ``p >= threshold``. Ties go to the highest threshold.
    """
    y, p = binary_inputs(y_true, p_pos, what="validation y_true")
    if method == "youden":
        fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
        # The first ROC point (threshold +inf, nothing called positive) has J = 0, as does the last one (the
        # lowest score, everything positive): skipping the first loses no maximum and keeps the threshold a
        # real probability.
        j = (tpr - fpr)[1:]
        return float(thresholds[1:][np.argmax(j)])  # thresholds decrease, so argmax's first hit is the highest
    if method == "f1":
        precision, recall, thresholds = precision_recall_curve(y, p)
        precision, recall = precision[:-1], recall[:-1]  # the last PR point has no threshold
        denominator = precision + recall
        f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
        return float(thresholds[np.flatnonzero(f1 == f1.max())[-1]])  # thresholds increase: last hit is highest
    raise PredictionError(f"unknown threshold method {method!r}; use one of {THRESHOLD_METHODS}")


def select_epoch(history_df: pd.DataFrame, metric: str = "valid_auc", mode: str = "max") -> int:
    """The epoch whose VALIDATION ``metric`` is best; ties go to the earliest epoch.

    ``history_df`` holds one row per epoch (an ``epoch`` column, else the index is the epoch). It must hold
    no test metrics at all: a column whose name contains "test" is refused, so a test score can never
    take part in choosing the checkpoint.
    """
    test_columns = [c for c in history_df.columns if "test" in str(c).lower()]
    if test_columns or "test" in metric.lower():
        raise PredictionError(f"select_epoch refuses test metrics {test_columns or [metric]}: the checkpoint is chosen "
                              f"on the validation split only; drop test columns from the history")
    if mode not in ("max", "min"):
        raise PredictionError(f"mode must be 'max' or 'min'; got {mode!r}")
    if metric not in history_df.columns:
        raise PredictionError(f"metric {metric!r} is not in the history; it has {list(history_df.columns)}")
    if len(history_df) == 0:
        raise PredictionError("the history has no epochs")
    values = pd.to_numeric(history_df[metric], errors="coerce").to_numpy(dtype=np.float64)
    missing = np.isnan(values)
    if missing.all():
        raise PredictionError(f"metric {metric!r} is missing or non-numeric in every epoch")
    if missing.any():
        warnings.warn(f"select_epoch: {int(missing.sum())} of {len(values)} epoch(s) have no {metric!r} value and "
                      f"cannot be chosen", stacklevel=2)
    best = np.nanargmax(values) if mode == "max" else np.nanargmin(values)  # first (earliest) of tied epochs
    epochs = history_df["epoch"].to_numpy() if "epoch" in history_df.columns else history_df.index.to_numpy()
    return int(epochs[best])


def select_model(metrics: pd.DataFrame, keys: tuple[str, ...] = ("backbone", "scenario")) -> pd.DataFrame:
    """The grid's model chosen on VALIDATION AUC: the (backbone, scenario) with the highest mean validation AUC
    over its seeds (at the largest label fraction), and within it the seed whose run has the highest one.

    ``metrics`` is :func:`osteolib.evaluation.evaluate_runs`'s table (rows of every split; only ``split == "val"``
    rows are read). Returns those val rows with columns ``mean_valid_auc`` (of the run's model) and ``selected``
    (True for exactly one run). Ties go to the first in sorted order, so the choice is the same every time.
    """
    val = metrics[metrics["split"] == "val"].copy()
    if val.empty or "auc" not in val.columns:
        raise PredictionError("select_model needs validation rows with an AUC (evaluate_runs of val predictions)")
    if "label_fraction" in val.columns:
        val = val[val["label_fraction"] == val["label_fraction"].max()].copy()
    keys = [k for k in keys if k in val.columns]
    val["mean_valid_auc"] = val.groupby(keys, dropna=False)["auc"].transform("mean")
    order = val.sort_values(["mean_valid_auc", "auc", *keys, "seed"],
                            ascending=[False, False, *([True] * len(keys)), True], kind="mergesort")
    val["selected"] = False
    val.loc[order.index[0], "selected"] = True
    return val.reset_index(drop=True)
