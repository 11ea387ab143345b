"""Statistics for comparing pretraining scenarios: DeLong, McNemar, Wilson, bootstrap, Holm, mixed models.

Everything works on plain arrays and on two kinds of per-image tables, so this module depends on no other
part of osteolib:

* a **prediction table**: one row per (run, image) with ``image_id, label, target, prob_<class>...,
  split, scenario, backbone, seed`` and optionally ``threshold`` (the run's decision threshold);
* an **agreement table**: one row per (run, image, CAM method) with ``image_id, scenario, backbone, seed,
  method`` and measure columns (``hit, energy_in_region, iou, dice, auc_region`` ...).

Per run: AUC with a DeLong CI and accuracy with a Wilson CI (:func:`auc_table`). Per pair of runs on the
same test images: paired DeLong and McNemar tests with effect sizes, Holm-adjusted over the whole family
(:func:`compare_scenarios`, worded by :func:`significance_summary`). Across seeds: a linear mixed model
with seed as the grouping factor, or OLS with seed as a fixed factor where that is the better choice
(:func:`mixed_model`); per-image agreement between scenarios with the image as the grouping factor
(:func:`agreement_model`).

DeLong is implemented here (the fast midrank algorithm of Sun & Xu 2014, IEEE Signal Processing Letters
21:1389) because no maintained library provides it; the tests check it against scikit-learn's AUC and a
direct O(n²) computation of the structural components. McNemar, Wilson, Holm, the mixed models and the
bootstrap are statsmodels' and scipy's.
"""
from __future__ import annotations

import itertools
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

RUN_KEYS = ("scenario", "backbone", "seed")
PROB_PREFIX = "prob_"
DEFAULT_THRESHOLD = 0.5
# below this many discordant pairs the chi-square approximation of McNemar's statistic is poor
MCNEMAR_EXACT_BELOW = 25
# a random-effect variance estimated from fewer groups than this is too unstable to be worth a mixed model
FEW_GROUPS = 5

COMPARISON_COLUMNS = [
    "backbone", "seed", "scenario", "reference", "test", "n", "n_positive", "value", "value_reference",
    "effect", "effect_ci_low", "effect_ci_high", "statistic", "p_value", "p_holm", "significant", "alpha",
    "family_size", "method", "discordant_b", "discordant_c", "odds_ratio", "odds_ratio_ci_low",
    "odds_ratio_ci_high",
]


# ----------------------------------------------------------------------------------------------------------
# result types


@dataclass(frozen=True)
class AUCResult:
    """ROC AUC of one score with its DeLong standard error and a normal-theory CI clipped to [0, 1]."""

    auc: float
    se: float
    ci_low: float
    ci_high: float
    n_positive: int
    n_negative: int


@dataclass(frozen=True)
class PairedResult:
    """Paired DeLong test of two scores on the same cases: ``diff = auc_a - auc_b``."""

    auc_a: float
    auc_b: float
    diff: float
    se: float
    z: float
    p_value: float
    ci_low: float
    ci_high: float
    correlation: float  # DeLong correlation of the two AUC estimates (why pairing gains power)


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


@dataclass(frozen=True)
class BootstrapResult:
    """A bootstrap CI of ``statistic`` (scipy.stats.bootstrap), with the bootstrap standard error."""

    estimate: float
    ci_low: float
    ci_high: float
    se: float
    n_boot: int
    method: str


@dataclass(frozen=True)
class HolmResult:
    """Holm-adjusted p-values (in the input order) and whether each hypothesis is rejected at ``alpha``."""

    p_adjusted: np.ndarray
    reject: np.ndarray
    alpha: float


