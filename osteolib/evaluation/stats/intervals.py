"""Intervals: the normal critical value, Wilson's interval of a proportion, bootstrap CIs (scipy)."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class BootstrapResult:
    """A bootstrap CI of ``statistic`` (scipy.stats.bootstrap), with the bootstrap standard error."""

    estimate: float
    ci_low: float
    ci_high: float
    se: float
    n_boot: int
    method: str


def critical_z(alpha: float) -> float:
    """The two-sided normal critical value of level ``alpha`` (1.96 for 0.05); refuses alpha outside (0, 1)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1 (e.g. 0.05 for 95 % intervals), got {alpha}")
    return float(sps.norm.ppf(1.0 - alpha / 2.0))


def wilson_ci(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion (statsmodels ``proportion_confint(method="wilson")``)."""
    from statsmodels.stats.proportion import proportion_confint

    critical_z(alpha)
    if n <= 0 or not 0 <= successes <= n or int(successes) != successes or int(n) != n:
        raise ValueError(f"wilson_ci needs whole numbers 0 <= successes <= n and n > 0, got successes={successes}, "
                         f"n={n}")
    low, high = proportion_confint(int(successes), int(n), alpha=alpha, method="wilson")
    return float(low), float(high)


def bootstrap_ci(statistic: Callable[..., float], *arrays: Any, n_boot: int = 2000, seed: int = 0,
                 paired: bool = True, method: str = "percentile", alpha: float = 0.05) -> BootstrapResult:
    """Bootstrap CI of ``statistic(*arrays)`` with scipy.stats.bootstrap.

    ``paired=True`` resamples cases jointly across the arrays (they must be equally long: e.g. labels and
    two score vectors of the same images); ``paired=False`` resamples each array on its own (independent
    samples). ``method`` is "percentile" or "bca". A statistic that is undefined (non-finite) on some
    resamples (e.g. an AUC of a resample holding one class) is an error, not silently dropped.
    """
    methods = {"percentile": "percentile", "bca": "BCa"}
    if method.lower() not in methods:
        raise ValueError(f"method must be 'percentile' or 'bca', got {method!r}")
    if n_boot < 100:
        raise ValueError(f"n_boot={n_boot} is too few resamples for a CI; use at least 1000")
    critical_z(alpha)
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one data array after the statistic")
    data = [np.asarray(a) for a in arrays]
    for i, a in enumerate(data):
        if a.ndim != 1 or a.size < 2:
            raise ValueError(f"array {i} must be one-dimensional with at least 2 cases, got shape {a.shape}")
    if paired and len({a.size for a in data}) > 1:
        raise ValueError(f"paired bootstrap needs equally long arrays, got lengths {[a.size for a in data]}; "
                         "pass paired=False for independent samples")
    estimate = float(statistic(*data))
    if not math.isfinite(estimate):
        raise ValueError(f"the statistic is {estimate} on the full data; check the inputs")
    with warnings.catch_warnings():
        # scipy warns about degenerate (constant) bootstrap distributions; handled explicitly below
        warnings.simplefilter("ignore", category=RuntimeWarning)
        warnings.simplefilter("ignore", category=getattr(sps, "DegenerateDataWarning", RuntimeWarning))
        result = sps.bootstrap(tuple(data), statistic, n_resamples=int(n_boot), vectorized=False, paired=paired,
                               confidence_level=1.0 - alpha, method=methods[method.lower()],
                               rng=np.random.default_rng(seed))
    distribution = np.asarray(result.bootstrap_distribution, dtype=float)
    undefined = ~np.isfinite(distribution)
    if undefined.any():
        raise ValueError(f"the statistic was undefined on {int(undefined.sum())} of {n_boot} bootstrap resamples "
                         "(e.g. a resample with a single class); use more cases or a statistic defined on every "
                         "resample")
    if np.ptp(distribution) == 0:
        low = high = float(distribution[0])
    else:
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"the {method} interval is undefined for this statistic and data; use "
                             "method='percentile'")
    return BootstrapResult(estimate=estimate, ci_low=low, ci_high=high, se=float(np.std(distribution, ddof=1)),
                           n_boot=int(n_boot), method=method.lower())
