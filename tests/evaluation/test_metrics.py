"""Metrics from saved predictions: hand-computed cases, sklearn agreement, table contract, honest selection."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are built, never shown

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from osteolib.evaluation import (
    PREDICTION_COLUMNS,
    PredictionError,
    binary_metrics,
    choose_threshold,
    class_names,
    evaluate,
    evaluate_runs,
    expected_calibration_error,
    format_mean_std,
    multiclass_metrics,
    plot_confusion_matrix,
    plot_learning_curves,
    plot_reliability,
    plot_roc,
    prediction_table,
    read_predictions,
    reliability_curve,
    results_table,
    roc_table,
    select_epoch,
    summarise_runs,
    to_latex,
    to_markdown,
    validate_predictions,
    with_validation_thresholds,
    write_predictions,
)

# A binary case small enough to count by hand. At threshold 0.5:
#   positives 0.9 0.8 0.6 | 0.3      -> TP = 3, FN = 1
#   negatives 0.7 0.55    | 0.4 0.2 0.1 0.05 -> FP = 2, TN = 4
# AUC: of the 4 x 6 = 24 positive/negative pairs, 6 + 6 + 5 + 3 = 20 rank the positive higher.
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
P = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.55, 0.4, 0.2, 0.1, 0.05])
IDS = {"scenario": "supervised", "backbone": "densenet121", "seed": 0, "fold": 0}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def binary_table(y=Y, p=P, split="test", classes=("normal", "osteoporosis"), **ids) -> pd.DataFrame:
    labels = [classes[int(v)] for v in y]
    return prediction_table([f"img{i:03d}" for i in range(len(y))], labels, p, classes, split, **{**IDS, **ids})


# ------------------------------------------------------------------------------------------
# Binary metrics


def test_binary_metrics_match_the_hand_counted_confusion_matrix():
    m = binary_metrics(Y, P, 0.5)
    assert m["confusion_matrix"] == [[4, 2], [1, 3]]  # [[TN, FP], [FN, TP]]
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["ppv"] == pytest.approx(3 / 5)
    assert m["npv"] == pytest.approx(4 / 5)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert (m["n"], m["n_pos"], m["threshold"]) == (10, 4, 0.5)


def test_auc_is_the_hand_counted_pair_ranking_and_equals_sklearn():
    m = binary_metrics(Y, P, 0.5)
    assert m["auc"] == pytest.approx(20 / 24)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + rng.random(200) * 0.7, 0, 1)
    assert binary_metrics(y, p, 0.5)["auc"] == roc_auc_score(y, p)


def test_threshold_is_inclusive_and_undefined_ratios_are_nan():
    # p >= threshold counts as positive: at 0.6 the positive scored exactly 0.6 is a true positive.
    assert binary_metrics(Y, P, 0.6)["confusion_matrix"] == [[5, 1], [1, 3]]
    nothing_positive = binary_metrics(Y, P, 0.95)
    assert np.isnan(nothing_positive["ppv"])
    assert nothing_positive["npv"] == pytest.approx(6 / 10)
    assert nothing_positive["sensitivity"] == 0.0 and nothing_positive["specificity"] == 1.0


def test_binary_metrics_refuse_a_single_class_and_bad_inputs():
    with pytest.raises(PredictionError, match="AUC undefined.*only class 1"):
        binary_metrics(np.ones(5, int), np.linspace(0.1, 0.9, 5), 0.5)
    with pytest.raises(PredictionError, match="0 .* and 1"):
        binary_metrics(np.array([0, 1, 2]), np.array([0.1, 0.5, 0.9]), 0.5)
    with pytest.raises(PredictionError, match=r"\[0, 1\]"):
        binary_metrics(Y, P * 2, 0.5)
    with pytest.raises(PredictionError, match="threshold"):
        binary_metrics(Y, P, 1.5)


def test_roc_table_runs_from_nothing_to_everything_positive():
    table = roc_table(Y, P)
    assert (table["fpr"].iloc[0], table["tpr"].iloc[0]) == (0.0, 0.0)
    assert (table["fpr"].iloc[-1], table["tpr"].iloc[-1]) == (1.0, 1.0)
    assert table["fpr"].is_monotonic_increasing and table["tpr"].is_monotonic_increasing


# ------------------------------------------------------------------------------------------
# Threshold and epoch selection


def youden_j(y, p, t):
    # an independent oracle: counted with numpy, not with the module under test
    called = p >= t
    return called[y == 1].mean() + (~called[y == 0]).mean() - 1


def test_youden_threshold_maximises_j_over_every_candidate():
    assert choose_threshold(Y, P) == 0.6  # J = 3/4 + 5/6 - 1, the best of the hand case
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 120)
    p = np.clip(0.25 * y + rng.random(120) * 0.75, 0, 1)
    chosen = choose_threshold(y, p)
    assert chosen in p
    best = max(youden_j(y, p, t) for t in np.unique(p))
    assert youden_j(y, p, chosen) == pytest.approx(best)


def test_f1_threshold_maximises_f1():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 100)
    p = np.clip(0.3 * y + rng.random(100) * 0.7, 0, 1)

    def f1(t):
        called = p >= t
        tp = np.sum(called & (y == 1))
        return 2 * tp / (called.sum() + (y == 1).sum())  # F1 = 2TP / (2TP + FP + FN)

    chosen = choose_threshold(y, p, method="f1")
    assert f1(chosen) == pytest.approx(max(f1(t) for t in np.unique(p)))
    with pytest.raises(PredictionError, match="unknown threshold method"):
        choose_threshold(y, p, method="accuracy")
    with pytest.raises(PredictionError, match="only class 0"):
        choose_threshold(np.zeros(4, int), [0.1, 0.2, 0.3, 0.4])


def test_select_epoch_picks_the_best_validation_epoch_and_refuses_test_columns():
    history = pd.DataFrame({"epoch": [0, 1, 2, 3], "train_loss": [0.9, 0.6, 0.4, 0.3],
                            "valid_loss": [0.8, 0.5, 0.55, 0.5], "valid_auc": [0.70, 0.85, 0.85, 0.80]})
    assert select_epoch(history) == 1  # tie between epochs 1 and 2: the earliest wins
    assert select_epoch(history, metric="valid_loss", mode="min") == 1
    assert select_epoch(history.drop(columns="epoch").set_index(pd.Index([10, 11, 12, 13]))) == 11
    with pytest.raises(PredictionError, match="refuses test metrics.*test_auc"):
        select_epoch(history.assign(test_auc=[0.9, 0.5, 0.5, 0.5]))
    with pytest.raises(PredictionError, match="not in the history"):
        select_epoch(history, metric="valid_accuracy")
    with pytest.warns(UserWarning, match="1 of 4 epoch"):
        assert select_epoch(history.assign(valid_auc=[np.nan, 0.6, 0.7, 0.65])) == 2


# ------------------------------------------------------------------------------------------
# Calibration


def test_ece_binary_by_hand():
    # Two bins [0, .5] and (.5, 1]: bin 1 holds .1 .3 .35 (mean .25, 1 of 3 positive), bin 2 holds .8 .9 (mean .85,
    # both positive). ECE = 3/5 * |1/3 - .25| + 2/5 * |1 - .85| = .05 + .06 = .11
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.1, 0.3, 0.35, 0.8, 0.9])
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.11)
    # the (N, 2) form means the same thing as p_pos
    assert expected_calibration_error(y, np.column_stack([1 - p, p]), n_bins=2) == pytest.approx(0.11)
    # 0.5 sits on the edge and belongs to the lower bin (as in sklearn's calibration_curve):
    # bins {.2, .5} (mean .35, 1 of 2 positive) and {.9} -> 2/3 * .15 + 1/3 * .1 = 0.4 / 3
    assert expected_calibration_error([0, 1, 1], [0.2, 0.5, 0.9], n_bins=2) == pytest.approx(0.4 / 3)
    # perfectly calibrated: half of the 0.5 predictions are right
    assert expected_calibration_error([0, 1, 0, 1], [0.5] * 4) == 0.0


def test_ece_top_label_multiclass_by_hand():
    # confidences .7 (right), .55 (wrong), .85 (right), .45 (wrong); five bins of width .2:
    # (.4,.6]: mean .5, accuracy 0 -> 2/4 * .5 = .25; (.6,.8]: .7 right -> 1/4 * .3 = .075;
    # (.8,1]: .85 right -> 1/4 * .15 = .0375. ECE = .3625
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.55, 0.25], [0.05, 0.1, 0.85], [0.45, 0.3, 0.25]])
    y = np.array([0, 2, 2, 1])
    assert expected_calibration_error(y, probs, n_bins=5) == pytest.approx(0.3625)


def test_reliability_curve_agrees_with_sklearn_and_keeps_empty_bins():
    rng = np.random.default_rng(5)
    p = rng.beta(2, 5, 300)
    y = (rng.random(300) < p).astype(int)
    table = reliability_curve(y, p, n_bins=10)
    fraction, mean = calibration_curve(y, p, n_bins=10)
    filled = table[table["count"] > 0]
    np.testing.assert_allclose(filled["fraction_positive"], fraction)
    np.testing.assert_allclose(filled["mean_predicted"], mean)
    assert table["count"].sum() == 300 and len(table) == 10
    sparse = reliability_curve([0, 0, 1, 0], [0.1, 0.2, 0.3, 0.9], n_bins=4)
    assert sparse["count"].tolist() == [2, 1, 0, 1] and np.isnan(sparse.loc[2, "mean_predicted"])
    quantile = reliability_curve(y, p, n_bins=5, strategy="quantile")
    assert quantile["count"].sum() == 300
    # ECE is the count-weighted gap of the same bins
    weighted = (filled["count"] / 300 * (filled["fraction_positive"] - filled["mean_predicted"]).abs()).sum()
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(weighted)


# ------------------------------------------------------------------------------------------
# Multi-class metrics

# true 0 0 0 1 1 2 2 2, predicted 0 0 1 1 2 2 2 0: confusion rows [[2,1,0],[0,1,1],[1,0,2]]
Y3 = np.array([0, 0, 0, 1, 1, 2, 2, 2])
P3 = np.array([[.8, .1, .1], [.6, .3, .1], [.3, .5, .2], [.1, .8, .1],
               [.1, .3, .6], [.2, .2, .6], [.1, .1, .8], [.5, .2, .3]])
CLASSES3 = ["normal", "osteopenia", "osteoporosis"]


def test_multiclass_metrics_from_a_known_confusion_matrix():
    m = multiclass_metrics(Y3, P3, CLASSES3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    sens = {c: m["per_class"][c]["sensitivity"] for c in CLASSES3}
    spec = {c: m["per_class"][c]["specificity"] for c in CLASSES3}
    assert sens == pytest.approx({"normal": 2 / 3, "osteopenia": 1 / 2, "osteoporosis": 2 / 3})
    assert spec == pytest.approx({"normal": 4 / 5, "osteopenia": 5 / 6, "osteoporosis": 4 / 5})
    assert [m["per_class"][c]["n"] for c in CLASSES3] == [3, 2, 3]


def test_multiclass_macro_auc_is_the_mean_one_vs_rest_auc():
    m = multiclass_metrics(Y3, P3, CLASSES3)
    per_class = [roc_auc_score(Y3 == k, P3[:, k]) for k in range(3)]
    assert [m["per_class"][c]["auc"] for c in CLASSES3] == pytest.approx(per_class)
    assert m["auc"] == pytest.approx(np.mean(per_class))
    assert m["auc"] == pytest.approx(roc_auc_score(Y3, P3, multi_class="ovr", average="macro"))
    # normal (class 0) by hand: positives .8 .6 .3 against negatives .1 .1 .2 .1 .5 -> 5 + 5 + 4 of 15
    assert m["per_class"]["normal"]["auc"] == pytest.approx(14 / 15)


def test_seven_class_float32_softmax_table_is_accepted_and_scored():
    # Softmax outputs saved as float32 sum to 1 only to ~1e-7: accepted, and the macro AUC is still sklearn's.
    rng = np.random.default_rng(11)
    classes = [f"c{k}" for k in range(7)]
    y = np.arange(70) % 7
    logits = rng.normal(size=(70, 7)).astype(np.float32)
    logits[np.arange(70), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    df = prediction_table([f"i{i}" for i in range(70)], [classes[k] for k in y], probs, classes, "test", **IDS)
    result = evaluate(df)
    exact = probs.astype(np.float64) / probs.astype(np.float64).sum(axis=1, keepdims=True)
    assert result["auc"] == pytest.approx(roc_auc_score(y, exact, multi_class="ovr"), abs=1e-6)
    assert result["n_classes"] == 7 and len(result["confusion_matrix"]) == 7


def test_multiclass_absent_class_is_reported_not_hidden():
    with pytest.warns(UserWarning, match=r"\['osteoporosis'\] absent"):
        m = multiclass_metrics(Y3[:5], P3[:5], CLASSES3)
    assert np.isnan(m["per_class"]["osteoporosis"]["auc"]) and m["n_classes_present"] == 2
    with pytest.raises(PredictionError, match="sum to 1"):
        multiclass_metrics(Y3, P3 * 0.9, CLASSES3)


# ------------------------------------------------------------------------------------------
# The prediction table


def test_prediction_table_has_the_contract_columns_and_binary_shorthand():
    df = binary_table(label_fraction=0.1)
    assert list(df.columns) == ["image_id", "label", "target", "prob_normal", "prob_osteoporosis", "split",
                                "scenario", "backbone", "seed", "fold", "label_fraction"]
    assert set(PREDICTION_COLUMNS) <= set(df.columns)
    assert class_names(df) == ["normal", "osteoporosis"]
    np.testing.assert_allclose(df["prob_osteoporosis"], P)
    np.testing.assert_allclose(df["prob_normal"] + df["prob_osteoporosis"], 1.0)
    assert df["target"].tolist() == Y.tolist()


def test_prediction_table_refuses_bad_arguments():
    with pytest.raises(PredictionError, match=r"missing \['seed', 'fold'\], unknown \['seeds'\]"):
        prediction_table(["a", "b"], ["x", "y"], [0.2, 0.7], ["x", "y"], "test",
                         scenario="s", backbone="b", seeds=0)
    with pytest.raises(PredictionError, match=r"identifiers \['seed'\] must be single values"):
        prediction_table(["a", "b"], ["x", "y"], [0.2, 0.7], ["x", "y"], "test", **{**IDS, "seed": [0, 1]})
    with pytest.raises(PredictionError, match="split must be one of"):
        prediction_table(["a", "b"], ["x", "y"], [0.2, 0.7], ["x", "y"], "train", **IDS)
    with pytest.raises(PredictionError, match=r"label\(s\) \['z'\]"):
        prediction_table(["a", "b"], ["x", "z"], [0.2, 0.7], ["x", "y"], "test", **IDS)
    with pytest.raises(PredictionError, match="shape"):
        prediction_table(["a", "b"], ["x", "y"], np.ones((2, 3)) / 3, ["x", "y"], "test", **IDS)


def test_validate_names_every_kind_of_bad_table():
    good = binary_table()
    with pytest.raises(PredictionError, match=r"lacks required column\(s\) \['target', 'seed'\]"):
        validate_predictions(good.drop(columns=["target", "seed"]))
    with pytest.raises(PredictionError, match="AUC undefined: the split holds only class 'normal'"):
        validate_predictions(good[good["label"] == "normal"])
    off = good.copy()
    off.loc[2, "prob_normal"] = 0.1  # row 2 now sums to 0.7
    with pytest.raises(PredictionError, match=r"do not sum to 1.*1 row\(s\): 2 \(image_id='img002'\)"):
        validate_predictions(off)
    outside = good.copy()
    outside.loc[0, ["prob_normal", "prob_osteoporosis"]] = [-0.2, 1.2]
    with pytest.raises(PredictionError, match=r"outside \[0, 1\]"):
        validate_predictions(outside)
    unknown = good.copy()
    unknown.loc[1, "label"] = "osteopenia"
    with pytest.raises(PredictionError, match=r"\['osteopenia'\] are not among the classes"):
        validate_predictions(unknown)
    wrong = good.copy()
    wrong.loc[0, "target"] = 0
    with pytest.raises(PredictionError, match="target does not equal"):
        validate_predictions(wrong)
    with pytest.raises(PredictionError, match="repeated within one run"):
        validate_predictions(pd.concat([good, good.iloc[:1]], ignore_index=True))
    # the same image in a different run (seed) or split is fine
    validate_predictions(pd.concat([good, binary_table(seed=1), binary_table(split="val")], ignore_index=True))


def test_write_refuses_to_overwrite_and_read_round_trips(tmp_path):
    df = binary_table()
    path = write_predictions(df, tmp_path / "predictions" / "supervised-densenet121-seed0.csv")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_predictions(binary_table(seed=5), path)
    back = read_predictions(path)
    pd.testing.assert_frame_equal(back, df, check_dtype=False, check_exact=True)
    bad = df.copy()
    bad.loc[0, "prob_normal"] = 0.5
    with pytest.raises(PredictionError):
        write_predictions(bad, tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()  # validated before anything is written


def test_read_concatenates_runs_and_refuses_mixtures(tmp_path):
    for seed in (0, 1, 2):
        write_predictions(binary_table(seed=seed), tmp_path / "runs" / f"seed{seed}.csv")
    df = read_predictions(str(tmp_path / "runs" / "*.csv"))
    assert len(df) == 30 and sorted(df["seed"].unique()) == [0, 1, 2]
    assert len(read_predictions(tmp_path / "runs")) == 30
    write_predictions(binary_table(seed=0), tmp_path / "copy" / "again.csv")
    with pytest.raises(PredictionError, match="appears in both"):
        read_predictions([tmp_path / "runs" / "seed0.csv", tmp_path / "copy" / "again.csv"])
    write_predictions(binary_table(classes=("neg", "pos"), seed=9), tmp_path / "other" / "x.csv")
    with pytest.raises(PredictionError, match="differ from"):
        read_predictions([tmp_path / "runs" / "seed1.csv", tmp_path / "other" / "x.csv"])
    with pytest.raises(PredictionError, match="no prediction files match"):
        read_predictions(str(tmp_path / "nothing" / "*.csv"))
    (tmp_path / "broken.csv").write_text("image_id,label\na,b\n")
    with pytest.raises(PredictionError, match=r"broken\.csv: prediction table lacks"):
        read_predictions(tmp_path / "broken.csv")


# ------------------------------------------------------------------------------------------
# Evaluation of tables


def test_evaluate_binary_reports_the_given_threshold_and_0_5():
    result = evaluate(binary_table(), threshold=0.6)
    assert result["threshold"] == 0.6 and result["positive_class"] == "osteoporosis"
    assert result["confusion_matrix"] == [[5, 1], [1, 3]]
    assert result["confusion_matrix_at_0.5"] == [[4, 2], [1, 3]]
    assert result["sensitivity_at_0.5"] == pytest.approx(0.75)
    assert result["auc"] == pytest.approx(20 / 24)
    assert (result["split"], result["seed"], result["n_classes"]) == ("test", 0, 2)
    assert 0 <= result["ece"] <= 1
    with pytest.raises(PredictionError, match="one run and one split"):
        evaluate(pd.concat([binary_table(), binary_table(seed=1)], ignore_index=True))


def test_evaluate_runs_takes_each_threshold_from_validation_only():
    # Validation says 0.6; on the test rows a different threshold (0.3) would give the best J.
    val = binary_table(split="val")
    test_p = np.array([0.9, 0.5, 0.45, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05])
    test = binary_table(p=test_p, split="test")
    assert choose_threshold(Y, test_p) != choose_threshold(Y, P)
    metrics = evaluate_runs(pd.concat([val, test], ignore_index=True))
    assert metrics["split"].tolist() == ["val", "test"]
    assert (metrics["threshold"] == choose_threshold(Y, P)).all()
    assert (metrics["threshold_source"] == "val (youden)").all()
    test_row = metrics[metrics["split"] == "test"].iloc[0]
    assert test_row["sensitivity"] == pytest.approx(1 / 4)  # only 0.9 reaches the validation threshold
    with pytest.raises(PredictionError, match="no 'val' rows"):
        evaluate_runs(test)
    assert (evaluate_runs(test, threshold_method=None)["threshold"] == 0.5).all()


def test_evaluate_multiclass_flattens_per_class_metrics():
    df = prediction_table([f"i{i}" for i in range(8)], [CLASSES3[k] for k in Y3], P3, CLASSES3, "test", **IDS)
    result = evaluate(df)
    assert result["auc"] == pytest.approx(roc_auc_score(Y3, P3, multi_class="ovr"))
    assert "threshold" not in result and "ece" in result
    with pytest.raises(PredictionError, match="binary problems only"):
        evaluate(df, threshold=0.5)
    row = evaluate_runs(df).iloc[0]
    assert row["sensitivity_osteopenia"] == pytest.approx(0.5) and row["specificity_normal"] == pytest.approx(0.8)


# ------------------------------------------------------------------------------------------
# Summaries and tables


def metrics_table() -> pd.DataFrame:
    return pd.DataFrame({
        "backbone": ["densenet121"] * 3 + ["vit_small"] * 3,
        "scenario": ["supervised"] * 3 + ["mae"] * 3,
        "seed": [0, 1, 2] * 2, "fold": [0] * 6, "split": ["test"] * 6,
        "accuracy": [0.8, 0.9, 1.0, 0.70, 0.72, 0.74],
        "auc": [0.85, 0.85, 0.85, 0.90, 0.80, 0.85],
    })


def test_summary_is_mean_and_sample_std_over_seeds():
    summary = summarise_runs(metrics_table())
    first = summary.iloc[0]
    assert (first["backbone"], first["scenario"], first["n_runs"]) == ("densenet121", "supervised", 3)
    assert first["accuracy_mean"] == pytest.approx(0.9) and first["accuracy_std"] == pytest.approx(0.1)
    assert first["auc_std"] == pytest.approx(0.0)
    assert summary.iloc[1]["accuracy_std"] == pytest.approx(0.02)
    table = results_table(summary)
    assert table.columns.tolist() == ["Model", "Learning method", "ACC", "AUC"]
    assert table.iloc[0].tolist() == ["densenet121", "supervised", "0.900 ± 0.100", "0.850 ± 0.000"]
    assert format_mean_std(0.8123, float("nan"), 1) == "0.812 (n=1)"


def test_summary_refuses_mixed_splits_repeated_runs_and_mixed_fractions():
    df = metrics_table()
    with pytest.raises(PredictionError, match="mixes splits"):
        summarise_runs(df.assign(split=["val", "test"] * 3))
    with pytest.raises(PredictionError, match="repeat a run"):
        summarise_runs(pd.concat([df, df.iloc[:1]], ignore_index=True))
    with pytest.raises(PredictionError, match="mixes label_fraction"):
        summarise_runs(df.assign(label_fraction=[0.1, 0.5, 1.0] * 2))
    with pytest.raises(PredictionError, match=r"lacks column\(s\) \['f1'\]"):
        summarise_runs(df, metrics=("f1",))
    gap = df.copy()
    gap.loc[0, "auc"] = np.nan
    with pytest.warns(UserWarning, match="1 of 3 run"):
        summary = summarise_runs(gap)
    assert summary.iloc[0]["auc_n"] == 2


def test_markdown_and_latex_tables(tmp_path):
    table = results_table(summarise_runs(metrics_table()), show_n=True)
    md = to_markdown(table, tmp_path / "table1.md")
    lines = md.splitlines()
    assert lines[0].startswith("| Model") and set(lines[1]) <= {"|", "-", " "}
    assert "| densenet121 | supervised      | 0.900 ± 0.100 |" in md
    assert (tmp_path / "table1.md").read_text(encoding="utf-8") == md
    tex = to_latex(table, tmp_path / "table1.tex", caption="ACC and AUC, mean ± std over 3 seeds", label="tab:1")
    assert r"\begin{tabular}{llccc}" in tex
    assert r"densenet121 & supervised & 0.900 $\pm$ 0.100 & 0.850 $\pm$ 0.000 & 3 \\" in tex
    assert r"vit\_small" in tex and r"\label{tab:1}" in tex


# ------------------------------------------------------------------------------------------
# Figures


def test_figures_are_built_with_the_numbers_they_show():
    fig = plot_roc({"A": (Y, P)}, thresholds={"A": 0.6})
    assert "A (AUC = 0.833)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    fig = plot_confusion_matrix([[4, 2], [1, 3]], ["normal", "osteoporosis"], normalize="true")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "0.67\n(4)" in texts and "0.75\n(3)" in texts
    with pytest.raises(PredictionError, match="shape"):
        plot_confusion_matrix([[1, 2, 3]], ["a", "b"])
    fig = plot_reliability({"A": (Y, P)}, n_bins=5)
    assert any("ECE = " in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    history = pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [1.0, 0.7, 0.5], "valid_loss": [0.9, 0.8, 0.85],
                            "valid_auc": [0.6, 0.7, 0.65], "time": ["00:01"] * 3})
    fig = plot_learning_curves(history, chosen_epoch=select_epoch(history))
    assert len(fig.axes) == 2
    with pytest.raises(PredictionError, match="test columns"):
        plot_learning_curves(history.assign(test_auc=[0.5, 0.6, 0.7]))


def test_each_run_gets_the_threshold_chosen_on_its_own_validation_rows():
    rng = np.random.default_rng(3)
    tables = []
    for seed in (0, 1):
        y_val = rng.integers(0, 2, 40)
        p_val = np.clip(0.3 * y_val + rng.uniform(0, 0.7, 40), 0, 1)
        tables += [binary_table(y_val, p_val, "val", seed=seed), binary_table(Y, P, "test", seed=seed)]
    df = pd.concat(tables, ignore_index=True)
    out = with_validation_thresholds(df)
    assert len(out) == len(df) and out["threshold"].notna().all()
    for seed in (0, 1):
        val = df[(df["seed"] == seed) & (df["split"] == "val")]
        expected = choose_threshold(val["target"].to_numpy(), val["prob_osteoporosis"].to_numpy())
        assert set(out.loc[out["seed"] == seed, "threshold"]) == {expected}  # test rows carry the val choice


def test_calibration_slope_and_intercept_read_over_and_under_confidence():
    from osteolib.evaluation import calibration_measures, calibration_table

    rng = np.random.default_rng(0)
    truth = rng.uniform(0.05, 0.95, 4000)
    y = (rng.uniform(size=truth.size) < truth).astype(int)
    logit = np.log(truth / (1 - truth))
    calibrated = calibration_measures(y, truth)
    assert abs(calibrated["calibration_slope"] - 1) < 0.1 and abs(calibrated["calibration_intercept"]) < 0.1
    too_extreme = calibration_measures(y, 1 / (1 + np.exp(-2 * logit)))  # an overfitted model: slope ~ 0.5
    assert abs(too_extreme["calibration_slope"] - 0.5) < 0.06
    too_high = calibration_measures(y, 1 / (1 + np.exp(-(logit + 1))))  # every prediction 1 logit too high
    assert abs(too_high["calibration_intercept"] + 1) < 0.1
    assert calibrated["brier"] < too_extreme["brier"]
    # CIs: the calibrated model's slope interval holds 1; with patient ids the patients are resampled
    table = calibration_table(y, truth, n_boot=100).set_index("measure")
    assert table.loc["calibration_slope", "ci_low"] < 1 < table.loc["calibration_slope", "ci_high"]
    assert table.loc["brier", "ci_low"] < calibrated["brier"] < table.loc["brier", "ci_high"]
    clustered = calibration_table(y, truth, groups=np.arange(y.size) // 200, n_boot=100).set_index("measure")
    assert clustered.loc["brier", "ci_method"] == "patient cluster bootstrap, percentile"
    # one class only: the recalibration is undefined, not invented
    only = calibration_measures(np.ones(10, int), np.full(10, 0.7))
    assert np.isnan(only["calibration_slope"]) and np.isclose(only["brier"], 0.09)
