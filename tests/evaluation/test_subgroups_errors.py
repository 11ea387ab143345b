"""Results by subgroup, the model chosen on validation, and a run's most confident errors (issue 17)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from osteolib.evaluation import evaluate_runs, select_model, stats


def predictions(n_per_level: int = 40, seed: int = 0, split: str = "test") -> pd.DataFrame:
    """One run: level A's scores separate the classes well, level B's not at all."""
    rng = np.random.default_rng(seed)
    rows = []
    for level, shift in (("A", 1.2), ("B", 0.0)):
        for k in range(n_per_level):
            y = k % 2
            p = 1 / (1 + math.exp(-(shift * (y - 0.5) * 2 + rng.normal(0, 1))))
            rows.append({"image_id": f"{level}{k}", "label": ["normal", "sick"][y], "target": y,
                         "prob_normal": 1 - p, "prob_sick": p, "split": split, "scenario": "random",
                         "backbone": "densenet121", "seed": 0, "fold": 0, "threshold": 0.5, "level": level})
    return pd.DataFrame(rows)


def groups(table: pd.DataFrame) -> pd.DataFrame:
    manifest = pd.DataFrame({"image_id": table["image_id"], "sex": table["level"].map({"A": "F", "B": "M"}),
                             "age": np.where(table["level"] == "A", 30, 70)})
    return stats.subgroup_columns(manifest)


def test_age_bands_cover_every_age_and_name_missing_ones():
    bands = stats.age_bands(pd.Series([0, 17, 18, 39.5, 40, 79, 80, 104, None]))
    assert bands.tolist() == ["0-17", "0-17", "18-39", "18-39", "40-59", "60-79", "80+", "80+", "unknown"]


def test_a_subgroup_that_differs_is_found_and_tested():
    table = predictions()
    result = stats.subgroup_table(table, groups(table), positive="sick")
    sex = result[result["variable"] == "sex"].set_index("level")
    assert set(result["variable"]) == {"sex", "age_band"}
    assert sex.loc["F", "auc"] > 0.85 and sex.loc["M", "auc"] < 0.75
    assert sex.loc["F", "n"] == 40 and sex.loc["F", "n_positive"] == 20 and not sex["too_small"].any()
    assert sex["auc_heterogeneity_p"].iloc[0] < 0.05  # Cochran's Q over the two DeLong AUCs
    assert sex["auc_df"].iloc[0] == 1
    lo, hi = sex.loc["F", ["auc_ci_low", "auc_ci_high"]]
    assert lo < sex.loc["F", "auc"] < hi


def test_small_subgroups_are_marked_and_kept_out_of_the_test_not_dropped():
    table = predictions()
    manifest = pd.DataFrame({"image_id": table["image_id"], "view": ["AP"] * 76 + ["PA"] * 4})
    result = stats.subgroup_table(table, stats.subgroup_columns(manifest), positive="sick")
    view = result.set_index("level")
    assert view.loc["PA", "too_small"] and view.loc["PA", "n"] == 4  # kept, marked
    assert math.isnan(view.loc["AP", "auc_heterogeneity_p"])  # one usable level: nothing to test


def test_a_predicted_image_missing_from_the_manifest_is_an_error():
    table = predictions()
    with pytest.raises(ValueError, match="no row in the manifest"):
        stats.subgroup_table(table, groups(table).iloc[5:], positive="sick")


def test_heterogeneity_needs_a_variance():
    assert stats.auc_heterogeneity([0.8, 0.8], [0.05, 0.05])[2] == pytest.approx(1.0)
    assert math.isnan(stats.auc_heterogeneity([1.0, 0.7], [0.0, 0.05])[2])


def test_the_model_is_chosen_on_validation_and_the_test_split_cannot_change_it():
    runs = []
    for scenario, val_shift in (("random", 0.5), ("chest_mae", 2.0)):
        for seed in (0, 1):
            for split in ("val", "test"):
                one = predictions(seed=seed, split=split)
                shift = val_shift if split == "val" else 0.0  # test favours nothing
                one["prob_sick"] = 1 / (1 + np.exp(-(one["target"] - 0.5) * 2 * shift - np.random.default_rng(seed).normal(0, 1, len(one))))
                one["prob_normal"] = 1 - one["prob_sick"]
                runs.append(one.assign(scenario=scenario, seed=seed).drop(columns=["threshold", "level"]))
    table = pd.concat(runs, ignore_index=True)
    chosen = select_model(evaluate_runs(table))
    assert chosen["selected"].sum() == 1
    best = chosen[chosen["selected"]].iloc[0]
    assert best["scenario"] == "chest_mae"
    assert best["auc"] == chosen[chosen["scenario"] == "chest_mae"]["auc"].max()
    flipped = table.copy()
    test = flipped["split"] == "test"
    flipped.loc[test, "prob_sick"] = 1 - flipped.loc[test, "prob_sick"]
    flipped.loc[test, "prob_normal"] = 1 - flipped.loc[test, "prob_sick"]
    again = select_model(evaluate_runs(flipped))
    assert again[again["selected"]].iloc[0][["scenario", "seed"]].tolist() == best[["scenario", "seed"]].tolist()


def test_the_most_confident_errors_are_the_surest_wrong_calls():
    table = predictions().drop(columns="level")
    errors = stats.confident_errors(table, positive="sick", n=3)
    wrong_negatives = table[(table["target"] == 0) & (table["prob_sick"] >= 0.5)].sort_values("prob_sick")
    wrong_positives = table[(table["target"] == 1) & (table["prob_sick"] < 0.5)].sort_values("prob_sick")
    fp = errors[errors["kind"] == "false positive"]
    fn = errors[errors["kind"] == "false negative"]
    assert fp["image_id"].tolist() == wrong_negatives["image_id"].tolist()[::-1][:3]
    assert fn["image_id"].tolist() == wrong_positives["image_id"].tolist()[:3]
    assert fp["rank"].tolist() == [1, 2, 3] and (errors["threshold"] == 0.5).all()


def test_with_three_classes_a_false_positive_is_an_image_called_positive():
    rows = pd.DataFrame({
        "image_id": ["a", "b", "c", "d"], "label": ["normal", "mild", "severe", "severe"], "target": [0, 1, 2, 2],
        "prob_normal": [0.1, 0.7, 0.5, 0.1], "prob_mild": [0.2, 0.2, 0.3, 0.1], "prob_severe": [0.7, 0.1, 0.2, 0.8],
        "split": "test", "scenario": "random", "backbone": "densenet121", "seed": 0})
    errors = stats.confident_errors(rows, positive="severe")
    # "b" (mild called normal) is wrong, but not about the positive class
    assert errors[["kind", "image_id"]].values.tolist() == [["false positive", "a"], ["false negative", "c"]]


def test_a_level_with_one_image_of_a_class_has_no_auc_but_keeps_its_row():
    table = predictions()
    manifest = pd.DataFrame({"image_id": table["image_id"], "site": ["big"] * 77 + ["tiny"] * 3})
    tiny = stats.subgroup_table(table, stats.subgroup_columns(manifest), positive="sick").set_index("level").loc["tiny"]
    assert tiny["n"] == 3 and tiny["too_small"] and math.isnan(tiny["auc"]) and not math.isnan(tiny["accuracy"])
