"""Specs of one's own data: class folders and label tables from a profile, expert regions, classes as named."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from osteolib.data import synthetic
from osteolib.data.audit import audit_summary, class_order
from osteolib.data.io import check_readable
from osteolib.data.manifest import ManifestError
from osteolib.data.synthetic.lab_folder import write_dicom
from osteolib.data.sources import (
    DatasetSpecError,
    apply_label_map,
    check_dataset_spec,
    load_dataset,
    load_pool,
    load_spec,
    scan_class_folder,
)

SIZE = 64


def xray(seed: int) -> np.ndarray:
    return synthetic.chest_radiograph(np.random.default_rng(seed), size=SIZE)


def save(path: Path, pixels: np.ndarray, kind: str = "png8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "png8":
        Image.fromarray((pixels * 255).astype(np.uint8)).save(path)
    elif kind == "png16":
        Image.fromarray((pixels * 65535).astype(np.uint16)).save(path)
    elif kind == "rgbjpg":  # a gray radiograph stored as an RGB JPEG
        Image.fromarray((pixels * 255).astype(np.uint8)).convert("RGB").save(path, quality=95)
    elif kind == "tif":
        Image.fromarray((pixels * 255).astype(np.uint8)).save(path)
    elif kind == "dcm":
        write_dicom((pixels * 255).astype(np.uint8), path, patient_id="P-1", view="AP")
    return path


@pytest.fixture(scope="module")
def lab_folder(tmp_path_factory) -> Path:
    """A lab's folder: class sub-folders with nested folders, every format, a loose image, an empty class."""
    root = tmp_path_factory.mktemp("lab") / "xrays"
    files = [("normal/site_a/P001_left.png", "png8"), ("normal/P002_a.png", "png16"),
             ("normal/site_b/deep/P003_a.jpg", "rgbjpg"), ("normal/P001_right.png", "png8"),
             ("osteoporosis/P004_a.tif", "tif"), ("osteoporosis/scans/P005_a.dcm", "dcm"),
             ("osteoporosis/P006_a.png", "png8"), ("osteoporosis/P006_b.png", "png8"),
             ("osteopenia/P007_a.png", "png8"), ("osteopenia/P008_a.png", "png8")]
    for seed, (name, kind) in enumerate(files):
        save(root / name, xray(seed), kind)
    save(root / "P009_loose.png", xray(20))
    (root / "emptyclass").mkdir()
    (root / "normal" / "notes.txt").write_text("not an image")
    return root


