"""The study's results from a run folder: per-run test metrics, their summary over seeds, Table 1 and the
label-efficiency table and figure (:func:`write_results_tables`).

Everything is read from the prediction files fine-tuning wrote (``<run>/predictions/*.csv``,
:mod:`osteolib.stages.finetune`); nothing here trains or predicts.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from osteolib.evaluation import (
    evaluate_runs,
    read_predictions,
    results_table,
    summarise_runs,
    to_latex,
    to_markdown,
)
from osteolib.runs import Run
from osteolib.study import SCENARIOS

__all__ = [
    "BACKBONE_LABELS",
    "SCENARIO_LABELS",
    "collect_results",
    "write_results_tables",
    "label_efficiency_table",
    "label_efficiency_figure",
]

# Display names for the paper's tables and figures (raw names stay in every CSV).
BACKBONE_LABELS = {"densenet121": "DenseNet121", "densenet121_multiscale": "DenseNet121 multi-scale",
                   "vit_small": "ViT-small", "efficientnetv2_s": "EfficientNetV2-S", "resnet50": "ResNet50",
                   "mobilenetv3": "MobileNetV3"}
SCENARIO_LABELS = {"random": "Random initialisation", "chest_mae": "Chest MAE",
                   "chest_mae+target_mae_random": "Chest MAE + target MAE (random crop)",
                   "chest_mae+target_mae_center": "Chest MAE + target MAE (center crop)",
                   "chest_mae+rotation": "Chest MAE + rotation proxy"}


# --------------------------------------------------------------------------------------------
# Results of a run folder


def collect_results(run: Run) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-run test metrics and their summary (mean ± std over seeds) from this run's prediction files.

    Each run's threshold is chosen on its own validation rows (:func:`osteolib.evaluation.evaluate_runs`);
    the summary groups by backbone, scenario and label fraction.
    """
    predictions = read_predictions(run.predictions)
    metrics = evaluate_runs(predictions)
    per_run = metrics[metrics["split"] == "test"].reset_index(drop=True)
    by = [c for c in ("backbone", "scenario", "label_fraction") if c in per_run.columns]
    summary = summarise_runs(per_run, by=by)
    order = _display_order(summary)
    return per_run, summary.iloc[order].reset_index(drop=True)


def _display_order(summary: pd.DataFrame) -> list[int]:
    backbones = list(BACKBONE_LABELS)
    scenarios = list(SCENARIOS)

    def key(i: int) -> tuple:
        row = summary.iloc[i]
        backbone, scenario = str(row["backbone"]), str(row["scenario"])
        fraction = float(row["label_fraction"]) if "label_fraction" in summary.columns else 1.0
        return (backbones.index(backbone) if backbone in backbones else len(backbones), backbone,
                scenarios.index(scenario) if scenario in scenarios else len(scenarios), scenario, fraction)

    return sorted(range(len(summary)), key=key)


def _with_labels(summary: pd.DataFrame) -> pd.DataFrame:
    labelled = summary.copy()
    labelled["backbone"] = [BACKBONE_LABELS.get(str(b), str(b)) for b in labelled["backbone"]]
    labelled["scenario"] = [SCENARIO_LABELS.get(str(s), str(s)) for s in labelled["scenario"]]
    return labelled


