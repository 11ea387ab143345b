"""Figures: ROC curves, reliability diagrams, confusion matrices, learning curves.

matplotlib and seaborn are imported on use, so metric-only users do not pay for them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from osteolib.evaluation.calibration import expected_calibration_error, reliability_curve
from osteolib.evaluation.checks import binary_inputs
from osteolib.evaluation.metrics import binary_metrics
from osteolib.evaluation.predictions import PredictionError


def plot_confusion_matrix(cm: Any, classes: Sequence[str], normalize: str | None = None, title: str | None = None):
    """A confusion matrix heat map (rows = true class). ``normalize``: None (counts), "true" (each row sums to 1:
    per-class recall on the diagonal), "pred" (each column sums to 1) or "all"; counts stay in the cells."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    counts = np.asarray(cm, dtype=np.float64)
    classes = [str(c) for c in classes]
    if counts.shape != (len(classes), len(classes)):
        raise PredictionError(f"confusion matrix has shape {counts.shape}; expected {len(classes)}x{len(classes)} "
                              f"for classes {classes}")
    axis = {"true": 1, "pred": 0, "all": None}
    if normalize is not None and normalize not in axis:
        raise PredictionError(f"normalize must be None, 'true', 'pred' or 'all'; got {normalize!r}")
    if normalize is None:
        values, annotations = counts, counts.astype(int).astype(str)
    else:
        totals = counts.sum(axis=axis[normalize], keepdims=normalize != "all")
        with np.errstate(invalid="ignore", divide="ignore"):
            values = counts / totals  # a class with no rows/predictions shows as an empty (NaN) row/column
        annotations = np.array([[("–" if np.isnan(v) else f"{v:.2f}") + f"\n({int(c)})" for v, c in zip(vr, cr)]
                                for vr, cr in zip(values, counts)])
    size = 1.2 + 0.7 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    sns.heatmap(values, annot=annotations, fmt="", cmap="Blues", square=True, cbar=True,
                xticklabels=classes, yticklabels=classes, vmin=0, vmax=None if normalize is None else 1, ax=ax,
                annot_kws={"fontsize": 8})
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    # row names read horizontally (seaborn turns them upright, onto the axis label); with several classes the
    # column names slant so that long ones (osteopenia, osteoporosis) do not run into each other
    ax.tick_params(axis="y", labelrotation=0)
    if len(classes) > 2:
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
    ax.set_title(title or ("confusion matrix" + (f" (normalised over {normalize})" if normalize else "")))
    fig.tight_layout()
    return fig


def plot_roc(curves: Mapping[str, tuple[Any, Any]], thresholds: Mapping[str, float] | None = None,
             title: str = "ROC curve"):
    """ROC curves, one per entry ``name -> (y_true, p_pos)``, with the AUC in the legend; ``thresholds``
    (name -> threshold) marks each curve's operating point."""
    import matplotlib.pyplot as plt

    if not curves:
        raise PredictionError("plot_roc needs at least one curve: {name: (y_true, p_pos)}")
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    for name, (y_true, p_pos) in curves.items():
        y, p = binary_inputs(y_true, p_pos, what=f"y_true of {name!r}")
        fpr, tpr, _ = roc_curve(y, p)
        (line,) = ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC = {roc_auc_score(y, p):.3f})")
        if thresholds and name in thresholds:
            point = binary_metrics(y, p, thresholds[name])
            ax.plot(1 - point["specificity"], point["sensitivity"], "o", color=line.get_color(), markersize=5)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def plot_reliability(curves: Mapping[str, tuple[Any, Any]], n_bins: int = 10, strategy: str = "uniform",
                     title: str = "reliability"):
    """Reliability diagrams, one per entry ``name -> (y_true, p_pos)``, with the ECE in the legend, above a
    panel of how many predictions fall in each bin."""
    import matplotlib.pyplot as plt

    if not curves:
        raise PredictionError("plot_reliability needs at least one curve: {name: (y_true, p_pos)}")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="perfect calibration")
    for name, (y_true, p) in curves.items():
        table = reliability_curve(y_true, p, n_bins=n_bins, strategy=strategy)
        ece = expected_calibration_error(y_true, p, n_bins=n_bins)
        (line,) = top.plot(table["mean_predicted"], table["fraction_positive"], "o-", markersize=4,
                           label=f"{name} (ECE = {ece:.3f})")
        centres = (table["lower"] + table["upper"]) / 2
        bottom.step(centres, table["count"], where="mid", color=line.get_color())
    top.set_ylabel("observed frequency of the positive class")
    top.set_ylim(-0.02, 1.02)
    top.set_title(title)
    top.legend(loc="upper left", fontsize=7)
    bottom.set_xlabel("mean predicted probability")
    bottom.set_ylabel("count")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    return fig


def plot_learning_curves(history_df: pd.DataFrame, chosen_epoch: int | None = None, title: str = "learning curves"):
    """Per-epoch training/validation curves: loss columns on the left, other numeric metrics on the right,
    the chosen epoch marked. Non-numeric columns (e.g. fastai's "time") are not plotted; test columns are
    refused, as in :func:`select_epoch`."""
    import matplotlib.pyplot as plt

    test_columns = [c for c in history_df.columns if "test" in str(c).lower()]
    if test_columns:
        raise PredictionError(f"learning curves show training and validation only; drop test columns {test_columns}")
    epochs = history_df["epoch"].to_numpy() if "epoch" in history_df.columns else history_df.index.to_numpy()
    numeric = [c for c in history_df.columns
               if c != "epoch" and pd.api.types.is_numeric_dtype(history_df[c])]
    losses = [c for c in numeric if "loss" in str(c).lower()]
    others = [c for c in numeric if c not in losses]
    panels = [(cols, label) for cols, label in ((losses, "loss"), (others, "metric")) if cols]
    if not panels:
        raise PredictionError(f"the history has no numeric columns to plot; it has {list(history_df.columns)}")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (cols, label) in zip(axes[0], panels):
        for column in cols:
            ax.plot(epochs, history_df[column].to_numpy(dtype=np.float64), marker=".", label=str(column))
        if chosen_epoch is not None:
            ax.axvline(chosen_epoch, color="grey", linestyle=":", linewidth=1, label=f"chosen epoch {chosen_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
