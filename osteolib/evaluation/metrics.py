"""Metrics from saved predictions: one prediction-table format, scikit-learn metrics, calibration, figures, tables.

Honest selection
----------------
The checkpoint (epoch) and the decision threshold are chosen on the VALIDATION split only
(:func:`select_epoch`, :func:`choose_threshold`); the test split is predicted once, after that choice, and
its metrics are reported at the validation-chosen threshold and at 0.5. Nothing here ever picks the best
of several test scores: :func:`select_epoch` refuses any column whose name contains "test", and
:func:`evaluate_runs` takes every run's threshold from that run's own validation rows.

The prediction table (the contract between training and the statistics stage)
------------------------------------------------------------------------------
One row per image and split, one CSV file per run (``runs/<run>/predictions/<scenario>-<backbone>-...csv``):

==================  ==================================================================================
``image_id``        str, unique within a run's split
``label``           str, the true class name
``target``          int, index of ``label`` in the class order below
``prob_<class>``    float in [0, 1], one column per class; each row sums to 1 (tolerance
                    :data:`PROB_SUM_TOLERANCE`). The order of these columns IS the class order. For a
                    binary problem the two columns are ``1 - p`` and ``p``: the positive class is the
                    second one.
``split``           ``"val"`` or ``"test"``
``scenario``        str, the learning method (e.g. ``"supervised"``, ``"mae"``)
``backbone``        str, e.g. ``"densenet121"``, ``"vit_small"``
``seed``            int
``fold``            int (0 when there is no cross-validation)
``label_fraction``  optional float, the share of training labels used
==================  ==================================================================================

A *run* is one value of (scenario, backbone, seed, fold[, label_fraction]); metrics are computed per run and
split, and :func:`summarise_runs` gives mean ± standard deviation over seeds/folds.

Conventions
-----------
* Binary: predicted positive when ``p >= threshold`` (the convention of sklearn's ``roc_curve``, so a
  threshold read from the ROC curve reproduces that curve's point exactly).
* Undefined ratios (e.g. PPV when nothing is predicted positive) are NaN, never 0.
* Single-class splits make AUC undefined and are refused with an error, not reported as NaN.
"""
from __future__ import annotations

import glob as _glob
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

PROB_PREFIX = "prob_"
PREDICTION_COLUMNS = ["image_id", "label", "target", "split", "scenario", "backbone", "seed", "fold"]
OPTIONAL_COLUMNS = ["label_fraction"]
RUN_COLUMNS = ["scenario", "backbone", "seed", "fold", "label_fraction"]
SPLITS = ("val", "test")
PROB_SUM_TOLERANCE = 1e-4
THRESHOLD_METHODS = ("youden", "f1")
# Metrics of a binary evaluation that change with the threshold (reported twice: chosen threshold and 0.5).
THRESHOLD_DEPENDENT = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv",
                       "confusion_matrix")


class PredictionError(ValueError):
    """A prediction table (or the arrays a metric got) is not usable; the message says where and what to do."""


# ======================================================================================================
# The prediction table
# ======================================================================================================


def prob_columns(classes: Sequence[str]) -> list[str]:
    """The probability column names for ``classes``, in class order."""
    return [f"{PROB_PREFIX}{c}" for c in classes]


def class_names(df: pd.DataFrame) -> list[str]:
    """The class order of a prediction table, read from its ``prob_`` columns."""
    return [str(c)[len(PROB_PREFIX):] for c in df.columns if str(c).startswith(PROB_PREFIX)]


def run_columns(df: pd.DataFrame) -> list[str]:
    """The run identifier columns this table has (``label_fraction`` is optional)."""
    return [c for c in RUN_COLUMNS if c in df.columns]


