"""Patient-level stratified splits, leakage checks, near-duplicates, saved splits."""
from __future__ import annotations

import time
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from osteolib.data import nih_cxr14, normalise_manifest
from osteolib.data.splits import (
    LeakageError,
    SplitError,
    _largest_remainder,
    apply_saved_split,
    check_no_leakage,
    file_hashes,
    label_conflicts,
    near_duplicates,
    patient_split,
    perceptual_hashes,
    save_split,
    split_summary,
)


def table(patients: dict[str, list[str]], paths: dict[str, str] | None = None) -> pd.DataFrame:
    """A manifest from {patient: [label of each image]} (paths need not exist unless files are hashed)."""
    rows = []
    for patient, labels in patients.items():
        for n, label in enumerate(labels):
            image_id = f"{patient}_{n}"
            rows.append({"image_id": image_id, "path": (paths or {}).get(image_id, f"/nowhere/{image_id}.png"),
                         "label": label, "patient_id": patient})
    return normalise_manifest(pd.DataFrame(rows))


def many_patients(n_a: int = 60, n_b: int = 40) -> pd.DataFrame:
    patients = {f"a{i:03d}": ["a"] * (1 + i % 3) for i in range(n_a)}
    patients.update({f"b{i:03d}": ["b"] * (1 + i % 2) for i in range(n_b)})
    return table(patients)


