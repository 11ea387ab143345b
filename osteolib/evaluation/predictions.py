"""The prediction table: the one contract between training and the statistics stage.

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

:func:`prediction_table` builds one, :func:`validate_predictions` checks one, :func:`write_predictions` and
:func:`read_predictions` move them to and from disk.
"""
from __future__ import annotations

import glob as _glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PROB_PREFIX = "prob_"
PREDICTION_COLUMNS = ["image_id", "label", "target", "split", "scenario", "backbone", "seed", "fold"]
OPTIONAL_COLUMNS = ["label_fraction"]
RUN_COLUMNS = ["scenario", "backbone", "seed", "fold", "label_fraction"]
SPLITS = ("val", "test", "external")  # external: a data set evaluated after selection (notebook 00's external_test)
PROB_SUM_TOLERANCE = 1e-4


class PredictionError(ValueError):
    """A prediction table (or the arrays a metric got) is not usable; the message says where and what to do."""


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


def plain_scalar(value: Any) -> Any:
    """numpy scalars -> Python scalars, so result dicts serialise to JSON as they are."""
    return value.item() if isinstance(value, np.generic) else value
