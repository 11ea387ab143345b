"""Per-run AUC and accuracy with intervals, and paired comparisons of scenarios (DeLong, McNemar, Holm)."""
from __future__ import annotations

import math

import itertools
from typing import Any, Sequence

import pandas as pd

from osteolib.evaluation.stats.delong import delong_auc, delong_paired
from osteolib.evaluation.stats.intervals import wilson_ci
from osteolib.evaluation.stats.mcnemar import mcnemar_paired
from osteolib.evaluation.stats.multiple import holm
from osteolib.evaluation.stats.views import RUN_KEYS, align_runs, require_columns, run_label, run_view, select_split

COMPARISON_COLUMNS = [
    "backbone", "seed", "scenario", "reference", "test", "n", "n_positive", "value", "value_reference",
    "effect", "effect_ci_low", "effect_ci_high", "statistic", "p_value", "p_holm", "significant", "alpha",
    "family_size", "method", "discordant_b", "discordant_c", "odds_ratio", "odds_ratio_ci_low",
    "odds_ratio_ci_high",
]


def auc_table(predictions_df: pd.DataFrame, split: str | None = "test", positive: str | None = None,
              alpha: float = 0.05, run_keys: Sequence[str] = RUN_KEYS) -> pd.DataFrame:
    """One row per run: n, AUC with DeLong CI, threshold, accuracy with Wilson CI (binary: sensitivity and
    specificity at the threshold with Wilson CIs too).

    Rows of ``split`` only (None = all rows). ``positive`` names the positive class; by default it is the
    class whose ``target`` is 1 (binary tables only). With more than two classes the AUC is ``positive`` against
    the rest, the accuracy that of the most probable class, and ``threshold`` is NaN.
    """
    require_columns(predictions_df, ["image_id", "label", "target", *run_keys], "prediction table")
    df = select_split(predictions_df, split)
    rows = []
    for values, run in df.groupby(list(run_keys), sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        run_name = run_label(run_keys, values)
        view = run_view(run, positive, run_name)
        auc = delong_auc(view.y.to_numpy(), view.score.to_numpy(), alpha=alpha)
        n = int(view.correct.size)
        n_correct = int(view.correct.sum())
        acc_low, acc_high = wilson_ci(n_correct, n, alpha)
        row = {**dict(zip(run_keys, values)), "n": n, "n_positive": auc.n_positive, "positive": view.positive,
               "auc": auc.auc, "auc_se": auc.se, "auc_ci_low": auc.ci_low, "auc_ci_high": auc.ci_high,
               "threshold": view.threshold, "accuracy": n_correct / n, "accuracy_ci_low": acc_low,
               "accuracy_ci_high": acc_high}
        if view.n_classes == 2:  # at the run's threshold; with more classes "positive vs rest" has no single one
            y, correct = view.y.to_numpy().astype(bool), view.correct.to_numpy()
            for name, cases in (("sensitivity", y), ("specificity", ~y)):
                hits, total = int((correct & cases).sum()), int(cases.sum())
                low, high = wilson_ci(hits, total, alpha) if total else (math.nan, math.nan)
                row.update({name: hits / total if total else math.nan, f"{name}_ci_low": low, f"{name}_ci_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


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
    require_columns(predictions_df, ["image_id", "label", "target", "scenario", *by], "prediction table")
    df = select_split(predictions_df, split)
    groups = [((), df)] if not by else [
        (values if isinstance(values, tuple) else (values,), g)
        for values, g in df.groupby(by, sort=True, dropna=False)]
    rows: list[dict[str, Any]] = []
    for values, group in groups:
        group_name = run_label(by, values)
        scenarios = sorted(group["scenario"].astype(str).unique().tolist())
        if reference not in scenarios:
            raise ValueError(f"group {group_name} has no run of the reference scenario {reference!r} (scenarios: "
                             f"{scenarios}); pass reference=<one of them>")
        others = [s for s in scenarios if s != reference]
        pairs = [(s, reference) for s in others]
        if all_pairs:
            pairs += list(itertools.combinations(others, 2))
        views = {s: run_view(run, positive, run_label(by, values, s))
                 for s, run in group.groupby(group["scenario"].astype(str))}
        for scenario, ref in pairs:
            name_s, name_r = run_label(by, values, scenario), run_label(by, values, ref)
            view_s, view_r = align_runs(views[scenario], views[ref], name_s, name_r)
            base = {**dict(zip(by, values)), "scenario": scenario, "reference": ref, "n": int(view_s.y.size),
                    "n_positive": int(view_s.y.sum()), "alpha": alpha}
            dl = delong_paired(view_s.y.to_numpy(), view_s.score.to_numpy(), view_r.score.to_numpy(), alpha=alpha)
            rows.append({**base, "test": "delong_auc", "value": dl.auc_a, "value_reference": dl.auc_b,
                         "effect": dl.diff, "effect_ci_low": dl.ci_low, "effect_ci_high": dl.ci_high,
                         "statistic": dl.z, "p_value": dl.p_value, "method": "DeLong paired (z)" + (
                             f"; {view_s.positive} vs rest" if view_s.n_classes > 2 else "")})
            mc = mcnemar_paired(view_s.correct.to_numpy(), view_r.correct.to_numpy(), alpha=alpha)
            rows.append({**base, "test": "mcnemar_accuracy", "value": mc.accuracy_a, "value_reference": mc.accuracy_b,
                         "effect": mc.diff, "effect_ci_low": mc.diff_ci_low, "effect_ci_high": mc.diff_ci_high,
                         "statistic": mc.statistic, "p_value": mc.p_value,
                         "method": f"{mc.method}; " + (
                             "most probable class" if view_s.n_classes > 2
                             else f"thresholds {view_s.threshold:g} / {view_r.threshold:g}"),
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
