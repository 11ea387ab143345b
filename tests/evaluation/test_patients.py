"""The patient cluster bootstrap, patient-level predictions and tests, and per-class statistics (plain arrays)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from osteolib.evaluation import stats


def _auc(y, s):
    return roc_auc_score(y, s)


def _correlated_images(n_patients=30, images=6, seed=0):
    """Patients whose images share one score (a strong patient effect) plus a little noise."""
    rng = np.random.default_rng(seed)
    y_patient = np.arange(n_patients) % 2
    patient_score = rng.normal(0.8 * y_patient, 1.0)
    groups = np.repeat(np.arange(n_patients), images)
    y = np.repeat(y_patient, images)
    score = np.repeat(patient_score, images) + rng.normal(0, 0.05, groups.size)
    return groups, y, score


def test_cluster_bootstrap_is_wider_than_image_bootstrap_when_images_correlate():
    groups, y, score = _correlated_images()
    image = stats.bootstrap_ci(_auc, y, score, n_boot=1000, seed=0)
    cluster = stats.cluster_bootstrap_ci(_auc, groups, y, score, n_boot=1000, seed=0)
    assert cluster.estimate == pytest.approx(image.estimate)
    assert cluster.ci_high - cluster.ci_low > 1.8 * (image.ci_high - image.ci_low)
    assert cluster.n_clusters == 30 and cluster.n_cases == 180


def test_cluster_bootstrap_equals_image_bootstrap_with_one_image_per_patient():
    rng = np.random.default_rng(1)
    y = np.arange(60) % 2
    score = rng.normal(y, 1.0)
    patients = np.array([f"p{k}" for k in range(60)])
    image = stats.bootstrap_ci(_auc, y, score, n_boot=500, seed=3)
    cluster = stats.cluster_bootstrap_ci(_auc, patients, y, score, n_boot=500, seed=3)
    assert (cluster.ci_low, cluster.ci_high, cluster.se) == pytest.approx((image.ci_low, image.ci_high, image.se),
                                                                         rel=1e-12)
    assert cluster.n_defined == 500
    accuracy = stats.bootstrap_ci(np.mean, (score > 0.5) == y, n_boot=500, seed=3)
    cluster_accuracy = stats.cluster_bootstrap_ci(np.mean, patients, (score > 0.5) == y, n_boot=500, seed=3)
    assert (cluster_accuracy.ci_low, cluster_accuracy.ci_high) == pytest.approx((accuracy.ci_low, accuracy.ci_high))


def test_cluster_bootstrap_refuses_too_few_clusters():
    with pytest.raises(ValueError, match="too few"):
        stats.cluster_bootstrap_ci(_auc, np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]),
                                   np.array([0.1, 0.2, 0.8, 0.9]), n_boot=200)


def _predictions(groups, y, score, scenario="random", threshold=0.5):
    p = 1 / (1 + np.exp(-score))
    return pd.DataFrame({"image_id": [f"i{k}" for k in range(len(y))], "patient_id": [f"p{g}" for g in groups],
                         "label": np.where(y == 1, "sick", "healthy"), "target": y, "prob_healthy": 1 - p,
                         "prob_sick": p, "split": "test", "scenario": scenario, "backbone": "densenet121", "seed": 0,
                         "threshold": threshold})


def test_patient_predictions_average_each_patients_images():
    groups, y, score = _correlated_images(n_patients=10, images=3)
    table = _predictions(groups, y, score)
    patients = stats.patient_predictions(table)
    assert len(patients) == 10 and set(patients["n_images"]) == {3}
    first = table[table["patient_id"] == "p0"]
    assert patients.loc[0, "prob_sick"] == pytest.approx(first["prob_sick"].mean())
    assert patients["image_id"].tolist() == [f"p{k}" for k in range(10)]
    assert stats.images_per_patient(table) == 3


def test_patient_auc_table_uses_delong_with_one_image_and_clusters_otherwise():
    rng = np.random.default_rng(2)
    y = np.arange(40) % 2
    single = _predictions(np.arange(40), y, rng.normal(y, 1.0))
    row = stats.patient_auc_table(single, n_boot=200).iloc[0]
    plain = stats.auc_table(single).iloc[0]
    assert (row["auc_ci_low"], row["auc_ci_high"]) == (plain["auc_ci_low"], plain["auc_ci_high"])
    assert row["patient_auc"] == plain["auc"] and row["max_images_per_patient"] == 1
    groups, y, score = _correlated_images()
    row = stats.patient_auc_table(_predictions(groups, y, score), n_boot=300).iloc[0]
    assert row["n_patients"] == 30 and row["n_images"] == 180
    assert row["image_ci_method"].startswith("patient cluster bootstrap")
    naive = stats.auc_table(_predictions(groups, y, score)).iloc[0]
    assert row["auc_ci_high"] - row["auc_ci_low"] > naive["auc_ci_high"] - naive["auc_ci_low"]


def test_compare_patients_counts_patients():
    groups, y, score = _correlated_images(n_patients=20, images=2)
    rng = np.random.default_rng(4)
    table = pd.concat([_predictions(groups, y, score, "random"),
                       _predictions(groups, y, score + rng.normal(0, 0.5, score.size), "mae")], ignore_index=True)
    result = stats.compare_patients(table, reference="random")
    assert set(result["test"]) == {"delong_auc", "mcnemar_accuracy"}
    assert set(result["n"]) == {20}


def _three_classes(n=90, seed=0):
    rng = np.random.default_rng(seed)
    target = np.arange(n) % 3
    logits = rng.normal(0, 1, (n, 3)) + 1.5 * np.eye(3)[target]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    classes = ["normal", "osteopenia", "osteoporosis"]
    return pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "label": [classes[t] for t in target],
                         "target": target, **{f"prob_{c}": probs[:, k] for k, c in enumerate(classes)},
                         "split": "test", "scenario": "random", "backbone": "densenet121", "seed": 0}), probs


def test_per_class_and_macro_auc_with_three_classes():
    table, probs = _three_classes()
    result = stats.class_auc_table(table, n_boot=300)
    assert result["class"].tolist() == ["normal", "osteopenia", "osteoporosis", "macro"]
    target = table["target"].to_numpy()
    for k in range(3):
        assert result.loc[k, "auc"] == pytest.approx(roc_auc_score(target == k, probs[:, k]))
        assert result.loc[k, "ci_method"] == "DeLong"
    macro = result.iloc[3]
    assert macro["auc"] == pytest.approx(roc_auc_score(target, probs, multi_class="ovr", average="macro"))
    assert macro["auc_ci_low"] < macro["auc"] < macro["auc_ci_high"]
    confusion = stats.confusion_table(table)
    assert confusion.filter(like="predicted_").to_numpy().sum() == len(table)


def test_mcnemar_on_correctness_with_three_classes():
    table, _ = _three_classes()
    rng = np.random.default_rng(5)
    other = table.copy()
    columns = ["prob_normal", "prob_osteopenia", "prob_osteoporosis"]
    noisy = other[columns].to_numpy() + rng.uniform(0, 0.6, (len(other), 3))
    other[columns] = noisy / noisy.sum(axis=1, keepdims=True)
    other["scenario"] = "mae"
    both = pd.concat([table, other], ignore_index=True)
    result = stats.compare_scenarios(both, reference="random", positive="osteoporosis")
    mcnemar = result[result["test"] == "mcnemar_accuracy"].iloc[0]
    correct_a = other[columns].to_numpy().argmax(axis=1) == other["target"].to_numpy()
    correct_b = table[columns].to_numpy().argmax(axis=1) == table["target"].to_numpy()
    direct = stats.mcnemar_paired(correct_a, correct_b)
    assert mcnemar["p_value"] == pytest.approx(direct.p_value)
    assert mcnemar["value"] == pytest.approx(correct_a.mean())
    # no threshold decides with three classes: the tables say what does
    assert mcnemar["method"].endswith("; most probable class")
    delong = result[result["test"] == "delong_auc"].iloc[0]
    assert delong["method"] == "DeLong paired (z); osteoporosis vs rest"
    assert delong["value"] == pytest.approx(roc_auc_score(other["label"] == "osteoporosis", other["prob_osteoporosis"]))
    per_run = stats.auc_table(both, positive="osteoporosis")
    assert per_run["threshold"].isna().all() and (per_run["positive"] == "osteoporosis").all()


def test_a_class_with_one_test_image_keeps_its_auc_without_an_interval():
    table, probs = _three_classes(n=30)
    rare = table["label"] == "osteopenia"
    keep = ~rare | (rare.cumsum() == 1)  # one osteopenia image left
    table, probs = table[keep].reset_index(drop=True), probs[keep.to_numpy()]
    result = stats.class_auc_table(table, n_boot=300).set_index("class")
    target = table["target"].to_numpy()
    assert result.loc["osteopenia", "auc"] == pytest.approx(roc_auc_score(target == 1, probs[:, 1]))
    assert np.isnan(result.loc["osteopenia", ["auc_ci_low", "auc_ci_high"]].astype(float)).all()
    assert result.loc["osteopenia", "ci_method"].startswith("none: 1 image(s) of the class")
    assert result.loc["normal", "ci_method"] == "DeLong" and result.loc["macro", "ci_method"] == "bootstrap"
    assert np.isfinite(result.loc["macro", ["auc_ci_low", "auc_ci_high"]].astype(float)).all()



def test_a_patient_whose_follow_up_changed_label_is_one_case_per_label():
    from osteolib.evaluation import stats

    rows = pd.DataFrame({"image_id": ["a1", "a2", "a3", "b1", "c1"], "patient_id": ["A", "A", "A", "B", "C"],
                         "label": ["no", "yes", "yes", "yes", "no"], "target": [0, 1, 1, 1, 0],
                         "prob_no": [0.8, 0.3, 0.1, 0.2, 0.6], "prob_yes": [0.2, 0.7, 0.9, 0.8, 0.4],
                         "split": "test", "scenario": "random", "backbone": "d", "seed": 0})
    cases = stats.patient_predictions(rows).set_index("image_id")
    assert sorted(cases.index) == ["A (no)", "A (yes)", "B", "C"]  # no image dropped, no label averaged away
    assert cases.loc["A (yes)", "n_images"] == 2 and cases.loc["A (yes)", "prob_yes"] == pytest.approx(0.8)
    assert cases.loc["A (no)", "several_labels"] and not cases.loc["B", "several_labels"]
    assert (cases["patient_id"] == ["A", "A", "B", "C"]).all()
