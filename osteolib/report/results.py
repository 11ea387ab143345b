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
    class_names,
    evaluate_runs,
    run_columns,
    select_model,
    stats,
    with_validation_thresholds,
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
    "roc_figure",
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


def collect_results(run: Run, split: str = "test") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-run metrics of ``split`` (test, or external) and their summary (mean ± std over seeds) from this run's
    prediction files.

    Each run's threshold is chosen on its own validation rows (:func:`osteolib.evaluation.evaluate_runs`);
    the summary groups by backbone, scenario and label fraction.
    """
    return _summarised(evaluate_runs(read_predictions(run.predictions)), split)


def _summarised(metrics: pd.DataFrame, split: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    per_run = metrics[metrics["split"] == split].reset_index(drop=True)
    by = [c for c in ("backbone", "scenario", "label_fraction") if c in per_run.columns]
    measures = [m for m in ("accuracy", "auc", "sensitivity", "specificity") if m in per_run.columns]
    summary = summarise_runs(per_run, by=by, metrics=measures)
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
    """Write the run's result tables and figures, all from its prediction files. Returns the paths by name.

    * ``tables/results_runs.csv`` (test metrics of every run), ``tables/results_summary.csv``, ``tables/table1.csv|md|tex``
      (the study's Table 1: model, learning method, ACC and AUC as mean ± std over seeds, at the largest label
      fraction present) and ``figures/roc_test.png|pdf`` (ROC curves per scenario);
    * ``tables/results_runs_ci.csv``: every run's AUC with its DeLong CI and accuracy, sensitivity and specificity
      with Wilson CIs (:func:`osteolib.evaluation.stats.auc_table`);
    * ``tables/selection.csv``: every run's validation AUC and the model chosen on it (:func:`select_model`) --
      the model the report's calibration, subgroup and failure sections show;
    * ``tables/subgroups.csv``: test (and external) results by sex, age band, view, source and site, where the
      manifest has them (:func:`osteolib.evaluation.stats.subgroup_table`);
    * with an external test set (notebook 00's ``external_test``): ``tables/results_external_runs.csv``,
      ``tables/results_external_summary.csv``, ``tables/results_external_runs_ci.csv``, ``tables/table1_external.csv|md``
      and ``figures/roc_external.png|pdf``;
    * with several label fractions: ``tables/label_efficiency.csv|md|tex`` (mean ± SD), ``tables/label_efficiency_ci.csv``
      (the curve: AUC averaged over seeds with a patient-bootstrap CI), ``figures/label_efficiency.png|pdf`` (the curve
      with its bands) and, with a random-initialisation baseline, ``tables/label_efficiency_effects.csv`` (the
      pretraining effect at each fraction, Holm-corrected) and ``tables/label_efficiency_model.csv`` (test AUC ~
      initialisation x log2 fraction, seed as random effect).
    """
    import matplotlib.pyplot as plt

    from osteolib.plotting import save_figure

    predictions = read_predictions(run.predictions)
    metrics = evaluate_runs(predictions)
    # each run's validation-chosen threshold on its rows, once, for the intervals, ROC points and subgroups
    thresholded = with_validation_thresholds(predictions)
    tables = run.tables
    paths: dict[str, Path] = {}
    splits = ["test"] + (["external"] if (predictions["split"] == "external").any() else [])
    for split in splits:
        per_run, summary = _summarised(metrics, split)
        stem = "results" if split == "test" else "results_external"
        paths[f"{stem}_runs"] = _write_csv(per_run, tables / f"{stem}_runs.csv")
        paths[f"{stem}_summary"] = _write_csv(summary, tables / f"{stem}_summary.csv")
        paths.update(_write_table1(summary, tables, "table1" if split == "test" else "table1_external",
                                   tex=split == "test", what="Test" if split == "test" else "External test"))
        # every run with its intervals: AUC (DeLong), accuracy, sensitivity and specificity (Wilson)
        intervals = stats.auc_table(thresholded, split=split,
                                    positive=class_names(predictions)[-1], run_keys=_run_keys(predictions))
        paths[f"{stem}_runs_ci"] = _write_csv(intervals, tables / f"{stem}_runs_ci.csv")
        figure = roc_figure(thresholded, split)
        for path in save_figure(figure, run.figures, f"roc_{split}"):
            paths[f"roc_{split}_{path.suffix[1:]}"] = path
        plt.close(figure)
        if split == "test":
            test_summary = summary

    selection = select_model(metrics).rename(columns={"auc": "valid_auc"})
    keep = [c for c in (*run_columns(predictions), "valid_auc", "mean_valid_auc", "threshold", "selected")
            if c in selection.columns]
    paths["selection"] = _write_csv(selection[keep], tables / "selection.csv")
    subgroups = _subgroup_results(run, thresholded, splits)
    if subgroups is not None:
        paths["subgroups"] = _write_csv(subgroups, tables / "subgroups.csv")

    fractions = sorted(test_summary["label_fraction"].unique()) if "label_fraction" in test_summary.columns else [1.0]
    if len(fractions) > 1:
        paths.update(_write_label_efficiency(run, predictions, metrics, test_summary))
    return paths


def _write_label_efficiency(run: Run, predictions: pd.DataFrame, metrics: pd.DataFrame,
                            summary: pd.DataFrame) -> dict[str, Path]:
    """The label-efficiency outputs: the mean ± SD table, the curve with patient-level bands, the pretraining effect
    at each fraction (Holm-corrected) and the mixed model (:mod:`osteolib.evaluation.stats.label_efficiency`)."""
    import matplotlib.pyplot as plt

    from osteolib.plotting import save_figure

    tables, paths = run.tables, {}
    efficiency = label_efficiency_table(summary)
    paths["label_efficiency"] = _write_csv(efficiency, tables / "label_efficiency.csv")
    paths["label_efficiency_md"] = tables / "label_efficiency.md"
    to_markdown(efficiency, paths["label_efficiency_md"])
    paths["label_efficiency_tex"] = tables / "label_efficiency.tex"
    to_latex(efficiency, paths["label_efficiency_tex"], caption="Test AUC by share of training labels",
             label="tab:label-efficiency")

    test = predictions[predictions["split"] == "test"]
    manifest = run.find_optional("data/manifest.csv")
    if manifest is not None:
        from osteolib.data import read_manifest

        test = stats.with_patients(test, read_manifest(manifest, check_files=False))
    else:  # a folder of bare predictions: every image its own patient
        test = test.assign(patient_id=test["image_id"].astype(str))
    positive = class_names(predictions)[-1]
    points = stats.curve_points(test, positive)
    paths["label_efficiency_ci"] = _write_csv(points, tables / "label_efficiency_ci.csv")
    if (test["scenario"] == "random").any() and test["scenario"].nunique() > 1:
        effects = stats.pretraining_effects(test, positive)
        paths["label_efficiency_effects"] = _write_csv(effects, tables / "label_efficiency_effects.csv")
        models = stats.efficiency_models(metrics[metrics["split"] == "test"])
        if models:
            paths["label_efficiency_model"] = _write_csv(stats.model_table(models),
                                                         tables / "label_efficiency_model.csv")
    figure = label_efficiency_figure(points)
    for path in save_figure(figure, run.figures, "label_efficiency"):
        paths[f"label_efficiency_{path.suffix[1:]}"] = path
    plt.close(figure)
    return paths


def _run_keys(predictions: pd.DataFrame) -> tuple[str, ...]:
    return tuple(c for c in ("scenario", "backbone", "seed", "label_fraction") if c in predictions.columns)


def _write_csv(table: pd.DataFrame, path: Path) -> Path:
    out = table.copy()
    for column in out.columns:
        if out[column].map(lambda v: isinstance(v, (list, dict))).any():
            out[column] = out[column].map(json.dumps)
    out.to_csv(path, index=False)
    return path


def _write_table1(summary: pd.DataFrame, tables: Path, stem: str, tex: bool, what: str) -> dict[str, Path]:
    fractions = sorted(summary["label_fraction"].unique()) if "label_fraction" in summary.columns else [1.0]
    full = summary[summary["label_fraction"] == fractions[-1]] if "label_fraction" in summary.columns else summary
    table1 = results_table(_with_labels(full))
    paths = {stem: tables / f"{stem}.csv", f"{stem}_md": tables / f"{stem}.md"}
    table1.to_csv(paths[stem], index=False)
    to_markdown(table1, paths[f"{stem}_md"])
    if tex:
        caption = f"{what} accuracy and AUC, mean ± standard deviation over seeds"
        if len(fractions) > 1:
            caption += f" ({fractions[-1]:.0%} of the training labels)"
        paths[f"{stem}_tex"] = tables / f"{stem}.tex"
        to_latex(table1, paths[f"{stem}_tex"], caption=caption, label="tab:results")
    return paths


def _subgroup_results(run: Run, predictions: pd.DataFrame, splits: list[str]) -> pd.DataFrame | None:
    """Results by subgroup for each split of ``predictions`` (with their thresholds), from the manifest(s) the
    predicted images come from."""
    from osteolib.data import read_manifest

    manifests = {"test": run.find_optional("data/manifest.csv")}  # absent only in a folder of bare predictions
    if manifests["test"] is None:
        return None
    if "external" in splits:
        manifests["external"] = run.find("data/external_manifest.csv")
    classes = class_names(predictions)
    out = []
    for split, path in manifests.items():
        groups = stats.subgroup_columns(read_manifest(path, check_files=False))
        if len(groups.columns) > 1:
            out.append(stats.subgroup_table(predictions, groups, split=split, positive=classes[-1],
                                              run_keys=_run_keys(predictions)))
    out = [t for t in out if len(t)]
    return pd.concat(out, ignore_index=True) if out else None


def roc_figure(predictions: pd.DataFrame, split: str = "test"):
    """ROC curves of ``split``: one panel per backbone, one colour per scenario, one line per seed, each run's
    validation-chosen operating point marked (the positive class is the last one)."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    rows = predictions[predictions["split"] == split]
    positive = class_names(rows)[-1]
    backbones = [b for b in BACKBONE_LABELS if b in set(rows["backbone"])] + \
        sorted(set(rows["backbone"]) - set(BACKBONE_LABELS))
    scenarios = [c for c in SCENARIOS if c in set(rows["scenario"])] + sorted(set(rows["scenario"]) - set(SCENARIOS))
    colours = dict(zip(scenarios, plt.cm.tab10.colors))
    fig, axes = plt.subplots(1, len(backbones), figsize=(4.3 * len(backbones), 4.3), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
        for scenario in scenarios:
            runs = rows[(rows["backbone"] == backbone) & (rows["scenario"] == scenario)]
            for k, (_, one) in enumerate(runs.groupby(run_columns(runs), sort=True)):
                y = (one["label"].astype(str) == positive).to_numpy()
                if y.all() or not y.any():
                    continue
                score = one[f"prob_{positive}"].to_numpy()
                fpr, tpr, _ = roc_curve(y, score)
                ax.plot(fpr, tpr, color=colours[scenario], linewidth=1.1, alpha=0.8,
                        label=SCENARIO_LABELS.get(scenario, scenario) if k == 0 else None)
                if "threshold" in one.columns and one["threshold"].notna().all():
                    called = score >= float(one["threshold"].iloc[0])
                    ax.plot((called & ~y).sum() / (~y).sum(), (called & y).sum() / y.sum(), "o", markersize=3,
                            color=colours[scenario])
        ax.set_title(f"{BACKBONE_LABELS.get(backbone, backbone)} · {split}", fontsize=10)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    return fig


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


def label_efficiency_figure(points: pd.DataFrame):
    """Test AUC against the share of training labels: one panel per backbone, one line per initialisation (the mean
    over seeds), a band for its 95 % patient-bootstrap interval (:func:`osteolib.evaluation.stats.curve_points`)."""
    import matplotlib.pyplot as plt

    needed = [c for c in ("backbone", "scenario", "label_fraction", "auc", "ci_low", "ci_high") if c not in points.columns]
    if needed:
        raise ValueError(f"the curve points lack {needed}; build them with osteolib.evaluation.stats.curve_points")
    backbones = [b for b in BACKBONE_LABELS if b in set(points["backbone"])] + \
        sorted(set(points["backbone"]) - set(BACKBONE_LABELS))
    scenarios = [c for c in SCENARIOS if c in set(points["scenario"])] + sorted(set(points["scenario"]) - set(SCENARIOS))
    colours = dict(zip(scenarios, plt.cm.tab10.colors))
    fractions = sorted(points["label_fraction"].unique())
    fig, axes = plt.subplots(1, len(backbones), figsize=(4.4 * len(backbones), 3.6), squeeze=False, sharey=True)
    for ax, backbone in zip(axes[0], backbones):
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        for scenario in scenarios:
            line = points[(points["backbone"] == backbone) & (points["scenario"] == scenario)]
            if line.empty:
                continue
            line = line.sort_values("label_fraction")
            seeds = int(line["seeds"].max()) if "seeds" in line.columns else None
            label = SCENARIO_LABELS.get(scenario, scenario) + (f" ({seeds} seed{'s' * (seeds != 1)})" if seeds else "")
            ax.fill_between(line["label_fraction"], line["ci_low"], line["ci_high"], color=colours[scenario],
                            alpha=0.15, linewidth=0)
            ax.plot(line["label_fraction"], line["auc"], marker="o", markersize=4, linewidth=1.4,
                    color=colours[scenario], label=label)
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([f"{f:.0%}" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("share of training patients with labels")
        ax.set_title(BACKBONE_LABELS.get(backbone, backbone), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test AUC (mean over seeds, 95 % CI)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
