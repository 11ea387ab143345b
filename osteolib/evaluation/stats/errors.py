"""The most confident errors of one run: the false positives it was surest of and the false negatives it was
surest of, for the failure analysis reviewers ask for (look at them, with their maps, before trusting a mean)."""
from __future__ import annotations

import pandas as pd

from osteolib.evaluation.stats.views import PROB_PREFIX, require_columns, run_view

__all__ = ["confident_errors"]


def confident_errors(run_predictions: pd.DataFrame, positive: str | None = None, n: int = 4,
                     split: str = "test") -> pd.DataFrame:
    """Up to ``n`` false positives (highest positive probability among images of another class called positive) and
    ``n`` false negatives (lowest among positive images called otherwise) of one run's ``split`` rows, at the run's
    threshold (with more than two classes: the most probable class is the call).

    Columns: ``kind`` ("false positive" | "false negative"), ``rank`` (1 = most confident), ``image_id``,
    ``label``, ``prob_positive``, ``threshold``.
    """
    require_columns(run_predictions, ["image_id", "label", "split"], "prediction table of one run")
    rows = run_predictions[run_predictions["split"].astype(str) == split]
    view = run_view(rows, positive, f"{split} rows")
    indexed = rows.set_index(rows["image_id"].astype(str)).loc[view.y.index]
    if view.n_classes == 2:
        called_positive = view.score.to_numpy() >= view.threshold
    else:  # the most probable class is the call; "positive" means the positive class won
        probs = indexed[[c for c in indexed.columns if c.startswith(PROB_PREFIX)]]
        called_positive = probs.idxmax(axis=1).to_numpy() == PROB_PREFIX + view.positive
    table = pd.DataFrame({"image_id": view.y.index, "label": indexed["label"].to_numpy(),
                          "prob_positive": view.score.to_numpy(), "y": view.y.to_numpy(), "called": called_positive})
    false_positives = table[(table["y"] == 0) & table["called"]].sort_values("prob_positive", ascending=False,
                                                                             kind="mergesort").head(n)
    false_negatives = table[(table["y"] == 1) & ~table["called"]].sort_values("prob_positive", ascending=True,
                                                                              kind="mergesort").head(n)
    out = pd.concat([false_positives.assign(kind="false positive", rank=range(1, len(false_positives) + 1)),
                     false_negatives.assign(kind="false negative", rank=range(1, len(false_negatives) + 1))],
                    ignore_index=True)
    return out.assign(threshold=view.threshold)[["kind", "rank", "image_id", "label", "prob_positive", "threshold"]]