def load_quietly(spec, data_root=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_spec(spec, data_root, **kw)


def test_folder_spec_reads_every_format_at_any_depth_with_patients(lab_folder):
    spec = {"kind": "folder", "root": str(lab_folder), "patient_from": r"^(?P<patient>P\d+)_"}
    with pytest.warns(UserWarning, match="beside the class folders"):
        df = load_spec(spec, target=True)
    assert sorted(df["label"].unique()) == ["normal", "osteopenia", "osteoporosis"]
    assert len(df) == 10 and df["width"].tolist() == [SIZE] * 10
    assert set(df.loc[df["label"] == "normal", "patient_id"]) == {"P001", "P002", "P003"}
    assert "normal/site_b/deep/P003_a" in set(df["image_id"])
    assert check_readable(df["path"])["ok"].all()
    assert df.attrs["excluded"]["image file(s) loose beside the class folders (no class)"] == 1
    assert df.attrs["excluded_files"][0].endswith("P009_loose.png")
    assert df.attrs["empty_class_folders"] == ["emptyclass"]
    assert df.attrs["patient_ids_from_images"] is False


def test_relative_root_resolves_against_data_root_and_without_patients_warns(lab_folder):
    with pytest.warns(UserWarning, match="no patient ids"):
        df = load_dataset({"kind": "folder", "root": "xrays"}, lab_folder.parent)
    assert df.attrs["patient_ids_from_images"] is True and df["patient_id"].nunique() == 10


def test_label_map_merges_and_drops_and_counts(lab_folder):
    merged = load_quietly({"kind": "folder", "root": str(lab_folder), "label_map": {"osteopenia": "osteoporosis"}})
    assert merged["label"].value_counts().to_dict() == {"osteoporosis": 6, "normal": 4}
    dropped = load_quietly({"kind": "folder", "root": str(lab_folder), "label_map": {"osteopenia": "drop"}})
    assert sorted(dropped["label"].unique()) == ["normal", "osteoporosis"] and len(dropped) == 8
    assert dropped.attrs["excluded"]["label 'osteopenia' dropped by label_map"] == 2
    also = apply_label_map(merged, {"normal": None})
    assert set(also["label"]) == {"osteoporosis"}


def test_unlabelled_pool_folder(lab_folder):
    pool_spec = {"kind": "folder", "root": str(lab_folder), "labels": "none"}
    pool = load_pool([pool_spec, {"kind": "folder", "root": str(lab_folder / "normal"), "labels": "none",
                                  "source": "second"}])
    assert set(pool["label"]) == {"unlabelled"} and len(pool) == 11 + 4  # the loose image belongs to the pool
    with pytest.raises(DatasetSpecError, match="dataset.labels: the target data set"):
        check_dataset_spec(pool_spec, target=True)


@pytest.fixture(scope="module")
def lab_table(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("table")
    rows = []
    for i in range(8):
        name = f"img{i}.png"
        save(root / "images" / ("sub" if i % 2 else "") / name, xray(30 + i))
        rows.append({"file": f"{'sub/' if i % 2 else ''}{name}", "diagnosis": [" normal", "osteoporosis ",
                     "osteopenia", "normal"][i % 4], "patient": f"p{i // 2}", "view": "ap", "age": 60 + i,
                     "sex": "F", "site": "A" if i < 4 else "B"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def test_csv_spec_keeps_extra_columns_strips_labels_and_maps(lab_table):
    spec = {"kind": "csv", "table": "labels.csv", "image_dir": "images", "path_column": "file",
            "label_column": "diagnosis", "patient_column": "patient", "view_column": "view",
            "label_map": {"osteopenia": "drop"}}
    df = load_quietly(spec, lab_table, target=True)
    assert sorted(df["label"].unique()) == ["normal", "osteoporosis"] and len(df) == 6
    assert {"age", "sex", "site"} <= set(df.columns) and set(df["view"]) == {"AP"}
    assert df.attrs["excluded"] == {"label 'osteopenia' dropped by label_map": 2}
    assert df.attrs["patient_ids_from_images"] is False


def test_case_variant_labels_stop_with_the_variants(lab_table, tmp_path):
    table = pd.read_csv(lab_table / "labels.csv")
    table.loc[0, "diagnosis"] = "Normal"
    table.to_csv(tmp_path / "t.csv", index=False)
    spec = {"kind": "csv", "table": str(tmp_path / "t.csv"), "image_dir": str(lab_table / "images"),
            "path_column": "file", "label_column": "diagnosis"}
    with pytest.raises(DatasetSpecError, match=r"dataset.label_column: class names that differ only in case: "
                                               r"\[\['Normal', 'normal'\]\]"):
        check_dataset_spec(spec)
    df = load_quietly({**spec, "label_map": {"Normal": "normal"}})
    assert "Normal" not in set(df["label"])


def test_case_variant_folders_stop(tmp_path):
    for name in ("Normal/a.png", "normal/b.png", "osteoporosis/c.png"):
        save(tmp_path / name, xray(1))
    with pytest.raises(DatasetSpecError, match=r"dataset.root: class names that differ only in case"):
        check_dataset_spec({"kind": "folder", "root": str(tmp_path)})


def test_boxes_and_masks_attach_like_nih(lab_folder, tmp_path):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image,x,y,width,height,label\nP001_left.png,4,5,10,12,fracture\n"
                     "osteoporosis/P004_a.tif,1,1,8,8,thin cortex\nP004_a.tif,2,2,4,4,\n")
    masks = tmp_path / "masks"
    save(masks / "P006_a_mask.png", (xray(3) > 0.5).astype(float))
    save(masks / "nobody.png", xray(3))
    spec = {"kind": "folder", "root": str(lab_folder), "regions": {"boxes": str(boxes), "masks": str(masks)}}
    df = load_quietly(spec).set_index("image_id")
    assert df.at["normal/site_a/P001_left", "boxes"] == [{"x": 4.0, "y": 5.0, "w": 10.0, "h": 12.0,
                                                         "label": "fracture"}]
    assert len(df.at["osteoporosis/P004_a", "boxes"]) == 2
    assert df.at["osteoporosis/P006_a", "mask_path"].endswith("P006_a_mask.png")
    assert df["mask_path"].notna().sum() == 1 and df["boxes"].notna().sum() == 2
    json.dumps(df.at["osteoporosis/P004_a", "boxes"])


def test_box_errors_name_the_row(lab_folder, tmp_path):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image,x,y,width,height\nP001_left.png,4,5,10,12\nmissing.png,1,1,2,2\n")
    spec = {"kind": "folder", "root": str(lab_folder), "regions": {"boxes": str(boxes)}}
    with pytest.raises(DatasetSpecError, match=r"dataset.regions.boxes: .*boxes.csv row 1 \(line 3\) names image "
                                               r"'missing.png'"):
        check_dataset_spec(spec)
    boxes.write_text("image,x,y,width,height\nP001_left.png,60,5,10,12\n")
    with pytest.raises(DatasetSpecError, match="row 0 .*reaches outside"):
        load_quietly(spec)
    boxes.write_text("image,x,y,w,h\nP001_left.png,60,5,10,12\n")
    with pytest.raises(DatasetSpecError, match=r"lacks column\(s\) \['width', 'height'\]"):
        check_dataset_spec(spec)


@pytest.mark.parametrize("spec, where, text", [
    ({"kind": "zip", "root": "x"}, "dataset.kind", "unknown kind 'zip'"),
    ({"kind": "folder", "root": "nowhere"}, "dataset.root", "folder not found"),
    ({"kind": "folder", "root": "CHANGE_ME/my_xrays"}, "dataset.root", "placeholder"),
    ({"kind": "folder", "root": "xrays", "patient_from": r"^(?P<patient>Q\d+)_"}, "dataset.patient_from",
     "matches none of the 10 file names"),
    ({"kind": "folder", "root": "xrays", "patient_from": "(unclosed"}, "dataset.patient_from", "not a valid"),
    ({"kind": "folder", "root": "xrays", "label_map": {"osteopenai": "drop"}}, "dataset.label_map.osteopenai",
     "not a class"),
    ({"kind": "folder", "root": "xrays", "colour": 1}, "dataset", r"unknown key\(s\) \['colour'\]"),
    ({"kind": "folder", "root": "xrays", "regions": {"boxes": "nope.csv"}}, "dataset.regions.boxes", "not found"),
    ({"kind": "folder", "root": "xrays", "label_map": {"osteopenia": "drop", "normal": "drop"}}, "dataset",
     "only one class"),
    ("no_such_set", "dataset", "unknown data set 'no_such_set'"),
])
def test_bad_folder_specs_fail_before_any_work(lab_folder, spec, where, text):
    with pytest.raises(DatasetSpecError, match=text) as info:
        check_dataset_spec(spec, lab_folder.parent, target=True)
    assert str(info.value).startswith(where + ":") and "What to do:" in str(info.value)


def test_bad_csv_specs(lab_table):
    base = {"kind": "csv", "table": "labels.csv", "image_dir": "images", "path_column": "file",
            "label_column": "diagnosis"}
    with pytest.raises(DatasetSpecError, match=r"dataset.patient_column: column 'pid' is not in"):
        check_dataset_spec({**base, "patient_column": "pid"}, lab_table)
    with pytest.raises(DatasetSpecError, match=r"dataset.label_column: column 'label' is not in"):
        check_dataset_spec({**base, "label_column": None} | {"label_column": "label"}, lab_table)
    with pytest.raises(DatasetSpecError, match=r"dataset.table: file not found"):
        check_dataset_spec({**base, "table": "nope.csv"}, lab_table)
    with pytest.raises(DatasetSpecError, match=r"dataset.image_dir: folder not found"):
        check_dataset_spec({**base, "image_dir": "imgs"}, lab_table)


def test_scan_lists_what_is_left_out(lab_folder):
    scan = scan_class_folder(lab_folder)
    assert scan.counts == {"normal": 4, "osteopenia": 2, "osteoporosis": 4}
    assert [p.name for p in scan.loose] == ["P009_loose.png"] and scan.empty == ["emptyclass"]


def test_class_order_puts_the_positive_class_last():
    labels = ["b", "a", "c", "a"]
    assert class_order(labels) == (["a", "b", "c"], None)
    assert class_order(labels, ["c", "a", "b"]) == (["c", "a", "b"], None)
    order, note = class_order(labels, ["c", "a", "b"], positive_class="a")
    assert order == ["c", "b", "a"] and "moved last" in note
    assert class_order(labels, positive_class="a")[0] == ["b", "c", "a"]
    with pytest.raises(ManifestError, match=r"classes: .*not listed \['c'\].*label_map"):
        class_order(labels, ["a", "b"])
    with pytest.raises(ManifestError, match="positive_class: 'z'"):
        class_order(labels, positive_class="z")


class FakeCache:
    key, size, path = "k", 64, "/cache"

    def pixel_stats(self, ids):
        return 0.5, 0.25


def summary_of(df, **kw):
    scan = pd.DataFrame({"width": [64] * len(df), "height": [64] * len(df), "bit_depth": [8] * len(df)})
    empty = pd.DataFrame(columns=["split_a", "split_b"])
    return audit_summary(df, FakeCache(), scan, empty, pd.DataFrame(), pd.DataFrame(), [], {}, **kw)


def test_audit_summary_default_unchanged_and_ordered_when_asked():
    df = pd.DataFrame({"image_id": list("wxyz"), "label": ["osteoporosis", "normal", "normal", "osteoporosis"],
                       "patient_id": list("wxyz"), "split": ["train", "train", "val", "test"], "view": "AP",
                       "source": "lab", "boxes": None, "mask_path": None})
    default = summary_of(df)
    assert default["classes"] == ["normal", "osteoporosis"] and "positive_class" not in default
    assert list(default)[:3] == ["settings", "classes", "n_images"]
    ordered = summary_of(df, classes=["osteoporosis", "normal"], positive_class="osteoporosis")
    assert ordered["classes"] == ["normal", "osteoporosis"] and ordered["positive_class"] == "osteoporosis"
    assert summary_of(df, classes=["osteoporosis", "normal"])["positive_class"] == "normal"
