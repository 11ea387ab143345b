"""Results by subgroup (sex, age band, view, source, site): the same AUC and accuracy, per level, with a test of
whether they differ.

A subgroup too small to say anything (fewer than :data:`MIN_PER_CLASS` images of either class) keeps its row,
marked ``too_small``, and stays out of the heterogeneity test. Heterogeneity of the AUC is Cochran's Q over the
levels' DeLong estimates (inverse-variance weights; the levels hold different patients, so they are independent);
of the accuracy, a chi-square test of correct-vs-wrong by level.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from osteolib.evaluation.stats.delong import delong_auc
from osteolib.evaluation.stats.intervals import wilson_ci
from osteolib.evaluation.stats.views import RUN_KEYS, require_columns, run_label, run_view

__all__ = ["SUBGROUP_COLUMNS", "AGE_BANDS", "MIN_PER_CLASS", "age_bands", "subgroup_columns", "subgroup_table",
           "auc_heterogeneity"]

SUBGROUP_COLUMNS = ("sex", "age_band", "view", "source", "site")
# (lower bound, label): children, young adults, and the decades where bone loss and chest disease change most
AGE_BANDS = ((0, "0-17"), (18, "18-39"), (40, "40-59"), (60, "60-79"), (80, "80+"))
MIN_PER_CLASS = 5
UNKNOWN = "unknown"


def age_bands(ages: pd.Series) -> pd.Series:
    """Age in years as a band label of :data:`AGE_BANDS`; missing ages become ``"unknown"``."""
    values = pd.to_numeric(ages, errors="coerce")
    bounds = [b for b, _ in AGE_BANDS] + [math.inf]
    banded = pd.cut(values, bins=bounds, right=False, labels=[label for _, label in AGE_BANDS])
    return banded.astype(object).where(values.notna(), UNKNOWN)


def subgroup_columns(manifest: pd.DataFrame) -> pd.DataFrame:
    """``image_id`` and the subgroup columns the manifest can give (``age`` becomes ``age_band``); a column whose
    values are all missing is left out."""
    table = pd.DataFrame({"image_id": manifest["image_id"].astype(str)})
    for column in SUBGROUP_COLUMNS:
        source = "age" if column == "age_band" else column
        if source not in manifest.columns or manifest[source].isna().all():
            continue
        values = age_bands(manifest[source]) if column == "age_band" else manifest[source]
        table[column] = values.astype(object).where(pd.notna(values), UNKNOWN).astype(str).to_numpy()
    return table


def auc_heterogeneity(aucs: Sequence[float], ses: Sequence[float]) -> tuple[float, int, float]:
    """Cochran's Q, its degrees of freedom and p-value for independent AUC estimates; NaNs when fewer than two
    estimates or when one has no variance (an AUC of 0 or 1)."""
    a, s = np.asarray(aucs, dtype=float), np.asarray(ses, dtype=float)
    if a.size < 2 or not np.all(np.isfinite(a)) or not np.all(s > 0):
        return math.nan, max(a.size - 1, 0), math.nan
    w = 1.0 / s**2
    pooled = float((w * a).sum() / w.sum())
    q = float((w * (a - pooled) ** 2).sum())
    return q, a.size - 1, float(sps.chi2.sf(q, a.size - 1))


def _accuracy_heterogeneity(correct: Sequence[int], n: Sequence[int]) -> float:
    table = np.array([[c, m - c] for c, m in zip(correct, n)], dtype=float)
    if table.shape[0] < 2 or (table.sum(axis=0) == 0).any():
        return math.nan
    return float(sps.chi2_contingency(table, correction=False)[1])


def subgroup_table(predictions_df: pd.DataFrame, subgroups: pd.DataFrame, split: str = "test",
                   positive: str | None = None, alpha: float = 0.05, run_keys: Sequence[str] = RUN_KEYS,
                   min_per_class: int = MIN_PER_CLASS) -> pd.DataFrame:
    """One row per run, subgroup variable and level of ``split``'s rows.

    ``subgroups`` is :func:`subgroup_columns` of the manifest(s) that hold the predicted images; every predicted
    image must have a row there. Columns: the run keys, ``split, variable, level, n, n_positive, n_negative,
    auc, auc_ci_low, auc_ci_high, accuracy, accuracy_ci_low, accuracy_ci_high, too_small`` and, per run and
    variable, ``auc_q, auc_df, auc_heterogeneity_p, accuracy_heterogeneity_p`` over the levels that are not too
    small. Variables with a single level among these images are left out (nothing to compare).
    """
    require_columns(predictions_df, ["image_id", "label", "target", "split", *run_keys], "prediction table")
    require_columns(subgroups, ["image_id"], "subgroup table")
    rows_of_split = predictions_df[predictions_df["split"].astype(str) == split]
    lookup = subgroups.drop_duplicates("image_id").set_index("image_id")
    missing = sorted(set(rows_of_split["image_id"].astype(str)) - set(lookup.index))
    if missing:
        raise ValueError(f"{len(missing)} predicted {split} image(s) have no row in the manifest (e.g. {missing[:5]}); "
                         f"the predictions and the manifest come from different runs")
    out = []
    for values, run in rows_of_split.groupby(list(run_keys), sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        view = run_view(run, positive, run_label(run_keys, values))
        levels_of = lookup.loc[view.y.index]
        for variable in [c for c in lookup.columns if levels_of[c].nunique() > 1]:
            rows = []
            for level, ids in levels_of.groupby(variable, sort=True).groups.items():
                y, score, correct = view.y.loc[ids], view.score.loc[ids], view.correct.loc[ids]
                n_pos, n_neg = int(y.sum()), int((1 - y).sum())
                row = {**dict(zip(run_keys, values)), "split": split, "variable": variable, "level": str(level),
                       "n": int(y.size), "n_positive": n_pos, "n_negative": n_neg,
                       "auc": math.nan, "auc_se": math.nan, "auc_ci_low": math.nan, "auc_ci_high": math.nan}
                if min(n_pos, n_neg) >= 2:  # DeLong's variance needs two of each; fewer: no AUC, and too small
                    auc = delong_auc(y.to_numpy(), score.to_numpy(), alpha=alpha)
                    row.update(auc=auc.auc, auc_se=auc.se, auc_ci_low=auc.ci_low, auc_ci_high=auc.ci_high)
                n_correct = int(correct.sum())
                low, high = wilson_ci(n_correct, int(y.size), alpha)
                row.update(accuracy=n_correct / y.size, accuracy_ci_low=low, accuracy_ci_high=high,
                           n_correct=n_correct, too_small=bool(min(n_pos, n_neg) < min_per_class))
                rows.append(row)
            usable = [r for r in rows if not r["too_small"] and r["level"] != UNKNOWN]
            q, df, p = auc_heterogeneity([r["auc"] for r in usable], [r["auc_se"] for r in usable])
            p_acc = _accuracy_heterogeneity([r["n_correct"] for r in usable], [r["n"] for r in usable])
            for r in rows:
                r.update(auc_q=q, auc_df=df, auc_heterogeneity_p=p, accuracy_heterogeneity_p=p_acc)
            out.extend(rows)
    return pd.DataFrame(out)
