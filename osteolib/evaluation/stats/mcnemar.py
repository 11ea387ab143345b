"""McNemar's test of paired correctness, with the accuracy difference (Newcombe's interval) and the
discordant-pair odds ratio."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from osteolib.evaluation.stats.intervals import critical_z, wilson_ci

# below this many discordant pairs the chi-square approximation of McNemar's statistic is poor
MCNEMAR_EXACT_BELOW = 25


@dataclass(frozen=True)
class McNemarResult:
    """McNemar test of paired correctness, with the accuracy difference and the discordant odds ratio.

    ``table`` rows are A correct / A wrong, columns B correct / B wrong, so ``b = table[0, 1]`` counts the
    cases only A gets right and ``c = table[1, 0]`` those only B gets right.
    """

    table: np.ndarray
    b: int
    c: int
    n: int
    exact: bool
    method: str
    statistic: float
    p_value: float
    accuracy_a: float
    accuracy_b: float
    diff: float  # accuracy_a - accuracy_b = (b - c) / n
    diff_ci_low: float
    diff_ci_high: float
    odds_ratio: float  # b / c (inf when c == 0, nan when b == c == 0)
    odds_ratio_ci_low: float
    odds_ratio_ci_high: float


def _paired_difference_ci(table: np.ndarray, alpha: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10, Stat Med 1998;17:2635) for a difference of paired proportions.

    Why not Wald: with accuracies near 1 and few discordant pairs the Wald interval collapses or leaves
    [-1, 1]; Newcombe combines the two Wilson intervals and the correlation of the pairs, which keeps good
    coverage at the sample sizes of a test split.
    """
    (a, b), (c, d) = table.astype(float)
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_ci(int(a + b), int(n), alpha)
    l2, u2 = wilson_ci(int(a + c), int(n), alpha)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    # Newcombe's continuity-corrected correlation: shrink a positive cross product by n/2, never below 0
    if cross > n / 2:
        cross_corrected = cross - n / 2
    elif cross < 0:
        cross_corrected = cross
    else:
        cross_corrected = 0.0
    phi = cross_corrected / math.sqrt(margins) if margins > 0 else 0.0
    diff = p1 - p2
    lower = diff - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    upper = diff + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return float(max(-1.0, lower)), float(min(1.0, upper))


def _as_bool_vector(values: Any, name: str) -> np.ndarray:
    v = np.asarray(values)
    if v.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {v.shape}")
    if v.dtype != bool:
        uniques = set(np.unique(v).tolist())
        if not uniques <= {0, 1}:
            raise ValueError(f"{name} must hold True/False or 0/1 (was each case classified correctly?), found "
                             f"{sorted(uniques, key=str)[:6]}")
    return v.astype(bool)


def mcnemar_paired(correct_a: Any, correct_b: Any, exact: bool | None = None, alpha: float = 0.05) -> McNemarResult:
    """McNemar test of paired correctness (statsmodels), with accuracy difference and discordant odds ratio.

    ``exact=None`` chooses the exact binomial test when there are fewer than 25 discordant pairs and the
    continuity-corrected chi-square test otherwise. The accuracy difference A - B gets Newcombe's paired
    score interval; the odds ratio b/c gets the exact (Clopper-Pearson) interval of b among the b + c
    discordant pairs, transformed to the odds scale.
    """
    from statsmodels.stats.contingency_tables import mcnemar
    from statsmodels.stats.proportion import proportion_confint

    critical_z(alpha)
    a_ok = _as_bool_vector(correct_a, "correct_a")
    b_ok = _as_bool_vector(correct_b, "correct_b")
    if a_ok.shape != b_ok.shape:
        raise ValueError(f"correct_a has {a_ok.size} cases but correct_b has {b_ok.size}; McNemar needs the same "
                         "cases in the same order")
    n = int(a_ok.size)
    if n == 0:
        raise ValueError("mcnemar_paired needs at least one case")
    table = np.array([[np.sum(a_ok & b_ok), np.sum(a_ok & ~b_ok)],
                      [np.sum(~a_ok & b_ok), np.sum(~a_ok & ~b_ok)]], dtype=np.int64)
    b, c = int(table[0, 1]), int(table[1, 0])
    discordant = b + c
    use_exact = discordant < MCNEMAR_EXACT_BELOW if exact is None else bool(exact)
    if discordant == 0:
        # both classifiers right and wrong on exactly the same cases: no evidence of any difference
        statistic, p_value = 0.0, 1.0
    else:
        result = mcnemar(table, exact=use_exact, correction=True)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    method = ("McNemar exact binomial" if use_exact
              else "McNemar chi-square (continuity corrected)")
    diff_low, diff_high = _paired_difference_ci(table, alpha)
    if discordant == 0:
        odds_ratio, or_low, or_high = math.nan, math.nan, math.nan
    else:
        odds_ratio = b / c if c > 0 else math.inf
        p_low, p_high = proportion_confint(b, discordant, alpha=alpha, method="beta")
        or_low = p_low / (1 - p_low) if p_low < 1 else math.inf
        or_high = p_high / (1 - p_high) if p_high < 1 else math.inf
    return McNemarResult(
        table=table, b=b, c=c, n=n, exact=use_exact, method=method, statistic=statistic, p_value=p_value,
        accuracy_a=float(a_ok.mean()), accuracy_b=float(b_ok.mean()), diff=(b - c) / n,
        diff_ci_low=diff_low, diff_ci_high=diff_high, odds_ratio=float(odds_ratio),
        odds_ratio_ci_low=float(or_low), odds_ratio_ci_high=float(or_high))
