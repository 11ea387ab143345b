"""``osteo predict`` on a tiny run made by notebooks 00 and 04 with three models (DenseNet121, the multi-scale
DenseNet, ViT-small): the same test images give exactly the probabilities notebook 04 wrote, an unreadable file is
reported while the others go through, nothing is overwritten, DICOM files are read as notebook 00 reads them, and
each model's overlays show its own map (the multi-scale CAM; Grad-CAM on the ViT's patch grid)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from osteolib.cli.osteo import main, run_profile
from osteolib.data import read_manifest, read_xray
from osteolib.data.synthetic.lab_folder import write_dicom

DENSENET = "random-densenet121-seed0-frac1.0"
MULTISCALE = "random-densenet121_multiscale-seed0-frac1.0"
VIT = "random-vit_small-seed0-frac1.0"

# 32 px: DenseNet121's last block is 1 x 1 there, still a valid map; the ViT takes 8-px patches (a 4 x 4 grid)
TINY_PROFILE = """\
name: tiny_predict
description: a tiny run for osteo predict's test
parameters: {data_root: null, image_size: 32, seed: 0}
steps:
  - notebook: 00_data_audit
    parameters:
      dataset: synthetic_shoulder
      dataset_options: {n_patients: 40, difficulty: 0.2, confounder: 0.0, size: 48}
      split_seed: 0
  - notebook: 04_finetune
    parameters: {scenario: random, epochs: 1, batch_size: 8, warmup_epochs: 0,
                 base_lr: 0.02, layer_decay: null, randaug_magnitude: null}
    variants:
      - {backbone: densenet121}
      - {backbone: densenet121_multiscale}
      - {backbone: vit_small, patch_size: 8}
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run with the three fine-tuned models (~3 minutes on 2 cores); OSTEO_TEST_PREDICT_RUN reuses one made
    earlier from TINY_PROFILE."""
    if os.environ.get("OSTEO_TEST_PREDICT_RUN"):
        return Path(os.environ["OSTEO_TEST_PREDICT_RUN"])
    root = tmp_path_factory.mktemp("predict")
    (root / "tiny.yaml").write_text(TINY_PROFILE)
    # jobs=2: the three cells two at a time, one core each (most of a tiny cell is its kernel starting)
    return run_profile(str(root / "tiny.yaml"), runs_dir=root / "runs", log_output=False, jobs=2).path


def _test_split(run: Path, model: str) -> tuple[pd.DataFrame, list[str]]:
    predictions = pd.read_csv(run / "predictions" / f"{model}.csv", dtype={"image_id": str})
    # read_manifest resolves the paths, which the file stores relative to itself
    manifest = read_manifest(run / "data" / "manifest.csv").set_index("image_id")
    test = predictions[predictions["split"] == "test"].reset_index(drop=True)
    return test, [str(p) for p in manifest.loc[test["image_id"], "path"]]


def _prob_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith("prob_")]


def _predict(run: Path, model: str, inputs: list[str], out: Path, *options: str) -> pd.DataFrame:
    assert main(["predict", "--run", str(run), "--model", model, *inputs, "--out", str(out), "--quiet",
                 *options]) == 0
    return pd.read_csv(out / "predictions.csv", keep_default_na=False)


@pytest.mark.slow
@pytest.mark.parametrize("model", [DENSENET, MULTISCALE, VIT])
def test_predict_reproduces_notebook_04_and_reports_a_broken_file(tiny_run, tmp_path, capsys, model):
    test, paths = _test_split(tiny_run, model)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"these bytes are no image")
    out = tmp_path / "out"
    assert main(["predict", "--run", str(tiny_run), "--model", model, *paths, str(broken), "--out", str(out)]) == 0
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    ok = table[table["status"] == "ok"].reset_index(drop=True)
    assert ok["file"].tolist() == paths
    for column in _prob_columns(test):
        # the same floats up to float32 rounding: oneDNN's kernels on some CPUs (seen on an AMD EPYC with AVX-512)
        # round differently for other batch compositions; a preprocessing difference would show as > 1e-3
        np.testing.assert_allclose(ok[column].to_numpy(float), test[column].to_numpy(float), rtol=0, atol=1e-6,
                                   err_msg=column)
    bad = table[table["status"] == "unreadable"]
    assert bad["file"].tolist() == [str(broken)] and "not a recognised image format" in bad["error"].iloc[0]
    assert f"cannot read {broken}" in capsys.readouterr().out
    assert all(Path(p).is_file() for p in ok["overlay"])
    assert set(ok["overlay_map"]) == {"multiscale_cam" if model == MULTISCALE else "gradcam"}
    assert bad["overlay"].iloc[0] == "" and bad["overlay_map"].iloc[0] == ""
    assert set(table["model"]) == {model} and set(table["run"]) == {str(tiny_run)}
    positive = _prob_columns(test)[1][len("prob_"):]
    threshold = float(ok["threshold"].iloc[0])
    assert ((ok["predicted"] == positive) == (ok[f"prob_{positive}"].astype(float) >= threshold)).all()
    # never written over: the same --out again is refused
    assert main(["predict", "--run", str(tiny_run), "--model", model, paths[0], "--out", str(out),
                 "--no-overlays"]) == 1
    assert "not an empty folder" in capsys.readouterr().err


@pytest.mark.slow
def test_without_overlays_the_probabilities_are_the_same_and_no_image_is_drawn(tiny_run, tmp_path):
    _, paths = _test_split(tiny_run, DENSENET)
    with_maps = _predict(tiny_run, DENSENET, paths, tmp_path / "with")
    without = _predict(tiny_run, DENSENET, paths, tmp_path / "without", "--no-overlays")
    assert not (tmp_path / "without" / "overlays").exists()
    assert (without["overlay"] == "").all() and (without["overlay_map"] == "").all()
    assert (with_maps["overlay_map"] == "gradcam").all()
    for column in _prob_columns(with_maps):
        assert np.array_equal(with_maps[column].to_numpy(float), without[column].to_numpy(float)), column


@pytest.mark.slow
def test_an_unknown_or_missing_model_name_lists_the_run_s_models(tiny_run, tmp_path, capsys):
    _, paths = _test_split(tiny_run, DENSENET)
    assert main(["predict", "--run", str(tiny_run), "--model", "nope", paths[0], "--out", str(tmp_path / "o")]) == 1
    assert DENSENET in capsys.readouterr().err
    # three models and no --model: which one is not guessed
    assert main(["predict", "--run", str(tiny_run), paths[0], "--out", str(tmp_path / "p")]) == 1
    message = capsys.readouterr().err
    assert "choose one with --model" in message and all(name in message for name in (DENSENET, MULTISCALE, VIT))


def _stretch_to_full_range(pixels: np.ndarray) -> np.ndarray:
    low, high = int(pixels.min()), int(pixels.max())
    return np.round((pixels.astype(np.float64) - low) * 255.0 / (high - low)).astype(np.uint8)


@pytest.mark.slow
def test_dicom_files_are_predicted_as_read_by_read_xray(tiny_run, tmp_path):
    """write_dicom stores the 8-bit values x16 as 12-bit data without a window, so read_xray scales DICOM by the
    data's min-max range while an 8-bit PNG is divided by 255. Hence (1) a DICOM of an image that does not span
    0..255 is its contrast-stretched version and gives other probabilities than the PNG, and (2) for images that
    do span 0..255 the decoded pixels are bit-identical (16 v / 4080 == v / 255 in float32 for every v), so the
    probabilities are exactly those of the PNGs."""
    _, paths = _test_split(tiny_run, DENSENET)
    originals = [np.asarray(Image.open(p)) for p in paths]
    assert all(a.dtype == np.uint8 for a in originals)
    spans_0_255 = np.array([a.min() == 0 and a.max() == 255 for a in originals])
    assert not spans_0_255.all()  # else (1) below would test nothing

    # (1) the images as they are
    as_dicom = [str(write_dicom(a, tmp_path / f"image{k}.dcm", f"P{k}", "ap")) for k, a in enumerate(originals)]
    for array, dicom in zip(originals, as_dicom):
        low, high = float(array.min()), float(array.max())
        assert np.allclose(read_xray(dicom).pixels, (array - low) / (high - low), atol=1e-6)
    png_table = _predict(tiny_run, DENSENET, paths, tmp_path / "png", "--no-overlays")
    dicom_table = _predict(tiny_run, DENSENET, as_dicom, tmp_path / "dicom")
    assert (dicom_table["status"] == "ok").all() and dicom_table["file"].tolist() == as_dicom
    assert all(Path(p).is_file() for p in dicom_table["overlay"])
    dicom_probs = dicom_table[_prob_columns(dicom_table)].to_numpy(float)
    png_probs = png_table[_prob_columns(png_table)].to_numpy(float)
    assert np.isfinite(dicom_probs).all() and np.allclose(dicom_probs.sum(axis=1), 1.0)
    same = (dicom_probs == png_probs).all(axis=1)
    assert same.tolist() == spans_0_255.tolist()  # stretched images differ, full-range ones are exactly equal

    # (2) the same 8-bit values spanning 0..255, once as PNG and once as DICOM, in two calls with the same batches
    stretched = [_stretch_to_full_range(a) for a in originals]
    full_png, full_dicom = [], []
    for k, array in enumerate(stretched):
        Image.fromarray(array).save(tmp_path / f"full{k}.png")
        full_png.append(str(tmp_path / f"full{k}.png"))
        full_dicom.append(str(write_dicom(array, tmp_path / f"full{k}.dcm", f"P{k}", "ap")))
        assert np.array_equal(read_xray(full_dicom[-1]).pixels, read_xray(full_png[-1]).pixels)
    from_png = _predict(tiny_run, DENSENET, full_png, tmp_path / "full-png", "--no-overlays")
    from_dicom = _predict(tiny_run, DENSENET, full_dicom, tmp_path / "full-dicom", "--no-overlays")
    for column in _prob_columns(from_png):
        assert np.array_equal(from_png[column].to_numpy(float), from_dicom[column].to_numpy(float)), column
    assert from_png["predicted"].tolist() == from_dicom["predicted"].tolist()


def _drawn_maps(monkeypatch) -> list[tuple[np.ndarray, np.ndarray]]:
    """Record (display pixels, map) of every overlay predict draws, still drawing it."""
    from osteolib.stages import predict

    drawn: list[tuple[np.ndarray, np.ndarray]] = []
    save = predict._save_overlay

    def record(pixels, cam, title, path):
        drawn.append((np.array(pixels), np.array(cam)))
        save(pixels, cam, title, path)

    monkeypatch.setattr(predict, "_save_overlay", record)
    return drawn


def _model_inputs(run: Path, model_name: str, paths: list[str], tmp_path: Path):
    """The model and the normalised images exactly as notebook 04 feeds them (cache, letterbox, audit mean/std)."""
    import torch

    from osteolib.data import ImageCache, XrayDataset, crop_policy, read_audit
    from osteolib.runs import open_run
    from osteolib.stages import finetune

    model, config, classes = finetune.load_finetuned(open_run(run), model_name)
    normalisation = read_audit(run / "data" / "audit.json")["normalisation"]
    manifest = pd.DataFrame({"image_id": [f"{i:06d}" for i in range(len(paths))], "path": paths})
    cache = ImageCache.build(manifest, config.image_size, root=tmp_path / "cache", progress=False)
    dataset = XrayDataset(cache, manifest["image_id"].tolist(), transform=crop_policy("none", config.image_size),
                          mean=normalisation["mean"], std=normalisation["std"])
    return model, classes, torch.stack([dataset[i][0] for i in range(len(dataset))])


@pytest.mark.slow
def test_multiscale_overlays_show_the_relevance_weighted_multiscale_cam(tiny_run, tmp_path, monkeypatch):
    from osteolib.explain import compute_cams, multiscale_cam
    from osteolib.models import MultiScaleDenseNet

    _, paths = _test_split(tiny_run, MULTISCALE)
    drawn = _drawn_maps(monkeypatch)
    table = _predict(tiny_run, MULTISCALE, paths, tmp_path / "out")
    assert (table["overlay_map"] == "multiscale_cam").all() and len(drawn) == len(paths)
    model, classes, images = _model_inputs(tiny_run, MULTISCALE, paths, tmp_path)
    assert isinstance(model, MultiScaleDenseNet)
    decided = [classes.index(c) for c in table["predicted"]]
    expected = multiscale_cam(model, images, class_idx=decided)[0]
    maps = np.stack([cam for _, cam in drawn])
    assert maps.shape == (len(paths), 32, 32)
    assert np.allclose(maps, expected, atol=1e-5)
    # grad-cam on the same taps weighs the scales equally: a different map, so the check above tells them apart
    equal_weights = compute_cams(model, images, "gradcam", targets=decided)
    assert not np.allclose(maps, equal_weights, atol=1e-3)


@pytest.mark.slow
def test_vit_overlays_are_grad_cam_on_the_patch_grid(tiny_run, tmp_path, monkeypatch):
    from osteolib.explain import compute_cams

    _, paths = _test_split(tiny_run, VIT)
    drawn = _drawn_maps(monkeypatch)
    table = _predict(tiny_run, VIT, paths, tmp_path / "out")
    assert (table["overlay_map"] == "gradcam").all() and len(drawn) == len(paths)
    assert all(Path(p).is_file() for p in table["overlay"])
    model, classes, images = _model_inputs(tiny_run, VIT, paths, tmp_path)
    decided = [classes.index(c) for c in table["predicted"]]
    maps = np.stack([cam for _, cam in drawn])
    assert maps.shape == (len(paths), 32, 32) and np.isfinite(maps).all()
    assert np.allclose(maps, compute_cams(model, images, "gradcam", targets=decided), atol=1e-5)
    # a map of the 4 x 4 patch grid, upsampled: not blank, and not one value everywhere
    assert all(cam.max() > 0 and cam.std() > 0 for cam in maps)


def test_osteo_help_and_list_do_not_import_torch():
    """Every command's module is imported to build the parser; predict's must not pull in torch (~2 s)."""
    code = ("import sys\nfrom osteolib.cli.osteo import main\nmain(['list'])\n"
            "try:\n    main(['predict', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("NO-TORCH")
    assert "--no-overlays" in result.stdout and "--quiet" in result.stdout  # the help was printed


def test_the_cli_names_the_file_the_stage_writes():
    from osteolib.cli import predict as cli
    from osteolib.stages import predict as stage

    assert cli.PREDICTIONS_FILE == stage.PREDICTIONS_FILE
