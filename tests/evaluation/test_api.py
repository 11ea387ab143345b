"""The evaluation layer's public names survive its split into one module per idea."""
from __future__ import annotations

import ast
from pathlib import Path

import osteolib.evaluation as evaluation
from osteolib.evaluation import stats

EVALUATION = Path(evaluation.__file__).resolve().parent

# Names other code, tests and notebooks use from the package (notebooks call them as evaluation.<name>).
PACKAGE_NAMES = [
    "PROB_PREFIX", "PREDICTION_COLUMNS", "OPTIONAL_COLUMNS", "RUN_COLUMNS", "SPLITS", "PROB_SUM_TOLERANCE",
    "THRESHOLD_METHODS", "THRESHOLD_DEPENDENT", "PredictionError", "prob_columns", "class_names", "run_columns",
    "prediction_table", "validate_predictions", "write_predictions", "read_predictions", "choose_threshold",
    "select_epoch", "binary_metrics", "multiclass_metrics", "roc_table", "evaluate", "evaluate_runs",
    "reliability_curve", "expected_calibration_error", "plot_confusion_matrix", "plot_roc", "plot_reliability",
    "plot_learning_curves", "summarise_runs", "format_mean_std", "results_table", "to_markdown", "to_latex",
    "with_validation_thresholds",
]

# Everything the single-module stats offered (public names).
STATS_NAMES = [
    "RUN_KEYS", "PROB_PREFIX", "DEFAULT_THRESHOLD", "MCNEMAR_EXACT_BELOW", "FEW_GROUPS", "COMPARISON_COLUMNS",
    "AUCResult", "PairedResult", "McNemarResult", "BootstrapResult", "HolmResult", "ModelResult", "delong_auc",
    "delong_paired", "wilson_ci", "mcnemar_paired", "bootstrap_ci", "holm", "auc_table", "compare_scenarios",
    "significance_summary", "mixed_model", "agreement_model",
]


def test_package_keeps_its_names():
    missing = [name for name in PACKAGE_NAMES if not hasattr(evaluation, name)]
    assert missing == []
    assert set(PACKAGE_NAMES) <= set(evaluation.__all__)
    assert callable(evaluation.evaluate) and evaluation.metrics.__name__ == "osteolib.evaluation.metrics"


def test_stats_package_keeps_the_module_api():
    missing = [name for name in STATS_NAMES if not hasattr(stats, name)]
    assert missing == []
    assert set(STATS_NAMES) <= set(stats.__all__)


def test_stats_imports_nothing_else_from_osteolib():
    outside = []
    for path in sorted((EVALUATION / "stats").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            outside += [f"{path.name}: {m}" for m in modules
                        if m.split(".")[0] == "osteolib" and not m.startswith("osteolib.evaluation.stats")]
    assert outside == []


def test_modules_stay_small():
    sizes = {str(p.relative_to(EVALUATION)): len(p.read_text().splitlines()) for p in EVALUATION.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 600} == {}
