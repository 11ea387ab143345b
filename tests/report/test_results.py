"""The grid's result tables (osteolib.report.results): per-run metrics and their summary from a run's prediction
files, Table 1 in csv / md / tex, and the label-efficiency table and figure."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from osteolib.evaluation import prediction_table, write_predictions
from osteolib.report import collect_results, write_results_tables
from osteolib.runs import Run

CLASSES = ["normal", "osteoporosis"]


def test_collect_results_writes_table1_and_the_label_efficiency_outputs(tmp_path):
    run = Run(tmp_path / "run")
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(12)]
    labels = [CLASSES[k % 2] for k in range(12)]
    for backbone in ("densenet121", "vit_small"):
        for scenario in ("random", "chest_mae"):
            for fraction in (0.25, 1.0):
                for seed in (0, 1):
                    skill = 0.3 * fraction + (0.2 if scenario == "chest_mae" else 0.0)
                    p = np.clip(np.array([k % 2 for k in range(12)]) * skill + rng.uniform(0, 0.7, 12), 0, 1)
                    ident = dict(scenario=scenario, backbone=backbone, seed=seed, fold=0, label_fraction=fraction)
                    table = pd.concat([prediction_table(ids[:6], labels[:6], p[:6], CLASSES, "val", **ident),
                                       prediction_table(ids[6:], labels[6:], p[6:], CLASSES, "test", **ident)])
                    write_predictions(table, run.predictions / f"{scenario}-{backbone}-seed{seed}-frac{fraction}.csv")
    per_run, summary = collect_results(run)
    assert len(per_run) == 16 and set(per_run["split"]) == {"test"}
    assert len(summary) == 8 and set(summary["n_runs"]) == {2}
    first = summary.iloc[0]
    assert (first["backbone"], first["scenario"], first["label_fraction"]) == ("densenet121", "random", 0.25)
    group = per_run[(per_run["backbone"] == "densenet121") & (per_run["scenario"] == "random")
                    & (per_run["label_fraction"] == 0.25)]
    assert first["auc_mean"] == pytest.approx(group["auc"].mean())

    paths = write_results_tables(run)
    table1 = pd.read_csv(paths["table1"])
    assert list(table1.columns) == ["Model", "Learning method", "ACC", "AUC"] and len(table1) == 4
    assert table1["Model"].tolist() == ["DenseNet121", "DenseNet121", "ViT-small", "ViT-small"]
    assert table1["Learning method"].tolist()[:2] == ["Random initialisation", "Chest MAE"]
    assert all(" ± " in cell for cell in table1["AUC"])
    assert r"$\pm$" in paths["table1_tex"].read_text() and "| Model" in paths["table1_md"].read_text()
    efficiency = pd.read_csv(paths["label_efficiency"])
    assert list(efficiency.columns) == ["Model", "Learning method", "25% labels", "100% labels"]
    assert paths["label_efficiency_png"].stat().st_size > 0 and paths["label_efficiency_pdf"].is_file()
    assert len(pd.read_csv(paths["results_runs"])) == 16