@dataclass
class ModelResult:
    """A fitted model of one response across runs: which model was used and why, and its fixed effects.

    ``coefficients`` has one row per fixed-effect term: ``term, estimate, se, ci_low, ci_high, p_value,
    p_holm`` (Holm over the non-intercept terms shown) and ``std_effect`` (estimate divided by the residual
    standard deviation, a Cohen's-d-like effect size). Seed dummies of the OLS fallback are nuisance terms and
    are left out of the table (their number is in ``n_nuisance_terms``).
    """

    response: str
    method: str  # "MixedLM" or "OLS"
    reason: str
    formula: str
    group: str
    n_obs: int
    n_groups: int
    n_dropped_missing: int
    coefficients: pd.DataFrame
    group_variance: float | None = None  # random-intercept variance (MixedLM only)
    residual_sd: float = math.nan
    n_nuisance_terms: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form for JSON: model facts plus the coefficient rows."""
        return {
            "response": self.response, "method": self.method, "reason": self.reason, "formula": self.formula,
            "group": self.group, "n_obs": self.n_obs, "n_groups": self.n_groups,
            "n_dropped_missing": self.n_dropped_missing, "group_variance": self.group_variance,
            "residual_sd": self.residual_sd, "n_nuisance_terms": self.n_nuisance_terms,
            "warnings": list(self.warnings), "coefficients": self.coefficients.to_dict(orient="records"),
        }


# ----------------------------------------------------------------------------------------------------------
# DeLong


def _check_binary_scores(y_true: Any, score_arrays: Sequence[Any],
                         names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Validate a 0/1 label vector and equally long finite score vectors; return (y as bool, scores k×n)."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be one-dimensional, got shape {y.shape}")
    values = set(np.unique(y).tolist())
    if not values <= {0, 1, True, False}:
        raise ValueError(f"y_true must hold only 0/1 (or False/True), found values {sorted(values, key=str)[:6]}; "
                         "map the positive class to 1 first")
    y = y.astype(bool)
    rows = []
    for name, s in zip(names, score_arrays):
        s = np.asarray(s, dtype=np.float64)
        if s.shape != y.shape:
            raise ValueError(f"{name} has shape {s.shape} but y_true has shape {y.shape}; pass one score per case")
        bad = ~np.isfinite(s)
        if bad.any():
            raise ValueError(f"{name} has {int(bad.sum())} non-finite values (first at position "
                             f"{int(np.flatnonzero(bad)[0])}); remove or fix those cases first")
        rows.append(s)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos < 2 or n_neg < 2:
        raise ValueError(f"DeLong needs at least 2 positive and 2 negative cases, got {n_pos} positive and "
                         f"{n_neg} negative")
    return y, np.vstack(rows)


def _delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) and their DeLong covariance (k, k) for k score rows, by midranks in O(k n log n).

    For positive case i, ``V10_i`` is the fraction of negatives it outscores (ties count one half); for
    negative case j, ``V01_j`` is the fraction of positives that outscore it. With midranks, the number of
    negatives below positive i is its rank among all cases minus its rank among positives, which turns the
    O(m n) pair comparisons into three sorts (Sun & Xu 2014).
    """
    positives, negatives = scores[:, y], scores[:, ~y]
    m, n = positives.shape[1], negatives.shape[1]
    rank_pos = sps.rankdata(positives, axis=1)
    rank_neg = sps.rankdata(negatives, axis=1)
    rank_all = sps.rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    aucs = (rank_all[:, :m].sum(axis=1) / m - (m + 1) / 2.0) / n
    v10 = (rank_all[:, :m] - rank_pos) / n
    v01 = 1.0 - (rank_all[:, m:] - rank_neg) / m
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return aucs, s10 / m + s01 / n


