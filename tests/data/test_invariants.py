"""The run's data invariants hold wherever a stage reads the manifest (osteolib.data.invariants), not only in 00."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from osteolib.data import read_split_manifest, splits, write_manifest
from osteolib.data.splits import LeakageError, SplitError


def split_manifest(tmp_path) -> pd.DataFrame:
    rows = []
    for k in range(12):
        path = tmp_path / f"img{k}.png"
        Image.fromarray(np.full((8, 8), 10 * k, np.uint8)).save(path)
        rows.append({"image_id": f"img{k}", "path": str(path), "label": ["normal", "osteoporosis"][k % 2],
                     "patient_id": f"p{k // 2}", "split": ["train", "train", "val", "test"][(k // 2) % 4],
                     "view": "ap", "source": "lab"})
    return pd.DataFrame(rows)


def test_a_clean_split_manifest_reads_back(tmp_path):
    df = split_manifest(tmp_path)
    write_manifest(df, tmp_path / "manifest.csv")
    assert len(read_split_manifest(tmp_path / "manifest.csv")) == 12


def test_a_manifest_edited_to_leak_a_patient_stops_every_later_stage(tmp_path):
    df = split_manifest(tmp_path)
    df.loc[df["image_id"] == "img1", "split"] = "test"  # patient p0 now in train and test
    write_manifest(df, tmp_path / "manifest.csv")
    with pytest.raises(LeakageError, match=r"manifest.csv: 1 leak\(s\) between splits:\n  patient 'p0' is in"):
        read_split_manifest(tmp_path / "manifest.csv")


def test_an_identical_file_in_two_splits_or_under_two_labels_stops(tmp_path):
    df = split_manifest(tmp_path)
    df.loc[df["image_id"] == "img4", "path"] = df.loc[df["image_id"] == "img0", "path"].item()  # train file in val
    write_manifest(df, tmp_path / "manifest.csv")
    with pytest.raises(LeakageError, match="identical images 'img0' .train. and 'img4' .val."):
        read_split_manifest(tmp_path / "manifest.csv")
    df = split_manifest(tmp_path)
    df.loc[df["image_id"] == "img1", "path"] = df.loc[df["image_id"] == "img0", "path"].item()  # one patient, 2 labels
    write_manifest(df, tmp_path / "manifest.csv")
    with pytest.raises(LeakageError, match=r"1 image file\(s\) appear under two labels: img0;img1"):
        read_split_manifest(tmp_path / "manifest.csv")


def test_an_empty_split_or_a_class_without_training_images_stops(tmp_path):
    df = split_manifest(tmp_path)
    write_manifest(df[df["split"] != "val"], tmp_path / "manifest.csv")
    with pytest.raises(SplitError, match=r"split\(s\) \['val'\] hold no image"):
        read_split_manifest(tmp_path / "manifest.csv")
    df = split_manifest(tmp_path)
    df.loc[(df["split"] == "train") & (df["label"] == "osteoporosis"), "label"] = "normal"
    df.loc[df["split"] != "train", "label"] = "osteoporosis"
    write_manifest(df, tmp_path / "manifest2.csv")
    with pytest.raises(SplitError, match=r"class\(es\) \['osteoporosis'\] have no training image"):
        read_split_manifest(tmp_path / "manifest2.csv")


def test_a_saved_split_that_leaks_is_refused(tmp_path):
    df = split_manifest(tmp_path)
    splits.save_split(df, tmp_path / "split.csv")
    saved = pd.read_csv(tmp_path / "split.csv")
    saved.loc[saved["image_id"] == "img1", "split"] = "test"
    saved.to_csv(tmp_path / "split.csv", index=False)
    with pytest.raises(LeakageError, match="split.csv: the saved split leaks"):
        splits.apply_saved_split(df.drop(columns="split"), tmp_path / "split.csv")
