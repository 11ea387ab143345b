"""Three classes through notebooks 00 -> 04 -> 05 on the synthetic generator's three-class mode (issue 20).

A tiny run (32-px images, one epoch, DenseNet121) fine-tuned twice — from random weights and from a weights file
the test writes (scenario own_checkpoint) — so that notebook 05 has a pair of models to compare. The assertions
read only the files the run writes: predictions with a probability per class, per-class and macro one-vs-rest
AUC with intervals, 3x3 confusion counts, McNemar on correctness, DeLong of the positive class one-vs-rest, and
Grad-CAM maps per class.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from osteolib.cli.osteo import run_profile

CLASSES = ["normal", "osteopenia", "osteoporosis"]

TINY_PROFILE = """\
name: tiny_three_classes
description: three classes through 00, 04 and 05 (tests/stages/test_three_classes.py)
parameters: {{data_root: null, image_size: 32, seed: 0}}
steps:
  - notebook: 00_data_audit
    parameters:
      dataset: synthetic_shoulder
      # 45 patients: the generator's own split gives each class two test patients (30 gave one, and the
      # patient-level DeLong of the positive class needs two positive patients)
      dataset_options: {{n_patients: 45, difficulty: 0.2, confounder: 0.0, size: 48, classes: {classes}}}
      classes: {classes}
      positive_class: osteoporosis
      split_seed: 0
      samples_per_class: 1
  - notebook: 04_finetune
    parameters: {{backbone: densenet121, epochs: 1, batch_size: 8, warmup_epochs: 0, base_lr: 0.02,
                 layer_decay: null, randaug_magnitude: null}}
    variants:
      - {{scenario: random}}
      - {{scenario: own_checkpoint, init_checkpoint: {weights}}}
  - notebook: 05_gradcam_statistics
    # the cheapest settings: one CAM method, four images, few resamples (the bootstrap refuses fewer than 100)
    parameters: {{cam_methods: [gradcam], max_cam_images: 4, n_boot: 200, randomisation_steps: 2,
                 max_faithfulness_images: 1, confounder_check: false}}
"""


def _write_weights(path: Path) -> None:
    """A timm DenseNet121 state dict (random weights, RGB stem, ImageNet head), as a user's weights file."""
    import timm
    import torch

    torch.manual_seed(0)
    torch.save(timm.create_model("densenet121", pretrained=False, in_chans=3, num_classes=1000).state_dict(), path)


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory) -> Path:
    """The run folder (minutes on 2 cores); OSTEO_TEST_THREE_CLASS_RUN reuses one made earlier."""
    if os.environ.get("OSTEO_TEST_THREE_CLASS_RUN"):
        return Path(os.environ["OSTEO_TEST_THREE_CLASS_RUN"])
    root = tmp_path_factory.mktemp("three_classes")
    weights = root / "own_densenet121.pth"
    _write_weights(weights)
    (root / "tiny.yaml").write_text(TINY_PROFILE.format(classes="[" + ", ".join(CLASSES) + "]", weights=weights))
    with pytest.MonkeyPatch.context() as patch:
        # one torch thread in the kernels (they inherit it). On this 2-core machine shared with other jobs, two
        # threads made everything 5-100x slower whenever the cores were busy (measured under load 3-5: a DenseNet
        # forward 0.04 s -> 1-4 s, the tiny fine-tuning 4 s -> 20-50 s), and this test took 2 to 5 minutes
        patch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
        # jobs=2: the two 04 cells side by side, one core each
        return run_profile(str(root / "tiny.yaml"), runs_dir=root / "runs", log_output=False, jobs=2).path


def _table(run: Path, name: str) -> pd.DataFrame:
    path = run / "tables" / name
    assert path.is_file(), f"{name} not written; tables: {sorted(p.name for p in (run / 'tables').iterdir())}"
    return pd.read_csv(path)


@pytest.mark.slow
def test_predictions_carry_a_probability_per_class(three_class_run):
    files = sorted((three_class_run / "predictions").glob("*.csv"))
    assert len(files) == 2
    for path in files:
        predictions = pd.read_csv(path)
        assert [c for c in predictions.columns if c.startswith("prob_")] == [f"prob_{c}" for c in CLASSES]
        probs = predictions[[f"prob_{c}" for c in CLASSES]].to_numpy(float)
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert set(predictions.loc[predictions["split"] == "test", "label"]) == set(CLASSES)