def write_image(path: Path, seed: int, shift: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    smooth = np.kron(rng.integers(40, 200, size=(8, 8)), np.ones((8, 8)))  # blocky, so phash is stable
    Image.fromarray(np.clip(smooth + shift, 0, 255).astype(np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------
# Splitting


def test_split_is_patient_level_stratified_and_deterministic():
    df = many_patients()
    out = patient_split(df, seed=3, group_identical=False)
    assert set(out["split"]) == {"train", "val", "test"}
    assert out.groupby("patient_id")["split"].nunique().max() == 1
    per_label = out.drop_duplicates("patient_id").groupby(["label", "split"]).size()
    # 60 "a" patients: 46.2 / 6.6 / 7.2 -> 46 / 7 / 7; 40 "b": 30.8 / 4.4 / 4.8 -> 31 / 4 / 5.
    assert per_label["a"].to_dict() == {"train": 46, "val": 7, "test": 7}
    assert per_label["b"].to_dict() == {"train": 31, "val": 4, "test": 5}
    again = patient_split(df, seed=3, group_identical=False)
    assert again["split"].tolist() == out["split"].tolist()
    other = patient_split(df, seed=4, group_identical=False)
    assert other["split"].tolist() != out["split"].tolist()
    shuffled = patient_split(df.sample(frac=1, random_state=1), seed=3, group_identical=False)
    assert shuffled.set_index("image_id")["split"].to_dict() == out.set_index("image_id")["split"].to_dict()
    assert (df["split"] == "").all()  # the input is not modified


def test_largest_remainder_gives_every_unit_a_split():
    assert _largest_remainder(100, (0.77, 0.11, 0.12)) == [77, 11, 12]
    assert _largest_remainder(10, (0.77, 0.11, 0.12)) == [8, 1, 1]
    assert _largest_remainder(6, (0.77, 0.11, 0.12)) == [4, 1, 1]
    assert sum(_largest_remainder(37, (0.5, 0.25, 0.25))) == 37


def test_a_patients_stratum_is_its_most_frequent_label_ties_sorted_first():
    df = table({"p1": ["b", "a", "b"], "p2": ["b", "a"], **{f"q{i}": ["c"] for i in range(20)}})
    out = patient_split(df, ratios=(1.0, 0.0, 0.0), group_identical=False)
    assert (out["split"] == "train").all()
    from osteolib.data.splits import _patient_units, _unit_strata
    strata = _unit_strata(df, _patient_units(df, None))
    assert len(strata["b"]) == 1 and len(strata["a"]) == 1  # p1 -> b (2 of 3), p2 -> a (tie, sorted first)


@pytest.mark.parametrize("ratios, message", [
    ((0.7, 0.2, 0.2), "sum to 1.1"),
    ((0.9, -0.1, 0.2), "non-negative"),
    ((0.5, 0.5), "three values"),
])
def test_bad_ratios_are_refused(ratios, message):
    with pytest.raises(SplitError, match=message):
        patient_split(many_patients(), ratios=ratios, group_identical=False)


def test_a_ratio_that_leaves_a_class_empty_names_class_split_count_and_remedy():
    df = table({**{f"a{i}": ["common"] for i in range(50)}, **{f"r{i}": ["rare"] for i in range(4)}})
    with pytest.raises(SplitError) as err:
        patient_split(df, group_identical=False)
    message = str(err.value)
    assert "class 'rare' has 4 patient(s): the val split (ratio 0.11) would get none" in message
    assert "'common'" not in message
    assert "at least 6 patients" in message and "change the ratios" in message
    # A zero ratio empties that split on purpose and is no error.
    out = patient_split(df, ratios=(0.75, 0.25, 0.0), group_identical=False)
    assert set(out["split"]) == {"train", "val"}


def test_an_existing_split_is_kept_but_still_checked():
    df = many_patients(6, 6)
    df["split"] = ["train"] * len(df)
    assert (patient_split(df, group_identical=False)["split"] == "train").all()
    df.loc[0, "split"] = ""
    with pytest.raises(SplitError, match="filled for some rows but not for 1"):
        patient_split(df, group_identical=False)
    assert patient_split(df, keep_existing=False, group_identical=False)["split"].isin(["train", "val", "test"]).all()
    leaky = table({"p1": ["a", "a"], "p2": ["a"]})
    leaky["split"] = ["train", "test", "val"]
    with pytest.raises(LeakageError, match=r"patient 'p1' is in \['test', 'train'\]"):
        patient_split(leaky, group_identical=False)


# ------------------------------------------------------------------------------------------
# Leakage by content


def test_identical_files_are_kept_together_and_leaks_are_named(tmp_path):
    paths = {"p0_0": write_image(tmp_path / "p0.png", 0)}
    (tmp_path / "p1.png").write_bytes(paths["p0_0"].read_bytes())  # the same image under another patient
    paths["p1_0"] = tmp_path / "p1.png"
    for i in range(2, 30):
        paths[f"p{i}_0"] = write_image(tmp_path / f"p{i}.png", i)
    df = table({f"p{i}": ["x"] for i in range(30)}, {k: str(v) for k, v in paths.items()})
    for seed in range(5):
        out = patient_split(df, seed=seed).set_index("image_id")["split"]
        assert out["p0_0"] == out["p1_0"]
    forced = df.assign(split=["train", "test"] + ["train"] * 28)
    with pytest.raises(LeakageError) as err:
        check_no_leakage(forced)
    assert "identical images 'p1_0' (test) and 'p0_0' (train)" in str(err.value)
    check_no_leakage(forced, check_content=False)  # patients alone do not leak here
    with pytest.raises(SplitError, match="no split"):
        check_no_leakage(df)


def test_label_conflicts_lists_identical_files_with_different_labels(tmp_path):
    a = write_image(tmp_path / "a.png", 1)
    (tmp_path / "b.png").write_bytes(a.read_bytes())
    c = write_image(tmp_path / "c.png", 2)
    df = normalise_manifest(pd.DataFrame({"image_id": ["a", "b", "c"], "path": [str(a), str(tmp_path / "b.png"), str(c)],
                                          "label": ["normal", "osteo", "osteo"], "patient_id": ["1", "2", "3"]}))
    conflicts = label_conflicts(df)
    assert len(conflicts) == 1
    row = conflicts.iloc[0]
    assert (row["image_ids"], row["labels"], row["n_images"]) == ("a;b", "normal;osteo", 2)
    assert row["sha256"] == file_hashes([a])[str(a)]


# ------------------------------------------------------------------------------------------
# Near-duplicates


def test_near_duplicates_finds_the_brightened_copy_only(tmp_path):
    paths = [write_image(tmp_path / "base.png", 7), write_image(tmp_path / "bright.png", 7, shift=3),
             write_image(tmp_path / "other.png", 8), write_image(tmp_path / "third.png", 9)]
    df = normalise_manifest(pd.DataFrame({"image_id": ["base", "bright", "other", "third"],
                                          "path": [str(p) for p in paths], "label": ["a", "a", "b", "b"],
                                          "patient_id": ["1", "2", "3", "3"], "split": ["train", "test", "val", "val"]}))
    pairs = near_duplicates(df, max_distance=4)
    assert pairs[["image_id_a", "image_id_b", "split_a", "split_b"]].values.tolist() == [
        ["base", "bright", "train", "test"]]
    hashes = [imagehash.phash(Image.open(p)) for p in paths]
    assert pairs.loc[0, "distance"] == hashes[0] - hashes[1]
    everything = near_duplicates(df, max_distance=64)
    assert len(everything) == 6  # all unordered pairs, none with itself
    same = everything.set_index(["image_id_a", "image_id_b"])
    assert same.loc[("other", "third"), "same_patient"] and not same.loc[("base", "bright"), "same_patient"]
    assert same.loc[("other", "third"), "distance"] == hashes[2] - hashes[3]
    big = perceptual_hashes([str(p) for p in paths], hash_size=16)
    assert big.shape == (4, 4) and near_duplicates(df, max_distance=256, phashes=big)["distance"].max() <= 256


def test_vectorised_distances_match_brute_force_and_scale_to_thousands():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, size=(300, 64), dtype=np.uint8)
    bits[1] = bits[0]
    bits[2] = bits[0]
    bits[2, :3] ^= 1
    packed = np.packbits(bits, axis=1).view(np.uint64)
    df = normalise_manifest(pd.DataFrame({"image_id": [f"i{n}" for n in range(300)], "path": "x", "label": "a",
                                          "patient_id": [str(n) for n in range(300)]}))
    found = near_duplicates(df, max_distance=20, phashes=packed)
    expected = {(f"i{a}", f"i{b}", int((bits[a] != bits[b]).sum())) for a in range(300) for b in range(a + 1, 300)
                if (bits[a] != bits[b]).sum() <= 20}
    assert set(zip(found["image_id_a"], found["image_id_b"], found["distance"])) == expected
    assert {("i0", "i1", 0), ("i0", "i2", 3)} <= expected
    n = 4000
    many = normalise_manifest(pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "path": "x", "label": "a",
                                            "patient_id": [str(k) for k in range(n)]}))
    random_hashes = rng.integers(0, 2**63, size=(n, 1), dtype=np.uint64)
    started = time.perf_counter()
    near_duplicates(many, max_distance=4, phashes=random_hashes)
    assert time.perf_counter() - started < 5.0  # ~0.15 s here; an O(n²) Python loop takes minutes


