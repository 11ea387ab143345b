"""The confounder check (osteolib.stages.confounder_check) and the explanation viewer / figure copies (osteolib.report.viewer).

One tiny real check (20 patients, 32 px, one epoch) is trained once for the module: it exercises the whole path
(synthetic data -> fine-tuning -> sub-run folders -> CAM agreement), and its sub-runs double as a small run folder
for the viewer. Its numbers are not judged (one epoch learns nothing); the verdict is tested on hand-made tables.
"""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch

from osteolib.stages import confounder_check as checks
from osteolib.stages import finetune
from osteolib.report import viewer
from osteolib.runs import Run, new_run

TINY = dict(n_patients=20, image_size=32, epochs=1, batch_size=8, warmup_epochs=0.0, n_cam_images=4)


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    run = new_run("test", root=root / "runs")
    config = checks.ConfounderCheckConfig(data_dir=str(root / "data"), **TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the two models then train side by side, one thread each, on any machine
    try:
        result = checks.run_confounder_check(run, config)
        assert torch.get_num_threads() == 2  # given back after the workers finished
        return run, result
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_confounder_check_trains_both_models_apart_from_the_main_run(tiny_check):
    run, result = tiny_check
    assert list(result.table["confounder"]) == [0.0, 1.0]
    assert result.table[["val_auc", "test_auc"]].apply(lambda c: c.between(0, 1)).all().all()
    assert set(result.agreement["confounder"]) == {0.0, 1.0}
    assert (result.agreement.groupby("confounder").size() == result.table.set_index("confounder")["n_explained"]).all()
    # the two models live in sub-runs: the main run's grid does not see them
    assert finetune.finetuned_runs(run) == []
    for strength in (0.0, 1.0):
        sub = checks.sub_run(run, strength)
        assert finetune.finetuned_runs(sub) == ["random-densenet121-seed0-frac1.0"]
    # the data differ in the marker only: marked train images follow the label where confounder = 1
    shortcut = result.models[1].manifest
    train = shortcut[shortcut["split"] == "train"]
    assert (train["marker"].astype(bool) == (train["label"] == "osteoporosis")).all()
    # both were trained side by side in worker processes, each with one of this process's two threads
    assert [m.summary["torch_threads"] for m in result.models] == [1, 1]
    # a second call reloads the trained models instead of failing on the existing prediction files
    again = checks.run_confounder_check(run, result.config)
    pd.testing.assert_frame_equal(again.table.drop(columns="train_seconds"), result.table.drop(columns="train_seconds"))
    assert isinstance(result.verdict(), str) and "test AUC" in result.verdict()


def test_training_starts_in_workers_only_where_it_pays(tiny_check, tmp_path):
    run, result = tiny_check
    assert checks.untrained(run, result.config) == [] and checks.start_training(run, result.config) is None
    fresh = new_run("test", root=tmp_path / "runs")
    assert checks.untrained(fresh, result.config) == [0.0, 1.0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert checks.start_training(fresh, result.config) is None  # one thread: nothing to gain, nothing started
    finally:
        torch.set_num_threads(threads)
    assert not checks.sub_run(fresh, 0.0).path.exists()


def test_a_second_start_joins_the_workers_of_the_first(tmp_path):
    run = new_run("test", root=tmp_path / "runs")
    config = checks.ConfounderCheckConfig(data_dir=str(tmp_path / "data"), **TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = checks.start_training(run, config)
        again = checks.start_training(run, config)  # the notebook cell run twice while the models train
        assert [w.pid for w, _ in again.workers] == [w.pid for w, _ in first.workers]
        assert again.threads == 2  # the threads before the first start, given back by whichever wait ends
        again.wait()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert checks.untrained(run, config) == []


@pytest.mark.slow
def test_a_changed_recipe_is_not_mixed_with_an_old_sub_run(tiny_check):
    run, result = tiny_check
    changed = checks.ConfounderCheckConfig(data_dir=result.config.data_dir, **{**TINY, "epochs": 2})
    with pytest.raises(FileExistsError, match="another recipe"):
        checks.train_or_load(run, changed, 0.0)


@pytest.mark.slow
def test_maps_explain_each_image_predicted_class_unless_told_the_positive_class(tiny_check, monkeypatch):
    import dataclasses

    from osteolib import explain

    # the tiny model's 32-px DenseNet has a 1 x 1 last feature map, so its maps cannot tell targets apart:
    # record what the check asks grad-cam for (explain's tests cover how None becomes the predicted class)
    _, result = tiny_check
    asked = []
    real_compute_cams = explain.compute_cams

    def recording_compute_cams(model, images, method, targets=None, **kwargs):
        asked.append(targets)
        return real_compute_cams(model, images, method, targets=targets, **kwargs)

    monkeypatch.setattr(explain, "compute_cams", recording_compute_cams)
    item = result.models[0]
    n = int(result.table["n_explained"].iloc[0])
    checks.score_model(item, dataclasses.replace(result.config, cam_target="predicted"))
    checks.score_model(item, dataclasses.replace(result.config, cam_target="positive"))
    assert asked == [None, [len(item.classes) - 1] * n]
    with pytest.raises(ValueError, match="cam_target"):
        dataclasses.replace(result.config, cam_target="true")


def table(real_val, real_test, short_val, short_test, real_energy=0.5, short_energy=0.2, shift=0.3):
    return pd.DataFrame([
        {"confounder": 0.0, "val_auc": real_val, "test_auc": real_test, "marker_shift": 0.0,
         "energy_in_region_mean": real_energy, "pointing_game_mean": 0.6},
        {"confounder": 1.0, "val_auc": short_val, "test_auc": short_test, "marker_shift": shift,
         "energy_in_region_mean": short_energy, "pointing_game_mean": 0.1},
    ])


def test_verdict_follows_the_numbers():
    shown = checks.confounder_verdict(table(0.9, 0.88, 0.99, 0.6))
    assert "shortcut is shown" in shown and "maps do point away" in shown and "test AUC 0.600" in shown
    not_shown = checks.confounder_verdict(table(0.9, 0.88, 0.9, 0.86, real_energy=0.2, short_energy=0.3))
    assert "shortcut is not shown" in not_shown and "maps do not point away" in not_shown
    noise = checks.confounder_verdict(table(0.9, 0.88, 0.99, 0.6, shift=-0.05))  # AUC drop without marker use
    assert "shortcut is not shown" in noise and "marker shift criterion not met" in noise
    unlearnt = checks.confounder_verdict(table(0.55, 0.52, 0.99, 0.5))
    assert "was not learnt" in unlearnt
    with pytest.raises(ValueError, match="confounder_verdict needs"):
        checks.confounder_verdict(table(0.9, 0.9, 0.9, 0.9).drop(columns="marker_shift"))


def test_marker_shift_is_the_difference_of_mean_probabilities():
    manifest = pd.DataFrame({"image_id": list("abcd"), "marker": [True, True, False, False]})
    predictions = pd.DataFrame({"image_id": list("abcd"), "split": "test", "prob_osteoporosis": [0.9, 0.7, 0.2, 0.4]})
    assert checks.marker_shift(predictions, manifest, "osteoporosis") == pytest.approx(0.5)
    assert np.isnan(checks.marker_shift(predictions, manifest.assign(marker=True), "osteoporosis"))


def test_config_is_checked_before_anything_runs():
    with pytest.raises(ValueError, match="difficulty"):
        checks.ConfounderCheckConfig(difficulty=1.0)
    with pytest.raises(ValueError, match="cam_method"):
        checks.ConfounderCheckConfig(cam_method="saliency")
    with pytest.raises(ValueError, match="epochs"):
        checks.ConfounderCheckConfig(epochs=0)


# ------------------------------------------------------------------------------------------ viewer

@pytest.mark.slow
def test_viewer_update_draws_the_chosen_model_map_and_probability(tiny_check):
    import matplotlib.pyplot as plt

    _, result = tiny_check
    item = result.models[0]
    cam_viewer = viewer.CamViewer(item.run, item.manifest, item.cache, item.mean, item.std, methods=["gradcam", "eigencam"])
    assert cam_viewer.scenarios == ["random"] and cam_viewer.backbones == ["densenet121"]
    image_id = cam_viewer.image_ids[0]
    shown = cam_viewer.update("random", "densenet121", image_id, "gradcam")
    predictions = pd.read_csv(item.run.predictions / f"{item.name}.csv")
    saved = predictions.loc[predictions["image_id"] == image_id, "prob_osteoporosis"].iloc[0]
    assert shown["probability"] == saved  # what notebook 04 recorded
    # recomputed in fp32 by the loaded model with the training preprocessing: equal up to bf16 rounding
    assert shown["probability_recomputed"] == pytest.approx(saved, abs=0.02)
    assert shown["cam"].shape == (32, 32) and 0 <= shown["cam"].min() <= shown["cam"].max() <= 1
    assert f"p(osteoporosis) = {shown['probability']:.3f}" in shown["ax"].get_title()
    # the map is the chosen method's map of the chosen model for the positive class
    from osteolib import explain
    from osteolib.stages import pretrain

    image = pretrain.example_images(item.cache, [image_id], item.mean, item.std)
    other = cam_viewer.update("random", "densenet121", image_id, "eigencam")
    np.testing.assert_allclose(other["cam"], explain.compute_cams(item.model, image, "eigencam", targets=[1])[0])
    assert other["method"] == "eigencam" and other["run_name"] == item.name
    with pytest.raises(KeyError, match="no model for scenario"):
        cam_viewer.update("chest_mae", "densenet121", image_id, "gradcam")
    with pytest.raises(ValueError, match="not offered"):
        cam_viewer.update("random", "densenet121", image_id, "layercam")
    widget = viewer.cam_viewer(item.run, item.manifest, item.cache, item.mean, item.std, methods=["gradcam"])
    assert len(widget.children) == 3
    plt.close("all")


def test_copy_paper_figures_replaces_the_earlier_set(tmp_path):
    figures = tmp_path / "figures"
    first = Run(tmp_path / "20990101-000000-real")
    for name in ("05_gradcam_overlays.png", "05_old_only.png", "label_efficiency.png", "02_loss.png"):
        (first.figures / name).write_bytes(b"first")
    copies = viewer.copy_paper_figures(first, destination=figures)
    assert sorted(p.name for p in copies) == ["05_gradcam_overlays.png", "05_old_only.png", "label_efficiency.png"]
    (figures / "01_chest_mae_vit_small_loss.png").write_bytes(b"stage 01")  # another pattern: kept
    second = Run(tmp_path / "20990102-000000-real")
    (second.figures / "05_gradcam_overlays.png").write_bytes(b"second")
    viewer.copy_paper_figures(second, destination=figures)
    assert sorted(p.name for p in figures.iterdir()) == ["01_chest_mae_vit_small_loss.png", "05_gradcam_overlays.png",
                                                          "SOURCE.md"]
    assert (figures / "05_gradcam_overlays.png").read_bytes() == b"second"
    assert "20990102-000000-real" in (figures / "SOURCE.md").read_text()
    empty = Run(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="matches"):
        viewer.copy_paper_figures(empty, destination=figures)
    assert (figures / "05_gradcam_overlays.png").read_bytes() == b"second"