def prediction_table(image_ids: Sequence[str], labels: Sequence[str], probs: Any, classes: Sequence[str],
                     split: str, **identifiers: Any) -> pd.DataFrame:
    """Build (and validate) one run's prediction table for one split.

    ``labels`` are class names; ``probs`` is (N, C) in the order of ``classes`` (softmax outputs), or, for a
    binary problem only, a 1-D array of the positive class's probability (``classes[1]``).
    ``identifiers`` must name ``scenario``, ``backbone``, ``seed`` and ``fold``, and may name ``label_fraction``.
    """
    classes = [str(c) for c in classes]
    if len(classes) < 2 or len(set(classes)) != len(classes) or any(not c for c in classes):
        raise PredictionError(f"classes must be at least two distinct non-empty names; got {classes}")
    required = [c for c in RUN_COLUMNS if c not in OPTIONAL_COLUMNS]
    missing = [c for c in required if c not in identifiers]
    unknown = sorted(set(identifiers) - set(RUN_COLUMNS))
    if missing or unknown:
        raise PredictionError(f"prediction_table needs identifiers {required} (optional {OPTIONAL_COLUMNS}); "
                              f"missing {missing}, unknown {unknown}")
    not_scalar = [name for name, value in identifiers.items() if np.ndim(value) != 0]
    if not_scalar:
        raise PredictionError(f"identifiers {not_scalar} must be single values (one run per table), not sequences")
    if split not in SPLITS:
        raise PredictionError(f"split must be one of {SPLITS}; got {split!r} (training predictions are not saved)")
    image_ids = [str(i) for i in image_ids]
    labels = [str(label) for label in labels]
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1 and len(classes) == 2:
        probs = np.column_stack([1.0 - probs, probs])
    if probs.ndim != 2 or probs.shape != (len(image_ids), len(classes)):
        raise PredictionError(f"probs has shape {probs.shape}; expected ({len(image_ids)}, {len(classes)}) "
                              f"= (number of image_ids, number of classes {classes})")
    if len(labels) != len(image_ids):
        raise PredictionError(f"{len(labels)} labels for {len(image_ids)} image_ids; give one label per image")
    index = {c: i for i, c in enumerate(classes)}
    unknown_labels = sorted(set(labels) - set(classes))
    if unknown_labels:
        raise PredictionError(f"label(s) {unknown_labels} are not among classes {classes}; labels are class "
                              f"names (map target indices with classes[i])")
    table: dict[str, Any] = {"image_id": image_ids, "label": labels, "target": [index[lab] for lab in labels]}
    for column, values in zip(prob_columns(classes), probs.T):
        table[column] = values
    table["split"] = split
    for name in RUN_COLUMNS:
        if name in identifiers:
            table[name] = identifiers[name]
    df = pd.DataFrame(table)
    df["target"] = df["target"].astype("int64")
    return validate_predictions(df)