# ------------------------------------------------------------------------------------------
# Saved splits and the summary


def test_saved_split_round_trips_and_names_what_does_not_fit(tmp_path):
    out = patient_split(many_patients(), seed=1, group_identical=False)
    path = save_split(out, tmp_path / "split.csv")
    assert list(pd.read_csv(path).columns) == ["image_id", "patient_id", "label", "split"]
    back = apply_saved_split(out.assign(split=""), path)
    assert back["split"].tolist() == out["split"].tolist()
    extra = pd.concat([out, table({"new": ["a"]})], ignore_index=True)
    with pytest.raises(SplitError, match=r"1 image id\(s\) of the manifest are not in the saved split: \['new_0'\]"):
        apply_saved_split(extra, path)
    with pytest.raises(SplitError, match=r"image id\(s\) of the saved split are not in the manifest: \['a000_0'\]"):
        apply_saved_split(out.iloc[1:], path)
    relabelled = out.copy()
    relabelled.loc[0, "label"] = "b"
    with pytest.raises(SplitError, match=r"1 image\(s\) have a different label.*a000_0"):
        apply_saved_split(relabelled, path)
    with pytest.raises(SplitError, match="no split"):
        save_split(out.assign(split=""), tmp_path / "other.csv")


def test_split_summary_counts_images_and_patients():
    df = table({"p1": ["a", "a"], "p2": ["b"], "p3": ["a"]})
    df["split"] = ["train", "train", "test", "test"]
    summary = split_summary(df).set_index(["split", "label"])
    assert summary.loc[("train", "a")].tolist() == [2, 1]
    assert summary.loc[("test", "all")].tolist() == [2, 2]
    assert summary.loc[("all", "all")].tolist() == [4, 3]
    assert summary.loc[("test", "a")].tolist() == [1, 1]


# ------------------------------------------------------------------------------------------
# Real data


@pytest.mark.real_data
def test_real_nih_split_has_no_patient_overlap_and_every_class_everywhere(real_data_root, tmp_path):
    df = nih_cxr14(real_data_root / "nih-cxr14-subset")
    out = patient_split(df, seed=0)
    by_split = {s: set(out.loc[out["split"] == s, "patient_id"]) for s in ("train", "val", "test")}
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    assert sum(len(p) for p in by_split.values()) == 682
    assert (out.groupby(["split", "label"]).size() > 0).all() and len(out.groupby(["split", "label"])) == 6
    share = {s: len(p) / 682 for s, p in by_split.items()}
    assert share["train"] == pytest.approx(0.77, abs=0.01) and share["test"] == pytest.approx(0.12, abs=0.01)
    path = save_split(out, tmp_path / "nih_split.csv")
    assert apply_saved_split(df, path)["split"].tolist() == out["split"].tolist()
