"""Image + clinical data (osteolib.data.clinical, osteolib.stages.clinical_fusion): the patient table's join, the
guard against label-defining covariates, and the three models on patients whose truth is known: the fused model
beats the image alone when the covariates carry signal and ties when they do not; the test split never reaches a fit.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from osteolib.data.clinical import ClinicalError, describe_covariates, join_clinical, read_clinical_table
from osteolib.stages.clinical_fusion import (FusionConfig, LabelCovariateError, check_label_covariates,
                                             clinical_fusion)

POSITIVE = "osteoporosis"


def patients(signal: float, n: int = 600, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A manifest (one image per patient; 50 % train, 25 % val, 25 % test) whose age, sex and BMI depend on the
    label by ``signal``, a label-defining T-score, and an image model's val/test probabilities of fixed skill."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    sign = 2 * y - 1
    manifest = pd.DataFrame({
        "image_id": [f"img{k}" for k in range(n)], "patient_id": [f"p{k}" for k in range(n)],
        "label": np.where(y == 1, POSITIVE, "normal"), "split": split,
        "age": np.round(65 + 8 * signal * sign + rng.normal(0, 8, n)),
        "sex": np.where(rng.random(n) < 0.5 + 0.3 * signal * sign, "F", "M"),
        "bmi": 26 - 2.5 * signal * sign + rng.normal(0, 3, n),
        "t_score": np.where(y == 1, rng.normal(-3.0, 0.4, n), rng.normal(-0.5, 0.7, n))})
    manifest.loc[rng.random(n) < 0.1, "bmi"] = np.nan  # missing values, imputed from train
    image_logit = 1.0 * sign + rng.normal(0, 1.0, n)
    rows = manifest[manifest["split"] != "train"]
    prob = 1 / (1 + np.exp(-image_logit[rows.index]))
    predictions = pd.DataFrame({"image_id": rows["image_id"], "split": rows["split"], "label": rows["label"],
                                f"prob_{POSITIVE}": prob, "prob_normal": 1 - prob})
    return manifest, predictions


COVARIATES = ["age", "sex", "bmi"]


def test_the_fused_model_beats_the_image_alone_when_the_covariates_carry_signal_and_ties_when_not():
    manifest, predictions = patients(signal=1.0)
    result = clinical_fusion(manifest, predictions, FusionConfig(COVARIATES), POSITIVE)
    auc = result.aucs.set_index("model")["auc"]
    assert auc["image+clinical"] > auc["image"] + 0.05 and auc["image+clinical"] > auc["clinical"]
    versus = result.comparisons.set_index("versus")
    assert versus.loc["image", "p_value"] < 0.05 and versus.loc["image", "ci_low"] > 0
    odds = result.odds_ratios.set_index("term")
    assert odds.loc["age", "odds_ratio"] > 1 and odds.loc["bmi", "odds_ratio"] < 1  # per SD, the planted directions
    assert "bmi" in " ".join(odds.index) and any("missingindicator" in t for t in odds.index)

    manifest, predictions = patients(signal=0.0, seed=1)
    result = clinical_fusion(manifest, predictions, FusionConfig(COVARIATES), POSITIVE)
    tie = result.comparisons.set_index("versus").loc["image"]
    assert tie["p_value"] > 0.05 and tie["ci_low"] < 0 < tie["ci_high"]
    assert abs(result.aucs.set_index("model").loc["clinical", "auc"] - 0.5) < 0.12


def test_the_guard_stops_a_label_defining_covariate_by_name_and_by_separation_unless_allowed():
    manifest, predictions = patients(signal=0.5)
    with pytest.raises(LabelCovariateError, match=r"t_score: its name says.*AUC 1\.000"):
        clinical_fusion(manifest, predictions, FusionConfig([*COVARIATES, "t_score"]), POSITIVE)
    renamed = manifest.rename(columns={"t_score": "lab_value_7"})  # a harmless name does not hide it
    with pytest.raises(LabelCovariateError, match="lab_value_7: alone it separates the training classes"):
        clinical_fusion(renamed, predictions, FusionConfig([*COVARIATES, "lab_value_7"]), POSITIVE)
    result = clinical_fusion(manifest, predictions,
                             FusionConfig([*COVARIATES, "t_score"], allow_label_covariates=["t_score"]), POSITIVE)
    assert [c["covariate"] for c in result.allowed_label_covariates] == ["t_score"]
    assert result.aucs.set_index("model").loc["clinical", "auc"] > 0.95  # what the guard protects against
    train = manifest[manifest["split"] == "train"]
    y = (train["label"] == POSITIVE).to_numpy(dtype=int)
    assert check_label_covariates(train, COVARIATES, y) == []  # the honest covariates pass


def test_no_fit_reads_the_test_split():
    manifest, predictions = patients(signal=1.0, seed=2)
    first = clinical_fusion(manifest, predictions, FusionConfig(COVARIATES), POSITIVE)
    # the test rows' labels, covariates and image probabilities replaced: both fitted models stay the same
    scrambled, scrambled_predictions = manifest.copy(), predictions.copy()
    test = scrambled["split"] == "test"
    rng = np.random.default_rng(9)
    for column in ("label", "age", "sex", "bmi"):
        scrambled.loc[test, column] = rng.permutation(scrambled.loc[test, column].to_numpy())
    on_test = scrambled_predictions["split"] == "test"
    scrambled_predictions.loc[on_test, f"prob_{POSITIVE}"] = rng.random(on_test.sum())
    scrambled_predictions["label"] = scrambled_predictions["image_id"].map(scrambled.set_index("image_id")["label"])
    second = clinical_fusion(scrambled, scrambled_predictions, FusionConfig(COVARIATES), POSITIVE)
    assert first.coefficients == second.coefficients
    assert not np.allclose(first.aucs["auc"], second.aucs["auc"])  # the test scores did change


def test_the_clinical_table_joins_by_patient_and_counts_what_does_not_match(tmp_path):
    manifest, _ = patients(signal=0.0, n=40)
    manifest = manifest.drop(columns=COVARIATES + ["t_score"])
    table = pd.DataFrame({"patient": [f"p{k}" for k in range(5, 45)], "age": range(40), "smoker": ["y", "n"] * 20})
    path = tmp_path / "clinical.csv"
    table.to_csv(path, index=False)
    joined = join_clinical(manifest, read_clinical_table(path, "patient"))
    assert joined.columns == ["age", "smoker"]
    assert joined.patients_without_row == [f"p{k}" for k in range(5)]
    assert joined.rows_without_images == sorted(f"p{k}" for k in range(40, 45))
    assert joined.manifest.set_index("patient_id").loc["p7", "age"] == 2
    described = describe_covariates(joined.manifest, joined.columns).set_index("covariate")
    assert described.loc["age", "kind"] == "numeric" and described.loc["smoker", "kind"] == "binary"
    assert described.loc["age", "missing"] == pytest.approx(5 / 40)
    pd.concat([table, table.iloc[:1]]).to_csv(path, index=False)
    with pytest.raises(ClinicalError, match=r"p5.*several rows \(file lines \[2, 42\]\)"):
        read_clinical_table(path, "patient")
    with pytest.raises(ClinicalError, match="no column 'id'"):
        read_clinical_table(path, "id")


def generated(signal: float, n: int = 800) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Patients with the synthetic shoulder generator's covariates (its own draw, without rendering the images;
    the split in the study's ratios) and an image model of fixed skill standing in for notebook 04's (its
    probabilities drawn from the label)."""
    from osteolib.data.synthetic.datasets import CLINICAL_STREAM, child_rng
    from osteolib.data.synthetic.shoulder import draw_clinical_covariates

    labels = ["normal", POSITIVE] * (n // 2)
    split = ["train"] * int(0.77 * n) + ["val"] * int(0.11 * n)
    split += ["test"] * (n - len(split))
    manifest = pd.DataFrame([{"image_id": f"img{k}", "patient_id": f"p{k}", "label": labels[k], "split": split[k],
                              **draw_clinical_covariates(child_rng(3, k, CLINICAL_STREAM), labels[k], signal)}
                             for k in range(n)])
    rng = np.random.default_rng(4)
    y = (manifest["label"] == POSITIVE).to_numpy(dtype=int)
    prob = 1 / (1 + np.exp(-(0.7 * (2 * y - 1) + rng.normal(0, 1.0, len(y)))))
    rows = manifest["split"] != "train"
    predictions = pd.DataFrame({"image_id": manifest.loc[rows, "image_id"], "split": manifest.loc[rows, "split"],
                                "label": manifest.loc[rows, "label"], f"prob_{POSITIVE}": prob[rows],
                                "prob_normal": 1 - prob[rows]})
    return manifest, predictions


def test_the_generators_covariates_join_its_manifest_and_leave_its_images_unchanged(tmp_path):
    from PIL import Image

    from osteolib.data.synthetic.datasets import write_shoulder_dataset

    with_covariates = pd.read_csv(write_shoulder_dataset(tmp_path / "a", n_patients=6, size=32, clinical_signal=1.0,
                                                         workers=1))
    without = pd.read_csv(write_shoulder_dataset(tmp_path / "b", n_patients=6, size=32, workers=1))
    assert {"age", "sex", "bmi", "t_score"} <= set(with_covariates.columns) and "age" not in without.columns
    assert (with_covariates.groupby("patient_id")["age"].nunique() == 1).all()  # one value per patient
    for a, b in zip(with_covariates["image_id"], without["image_id"]):  # the same pixels, file for file
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "images" / f"{a}.png")),
                              np.asarray(Image.open(tmp_path / "b" / "images" / f"{b}.png")))


def test_the_generators_patients_carry_the_truth_the_fusion_and_the_guard_are_tested_on():
    manifest, predictions = generated(1.0)
    result = clinical_fusion(manifest, predictions, FusionConfig(COVARIATES), POSITIVE)
    versus = result.comparisons.set_index("versus").loc["image"]
    assert versus["difference"] > 0 and versus["p_value"] < 0.05  # the covariates carry signal: fusion wins
    with pytest.raises(LabelCovariateError, match="t_score"):
        clinical_fusion(manifest, predictions, FusionConfig([*COVARIATES, "t_score"]), POSITIVE)
    manifest, predictions = generated(0.0)
    result = clinical_fusion(manifest, predictions, FusionConfig(COVARIATES), POSITIVE)
    tie = result.comparisons.set_index("versus").loc["image"]
    assert tie["p_value"] > 0.05 and tie["ci_low"] < 0 < tie["ci_high"]  # no signal: a tie
