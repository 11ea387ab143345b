"""Input checks of the array-level metrics: label and probability arrays, refused with a :class:`PredictionError`
that says what is wrong."""
from __future__ import annotations

from typing import Any

import numpy as np

from osteolib.evaluation.predictions import PROB_SUM_TOLERANCE, PredictionError


def binary_inputs(y_true: Any, p_pos: Any, both_classes: bool = True,
                  what: str = "y_true") -> tuple[np.ndarray, np.ndarray]:
    """0/1 labels (as int64) and positive-class probabilities (float64), checked; ``both_classes`` also requires
    both classes to be present (AUC is undefined otherwise)."""
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


def multiclass_inputs(y_true: Any, probs: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class indices (as int64) and an (N, ``n_classes``) probability matrix whose rows sum to 1, checked."""
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
