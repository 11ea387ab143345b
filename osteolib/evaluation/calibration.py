"""Calibration: reliability curves and the expected calibration error (on the same equal-width bins), the Brier
score and the logistic recalibration intercept and slope, with (patient) bootstrap CIs."""
from __future__ import annotations

import warnings
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


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), with p clipped to [1e-6, 1 - 1e-6]."""
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)  # a probability of exactly 0 or 1 has no logit
    return np.log(p / (1 - p))


def calibration_measures(y_true: Any, p: Any) -> dict[str, float]:
    """Brier score, ECE, and the logistic recalibration of the positive class's probability (statsmodels GLM):

    * calibration **intercept** (calibration-in-the-large): the intercept of ``logit P(y) = a + logit(p)``
      (the predictions as an offset); 0 when the predictions are right on average, < 0 when too high;
    * calibration **slope**: b in ``logit P(y) = a + b logit(p)``; 1 is ideal, < 1 means too extreme
      predictions (overfitting), > 1 too timid.

    NaN for a measure the data cannot give (one class only, or a perfectly separated sample).
    """
    import statsmodels.api as sm

    y, p = binary_inputs(y_true, p, both_classes=False)
    out = {"brier": float(np.mean((p - y) ** 2)), "ece": expected_calibration_error(y, p),
           "calibration_intercept": np.nan, "calibration_slope": np.nan}
    if len(np.unique(y)) < 2:
        return out
    logit_p = logit(p)
    family = sm.families.Binomial()
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # separation and convergence warnings: judged from the result below
        try:
            large = sm.GLM(y, np.ones((len(y), 1)), family=family, offset=logit_p).fit()
            slope = sm.GLM(y, sm.add_constant(logit_p, has_constant="add"), family=family).fit()
        except Exception:  # perfect separation in a tiny sample: no estimate rather than a wrong one
            return out
    if np.isfinite(large.params[0]):
        out["calibration_intercept"] = float(large.params[0])
    if np.isfinite(slope.params[1]) and abs(slope.params[1]) < 1e3:
        out["calibration_slope"] = float(slope.params[1])
    return out


def calibration_table(y_true: Any, p: Any, groups: Any = None, n_boot: int = 500, alpha: float = 0.05,
                      seed: int = 0) -> pd.DataFrame:
    """:func:`calibration_measures` with percentile bootstrap CIs: one row per measure (measure, estimate,
    ci_low, ci_high, n_boot_used, ci_method).

    ``groups`` (e.g. patient ids, one per prediction) makes it a cluster bootstrap: patients are resampled, not
    images, so several images of one patient do not claim a precision the data do not have. Resamples in which a
    measure is undefined (one class only) are left out of that measure's interval and counted.
    """
    y, p = binary_inputs(y_true, p, both_classes=False)
    estimate = calibration_measures(y, p)
    units = np.arange(len(y)) if groups is None else pd.factorize(pd.Series(list(groups)).astype(str))[0]
    if len(units) != len(y):
        raise PredictionError(f"groups holds {len(units)} values for {len(y)} predictions")
    members = [np.flatnonzero(units == u) for u in range(units.max() + 1)]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in estimate}
    for _ in range(n_boot):
        rows = np.concatenate([members[u] for u in rng.integers(0, len(members), len(members))])
        for key, value in calibration_measures(y[rows], p[rows]).items():
            if np.isfinite(value):
                draws[key].append(value)
    method = "patient cluster bootstrap" if groups is not None else "bootstrap"
    table = []
    for key, value in estimate.items():
        values = np.asarray(draws[key])
        low, high = (np.quantile(values, [alpha / 2, 1 - alpha / 2]) if len(values) >= 20 else (np.nan, np.nan))
        table.append({"measure": key, "estimate": value, "ci_low": float(low), "ci_high": float(high),
                      "n_boot_used": len(values), "ci_method": f"{method}, percentile" if len(values) >= 20
                      else f"none: {len(values)} of {n_boot} resamples defined it"})
    return pd.DataFrame(table)
