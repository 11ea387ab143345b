"""Layer 4, evaluation: the prediction table (the contract between training and statistics), metrics, statistics.

One idea per module:

* :mod:`.predictions`: the prediction table (format, checks, reading and writing);
* :mod:`.checks`: input checks of the array-level metrics;
* :mod:`.selection`: threshold and epoch selection, on the validation split only;
* :mod:`.metrics`: binary and multi-class metrics, per run and split;
* :mod:`.calibration`: reliability curves, expected calibration error, Brier score, calibration slope and intercept;
* :mod:`.figures`: ROC, reliability, confusion-matrix and learning-curve figures;
* :mod:`.tables`: summaries over seeds, the results table, Markdown and LaTeX;
* :mod:`.stats`: statistics for comparing scenarios (a package that imports nothing else from osteolib).
"""
from __future__ import annotations

from osteolib.evaluation import calibration, checks, figures, metrics, predictions, selection, stats, tables
from osteolib.evaluation.calibration import (
    calibration_measures,
    calibration_table,
    expected_calibration_error,
    reliability_curve,
)
from osteolib.evaluation.figures import plot_confusion_matrix, plot_learning_curves, plot_reliability, plot_roc
from osteolib.evaluation.metrics import (
    THRESHOLD_DEPENDENT,
    binary_metrics,
    evaluate,
    evaluate_runs,
    multiclass_metrics,
    roc_table,
    with_validation_thresholds,
)
from osteolib.evaluation.predictions import (
    OPTIONAL_COLUMNS,
    PREDICTION_COLUMNS,
    PROB_PREFIX,
    PROB_SUM_TOLERANCE,
    RUN_COLUMNS,
    SPLITS,
    PredictionError,
    class_names,
    prediction_table,
    prob_columns,
    read_predictions,
    run_columns,
    validate_predictions,
    write_predictions,
)
from osteolib.evaluation.selection import THRESHOLD_METHODS, choose_threshold, select_epoch, select_model
from osteolib.evaluation.tables import format_mean_std, results_table, summarise_runs, to_latex, to_markdown

__all__ = [
    "predictions",
    "checks",
    "selection",
    "metrics",
    "calibration",
    "figures",
    "tables",
    "stats",
    "PROB_PREFIX",
    "PREDICTION_COLUMNS",
    "OPTIONAL_COLUMNS",
    "RUN_COLUMNS",
    "SPLITS",
    "PROB_SUM_TOLERANCE",
    "THRESHOLD_METHODS",
    "THRESHOLD_DEPENDENT",
    "PredictionError",
    "prob_columns",
    "class_names",
    "run_columns",
    "prediction_table",
    "validate_predictions",
    "write_predictions",
    "read_predictions",
    "choose_threshold",
    "select_epoch",
    "select_model",
    "binary_metrics",
    "multiclass_metrics",
    "roc_table",
    "evaluate",
    "evaluate_runs",
    "reliability_curve",
    "expected_calibration_error",
    "calibration_measures",
    "calibration_table",
    "plot_confusion_matrix",
    "plot_roc",
    "plot_reliability",
    "plot_learning_curves",
    "summarise_runs",
    "format_mean_std",
    "results_table",
    "to_markdown",
    "to_latex",
    "with_validation_thresholds",
]
