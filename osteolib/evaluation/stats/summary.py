"""The comparison table in words: which differences survive Holm correction, with their effect sizes."""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from osteolib.evaluation.stats.views import require_columns


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
    require_columns(comparisons_df, ["scenario", "reference", "test", "effect", "effect_ci_low", "effect_ci_high",
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