def write_results_tables(run: Run) -> dict[str, Path]:
    """Write the run's result tables (and the label-efficiency figure when it has several label fractions).

    ``tables/results_runs.csv`` (test metrics of every run), ``tables/results_summary.csv``,
    ``tables/table1.csv|md|tex`` (the study's Table 1: model, learning method, ACC and AUC as mean ± std over
    seeds, at the largest label fraction present), and with several fractions
    ``tables/label_efficiency.csv|md|tex`` (test AUC per fraction) and ``figures/label_efficiency.png|pdf``.
    Returns the paths by name.
    """
    from osteolib.plotting import save_figure

    per_run, summary = collect_results(run)
    tables = run.tables
    paths: dict[str, Path] = {}
    runs_out = per_run.copy()
    for column in runs_out.columns:
        if runs_out[column].map(lambda v: isinstance(v, (list, dict))).any():
            runs_out[column] = runs_out[column].map(json.dumps)
    paths["results_runs"] = tables / "results_runs.csv"
    runs_out.to_csv(paths["results_runs"], index=False)
    paths["results_summary"] = tables / "results_summary.csv"
    summary.to_csv(paths["results_summary"], index=False)

    fractions = sorted(summary["label_fraction"].unique()) if "label_fraction" in summary.columns else [1.0]
    full = summary[summary["label_fraction"] == fractions[-1]] if "label_fraction" in summary.columns else summary
    table1 = results_table(_with_labels(full))
    paths["table1"] = tables / "table1.csv"
    table1.to_csv(paths["table1"], index=False)
    paths["table1_md"] = tables / "table1.md"
    to_markdown(table1, paths["table1_md"])
    paths["table1_tex"] = tables / "table1.tex"
    caption = "Test accuracy and AUC, mean ± standard deviation over seeds"
    if len(fractions) > 1:
        caption += f" ({fractions[-1]:.0%} of the training labels)"
    to_latex(table1, paths["table1_tex"], caption=caption, label="tab:results")

    if len(fractions) > 1:
        efficiency = label_efficiency_table(summary)
        paths["label_efficiency"] = tables / "label_efficiency.csv"
        efficiency.to_csv(paths["label_efficiency"], index=False)
        paths["label_efficiency_md"] = tables / "label_efficiency.md"
        to_markdown(efficiency, paths["label_efficiency_md"])
        paths["label_efficiency_tex"] = tables / "label_efficiency.tex"
        to_latex(efficiency, paths["label_efficiency_tex"], caption="Test AUC by share of training labels",
                 label="tab:label-efficiency")
        import matplotlib.pyplot as plt

        figure = label_efficiency_figure(summary)
        for path in save_figure(figure, run.figures, "label_efficiency"):
            paths[f"label_efficiency_{path.suffix[1:]}"] = path
        plt.close(figure)
    return paths


def label_efficiency_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Test AUC ("mean ± std") per model and learning method (rows) and label fraction (columns)."""
    from osteolib.evaluation import format_mean_std

    fractions = sorted(summary["label_fraction"].unique())
    rows = []
    for (backbone, scenario), group in summary.groupby(["backbone", "scenario"], sort=False):
        row = {"Model": BACKBONE_LABELS.get(backbone, backbone), "Learning method": SCENARIO_LABELS.get(scenario, scenario)}
        for fraction in fractions:
            match = group[group["label_fraction"] == fraction]
            row[f"{fraction:.0%} labels"] = ("n/a" if match.empty else
                                             format_mean_std(match["auc_mean"].iloc[0], match["auc_std"].iloc[0],
                                                             int(match["auc_n"].iloc[0])))
        rows.append(row)
    return pd.DataFrame(rows)


def label_efficiency_figure(summary: pd.DataFrame):
    """Test AUC against the share of training labels: one panel per backbone, one line per scenario,
    error bars = standard deviation over seeds (none where a point has a single seed)."""
    import matplotlib.pyplot as plt

    needed = [c for c in ("backbone", "scenario", "label_fraction", "auc_mean", "auc_std") if c not in summary.columns]
    if needed:
        raise ValueError(f"the summary lacks {needed}; build it with collect_results(run)")
    backbones = list(dict.fromkeys(summary["backbone"]))
    fractions = sorted(summary["label_fraction"].unique())
    fig, axes = plt.subplots(1, len(backbones), figsize=(4.2 * len(backbones), 3.4), squeeze=False, sharey=True)
    for ax, backbone in zip(axes[0], backbones):
        rows = summary[summary["backbone"] == backbone]
        for scenario, group in rows.groupby("scenario", sort=False):
            group = group.sort_values("label_fraction")
            ax.errorbar(group["label_fraction"], group["auc_mean"], yerr=group["auc_std"].fillna(0.0), marker="o",
                        capsize=3, linewidth=1.2, markersize=4, label=SCENARIO_LABELS.get(scenario, scenario))
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([f"{f:.0%}" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("share of training labels")
        ax.set_title(BACKBONE_LABELS.get(backbone, backbone), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test AUC (mean ± std over seeds)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
