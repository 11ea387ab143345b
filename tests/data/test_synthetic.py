"""Synthetic X-rays: determinism, ground truth where the class signal lives, splits, confounder, files."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from osteolib.data import synthetic
from osteolib.data.synthetic import datasets as synthetic_datasets
from osteolib.data import MANIFEST_COLUMNS, read_manifest
from osteolib.data import (
    DEFAULT_CLASSES,
    THREE_CLASSES,
    chest_radiograph,
    class_means,
    draw_shoulder_patient,
    ensure_synthetic,
    marker_probability,
    shoulder_radiograph,
    write_chest_dataset,
    write_shoulder_dataset,
)

SIZE = 64


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(123, spawn_key=key))


def file_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ images

def test_chest_radiograph_is_a_deterministic_float_image_in_range():
    image = chest_radiograph(rng(0), size=SIZE)
    assert image.shape == (SIZE, SIZE) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image.std() > 0.1  # real contrast, not a flat picture
    assert np.array_equal(image, chest_radiograph(rng(0), size=SIZE))
    assert not np.array_equal(image, chest_radiograph(rng(1), size=SIZE))
    # Dark lungs either side of a bright mediastinum, black air above the shoulders: an X-ray layout.
    big = chest_radiograph(rng(0), size=128)
    lungs = (big[40:80, 25:45].mean() + big[40:80, 83:103].mean()) / 2
    assert big[40:80, 58:70].mean() > lungs + 0.1


@pytest.mark.parametrize("view", ["AP", "Y"])
def test_shoulder_sample_has_image_mask_and_enclosing_box(view):
    sample = shoulder_radiograph(rng(2), size=SIZE, label="osteoporosis", view=view, marker=True)
    assert sample.image.shape == sample.mask.shape == (SIZE, SIZE)
    assert sample.image.dtype == np.float32 and 0 <= sample.image.min() and sample.image.max() <= 1
    assert sample.mask.dtype == np.uint8 and set(np.unique(sample.mask)) == {0, 1}
    assert 0.03 < sample.mask.mean() < 0.4  # the humerus: a region, not the whole picture
    rows, cols = np.nonzero(sample.mask)
    box = sample.box
    assert box["label"] == "evidence"
    assert (box["x"], box["y"]) == (cols.min(), rows.min())
    assert (box["x"] + box["w"] - 1, box["y"] + box["h"] - 1) == (cols.max(), rows.max())
    assert box["x"] + box["w"] <= SIZE and box["y"] + box["h"] <= SIZE
    assert sample.marker and sample.marker_corner in synthetic.CORNERS
    params = sample.parameters()
    for key in ("cti", "trabecular_density", "trabecular_contrast", "side", "marker", "view", "label"):
        assert key in params
    assert params["view"] == view and params["label"] == "osteoporosis"


@pytest.mark.parametrize("view", ["AP", "Y"])
def test_class_changes_pixels_only_inside_the_evidence_mask(view):
    # Same seed, different label: the counterfactual image differs only where the mask says.
    for seed in range(3):
        normal = shoulder_radiograph(rng(10, seed), size=SIZE, label="normal", difficulty=0.0, view=view, marker=True)
        sick = shoulder_radiograph(rng(10, seed), size=SIZE, label="osteoporosis", difficulty=0.0, view=view,
                                   marker=True)
        assert np.array_equal(normal.mask, sick.mask)
        difference = np.abs(normal.image - sick.image)
        assert difference[normal.mask == 0].max() == 0.0
        assert difference[normal.mask == 1].mean() > 0.01
        assert sick.patient.cti < normal.patient.cti
        assert sick.patient.trabecular_density < normal.patient.trabecular_density


def test_difficulty_one_removes_the_class_signal_entirely():
    means = class_means(DEFAULT_CLASSES, difficulty=1.0)
    assert means["normal"] == means["osteoporosis"]
    normal = shoulder_radiograph(rng(20), size=SIZE, label="normal", difficulty=1.0)
    sick = shoulder_radiograph(rng(20), size=SIZE, label="osteoporosis", difficulty=1.0)
    assert np.array_equal(normal.image, sick.image)


def test_effect_size_shrinks_with_difficulty_and_three_classes_are_ordered():
    gaps = [class_means(DEFAULT_CLASSES, d)["normal"] - class_means(DEFAULT_CLASSES, d)["osteoporosis"]
            for d in (0.0, 0.5, 1.0)]
    assert gaps == pytest.approx([synthetic.MAX_EFFECT, synthetic.MAX_EFFECT / 2, 0.0])
    three = class_means(THREE_CLASSES, 0.5)
    assert three["normal"] > three["osteopenia"] > three["osteoporosis"]


def test_inside_mask_intensity_separates_classes_while_outside_does_not():
    # Independent patients (a different seed per image). The feature: how much brighter the bone is
    # than the soft tissue right around it (so that exposure differences between films cancel).
    inside = {"normal": [], "osteoporosis": []}
    outside = {"normal": [], "osteoporosis": []}
    for k in range(60):
        label = DEFAULT_CLASSES[k % 2]
        sample = shoulder_radiograph(rng(30, k), size=SIZE, label=label, difficulty=0.0, view="AP")
        bone = sample.mask == 1
        around = ndimage.binary_dilation(bone, iterations=4) & ~bone
        inside[label].append(sample.image[bone].mean() - sample.image[around].mean())
        outside[label].append(sample.image[~bone].mean())

    def t_statistic(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return (a.mean() - b.mean()) / np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))

    assert t_statistic(inside["normal"], inside["osteoporosis"]) > 3.0  # denser bone in normal
    assert abs(t_statistic(outside["normal"], outside["osteoporosis"])) < 2.0


def test_draw_shoulder_patient_rejects_unknown_label():
    with pytest.raises(ValueError, match="label 'broken'"):
        draw_shoulder_patient(rng(0), "broken")
    with pytest.raises(ValueError, match="view"):
        shoulder_radiograph(rng(0), size=SIZE, view="lateral")


# ------------------------------------------------------------------------------------------------ confounder

def test_marker_probability_follows_label_in_train_and_val_only():
    assert marker_probability("train", "osteoporosis", DEFAULT_CLASSES, 1.0) == 1.0
    assert marker_probability("val", "normal", DEFAULT_CLASSES, 1.0) == 0.0
    assert marker_probability("test", "osteoporosis", DEFAULT_CLASSES, 1.0) == 0.5
    assert marker_probability("train", "normal", DEFAULT_CLASSES, 0.0) == 0.5
    assert marker_probability("train", "osteopenia", THREE_CLASSES, 1.0) == 0.5
    assert marker_probability("train", "normal", DEFAULT_CLASSES, 0.4) == pytest.approx(0.3)


def test_marker_draws_are_independent_of_label_so_test_split_has_no_shortcut():
    # The per-patient draw decides the marker; it must not depend on the class.
    draws = {label: [draw_shoulder_patient(rng(40, k), label).marker_draw for k in range(400)]
             for label in DEFAULT_CLASSES}
    rates = {label: np.mean(np.asarray(values) < 0.5) for label, values in draws.items()}
    assert abs(rates["normal"] - rates["osteoporosis"]) < 0.1


# ------------------------------------------------------------------------------------------------ data sets

@pytest.fixture(scope="module")
def shoulder_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shoulder")
    manifest_path = write_shoulder_dataset(folder, n_patients=40, seed=5, size=SIZE, difficulty=0.5,
                                           confounder=1.0, workers=1)
    return folder, manifest_path


def test_shoulder_manifest_round_trips_with_masks_boxes_and_splits(shoulder_set):
    folder, manifest_path = shoulder_set
    df = read_manifest(manifest_path)  # checks that every image and mask file exists
    assert list(df.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    assert {"side", "marker"} <= set(df.columns)
    assert set(df["source"]) == {"synthetic-shoulder"}
    assert set(df["view"]) <= {"AP", "Y"} and "AP" in set(df["view"])
    assert (df["width"] == SIZE).all() and (df["height"] == SIZE).all()
    assert df["patient_id"].nunique() == 40 and 40 < len(df) <= 80
    for _, row in df.iterrows():
        mask = np.asarray(Image.open(row["mask_path"]))
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
        (box,) = row["boxes"]
        rows, cols = np.nonzero(mask)
        assert (box["x"], box["y"], box["w"], box["h"]) == (
            cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
        assert Image.open(row["path"]).mode == "L"


def test_split_is_patient_level_stratified_and_labels_balanced(shoulder_set):
    _, manifest_path = shoulder_set
    df = read_manifest(manifest_path)
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    assert (df.groupby("patient_id")["label"].nunique() == 1).all()
    patients = df.drop_duplicates("patient_id")
    assert patients["label"].value_counts().to_dict() == {"normal": 20, "osteoporosis": 20}
    per_split = patients.groupby(["split", "label"]).size().unstack()
    assert set(per_split.index) == {"train", "val", "test"}
    # Per class 20 * (0.77, 0.11, 0.12) = (15.4, 2.2, 2.4): largest remainders give (16, 2, 2).
    assert per_split.to_dict("index") == {split: {"normal": n, "osteoporosis": n}
                                          for split, n in (("test", 2), ("train", 16), ("val", 2))}


def test_confounder_one_marks_every_osteoporotic_training_image_and_never_the_mask(shoulder_set):
    folder, manifest_path = shoulder_set
    df = read_manifest(manifest_path)
    development = df[df["split"].isin(["train", "val"])]
    marked = development["marker"].astype(str) == "True"
    assert (marked == (development["label"] == "osteoporosis")).all()
    params = pd.read_csv(folder / "parameters.csv")
    test_ids = set(df.loc[df["split"] == "test", "image_id"])
    for _, row in params.iterrows():
        mask = np.asarray(Image.open(folder / "masks" / f"{row['image_id']}.png")) > 0
        image = np.asarray(Image.open(folder / "images" / f"{row['image_id']}.png"))
        if row["marker"]:
            r, c, h, w = synthetic.marker_footprint(SIZE, row["marker_corner"])
            assert not mask[r:r + h, c:c + w].any()
            assert (image[r:r + h, c:c + w] == 255).sum() >= 5  # the lead letter burnt in
        if row["image_id"] in test_ids:  # test markers follow the patient's draw, not the label
            patient = draw_shoulder_patient(synthetic.child_rng(5, int(row["image_id"].split("-")[1])), row["label"])
            assert bool(row["marker"]) == (patient.marker_draw < 0.5)


def test_parameters_and_generator_json_describe_every_image(shoulder_set):
    folder, manifest_path = shoulder_set
    df = read_manifest(manifest_path)
    params = pd.read_csv(folder / "parameters.csv")
    assert list(params["image_id"]) == list(df["image_id"])
    for column in ("cti", "trabecular_density", "trabecular_contrast", "bone_quality", "side", "marker", "view"):
        assert column in params.columns
    by_label = params.groupby("label")["cti"].mean()
    assert by_label["normal"] > by_label["osteoporosis"]
    info = json.loads((folder / "generator.json").read_text())
    assert info["complete"] and info["kind"] == "shoulder" and info["n_images"] == len(df)
    assert info["parameters"]["confounder"] == 1.0 and info["parameters"]["classes"] == list(DEFAULT_CLASSES)


def test_written_data_is_deterministic_and_seed_dependent(tmp_path):
    settings = dict(n_patients=4, size=48, difficulty=0.5, confounder=0.5, workers=1)
    write_shoulder_dataset(tmp_path / "a", seed=1, **settings)
    write_shoulder_dataset(tmp_path / "b", seed=1, **settings)
    write_shoulder_dataset(tmp_path / "c", seed=2, **settings)
    first, again, other = (file_bytes(tmp_path / name) for name in "abc")
    assert first == again  # manifest paths are relative, so even the CSV is identical
    assert first["images/shoulder-00000-ap.png"] != other["images/shoulder-00000-ap.png"]


def test_image_k_does_not_depend_on_the_data_set_size(tmp_path):
    small = write_shoulder_dataset(tmp_path / "small", n_patients=2, seed=4, size=48, workers=1).parent
    large = write_shoulder_dataset(tmp_path / "large", n_patients=5, seed=4, size=48, workers=1).parent
    for image in (small / "images").iterdir():
        assert image.read_bytes() == (large / "images" / image.name).read_bytes()
    chest_small = write_chest_dataset(tmp_path / "chest-small", n_images=2, seed=4, size=48, workers=1).parent
    chest_large = write_chest_dataset(tmp_path / "chest-large", n_images=4, seed=4, size=48, workers=1).parent
    for image in (chest_small / "images").iterdir():
        assert image.read_bytes() == (chest_large / "images" / image.name).read_bytes()


def test_parallel_workers_give_the_same_files(tmp_path):
    write_shoulder_dataset(tmp_path / "one", n_patients=4, seed=6, size=48, workers=1)
    write_shoulder_dataset(tmp_path / "two", n_patients=4, seed=6, size=48, workers=2)
    assert file_bytes(tmp_path / "one") == file_bytes(tmp_path / "two")


def test_three_class_mode(tmp_path):
    df = read_manifest(write_shoulder_dataset(tmp_path, n_patients=9, seed=0, size=48, classes=THREE_CLASSES,
                                              workers=1))
    assert df.drop_duplicates("patient_id")["label"].value_counts().to_dict() == {c: 3 for c in THREE_CLASSES}


def test_chest_dataset_manifest(tmp_path):
    df = read_manifest(write_chest_dataset(tmp_path, n_images=10, seed=0, size=48, workers=1))
    assert len(df) == 10 and df["patient_id"].nunique() == 10
    assert set(df["source"]) == {"synthetic-chest"} and set(df["label"]) == {"unlabelled"}
    assert set(df["view"]) <= {"PA", "AP"} and set(df["split"]) <= {"train", "val", "test"}
    assert df["mask_path"].isna().all() and df["boxes"].isna().all()
    assert len(pd.read_csv(tmp_path / "parameters.csv")) == 10


# ------------------------------------------------------------------------------------------------ ensure_synthetic

def test_ensure_synthetic_reuses_a_complete_copy_and_keys_on_parameters(tmp_path, monkeypatch):
    params = dict(n_patients=4, size=48, seed=0)
    first = ensure_synthetic("shoulder", root=tmp_path, workers=1, **params)
    assert first.parent.parent == tmp_path and first.parent.name.startswith("shoulder-")
    stamp = (first.parent / "images" / "shoulder-00000-ap.png").stat().st_mtime_ns

    def must_not_generate(*args, **kwargs):
        raise AssertionError("a complete copy existed; nothing should be generated")

    monkeypatch.setitem(synthetic_datasets._KINDS, "shoulder", (synthetic.ShoulderSettings, must_not_generate))
    # Same parameters spelt differently (floats, lists) find the same copy.
    again = ensure_synthetic("shoulder", root=tmp_path, n_patients=4.0, size=48, seed=0, ratios=[0.77, 0.11, 0.12])
    assert again == first
    assert (first.parent / "images" / "shoulder-00000-ap.png").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    other = ensure_synthetic("shoulder", root=tmp_path, workers=1, difficulty=0.9, **params)
    assert other.parent != first.parent
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.parent.name, other.parent.name])


def test_ensure_synthetic_regenerates_a_damaged_copy(tmp_path):
    manifest = ensure_synthetic("chest", root=tmp_path, n_images=3, size=48, workers=1)
    (manifest.parent / "images" / "chest-00001.png").unlink()
    with pytest.warns(UserWarning, match="incomplete or damaged"):
        again = ensure_synthetic("chest", root=tmp_path, n_images=3, size=48, workers=1)
    assert again == manifest and len(read_manifest(again)) == 3


def test_interrupted_generation_leaves_nothing_that_is_trusted(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    # the writer looks its job up in osteolib.data.synthetic.datasets: patch it there
    monkeypatch.setattr(synthetic_datasets, "_shoulder_job", broken)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic("shoulder", root=tmp_path, n_patients=3, size=48, workers=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind, params, name", [
    ("shoulder", {"difficulty": 1.5}, "difficulty"),
    ("shoulder", {"confounder": -0.1}, "confounder"),
    ("shoulder", {"n_patients": 1}, "n_patients"),
    ("shoulder", {"n_patients": 2, "classes": THREE_CLASSES}, "n_patients"),
    ("shoulder", {"ratios": (0.5, 0.5, 0.5)}, "ratios"),
    ("shoulder", {"classes": ("normal",)}, "classes"),
    ("shoulder", {"size": 8}, "size"),
    ("shoulder", {"difficuly": 0.5}, "difficuly"),
    ("chest", {"n_images": 0}, "n_images"),
    ("chest", {"seed": -1}, "seed"),
    ("bone", {}, "kind"),
])
def test_bad_parameters_raise_before_anything_is_written(tmp_path, kind, params, name):
    root = tmp_path / "synthetic"
    with pytest.raises(ValueError, match=name):
        ensure_synthetic(kind, root=root, **params)
    assert not root.exists()


def test_writers_validate_before_creating_folders(tmp_path):
    with pytest.raises(ValueError, match="difficulty"):
        write_shoulder_dataset(tmp_path / "s", n_patients=4, difficulty=2.0)
    with pytest.raises(ValueError, match="workers"):
        write_chest_dataset(tmp_path / "c", n_images=2, workers=0)
    assert list(tmp_path.iterdir()) == []
