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
    return pd.DataFrame([{"image_id_a": a, "image_id_b": b, "score": 0.99} for a, b in items])


# ------------------------------------------------------------------------------------------------ detector

def test_rotate_keeps_the_centre_and_flip_is_its_own_inverse():
    image = np.random.default_rng(0).random((2, 32, 32)).astype(np.float32)
    assert np.allclose(duplicates.rotate(image, 0.0), image)
    turned = duplicates.rotate(image, 10.0)
    assert np.allclose(turned[:, 14:18, 14:18], duplicates.rotate(image, 10.0)[:, 14:18, 14:18])
    assert np.corrcoef(turned[0, 8:24, 8:24].ravel(), image[0, 8:24, 8:24].ravel())[0, 1] < 0.9
    for how in duplicates.FLIPS:
        assert np.array_equal(duplicates.flip(duplicates.flip(image, how), how), image)


def test_identical_and_flipped_rotated_copies_of_distinct_textures_are_found():
    # Distinct random smooth textures: no look-alikes, so every reported pair must be a copy.
    rng = np.random.default_rng(1)
    from scipy import ndimage
    originals = [ndimage.gaussian_filter(rng.random((64, 64)), 2.0) for _ in range(12)]
    images, sources = [], []
    for k, image in enumerate(originals):
        images += [image, duplicates.rotate(duplicates.flip(image[None], "h"), 8.0)[0] ** 1.5]
        sources += [k, k]
    table = manifest([f"img{i}" for i in range(len(images))], [f"p{i}" for i in range(len(images))])
    found = duplicates.find_copies(table, images=np.stack(images).astype(np.float32))
    assert list(found.columns) == duplicates.PAIR_COLUMNS
    source = dict(zip(table["image_id"], sources))
    same = [source[a] == source[b] for a, b in zip(found["image_id_a"], found["image_id_b"])]
    assert all(same), found
    assert sum(same) >= 11  # of 12 copies
    assert (found["flip"].isin(["h", "v"])).all()  # a left-right flip (or its equivalent up to 180 deg)


@pytest.mark.xfail(strict=False, reason="measured limit: synthetic look-alike patients score as high as copies "
                                        "at 64 px (bench/results/near_duplicates.json); target not met yet")
def test_augmented_copies_of_synthetic_shoulders_meet_the_target(tmp_path):
    bench = bench_module()
    table = bench.build_fixture(tmp_path, n_patients=20, copies=2, size=64)
    result = bench.score(table, duplicates.find_copies(table))
    assert result["pair_recall"] >= 0.95
    assert result["false_pair_image_share"] <= 0.01


@pytest.mark.xfail(strict=False, reason="measured: the detector reports 521 pairs, all between different patients, "
                                        "on the smoke profile's data (no copies); it must not gate a default run yet")
def test_no_pairs_between_patients_on_the_smoke_profile_data():
    from osteolib.data.sources import load_dataset

    table = load_dataset("synthetic_shoulder", n_patients=40, difficulty=0.2, confounder=0.0, size=64, seed=0)
    found = duplicates.find_copies(table)
    assert (found["patient_a"] == found["patient_b"]).all(), found.head()


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