def validate_predictions(df: pd.DataFrame) -> pd.DataFrame:
    """Raise :class:`PredictionError` listing every problem; return the table unchanged when it is sound.

    Checks: required and probability columns, probabilities numeric, in [0, 1] and summing to 1, labels among
    the classes and ``target`` matching them, split names, run identifiers present, image ids unique within
    each run's split, and at least two classes in every run's split (otherwise AUC is undefined).
    """
    if not isinstance(df, pd.DataFrame):
        raise PredictionError(f"expected a pandas DataFrame of predictions, got {type(df).__name__}")
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise PredictionError(f"prediction table lacks required column(s) {missing}; it has {list(df.columns)}")
    classes = class_names(df)
    if len(classes) < 2:
        raise PredictionError(f"prediction table needs one '{PROB_PREFIX}<class>' column per class (at least two); "
                              f"it has {list(df.columns)}")
    if len(df) == 0:
        raise PredictionError("prediction table has no rows")
    problems: list[str] = []
    columns = prob_columns(classes)
    probs = df[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    non_numeric = np.isnan(probs).any(axis=1)
    if non_numeric.any():
        problems.append(f"missing or non-numeric probabilities in {_rows(df, non_numeric)}")
    with np.errstate(invalid="ignore"):
        outside = ((probs < 0) | (probs > 1)).any(axis=1)
        off_sum = ~non_numeric & (np.abs(probs.sum(axis=1) - 1.0) > PROB_SUM_TOLERANCE)
    if outside.any():
        problems.append(f"probabilities outside [0, 1] in {_rows(df, outside)}")
    if off_sum.any():
        worst = float(np.nanmax(np.abs(probs.sum(axis=1) - 1.0)))
        problems.append(f"probabilities do not sum to 1 (tolerance {PROB_SUM_TOLERANCE}, worst off by {worst:.3g}) "
                        f"in {_rows(df, off_sum)}: save softmax outputs, not logits or sigmoid per class")
    labels = df["label"].astype(str)
    unknown = ~labels.isin(classes).to_numpy()
    if unknown.any():
        problems.append(f"label(s) {sorted(set(labels[unknown]))} are not among the classes {classes} "
                        f"(from the {PROB_PREFIX} columns) in {_rows(df, unknown)}")
    targets = pd.to_numeric(df["target"], errors="coerce")
    expected = labels.map({c: i for i, c in enumerate(classes)})
    wrong_target = (~unknown) & (targets.to_numpy(dtype=np.float64) != expected.to_numpy(dtype=np.float64))
    if wrong_target.any():
        problems.append(f"target does not equal the label's index in {classes} in {_rows(df, wrong_target)}")
    bad_splits = sorted(set(df["split"].astype(str)) - set(SPLITS))
    if bad_splits:
        problems.append(f"unknown split name(s) {bad_splits}; prediction tables hold only {SPLITS}")
    for column in ["image_id"] + [c for c in RUN_COLUMNS if c in PREDICTION_COLUMNS]:
        empty = (df[column].isna() | (df[column].astype(str).str.strip() == "")).to_numpy()
        if empty.any():
            problems.append(f"empty {column} in {_rows(df, empty)}")
    duplicated = df.duplicated(subset=run_columns(df) + ["split", "image_id"]).to_numpy()
    if duplicated.any():
        problems.append(f"image_id repeated within one run's split in {_rows(df, duplicated)}")
    if problems:
        raise PredictionError(f"{len(problems)} problem(s) in the prediction table:\n  " + "\n  ".join(problems))
    for key, group in df.groupby(run_columns(df) + ["split"], dropna=False, sort=False):
        present = sorted(set(group["label"].astype(str)))
        if len(present) < 2:
            run = dict(zip(run_columns(df) + ["split"], key))
            raise PredictionError(f"AUC undefined: the split holds only class {present[0]!r} ({len(group)} rows; "
                                  f"run {run}). Use a patient-level split stratified by label so that every split "
                                  f"holds every class.")
    return df


def write_predictions(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate and write a prediction table as CSV; refuses to overwrite an existing file.

    Predictions are written once per run: an existing file means a run is being repeated into the same
    place, which would silently replace evidence the statistics stage may already have used.
    """
    validate_predictions(df)
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"refusing to overwrite the prediction file {path}: predictions are written once per "
                              f"run. Write into a new run folder, or delete the file deliberately first.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", newline="") as fh:  # "x": fail, rather than overwrite, if another writer got there first
        df.to_csv(fh, index=False)
    return path


def read_predictions(paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Read and concatenate prediction files: a file, a folder (its ``*.csv``), a glob pattern, or a list of these.

    Every file is validated on its own (errors name the file); all must share one class order, and a run's
    split may appear in only one file.
    """
    files = _expand_prediction_paths(paths_or_glob)
    frames: list[pd.DataFrame] = []
    classes: list[str] | None = None
    seen: dict[str, Path] = {}
    for path in files:
        try:
            df = pd.read_csv(path, dtype={"image_id": str, "label": str, "split": str, "scenario": str,
                                          "backbone": str}, keep_default_na=False,
                             na_values={c: [""] for c in ("seed", "fold", "label_fraction", "target")})
            validate_predictions(df)
        except (PredictionError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
            raise PredictionError(f"{path}: {error}") from error
        file_classes = class_names(df)
        if classes is None:
            classes, first = file_classes, path
        elif file_classes != classes:
            raise PredictionError(f"{path}: classes {file_classes} differ from {classes} in {first}; "
                                  f"read files of one classification problem together")
        for key in df[run_columns(df) + ["split"]].drop_duplicates().itertuples(index=False):
            text = repr(tuple(key))
            if text in seen:
                raise PredictionError(f"run/split {text} appears in both {seen[text]} and {path}; "
                                      f"each run's predictions belong in one file")
            seen[text] = path
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _expand_prediction_paths(paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    items = [paths_or_glob] if isinstance(paths_or_glob, (str, os.PathLike)) else list(paths_or_glob)
    files: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if any(ch in text for ch in "*?["):
            matches = sorted(Path(p) for p in _glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise PredictionError(f"no prediction files match {text!r}")
            files.extend(matches)
        elif Path(text).is_dir():
            matches = sorted(Path(text).glob("*.csv"))
            if not matches:
                raise PredictionError(f"no *.csv prediction files in the folder {text}")
            files.extend(matches)
        elif Path(text).is_file():
            files.append(Path(text))
        else:
            raise PredictionError(f"prediction file not found: {text}")
    if not files:
        raise PredictionError("no prediction files given")
    return list(dict.fromkeys(files))  # the same file named twice (e.g. by two patterns) is read once


def _rows(df: pd.DataFrame, mask: np.ndarray, limit: int = 10) -> str:
    """'row(s) 3 (image_id='a'), ...' for the first rows flagged by ``mask``, with a count of the rest."""
    rows = np.flatnonzero(mask)
    shown = ", ".join(f"{df.index[r]} (image_id={df['image_id'].iloc[r]!r})" for r in rows[:limit])
    more = f" ... and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"{len(rows)} row(s): {shown}{more}"


# ======================================================================================================
# Input checks for the array-level metrics
# ======================================================================================================


def _binary_inputs(y_true: Any, p_pos: Any, both_classes: bool = True, what: str = "y_true") -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(p_pos, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1 or len(y) != len(p):
        raise PredictionError(f"{what} and p_pos must be 1-D and of equal length; got shapes {y.shape} and {p.shape}")
    if len(y) == 0:
        raise PredictionError(f"{what} is empty")
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise PredictionError(f"{what} must hold 0 (negative) and 1 (positive) only; got values {sorted(values)}")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise PredictionError("p_pos must be finite probabilities in [0, 1]")
    if both_classes and len(values) < 2:
        raise PredictionError(f"AUC undefined: {what} holds only class {values.pop()} ({len(y)} rows)")
    return y.astype(np.int64), p


def _multiclass_inputs(y_true: Any, probs: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != n_classes or y.ndim != 1 or len(y) != len(p):
        raise PredictionError(f"probs must be (N, {n_classes}) and y_true (N,); got {p.shape} and {y.shape}")
    if len(y) == 0:
        raise PredictionError("y_true is empty")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= n_classes:
        raise PredictionError(f"y_true must be integer class indices in [0, {n_classes}); got {np.unique(y)[:10]}")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise PredictionError("probs must be finite probabilities in [0, 1]")
    sums = p.sum(axis=1)
    if np.any(np.abs(sums - 1.0) > PROB_SUM_TOLERANCE):
        raise PredictionError(f"probability rows must sum to 1 (tolerance {PROB_SUM_TOLERANCE}); worst row sums to "
                              f"{sums[np.argmax(np.abs(sums - 1.0))]:.6g}")
    # Deliberately not renormalised: dividing by sums that differ in the last bit breaks ties between equal
    # scores and changes rank-based metrics such as AUC.
    return y.astype(np.int64), p


# ======================================================================================================
# Threshold and epoch selection (validation only)
# ======================================================================================================


def choose_threshold(y_true: Any, p_pos: Any, method: str = "youden") -> float:
    """The decision threshold, chosen on VALIDATION predictions only (never on test).

    ``"youden"``: maximises Youden's J = sensitivity + specificity - 1 over every point of sklearn's
    ``roc_curve``; ``"f1"``: maximises F1 over sklearn's ``precision_recall_curve``. The result is one of the
    predicted probabilities; classify positive when ``p >= threshold``. Ties go to the highest threshold.
    """
    y, p = _binary_inputs(y_true, p_pos, what="validation y_true")
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


# ======================================================================================================
# Metrics
# ======================================================================================================


def binary_metrics(y_true: Any, p_pos: Any, threshold: float) -> dict[str, Any]:
    """Metrics of a binary classifier at ``threshold`` (positive when ``p_pos >= threshold``).

    Returns accuracy, balanced_accuracy, sensitivity (recall of class 1), specificity (recall of class 0),
    ppv (precision of class 1), npv (precision of class 0), auc, confusion_matrix [[TN, FP], [FN, TP]],
    threshold, n and n_pos. Undefined ratios are NaN. Both classes must be present.
    """
    y, p = _binary_inputs(y_true, p_pos)
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
    y, p = _multiclass_inputs(y_true, probs, len(classes))
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
    y, p = _binary_inputs(y_true, p_pos)
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
    out: dict[str, Any] = {k: _plain(v) for k, v in groups.iloc[0].items()}
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


# ======================================================================================================
# Calibration
# ======================================================================================================


def _uniform_bin_ids(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins on [0, 1], assigned exactly as sklearn's calibration_curve does: bin k holds
    (k/n, (k+1)/n], the first bin also holds 0. ECE and the reliability curve therefore use the same bins."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], p)


def _check_bins(n_bins: int) -> None:
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise PredictionError(f"n_bins must be a positive integer; got {n_bins!r}")


def reliability_curve(y_true: Any, p: Any, n_bins: int = 10, strategy: str = "uniform") -> pd.DataFrame:
    """A reliability curve (sklearn's ``calibration_curve``) with the number of predictions in each bin.

    One row per bin, empty bins included (count 0, NaN fractions) so that nothing disappears from view:
    bin, lower, upper, count, mean_predicted, fraction_positive.
    """
    y, p = _binary_inputs(y_true, p, both_classes=False)
    _check_bins(n_bins)
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif strategy == "quantile":
        edges = np.percentile(p, np.linspace(0, 100, n_bins + 1))
    else:
        raise PredictionError(f"strategy must be 'uniform' or 'quantile'; got {strategy!r}")
    fraction_positive, mean_predicted = calibration_curve(y, p, n_bins=n_bins, strategy=strategy)
    ids = np.searchsorted(edges[1:-1], p)  # sklearn's own bin assignment, to count what it averaged
    counts = np.bincount(ids, minlength=n_bins)
    filled = counts > 0
    if filled.sum() != len(fraction_positive):
        raise RuntimeError("bin counts disagree with sklearn's calibration_curve; check the installed sklearn version")
    table = pd.DataFrame({"bin": np.arange(n_bins), "lower": edges[:-1], "upper": edges[1:], "count": counts,
                          "mean_predicted": np.nan, "fraction_positive": np.nan})
    table.loc[filled, "mean_predicted"] = mean_predicted
    table.loc[filled, "fraction_positive"] = fraction_positive
    return table


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 10) -> float:
    """Expected calibration error over ``n_bins`` equal-width bins: sum over bins of
    (bin count / N) * |observed frequency - mean predicted probability|.

    Binary (``probs`` 1-D = p_pos, or (N, 2)): on the positive class's probability against y_true in {0, 1}.
    Multi-class ((N, C), C > 2): top-label ECE, the most probable class's probability against whether that
    prediction is correct.
    """
    _check_bins(n_bins)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 2:
        y, p = _multiclass_inputs(y_true, p, 2)
        confidence, outcome = p[:, 1], y.astype(np.float64)
    elif p.ndim == 2:
        y, p = _multiclass_inputs(y_true, p, p.shape[1])
        confidence, outcome = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    else:
        y, confidence = _binary_inputs(y_true, p, both_classes=False)
        outcome = y.astype(np.float64)
    ids = _uniform_bin_ids(confidence, n_bins)
    counts = np.bincount(ids, minlength=n_bins)
    filled = counts > 0
    mean_confidence = np.bincount(ids, weights=confidence, minlength=n_bins)[filled] / counts[filled]
    frequency = np.bincount(ids, weights=outcome, minlength=n_bins)[filled] / counts[filled]
    return float(np.sum(counts[filled] / len(confidence) * np.abs(frequency - mean_confidence)))


# ======================================================================================================
# Figures (matplotlib/seaborn imported on use, so metric-only users do not pay for them)
# ======================================================================================================


def plot_confusion_matrix(cm: Any, classes: Sequence[str], normalize: str | None = None, title: str | None = None):
    """A confusion matrix heat map (rows = true class). ``normalize``: None (counts), "true" (each row sums to 1:
    per-class recall on the diagonal), "pred" (each column sums to 1) or "all"; counts stay in the cells."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    counts = np.asarray(cm, dtype=np.float64)
    classes = [str(c) for c in classes]
    if counts.shape != (len(classes), len(classes)):
        raise PredictionError(f"confusion matrix has shape {counts.shape}; expected {len(classes)}x{len(classes)} "
                              f"for classes {classes}")
    axis = {"true": 1, "pred": 0, "all": None}
    if normalize is not None and normalize not in axis:
        raise PredictionError(f"normalize must be None, 'true', 'pred' or 'all'; got {normalize!r}")
    if normalize is None:
        values, annotations = counts, counts.astype(int).astype(str)
    else:
        totals = counts.sum(axis=axis[normalize], keepdims=normalize != "all")
        with np.errstate(invalid="ignore", divide="ignore"):
            values = counts / totals  # a class with no rows/predictions shows as an empty (NaN) row/column
        annotations = np.array([[("–" if np.isnan(v) else f"{v:.2f}") + f"\n({int(c)})" for v, c in zip(vr, cr)]
                                for vr, cr in zip(values, counts)])
    size = 1.2 + 0.7 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    sns.heatmap(values, annot=annotations, fmt="", cmap="Blues", square=True, cbar=True,
                xticklabels=classes, yticklabels=classes, vmin=0, vmax=None if normalize is None else 1, ax=ax,
                annot_kws={"fontsize": 8})
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or ("confusion matrix" + (f" (normalised over {normalize})" if normalize else "")))
    fig.tight_layout()
    return fig


def plot_roc(curves: Mapping[str, tuple[Any, Any]], thresholds: Mapping[str, float] | None = None,
             title: str = "ROC curve"):
    """ROC curves, one per entry ``name -> (y_true, p_pos)``, with the AUC in the legend; ``thresholds``
    (name -> threshold) marks each curve's operating point."""
    import matplotlib.pyplot as plt

    if not curves:
        raise PredictionError("plot_roc needs at least one curve: {name: (y_true, p_pos)}")
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    for name, (y_true, p_pos) in curves.items():
        y, p = _binary_inputs(y_true, p_pos, what=f"y_true of {name!r}")
        fpr, tpr, _ = roc_curve(y, p)
        (line,) = ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC = {roc_auc_score(y, p):.3f})")
        if thresholds and name in thresholds:
            point = binary_metrics(y, p, thresholds[name])
            ax.plot(1 - point["specificity"], point["sensitivity"], "o", color=line.get_color(), markersize=5)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def plot_reliability(curves: Mapping[str, tuple[Any, Any]], n_bins: int = 10, strategy: str = "uniform",
                     title: str = "reliability"):
    """Reliability diagrams, one per entry ``name -> (y_true, p_pos)``, with the ECE in the legend, above a
    panel of how many predictions fall in each bin."""
    import matplotlib.pyplot as plt

    if not curves:
        raise PredictionError("plot_reliability needs at least one curve: {name: (y_true, p_pos)}")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="perfect calibration")
    for name, (y_true, p) in curves.items():
        table = reliability_curve(y_true, p, n_bins=n_bins, strategy=strategy)
        ece = expected_calibration_error(y_true, p, n_bins=n_bins)
        (line,) = top.plot(table["mean_predicted"], table["fraction_positive"], "o-", markersize=4,
                           label=f"{name} (ECE = {ece:.3f})")
        centres = (table["lower"] + table["upper"]) / 2
        bottom.step(centres, table["count"], where="mid", color=line.get_color())
    top.set_ylabel("observed frequency of the positive class")
    top.set_ylim(-0.02, 1.02)
    top.set_title(title)
    top.legend(loc="upper left", fontsize=7)
    bottom.set_xlabel("mean predicted probability")
    bottom.set_ylabel("count")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    return fig


def plot_learning_curves(history_df: pd.DataFrame, chosen_epoch: int | None = None, title: str = "learning curves"):
    """Per-epoch training/validation curves: loss columns on the left, other numeric metrics on the right,
    the chosen epoch marked. Non-numeric columns (e.g. fastai's "time") are not plotted; test columns are
    refused, as in :func:`select_epoch`."""
    import matplotlib.pyplot as plt

    test_columns = [c for c in history_df.columns if "test" in str(c).lower()]
    if test_columns:
        raise PredictionError(f"learning curves show training and validation only; drop test columns {test_columns}")
    epochs = history_df["epoch"].to_numpy() if "epoch" in history_df.columns else history_df.index.to_numpy()
    numeric = [c for c in history_df.columns
               if c != "epoch" and pd.api.types.is_numeric_dtype(history_df[c])]
    losses = [c for c in numeric if "loss" in str(c).lower()]
    others = [c for c in numeric if c not in losses]
    panels = [(cols, label) for cols, label in ((losses, "loss"), (others, "metric")) if cols]
    if not panels:
        raise PredictionError(f"the history has no numeric columns to plot; it has {list(history_df.columns)}")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (cols, label) in zip(axes[0], panels):
        for column in cols:
            ax.plot(epochs, history_df[column].to_numpy(dtype=np.float64), marker=".", label=str(column))
        if chosen_epoch is not None:
            ax.axvline(chosen_epoch, color="grey", linestyle=":", linewidth=1, label=f"chosen epoch {chosen_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ======================================================================================================
# Summaries over seeds and the results table
# ======================================================================================================


def summarise_runs(metrics_df: pd.DataFrame, by: Sequence[str] = ("backbone", "scenario"),
                   metrics: Sequence[str] = ("accuracy", "auc")) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof=1) of each metric over the runs (seeds, folds) of each group.

    Columns: ``by``..., n_runs, then ``<metric>_mean``, ``<metric>_std``, ``<metric>_n`` (runs with a value;
    missing values are counted and warned about, never silently averaged away). Groups keep their order of
    first appearance. Refuses tables mixing splits, repeated runs, and groups mixing label fractions (or
    another identifier) that ``by`` does not separate.
    """
    by, metrics = list(by), list(metrics)
    missing = [c for c in by + metrics if c not in metrics_df.columns]
    if missing:
        raise PredictionError(f"metrics table lacks column(s) {missing}; it has {list(metrics_df.columns)}")
    if len(metrics_df) == 0:
        raise PredictionError("metrics table has no rows")
    if "split" in metrics_df.columns and metrics_df["split"].nunique(dropna=False) > 1:
        raise PredictionError(f"metrics table mixes splits {sorted(metrics_df['split'].astype(str).unique())}; "
                              f"summarise one, normally metrics_df[metrics_df['split'] == 'test']")
    identifiers = [c for c in RUN_COLUMNS if c in metrics_df.columns]
    repeated = metrics_df.duplicated(subset=list(dict.fromkeys(by + identifiers)), keep=False)
    # Without a seed or fold column runs cannot be told apart, so repetition can only be checked with one.
    if {"seed", "fold"} & set(identifiers) and repeated.any():
        raise PredictionError(f"{int(repeated.sum())} rows repeat a run ({identifiers}); each run must be counted once, "
                              f"e.g. rows {metrics_df.index[repeated].tolist()[:10]}")
    must_be_constant = [c for c in ("scenario", "backbone", "label_fraction") if c in metrics_df.columns and c not in by]
    rows: list[dict[str, Any]] = []
    for key, group in metrics_df.groupby(by, dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for column in must_be_constant:
            if group[column].nunique(dropna=False) > 1:
                raise PredictionError(f"group {dict(zip(by, key))} mixes {column} values "
                                      f"{sorted(group[column].astype(str).unique())}; add {column!r} to by")
        row: dict[str, Any] = {**{b: _plain(k) for b, k in zip(by, key)}, "n_runs": len(group)}
        for metric in metrics:
            values = pd.to_numeric(group[metric], errors="coerce").to_numpy(dtype=np.float64)
            present = values[~np.isnan(values)]
            if len(present) < len(values):
                warnings.warn(f"{dict(zip(by, key))}: {len(values) - len(present)} of {len(values)} run(s) have no "
                              f"{metric!r} value; its mean and std use the other {len(present)}", stacklevel=2)
            row[f"{metric}_mean"] = float(present.mean()) if len(present) else math.nan
            row[f"{metric}_std"] = float(present.std(ddof=1)) if len(present) > 1 else math.nan
            row[f"{metric}_n"] = int(len(present))
        rows.append(row)
    return pd.DataFrame(rows)


def format_mean_std(mean: float, std: float, n: int | None = None, digits: int = 3) -> str:
    """'0.812 ± 0.014'; a single run has no spread: '0.812 (n=1)'; no value at all: 'n/a'."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}" + (f" (n={n})" if n is not None else "")
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_table(summary: pd.DataFrame, columns: Mapping[str, str] | None = None,
                  metric_names: Mapping[str, str] | None = None, digits: int = 3, show_n: bool = False) -> pd.DataFrame:
    """The study's Table 1 layout from :func:`summarise_runs`: Model, Learning method, ACC, AUC as
    "mean ± std" strings. ``columns`` renames the grouping columns, ``metric_names`` picks and renames metrics;
    ``show_n`` adds the number of runs."""
    columns = dict(columns or {"backbone": "Model", "scenario": "Learning method"})
    metric_names = dict(metric_names or {"accuracy": "ACC", "auc": "AUC"})
    missing = [c for c in columns if c not in summary.columns]
    missing += [f"{m}_mean/_std" for m in metric_names if f"{m}_mean" not in summary.columns]
    if missing:
        raise PredictionError(f"summary lacks {missing}; it has {list(summary.columns)} (build it with summarise_runs)")
    table = pd.DataFrame({title: summary[column].astype(str) for column, title in columns.items()})
    for metric, title in metric_names.items():
        counts = summary.get(f"{metric}_n", pd.Series([None] * len(summary), index=summary.index))
        table[title] = [format_mean_std(m, s, n, digits) for m, s, n in
                        zip(summary[f"{metric}_mean"], summary[f"{metric}_std"], counts)]
    if show_n:
        table["Runs"] = summary["n_runs"].astype(int).astype(str)
    return table.reset_index(drop=True)


def to_markdown(table: pd.DataFrame, path: str | os.PathLike | None = None) -> str:
    """A GitHub-flavoured markdown table of ``table``'s cells as text (written to ``path`` when given).

    Hand-written because pandas' ``to_markdown`` needs the ``tabulate`` package, which the project does not use.
    """
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = [cell(c) for c in table.columns]
    body = [[cell(v) for v in row] for row in table.itertuples(index=False)]
    widths = [max(len(h), 3, *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in body]
    text = "\n".join(lines) + "\n"
    _write_text(text, path)
    return text


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_NUMERIC_CELL = re.compile(r"^\s*(n/a|[-+]?\d+(\.\d+)?(\s*±\s*\d+(\.\d+)?)?(\s*\(n=\d+\))?)\s*$")


def to_latex(table: pd.DataFrame, path: str | os.PathLike | None = None, caption: str | None = None,
             label: str | None = None) -> str:
    """A booktabs LaTeX table of ``table`` (text columns left-aligned, number columns centred, ± as $\\pm$),
    written to ``path`` when given. Needs ``\\usepackage{booktabs}`` in the document."""
    def cell(value: Any) -> str:
        text = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(value))
        return text.replace("±", r"$\pm$")

    align = "".join("c" if all(_NUMERIC_CELL.match(str(v)) for v in table[c]) and len(table) else "l"
                    for c in table.columns)
    lines = [r"\begin{table}[ht]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{cell(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines += [rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(cell(c) for c in table.columns) + r" \\",
              r"\midrule"]
    lines += [" & ".join(cell(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    text = "\n".join(lines) + "\n"
    _write_text(text, path)
    return text


def _write_text(text: str, path: str | os.PathLike | None) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so result dicts serialise to JSON as they are."""
    return value.item() if isinstance(value, np.generic) else value


def with_validation_thresholds(df: pd.DataFrame, threshold_method: str = "youden") -> pd.DataFrame:
    """The prediction table with a ``threshold`` column: each run's decision threshold, chosen on that run's own
    validation rows (as :func:`evaluate_runs` does), so that test accuracy and McNemar tests downstream use the
    validation-chosen operating point rather than 0.5."""
    keys = run_columns(df)
    metrics = evaluate_runs(df, threshold_method=threshold_method)
    thresholds = metrics.loc[metrics["split"] == "val", [*keys, "threshold"]]
    return df.drop(columns=["threshold"], errors="ignore").merge(thresholds, on=keys, how="left", validate="m:1")
