"""Prediction tables reduced to what the paired tests need: one view per run, indexed by image_id."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

RUN_KEYS = ("scenario", "backbone", "seed")
PROB_PREFIX = "prob_"
DEFAULT_THRESHOLD = 0.5


def require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Refuse a table lacking any of ``columns`` (``what`` names the table in the message)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"the {what} lacks column(s) {missing}; it has {list(df.columns)}")


def select_split(df: pd.DataFrame, split: str | None) -> pd.DataFrame:
    """Rows of ``split`` (all rows when None or when the table has no split column)."""
    if split is None or "split" not in df.columns:
        return df
    chosen = df[df["split"].astype(str) == split]
    if chosen.empty:
        present = sorted(df["split"].astype(str).unique().tolist())
        raise ValueError(f"the prediction table has no rows with split == {split!r} (splits present: {present}); "
                         "pass split=None to use every row")
    return chosen


def _class_names(df: pd.DataFrame) -> list[str]:
    names = [c[len(PROB_PREFIX):] for c in df.columns if c.startswith(PROB_PREFIX)]
    if not names:
        raise ValueError(f"the prediction table has no '{PROB_PREFIX}<class>' columns; columns: {list(df.columns)}")
    return names


@dataclass(frozen=True)
class RunView:
    """One run reduced to what the tests need, indexed by image_id."""

    y: pd.Series          # 1 = positive class
    score: pd.Series      # probability of the positive class
    correct: pd.Series    # predicted class == true class
    threshold: float      # the run's decision threshold; NaN with more than two classes (the most probable wins)
    positive: str
    n_classes: int = 2


def run_view(run: pd.DataFrame, positive: str | None, run_name: str) -> RunView:
    """Binary labels, positive-class score and correctness of one run (one row per image)."""
    duplicated = run["image_id"][run["image_id"].duplicated()]
    if not duplicated.empty:
        raise ValueError(f"run {run_name} has {duplicated.size} repeated image_id(s) (e.g. "
                         f"{duplicated.astype(str).tolist()[:5]}); a run must predict each image once")
    classes = _class_names(run)
    targets = pd.to_numeric(run["target"], errors="coerce")
    if targets.isna().any() or (targets != targets.round()).any():
        bad = run["image_id"].to_numpy()[(targets.isna() | (targets != targets.round())).to_numpy()]
        raise ValueError(f"run {run_name}: target must be the integer class index, but {bad.size} row(s) are not "
                         f"(e.g. image_id {bad[:5].tolist()})")
    target_to_label = run["label"].astype(str).groupby(targets.astype(int).to_numpy()).unique()
    for target, labels in target_to_label.items():
        if len(labels) > 1:
            raise ValueError(f"run {run_name}: target {target} is paired with several labels {list(labels)}; "
                             "target must be the class index of label")
    if positive is None:
        if run["target"].nunique() > 2 or len(classes) > 2:
            raise ValueError(f"run {run_name} has classes {classes}: AUC and DeLong need a binary question, so pass "
                             "positive=<class name> (one-vs-rest)")
        ones = target_to_label.get(1)
        if ones is None:
            raise ValueError(f"run {run_name} has no row with target == 1; cannot tell the positive class (pass "
                             "positive=<class name>)")
        positive = str(ones[0])
    if positive not in classes:
        raise ValueError(f"positive class {positive!r} has no '{PROB_PREFIX}{positive}' column in run {run_name} "
                         f"(classes with probabilities: {classes})")
    probs = run[[PROB_PREFIX + c for c in classes]].astype(float)
    bad = ~np.isfinite(probs.to_numpy()).all(axis=1)
    if bad.any():
        raise ValueError(f"run {run_name} has {int(bad.sum())} row(s) with missing/non-finite probabilities (e.g. "
                         f"image_id {run['image_id'].to_numpy()[bad][:5].tolist()}); fix the prediction file")
    if len(classes) > 2:
        threshold = math.nan  # no threshold: the most probable class is the prediction (below)
    elif "threshold" in run.columns:
        thresholds = run["threshold"].dropna().unique()
        if len(thresholds) != 1:
            raise ValueError(f"run {run_name} has {len(thresholds)} distinct thresholds {list(thresholds)[:5]}; "
                             "a run must use one decision threshold")
        threshold = float(thresholds[0])
    else:
        threshold = DEFAULT_THRESHOLD
    labels = run["label"].astype(str).to_numpy()
    score = probs[PROB_PREFIX + positive].to_numpy()
    y = labels == positive
    if len(classes) == 2:
        # binary: the run's own threshold on the positive probability decides
        predicted_positive = score >= threshold
        correct = predicted_positive == y
    else:
        # several classes: the most probable class is the prediction (a single threshold does not apply)
        predicted = np.asarray(classes)[probs.to_numpy().argmax(axis=1)]
        correct = predicted == labels
    index = pd.Index(run["image_id"].astype(str), name="image_id")
    return RunView(y=pd.Series(y.astype(int), index=index), score=pd.Series(score, index=index),
                   correct=pd.Series(correct, index=index), threshold=threshold, positive=positive,
                   n_classes=len(classes))


def run_label(keys: Sequence[str], values: Sequence[Any], scenario: str | None = None) -> str:
    """A run's or group's name for error messages, e.g. ``(backbone=vit_small, seed=1, scenario=mae)``."""
    pairs = [f"{k}={v}" for k, v in zip(keys, values)]
    if scenario is not None:
        pairs.append(f"scenario={scenario}")
    return "(" + ", ".join(pairs) + ")"


def align_runs(view_a: RunView, view_b: RunView, name_a: str, name_b: str) -> tuple[RunView, RunView]:
    """Both runs on the same images in the same order; mismatched image sets or labels are an error."""
    ids_a, ids_b = set(view_a.y.index), set(view_b.y.index)
    if ids_a != ids_b:
        only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
        raise ValueError(f"runs {name_a} and {name_b} were evaluated on different images: {len(only_a)} only in the "
                         f"first (e.g. {only_a[:5]}), {len(only_b)} only in the second (e.g. {only_b[:5]}); paired "
                         "tests need the same test images, so re-run the predictions on the same split")
    order = view_a.y.index
    aligned_b = RunView(y=view_b.y.loc[order], score=view_b.score.loc[order], correct=view_b.correct.loc[order],
                        threshold=view_b.threshold, positive=view_b.positive, n_classes=view_b.n_classes)
    mismatch = aligned_b.y.to_numpy() != view_a.y.to_numpy()
    if mismatch.any():
        raise ValueError(f"runs {name_a} and {name_b} disagree on the label of {int(mismatch.sum())} image(s) (e.g. "
                         f"{order[mismatch][:5].tolist()}); the prediction tables must come from the same manifest")
    return view_a, aligned_b