def _z(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1 (e.g. 0.05 for 95 % intervals), got {alpha}")
    return float(sps.norm.ppf(1.0 - alpha / 2.0))


def delong_auc(y_true: Any, scores: Any, alpha: float = 0.05) -> AUCResult:
    """ROC AUC with its DeLong standard error and a (1 - alpha) normal CI clipped to [0, 1]."""
    z = _z(alpha)
    y, s = _check_binary_scores(y_true, [scores], ["scores"])
    aucs, cov = _delong_components(y, s)
    auc, se = float(aucs[0]), float(math.sqrt(max(cov[0, 0], 0.0)))
    return AUCResult(auc=auc, se=se, ci_low=max(0.0, auc - z * se), ci_high=min(1.0, auc + z * se),
                     n_positive=int(y.sum()), n_negative=int((~y).sum()))


def delong_paired(y_true: Any, scores_a: Any, scores_b: Any, alpha: float = 0.05) -> PairedResult:
    """Paired DeLong test of AUC(a) = AUC(b) for two scores of the same cases (two-sided)."""
    z_crit = _z(alpha)
    y, s = _check_binary_scores(y_true, [scores_a, scores_b], ["scores_a", "scores_b"])
    aucs, cov = _delong_components(y, s)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    if se > 0:
        z = diff / se
    else:
        # identical rankings (or both constant within class): no sampling variation in the difference
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    p = float(2.0 * sps.norm.sf(abs(z)))
    denominator = math.sqrt(max(cov[0, 0], 0.0) * max(cov[1, 1], 0.0))
    correlation = float(cov[0, 1] / denominator) if denominator > 0 else math.nan
    return PairedResult(auc_a=float(aucs[0]), auc_b=float(aucs[1]), diff=diff, se=se, z=float(z), p_value=p,
                        ci_low=diff - z_crit * se, ci_high=diff + z_crit * se, correlation=correlation)


# ----------------------------------------------------------------------------------------------------------
# proportions: Wilson, McNemar


def wilson_ci(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion (statsmodels ``proportion_confint(method="wilson")``)."""
    from statsmodels.stats.proportion import proportion_confint

    _z(alpha)
    if n <= 0 or not 0 <= successes <= n or int(successes) != successes or int(n) != n:
        raise ValueError(f"wilson_ci needs whole numbers 0 <= successes <= n and n > 0, got successes={successes}, "
                         f"n={n}")
    low, high = proportion_confint(int(successes), int(n), alpha=alpha, method="wilson")
    return float(low), float(high)


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

    _z(alpha)
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


# ----------------------------------------------------------------------------------------------------------
# bootstrap and multiplicity


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
    _z(alpha)
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


def holm(p_values: Any, alpha: float = 0.05) -> HolmResult:
    """Holm step-down adjustment over a family of p-values (statsmodels ``multipletests(method="holm")``)."""
    from statsmodels.stats.multitest import multipletests

    _z(alpha)
    p = np.asarray(p_values, dtype=float).ravel()
    if p.size == 0:
        return HolmResult(p_adjusted=p.copy(), reject=np.zeros(0, dtype=bool), alpha=alpha)
    bad = ~np.isfinite(p) | (p < 0) | (p > 1)
    if bad.any():
        raise ValueError(f"p-values must lie in [0, 1]; position(s) {np.flatnonzero(bad)[:10].tolist()} hold "
                         f"{p[bad][:10].tolist()}")
    reject, adjusted, _, _ = multipletests(p, alpha=alpha, method="holm")
    return HolmResult(p_adjusted=np.asarray(adjusted, dtype=float), reject=np.asarray(reject, dtype=bool),
                      alpha=alpha)


# ----------------------------------------------------------------------------------------------------------
# prediction tables


def _require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"the {what} lacks column(s) {missing}; it has {list(df.columns)}")


def _select_split(df: pd.DataFrame, split: str | None) -> pd.DataFrame:
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
class _RunView:
    """One run reduced to what the tests need, indexed by image_id."""

    y: pd.Series          # 1 = positive class
    score: pd.Series      # probability of the positive class
    correct: pd.Series    # predicted class == true class
    threshold: float
    positive: str


def _run_view(run: pd.DataFrame, positive: str | None, run_name: str) -> _RunView:
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
    if "threshold" in run.columns:
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
    return _RunView(y=pd.Series(y.astype(int), index=index), score=pd.Series(score, index=index),
                    correct=pd.Series(correct, index=index), threshold=threshold, positive=positive)


def _name(keys: Sequence[str], values: Sequence[Any], scenario: str | None = None) -> str:
    """A run's or group's name for error messages, e.g. ``(backbone=vit_small, seed=1, scenario=mae)``."""
    pairs = [f"{k}={v}" for k, v in zip(keys, values)]
    if scenario is not None:
        pairs.append(f"scenario={scenario}")
    return "(" + ", ".join(pairs) + ")"


def auc_table(predictions_df: pd.DataFrame, split: str | None = "test", positive: str | None = None,
              alpha: float = 0.05, run_keys: Sequence[str] = RUN_KEYS) -> pd.DataFrame:
    """One row per run: n, AUC with DeLong CI, threshold, accuracy with Wilson CI.

    Rows of ``split`` only (None = all rows). ``positive`` names the positive class; by default it is the
    class whose ``target`` is 1 (binary tables only).
    """
    _require_columns(predictions_df, ["image_id", "label", "target", *run_keys], "prediction table")
    df = _select_split(predictions_df, split)
    rows = []
    for values, run in df.groupby(list(run_keys), sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        run_name = _name(run_keys, values)
        view = _run_view(run, positive, run_name)
        auc = delong_auc(view.y.to_numpy(), view.score.to_numpy(), alpha=alpha)
        n = int(view.correct.size)
        n_correct = int(view.correct.sum())
        acc_low, acc_high = wilson_ci(n_correct, n, alpha)
        rows.append({**dict(zip(run_keys, values)), "n": n, "n_positive": auc.n_positive, "positive": view.positive,
                     "auc": auc.auc, "auc_se": auc.se, "auc_ci_low": auc.ci_low, "auc_ci_high": auc.ci_high,
                     "threshold": view.threshold, "accuracy": n_correct / n, "accuracy_ci_low": acc_low,
                     "accuracy_ci_high": acc_high})
    return pd.DataFrame(rows)


def _aligned(view_a: _RunView, view_b: _RunView, name_a: str, name_b: str) -> tuple[_RunView, _RunView]:
    """Both runs on the same images in the same order; mismatched image sets or labels are an error."""
    ids_a, ids_b = set(view_a.y.index), set(view_b.y.index)
    if ids_a != ids_b:
        only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
        raise ValueError(f"runs {name_a} and {name_b} were evaluated on different images: {len(only_a)} only in the "
                         f"first (e.g. {only_a[:5]}), {len(only_b)} only in the second (e.g. {only_b[:5]}); paired "
                         "tests need the same test images, so re-run the predictions on the same split")
    order = view_a.y.index
    aligned_b = _RunView(y=view_b.y.loc[order], score=view_b.score.loc[order], correct=view_b.correct.loc[order],
                         threshold=view_b.threshold, positive=view_b.positive)
    mismatch = aligned_b.y.to_numpy() != view_a.y.to_numpy()
    if mismatch.any():
        raise ValueError(f"runs {name_a} and {name_b} disagree on the label of {int(mismatch.sum())} image(s) (e.g. "
                         f"{order[mismatch][:5].tolist()}); the prediction tables must come from the same manifest")
    return view_a, aligned_b


def compare_scenarios(predictions_df: pd.DataFrame, reference: str = "random", by: Sequence[str] = ("backbone", "seed"),
                      all_pairs: bool = False, alpha: float = 0.05, split: str | None = "test",
                      positive: str | None = None) -> pd.DataFrame:
    """Paired tests of every scenario against ``reference`` (or all pairs) within each ``by`` group.

    For each pair of runs on the same test images: a paired DeLong test (effect: ΔAUC with its CI) and a
    McNemar test of correctness at each run's threshold (effect: Δaccuracy with Newcombe's CI, and the
    discordant-pair odds ratio). Returns one row per (group, pair, test) with the columns
    :data:`COMPARISON_COLUMNS` (``by`` columns first); ``effect = scenario - reference``. ``p_holm`` is the
    Holm adjustment over the whole family (every row of the result) and ``significant`` means
    ``p_holm < alpha``.
    """
    by = list(by)
    _require_columns(predictions_df, ["image_id", "label", "target", "scenario", *by], "prediction table")
    df = _select_split(predictions_df, split)
    groups = [((), df)] if not by else [
        (values if isinstance(values, tuple) else (values,), g)
        for values, g in df.groupby(by, sort=True, dropna=False)]
    rows: list[dict[str, Any]] = []
    for values, group in groups:
        group_name = _name(by, values)
        scenarios = sorted(group["scenario"].astype(str).unique().tolist())
        if reference not in scenarios:
            raise ValueError(f"group {group_name} has no run of the reference scenario {reference!r} (scenarios: "
                             f"{scenarios}); pass reference=<one of them>")
        others = [s for s in scenarios if s != reference]
        pairs = [(s, reference) for s in others]
        if all_pairs:
            pairs += list(itertools.combinations(others, 2))
        views = {s: _run_view(run, positive, _name(by, values, s))
                 for s, run in group.groupby(group["scenario"].astype(str))}
        for scenario, ref in pairs:
            name_s, name_r = _name(by, values, scenario), _name(by, values, ref)
            view_s, view_r = _aligned(views[scenario], views[ref], name_s, name_r)
            base = {**dict(zip(by, values)), "scenario": scenario, "reference": ref, "n": int(view_s.y.size),
                    "n_positive": int(view_s.y.sum()), "alpha": alpha}
            dl = delong_paired(view_s.y.to_numpy(), view_s.score.to_numpy(), view_r.score.to_numpy(), alpha=alpha)
            rows.append({**base, "test": "delong_auc", "value": dl.auc_a, "value_reference": dl.auc_b,
                         "effect": dl.diff, "effect_ci_low": dl.ci_low, "effect_ci_high": dl.ci_high,
                         "statistic": dl.z, "p_value": dl.p_value, "method": "DeLong paired (z)"})
            mc = mcnemar_paired(view_s.correct.to_numpy(), view_r.correct.to_numpy(), alpha=alpha)
            rows.append({**base, "test": "mcnemar_accuracy", "value": mc.accuracy_a, "value_reference": mc.accuracy_b,
                         "effect": mc.diff, "effect_ci_low": mc.diff_ci_low, "effect_ci_high": mc.diff_ci_high,
                         "statistic": mc.statistic, "p_value": mc.p_value,
                         "method": f"{mc.method}; thresholds {view_s.threshold:g} / {view_r.threshold:g}",
                         "discordant_b": mc.b, "discordant_c": mc.c, "odds_ratio": mc.odds_ratio,
                         "odds_ratio_ci_low": mc.odds_ratio_ci_low, "odds_ratio_ci_high": mc.odds_ratio_ci_high})
    columns = by + [c for c in COMPARISON_COLUMNS if c not in by and c not in ("backbone", "seed")]
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=columns)
    adjusted = holm(out["p_value"].to_numpy(), alpha=alpha)
    out["p_holm"] = adjusted.p_adjusted
    out["significant"] = adjusted.reject
    out["family_size"] = len(out)
    return out.reindex(columns=columns)


def _format_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


_TEST_WORDS = {"delong_auc": ("AUC", "ΔAUC"), "mcnemar_accuracy": ("accuracy", "Δaccuracy")}


def _describe_pair(rows: pd.DataFrame, by: Sequence[str]) -> str:
    """One sentence for one (scenario, reference, test) over all its runs: how many significant, effect sizes."""
    first = rows.iloc[0]
    measure, delta = _TEST_WORDS.get(str(first["test"]), (str(first["test"]), "effect"))
    level = f"{100 * (1 - float(first['alpha'])):g} % CI"
    significant = rows[rows["significant"].astype(bool)]
    head = f"*{first['scenario']}* vs *{first['reference']}*, {measure}: "
    if len(rows) == 1:
        # a single run: give the effect with its interval
        verdict = "significant" if len(significant) else "not significant"
        detail = (f"{delta} {first['effect']:+.3f} [{level} {first['effect_ci_low']:+.3f}, "
                  f"{first['effect_ci_high']:+.3f}], p {_format_p(first['p_value'])}, "
                  f"Holm p {_format_p(first['p_holm'])}")
        context = ", ".join(f"{k} {first[k]}" for k in by)
        return head + f"{verdict}{f' ({context})' if context else ''}, {detail}."
    effects = rows["effect"].astype(float)
    spread = f"{delta} median {effects.median():+.3f} (range {effects.min():+.3f} to {effects.max():+.3f})"
    if len(significant):
        higher = int((significant["effect"] > 0).sum())
        lower = len(significant) - higher
        direction = ("higher" if lower == 0 else "lower" if higher == 0 else f"{higher} higher, {lower} lower")
        return (head + f"significant in {len(significant)} of {len(rows)} runs ({direction}); {spread}; "
                f"largest significant Holm p {_format_p(float(significant['p_holm'].max()))}.")
    return (head + f"not significant in any of {len(rows)} runs; {spread}; smallest Holm p "
            f"{_format_p(float(rows['p_holm'].min()))}.")


def significance_summary(comparisons_df: pd.DataFrame) -> str:
    """A short Markdown paragraph: which differences survive Holm correction and which do not, with effects.

    One sentence per (scenario, reference, test) over all runs (backbones, seeds) of the table: significant
    comparisons first, then the others, each with its effect sizes.
    """
    _require_columns(comparisons_df, ["scenario", "reference", "test", "effect", "effect_ci_low", "effect_ci_high",
                                      "p_value", "p_holm", "significant", "alpha"], "comparison table")
    if comparisons_df.empty:
        return "No comparisons were made (the comparison table is empty)."
    by = [c for c in comparisons_df.columns if c in ("backbone", "seed")]
    alpha = float(comparisons_df["alpha"].iloc[0])
    n_significant = int(comparisons_df["significant"].astype(bool).sum())
    opening = (f"After Holm correction over the family of {len(comparisons_df)} tests (paired DeLong for AUC, "
               f"McNemar for accuracy; family-wise α = {alpha:g}), {n_significant} "
               f"{'difference is' if n_significant == 1 else 'differences are'} significant.")
    sentences_significant, sentences_other = [], []
    for _, rows in comparisons_df.groupby(["scenario", "reference", "test"], sort=True):
        sentence = _describe_pair(rows, by)
        (sentences_significant if rows["significant"].astype(bool).any() else sentences_other).append(sentence)
    return " ".join([opening, *sentences_significant, *sentences_other])


# ----------------------------------------------------------------------------------------------------------
# models across seeds and images


_FUNCTION_OR_STRING = re.compile(r"'[^']*'|\"[^\"]*\"|[A-Za-z_][A-Za-z0-9_.]*\s*\(")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _formula_variables(fixed: str) -> list[str]:
    """Column names used by a right-hand-side formula (function names and quoted levels removed)."""
    stripped = _FUNCTION_OR_STRING.sub(" ", fixed)
    return list(dict.fromkeys(_IDENTIFIER.findall(stripped)))


def _is_balanced(df: pd.DataFrame, group: str, factors: Sequence[str]) -> bool:
    """Every group holds every cell of the factors, each the same number of times."""
    if not factors:
        sizes = df.groupby(group, observed=True).size()
        return sizes.nunique() == 1
    counts = df.groupby([group, *factors], observed=False).size()
    return counts.nunique() == 1 and int(counts.iloc[0]) > 0


def _term_table(estimates: pd.Series, se: pd.Series, ci: pd.DataFrame, p: pd.Series, terms: Sequence[str],
                residual_sd: float, alpha: float) -> pd.DataFrame:
    table = pd.DataFrame({
        "term": list(terms),
        "estimate": [float(estimates[t]) for t in terms],
        "se": [float(se[t]) for t in terms],
        "ci_low": [float(ci.loc[t].iloc[0]) for t in terms],
        "ci_high": [float(ci.loc[t].iloc[1]) for t in terms],
        "p_value": [float(p[t]) for t in terms],
    })
    # Holm and standardised effects over the effects of interest; the intercept is a level, not a comparison
    is_effect = table["term"] != "Intercept"
    table["std_effect"] = math.nan
    if residual_sd > 0:
        table.loc[is_effect, "std_effect"] = table.loc[is_effect, "estimate"] / residual_sd
    table["p_holm"] = math.nan
    if is_effect.any():
        table.loc[is_effect, "p_holm"] = holm(table.loc[is_effect, "p_value"].to_numpy(), alpha=alpha).p_adjusted
    return table


def mixed_model(df: pd.DataFrame, response: str, fixed: str = "scenario + backbone", group: str = "seed",
                reference: Mapping[str, str] | None = None, method: str = "auto", alpha: float = 0.05,
                few_groups: int = FEW_GROUPS) -> ModelResult:
    """Model ``response ~ fixed`` across runs with ``group`` as the grouping factor.

    ``method="auto"``: a balanced design with fewer than ``few_groups`` groups is fitted by OLS with
    ``C(group)`` as a fixed factor (in a balanced design the fixed effects are the same as the mixed
    model's, without an unstable variance estimate); otherwise statsmodels MixedLM (random intercept per
    group, REML), falling back to the OLS model when MixedLM fails or does not converge. ``"mixedlm"`` and
    ``"ols"`` force one (a forced MixedLM that fails raises). ``result.method`` and ``result.reason`` say
    which was used and why. ``reference`` maps factor columns to their baseline level (default
    ``{"scenario": "random"}`` where that level exists). Rows with a missing response are counted in
    ``n_dropped_missing`` and left out.
    """
    import statsmodels.formula.api as smf

    if method not in ("auto", "mixedlm", "ols"):
        raise ValueError(f"method must be 'auto', 'mixedlm' or 'ols', got {method!r}")
    _z(alpha)
    variables = _formula_variables(fixed)
    _require_columns(df, [response, group, *variables], "table")
    if not variables:
        raise ValueError(f"fixed={fixed!r} names no column; give factors such as 'scenario + backbone'")
    data = df[[response, group, *variables]].copy()
    try:
        data[response] = pd.to_numeric(data[response], errors="raise").astype(float)
    except (TypeError, ValueError) as error:
        raise ValueError(f"response column {response!r} must be numeric (or True/False): {error}") from None
    missing = data[[response, group, *variables]].isna().any(axis=1)
    n_dropped = int(missing.sum())
    data = data[~missing].reset_index(drop=True)
    if data.empty:
        raise ValueError(f"no row of the table has a value for {response!r} (all {n_dropped} rows missing)")
    if data[response].nunique() < 2:
        raise ValueError(f"{response!r} takes a single value ({data[response].iloc[0]}) in every row; there is "
                         "nothing to model")

    # factors become ordered categoricals so that the baseline (treatment reference) level is chosen, not alphabetic
    baselines = dict(reference) if reference is not None else {}
    if reference is None and "scenario" in variables and (data["scenario"].astype(str) == "random").any():
        baselines["scenario"] = "random"
    factors = []
    for name in variables:
        if pd.api.types.is_numeric_dtype(data[name]) and name not in baselines:
            continue
        levels = sorted(data[name].astype(str).unique().tolist())
        if name in baselines:
            if baselines[name] not in levels:
                raise ValueError(f"reference level {baselines[name]!r} of {name!r} does not occur (levels: {levels})")
            levels.remove(baselines[name])
            levels.insert(0, baselines[name])
        if len(levels) < 2:
            raise ValueError(f"factor {name!r} has a single level {levels}; a model needs at least two levels to "
                             "compare (drop it from fixed)")
        data[name] = pd.Categorical(data[name].astype(str), categories=levels)
        factors.append(name)
    data[group] = data[group].astype(str)
    n_groups = int(data[group].nunique())
    if n_groups < 2:
        raise ValueError(f"{group!r} has a single value; a model across {group}s needs at least two")

    balanced = _is_balanced(data, group, factors)
    # the response must be addressable in the formula whatever its name
    lhs = response if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", response) else f"Q('{response}')"
    ols_formula = f"{lhs} ~ {fixed} + C({group})"
    mixed_formula = f"{lhs} ~ {fixed}"

    caught: list[str] = []
    if method == "ols" or (method == "auto" and balanced and n_groups < few_groups):
        reason = ("forced by method='ols'" if method == "ols" else
                  f"balanced design with only {n_groups} {group} groups (< {few_groups}): a random-effect variance "
                  f"from so few groups is unstable, and with balance OLS with C({group}) gives the same fixed effects")
    else:
        try:
            from statsmodels.tools.sm_exceptions import ConvergenceWarning

            # MixedLM's optimiser starts from unit-scale variances and stops on the boundary when the response
            # varies by ~0.01 (AUCs, Dice): fit a standardised response and scale the estimates back exactly
            centre, spread = float(data[response].mean()), float(data[response].std(ddof=1))
            scaled = data.assign(**{response: (data[response] - centre) / spread})
            with warnings.catch_warnings(record=True) as records:
                warnings.simplefilter("always")
                fit = smf.mixedlm(mixed_formula, scaled, groups=scaled[group]).fit(reml=True)
            caught = [str(r.message) for r in records if issubclass(r.category, ConvergenceWarning)]
            problem = None
            if not fit.converged:
                problem = "the optimiser did not converge"
            elif caught:
                problem = "statsmodels warned: " + "; ".join(dict.fromkeys(caught))
            elif not np.all(np.isfinite(fit.bse_fe)):
                problem = "the fixed-effect standard errors are not finite"
        except (np.linalg.LinAlgError, ValueError) as error:
            problem, fit = f"MixedLM failed: {error}", None
        if problem is None:
            terms = list(fit.fe_params.index)
            shift = pd.Series([centre if t == "Intercept" else 0.0 for t in terms], index=terms)
            estimates = fit.fe_params * spread + shift
            ci = fit.conf_int(alpha=alpha).loc[terms].mul(spread).add(shift, axis=0)
            residual_sd = math.sqrt(float(fit.scale)) * spread
            table = _term_table(estimates, fit.bse_fe * spread, ci, fit.pvalues, terms, residual_sd, alpha)
            why = ("forced by method='mixedlm'" if method == "mixedlm" else
                   ("unbalanced design" if not balanced else f"{n_groups} {group} groups (>= {few_groups})")
                   + f": random intercept per {group} (REML)")
            return ModelResult(response=response, method="MixedLM", reason=why, formula=f"{mixed_formula} "
                               f"+ (1 | {group})", group=group, n_obs=int(len(data)), n_groups=n_groups,
                               n_dropped_missing=n_dropped, coefficients=table,
                               group_variance=float(np.asarray(fit.cov_re)[0, 0]) * spread ** 2,
                               residual_sd=residual_sd,
                               warnings=caught)
        if method == "mixedlm":
            raise RuntimeError(f"MixedLM of {response!r} on {fixed!r} with groups {group!r} is not usable: {problem}; "
                               "use method='auto' to fall back to OLS")
        reason = f"MixedLM not usable ({problem}); fell back to OLS with C({group}) as a fixed factor"

    fit = smf.ols(ols_formula, data).fit()
    nuisance = [t for t in fit.params.index if t.startswith(f"C({group})")]
    terms = [t for t in fit.params.index if t not in nuisance]
    residual_sd = math.sqrt(float(fit.scale))
    table = _term_table(fit.params, fit.bse, fit.conf_int(alpha=alpha), fit.pvalues, terms, residual_sd, alpha)
    return ModelResult(response=response, method="OLS", reason=reason, formula=ols_formula, group=group,
                       n_obs=int(len(data)), n_groups=n_groups, n_dropped_missing=n_dropped, coefficients=table,
                       residual_sd=residual_sd, n_nuisance_terms=len(nuisance), warnings=caught)


def agreement_model(agreement_df: pd.DataFrame, measure: str, fixed: str = "scenario", group: str = "image_id",
                    cam_method: str | None = None, reference: Mapping[str, str] | None = None,
                    method: str = "auto", alpha: float = 0.05) -> ModelResult:
    """Per-image agreement (e.g. ``dice``) compared between scenarios, with the image as the grouping factor.

    The same image seen by every scenario is the pairing: a random intercept per image removes how easy each
    image is. ``cam_method`` keeps the rows of one explanation method (column ``method``); a table mixing
    several methods must either choose one or put ``method`` into ``fixed``.
    """
    _require_columns(agreement_df, [measure, group], "agreement table")
    df = agreement_df
    if "method" in df.columns:
        methods = sorted(df["method"].astype(str).unique().tolist())
        if cam_method is not None:
            if cam_method not in methods:
                raise ValueError(f"cam_method {cam_method!r} does not occur in the agreement table "
                                 f"(methods: {methods})")
            df = df[df["method"].astype(str) == cam_method]
        elif len(methods) > 1 and "method" not in _formula_variables(fixed):
            raise ValueError(f"the agreement table mixes CAM methods {methods}; pass cam_method=<one of them> or add "
                             "'+ method' to fixed")
    elif cam_method is not None:
        raise ValueError("cam_method was given but the agreement table has no 'method' column")
    return mixed_model(df, measure, fixed=fixed, group=group, reference=reference, method=method, alpha=alpha)
