"""Copies of one radiograph: the detector (osteolib.data.duplicates) and the split policy (splits.group_copies,
splits.check_copies)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from osteolib.data import duplicates, splits
from osteolib.data.splits import LeakageError, SplitError

BENCH = Path(__file__).resolve().parents[2] / "bench" / "near_duplicates.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("near_duplicates_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def manifest(ids, patients, splits_=None) -> pd.DataFrame:
    return pd.DataFrame({"image_id": ids, "patient_id": patients, "path": [f"/data/{i}.png" for i in ids],
                         "label": ["a"] * len(ids), "split": splits_ or [""] * len(ids)})


def pairs(*items) -> pd.DataFrame:
    return pd.DataFrame([{"image_id_a": a, "image_id_b": b, "matches": 40} for a, b in items])


# ------------------------------------------------------------------------------------------------ detector

def similarity(degrees: float, scale: float = 1.0, mirror: bool = False) -> np.ndarray:
    t = np.deg2rad(degrees)
    linear = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    if mirror:
        linear = linear @ np.diag([-1.0, 1.0])
    return np.hstack([linear, [[5.0], [-3.0]]])


def test_a_transform_reads_as_flip_rotation_and_scale():
    assert duplicates.decompose(similarity(10, 1.05, mirror=True)) == ("h", 10.0, 1.05)
    assert duplicates.decompose(similarity(-12)) == ("none", -12.0, 1.0)
    assert duplicates.decompose(similarity(185)) == ("hv", 5.0, 1.0)  # a half turn is both flips
    assert duplicates.decompose(similarity(175, mirror=True)) == ("v", -5.0, 1.0)  # mirror + half turn: up-down
    assert duplicates.describe("h", 10.0, 1.05, 3.0, -2.0) == "flip h, rotate +10 deg, scale 1.05, shift (+3, -2) px"
    assert duplicates.describe("none", 0.2, 1.0, 0.1, 0.0) == "identical alignment"


@pytest.fixture(scope="module")
def shoulder_copies(tmp_path_factory):
    """20 synthetic shoulders at 256 px, each with 2 augmented copies (bench/near_duplicates.py's fixture)."""
    return bench_module().build_fixture(tmp_path_factory.mktemp("copies"), n_patients=20, copies=2, size=256)


def test_augmented_copies_of_synthetic_shoulders_meet_the_target(shoulder_copies):
    # flips, rotations to 15 deg, shifts and crops to 10 %, brightness/contrast/gamma, JPEG 60-95
    found = duplicates.find_copies(shoulder_copies)
    assert list(found.columns) == duplicates.PAIR_COLUMNS
    result = bench_module().score(shoulder_copies, found)
    assert result["pair_recall"] >= 0.95, result
    assert result["copy_recall"] == 1.0, result
    assert result["false_pair_image_share"] <= 0.01, result


def test_the_detector_gives_the_same_pairs_every_time(shoulder_copies):
    first = duplicates.find_copies(shoulder_copies.head(24))
    again = duplicates.find_copies(shoulder_copies.head(24))
    assert len(first) and first.equals(again)


def test_a_mirrored_copy_is_reported_as_a_flip_with_its_rotation(tmp_path):
    from scipy import ndimage

    from osteolib.data import synthetic

    image = synthetic.shoulder_radiograph(synthetic.child_rng(3, 0), size=256, label="normal").image
    copy = ndimage.rotate(image[:, ::-1], 8.0, reshape=False, order=1)
    other = synthetic.shoulder_radiograph(synthetic.child_rng(3, 1), size=256, label="normal").image
    table = manifest(["orig", "copy", "other"], ["p1", "p2", "p3"])
    found = duplicates.find_copies(table, images=[image, copy * 0.7 + 0.1, other])
    assert found[["image_id_a", "image_id_b"]].values.tolist() == [["orig", "copy"]]
    row = found.iloc[0]
    assert row["flip"] == "h" and abs(abs(row["rotation_deg"]) - 8) < 2 and abs(row["scale"] - 1) < 0.03, row


def test_no_pairs_between_patients_on_the_smoke_profile_data():
    # 64 px look-alikes of one anatomy template, no copies at all: the default run must not stop on them
    from osteolib.data.sources import load_dataset

    table = load_dataset("synthetic_shoulder", n_patients=40, difficulty=0.2, confounder=0.0, size=64, seed=0)
    found = duplicates.find_copies(table)
    assert found.empty, found.head()


def test_min_matches_below_one_is_refused():
    with pytest.raises(ValueError, match="min_matches=0"):
        duplicates.find_copies(manifest(["a"], ["p"]), images=[np.zeros((8, 8))], min_matches=0)


# ------------------------------------------------------------------------------------------------ policy

def test_group_copies_joins_patients_transitively_and_keeps_the_originals():
    table = manifest(["x", "y", "z", "w"], ["p3", "p1", "p2", "p9"])
    out = splits.group_copies(table, pairs(("x", "y"), ("y", "z")))
    assert out["patient_id"].tolist() == ["p1", "p1", "p1", "p9"]
    assert out["patient_id_original"].tolist() == ["p3", "p1", "p2", "p9"]
    assert table["patient_id"].tolist() == ["p3", "p1", "p2", "p9"]  # the input is not changed
    with pytest.raises(SplitError, match="not in the manifest"):
        splits.group_copies(table, pairs(("x", "nope")))


def test_grouped_copies_land_in_one_split():
    n = 40
    table = manifest([f"i{k}" for k in range(n)], [f"p{k:02d}" for k in range(n)])
    table["label"] = ["a", "b"] * (n // 2)
    copy_pairs = pairs(*[(f"i{k}", f"i{k + 2}") for k in range(0, n - 2, 4)])
    grouped = splits.group_copies(table, copy_pairs)
    split = splits.patient_split(grouped, seed=0, group_identical=False)
    assert splits.check_copies(split, copy_pairs, "stop").empty


def test_check_copies_stop_names_files_splits_and_the_remedy():
    table = manifest(["N10", "N10_aug3", "N11"], ["N10", "N10_aug3", "N11"], ["train", "test", "train"])
    with pytest.raises(LeakageError) as error:
        splits.check_copies(table, pairs(("N10", "N10_aug3")))
    message = str(error.value)
    assert "N10.png (train)" in message and "N10_aug3.png (test)" in message
    assert "near_duplicates: group" in message and "ignore" in message
    crossing = splits.check_copies(table, pairs(("N10", "N10_aug3")), "ignore")
    assert crossing[["file_a", "file_b"]].values.tolist() == [["N10.png", "N10_aug3.png"]]
    with pytest.raises(LeakageError, match="brings its own split"):
        splits.check_copies(table, pairs(("N10", "N10_aug3")), "group")
    with pytest.raises(SplitError, match="use one of"):
        splits.check_copies(table, pairs(("N10", "N10_aug3")), "maybe")