def _assert_class_auc(table: pd.DataFrame, runs: int) -> None:
    assert {"class", "auc", "auc_ci_low", "auc_ci_high", "ci_method"} <= set(table.columns)
    assert sorted(table["class"].unique()) == sorted([*CLASSES, "macro"])
    assert len(table) == runs * (len(CLASSES) + 1)
    finite = table.dropna(subset=["auc"])
    assert len(finite) == len(table)  # every class is in the test split
    assert ((finite["auc_ci_low"] <= finite["auc"] + 1e-9) & (finite["auc"] <= finite["auc_ci_high"] + 1e-9)).all()


def _assert_confusion(table: pd.DataFrame, runs: int, n_test: int) -> None:
    predicted = [f"predicted_{c}" for c in CLASSES]
    assert set(predicted) <= set(table.columns) and "true" in table.columns
    assert len(table) == runs * len(CLASSES)
    for _, counts in table.groupby(["scenario", "backbone", "seed"]):
        assert counts["true"].tolist() == CLASSES  # 3 x 3 counts, rows in class order
        assert counts[predicted].to_numpy().shape == (3, 3)
        assert int(counts[predicted].to_numpy().sum()) == n_test


@pytest.mark.slow
def test_notebook_04_writes_per_class_auc_and_a_confusion_matrix(three_class_run):
    names = sorted(p.stem for p in (three_class_run / "predictions").glob("*.csv"))
    for name in names:
        test = pd.read_csv(three_class_run / "predictions" / f"{name}.csv").query("split == 'test'")
        _assert_class_auc(_table(three_class_run, f"04_{name}_class_auc.csv"), runs=1)
        _assert_confusion(_table(three_class_run, f"04_{name}_confusion.csv"), runs=1, n_test=len(test))
        assert (three_class_run / "figures" / f"04_{name}_confusion.png").is_file()


@pytest.mark.slow
def test_notebook_05_writes_per_class_auc_confusion_and_paired_tests(three_class_run):
    n_test = len(pd.read_csv(next((three_class_run / "predictions").glob("*.csv"))).query("split == 'test'"))
    _assert_class_auc(_table(three_class_run, "05_class_auc.csv"), runs=2)
    _assert_confusion(_table(three_class_run, "05_confusion.csv"), runs=2, n_test=n_test)
    per_run = _table(three_class_run, "05_auc_per_run.csv")
    # AUC of the positive class against the rest; accuracy of the most probable class, so no threshold
    assert len(per_run) == 2 and (per_run["positive"] == "osteoporosis").all() and per_run["threshold"].isna().all()
    significance = _table(three_class_run, "05_significance.csv")
    mcnemar = significance[significance["test"] == "mcnemar_accuracy"]
    assert len(mcnemar) == 1 and mcnemar[["scenario", "reference"]].iloc[0].tolist() == ["own_checkpoint", "random"]
    assert mcnemar["n"].iloc[0] == n_test and np.isfinite(mcnemar["p_value"].iloc[0])
    assert mcnemar["method"].iloc[0].endswith("; most probable class")
    delong = significance[significance["test"] == "delong_auc"]
    assert delong["method"].tolist() == ["DeLong paired (z); osteoporosis vs rest"]
    assert len(_table(three_class_run, "05_significance_patient_level.csv")) == 2


@pytest.mark.slow
def test_notebook_05_explains_every_class(three_class_run):
    assert (three_class_run / "figures" / "05_gradcam_per_class.png").is_file()
    agreement = _table(three_class_run, "05_agreement_per_image.csv")  # the positive class's maps
    n_images = agreement["image_id"].nunique()
    assert n_images > 0 and len(agreement) == 2 * n_images  # two models, one CAM method
    per_class = _table(three_class_run, "05_agreement_per_class.csv")
    assert per_class.groupby("explained_class").size().to_dict() == {c: 2 * n_images for c in CLASSES}
    per_class_ci = _table(three_class_run, "05_agreement_per_class_ci.csv")
    assert sorted(per_class_ci["explained_class"].unique()) == sorted(CLASSES)
