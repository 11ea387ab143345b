"""Calibration: reliability curves and the expected calibration error, on the same equal-width bins."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve

from osteolib.evaluation.checks import binary_inputs, multiclass_inputs
from osteolib.evaluation.predictions import PredictionError


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
    y, p = binary_inputs(y_true, p, both_classes=False)
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
        y, p = multiclass_inputs(y_true, p, 2)
        confidence, outcome = p[:, 1], y.astype(np.float64)
    elif p.ndim == 2:
        y, p = multiclass_inputs(y_true, p, p.shape[1])
        confidence, outcome = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    else:
        y, confidence = binary_inputs(y_true, p, both_classes=False)
        outcome = y.astype(np.float64)
    ids = _uniform_bin_ids(confidence, n_bins)
    counts = np.bincount(ids, minlength=n_bins)
    filled = counts > 0
    mean_confidence = np.bincount(ids, weights=confidence, minlength=n_bins)[filled] / counts[filled]
    frequency = np.bincount(ids, weights=outcome, minlength=n_bins)[filled] / counts[filled]
    return float(np.sum(counts[filled] / len(confidence) * np.abs(frequency - mean_confidence)))
