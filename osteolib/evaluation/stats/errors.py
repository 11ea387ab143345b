"""The most confident errors of one run: the false positives it was surest of and the false negatives it was
surest of, for the failure analysis reviewers ask for (look at them, with their maps, before trusting a mean)."""
from __future__ import annotations

import pandas as pd

from osteolib.evaluation.stats.views import require_columns, run_view

__all__ = ["confident_errors"]


def confident_errors(run_predictions: pd.DataFrame, positive: str | None = None, n: int = 4,
                     split: str = "test") -> pd.DataFrame:
    """Up to ``n`` false positives (highest positive probability among wrongly called negatives) and ``n`` false
    negatives (lowest among wrongly called positives) of one run's ``split`` rows, at the run's threshold.

    Columns: ``kind`` ("false positive" | "false negative"), ``rank`` (1 = most confident), ``image_id``,
    ``label``, ``prob_positive``, ``threshold``.
    """
    require_columns(run_predictions, ["image_id", "label", "split"], "prediction table of one run")
    rows = run_predictions[run_predictions["split"].astype(str) == split]
    view = run_view(rows, positive, f"{split} rows")
    label = rows.set_index(rows["image_id"].astype(str))["label"]
    table = pd.DataFrame({"image_id": view.y.index, "label": label.loc[view.y.index].to_numpy(),
                          "prob_positive": view.score.to_numpy(), "y": view.y.to_numpy(),
                          "correct": view.correct.to_numpy()})
    false_positives = table[(table["y"] == 0) & ~table["correct"]].sort_values("prob_positive", ascending=False,
                                                                               kind="mergesort").head(n)
    false_negatives = table[(table["y"] == 1) & ~table["correct"]].sort_values("prob_positive", ascending=True,
                                                                               kind="mergesort").head(n)
    out = pd.concat([false_positives.assign(kind="false positive", rank=range(1, len(false_positives) + 1)),
                     false_negatives.assign(kind="false negative", rank=range(1, len(false_negatives) + 1))],
                    ignore_index=True)
    return out.assign(threshold=view.threshold)[["kind", "rank", "image_id", "label", "prob_positive", "threshold"]]
