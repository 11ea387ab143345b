"""Manifest builders: the real chest data sets, and every layout on tiny files written in tmp_path."""
from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from osteolib.data import (
    MANIFEST_COLUMNS,
    ManifestError,
    add_image_sizes,
    build_manifest,
    concat_manifests,
    from_csv,
    from_folder,
    hannover,
    kermany,
    nih_cxr14,
    read_bracketed_csv,
    write_manifest,
)


def write_png(path: Path, width: int = 16, height: int = 12, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((height, width), value, dtype=np.uint8)
    pixels[0, 0] = (value + 7) % 256  # not flat, so two files with different values differ
    Image.fromarray(pixels).save(path)
    return path


# ------------------------------------------------------------------------------------------
# Real data


@pytest.mark.real_data
def test_nih_subset_reads_every_image_label_patient_and_view(real_data_root):
    df = nih_cxr14(real_data_root / "nih-cxr14-subset")
    assert list(df.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    assert len(df) == 1000 and df["image_id"].is_unique
    assert df["label"].value_counts().to_dict() == {"pneumonia": 500, "no_finding": 500}
    assert df["patient_id"].nunique() == 682
    assert df["view"].value_counts().to_dict() == {"AP": 567, "PA": 433}
    assert (df["width"] == 256).all() and (df["height"] == 256).all()
    assert df.attrs["excluded"] == {} and df.attrs["patient_ids_from_images"] is False
    assert all(Path(p).is_file() for p in df["path"])
    # Every pneumonia row's NIH finding string names Pneumonia; every other row is exactly "No Finding".
    assert df.loc[df["label"] == "pneumonia", "finding_labels"].str.contains("Pneumonia").all()
    assert (df.loc[df["label"] == "no_finding", "finding_labels"] == "No Finding").all()


@pytest.mark.real_data
def test_nih_subset_boxes_are_scaled_from_1024_to_the_256_files(real_data_root):
    folder = real_data_root / "nih-cxr14-subset"
    df = nih_cxr14(folder).set_index("image_id")
    boxes = {i: b for i, b in df["boxes"].items() if b}
    assert len(boxes) == 44 and sum(len(b) for b in boxes.values()) == 49
    assert sum(box["label"] == "Pneumonia" for b in boxes.values() for box in b) == 43
    for image_boxes in boxes.values():
        for box in image_boxes:
            assert 0 <= box["x"] and 0 <= box["y"] and box["w"] > 0 and box["h"] > 0
            assert box["x"] + box["w"] <= 256 and box["y"] + box["h"] <= 256
    # Each published box, read independently from the raw CSV, is in the manifest times 0.25.
    with open(folder / "BBox_List_2017_subset.csv", newline="") as handle:
        lines = list(csv.reader(handle))[1:]
    assert len(lines) == 49
    for name, finding, x, y, w, h, *_ in lines:
        expected = {"x": float(x) * 0.25, "y": float(y) * 0.25, "w": float(w) * 0.25, "h": float(h) * 0.25}
        candidates = [b for b in df.at[name.removesuffix(".png"), "boxes"] if b["label"] == finding]
        assert any(all(b[k] == pytest.approx(v) for k, v in expected.items()) for b in candidates), name
    first = df.at["00008365_000", "boxes"][0]
    assert (first["x"], first["label"]) == (pytest.approx(337.898305084746 / 4), "Cardiomegaly")


@pytest.mark.real_data
def test_kermany_has_unique_ids_although_file_names_repeat(real_data_root):
    df = kermany(real_data_root / "kermany-pediatric-cxr")
    assert len(df) == 2921 and df["image_id"].is_unique
    assert df["label"].value_counts().to_dict() == {"normal": 1330, "bacterial": 974, "viral": 617}
    names = df["path"].map(lambda p: Path(p).name)
    assert names.duplicated().any()  # the reason ids must carry the class
    assert df.attrs["patient_ids_from_images"] is True and (df["patient_id"] == df["image_id"]).all()
    assert df["width"].notna().all() and (df[["width", "height"]].max(axis=1) == 256).all()


@pytest.mark.real_data
def test_hannover_and_the_chest_pretraining_pool(real_data_root):
    table = pd.read_csv(real_data_root / "hannover-covid-cxr" / "data.csv", dtype=str)
    df = hannover(real_data_root / "hannover-covid-cxr")
    assert len(df) == 243 and (df["label"] == "covid").all()
    assert df["patient_id"].nunique() == table["patient_id"].nunique()
    assert df["view"].value_counts().to_dict() == table["projection"].str.upper().value_counts().to_dict()
    assert set(df["view"]) <= {"AP", "PA"} and df["width"].notna().all()
    pool = concat_manifests(kermany(real_data_root / "kermany-pediatric-cxr"), df)
    assert len(pool) == 2921 + 243 and pool["image_id"].is_unique
    assert pool.attrs["patient_ids_from_images"] is True
    assert set(pool["source"]) == {"kermany", "hannover"}


@pytest.mark.real_data
def test_build_manifest_by_name_matches_the_builder(real_data_root):
    df = build_manifest("nih_cxr14", real_data_root / "nih-cxr14-subset", bbox=False)
    assert len(df) == 1000 and df["boxes"].isna().all()


# ------------------------------------------------------------------------------------------
# Folder of class sub-folders


def test_from_folder_labels_ids_and_counted_non_images(tmp_path):
    write_png(tmp_path / "normal" / "a.png")
    write_png(tmp_path / "normal" / "a.jpg")  # same stem, other extension: ids must still differ
    write_png(tmp_path / "normal" / "sub" / "b.png")
    write_png(tmp_path / "osteo" / "a.png")
    (tmp_path / "osteo" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="not an image file"):
        df = from_folder(tmp_path, source="mine")
    assert sorted(df["image_id"]) == ["normal/a.jpg", "normal/a.png", "normal/sub/b", "osteo/a"]
    assert df.set_index("image_id")["label"].to_dict()["osteo/a"] == "osteo"
    assert df.attrs["excluded"] == {"not an image file (extension)": 1}
    assert df.attrs["patient_ids_from_images"] is True
    assert (df["source"] == "mine").all() and (df["split"] == "").all()


def test_from_folder_patient_regex_and_its_errors(tmp_path):
    write_png(tmp_path / "a" / "P001_left.png")
    write_png(tmp_path / "a" / "P001_right.png")
    write_png(tmp_path / "b" / "P002_left.png")
    df = from_folder(tmp_path, patient_from=r"^(?P<patient>P\d+)_")
    assert sorted(df["patient_id"]) == ["P001", "P001", "P002"]
    assert df.attrs["patient_ids_from_images"] is False
    write_png(tmp_path / "b" / "unnamed.png")
    with pytest.raises(ManifestError, match=r"does not match 1 file name.*unnamed\.png"):
        from_folder(tmp_path, patient_from=r"^(P\d+)_")
    with pytest.raises(ManifestError, match="no class sub-folders"):
        from_folder(tmp_path / "a")
    with pytest.raises(ManifestError, match="folder not found"):
        from_folder(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------
# CSV label tables


def _label_table(tmp_path: Path) -> Path:
    for name in ("x1.png", "x2.png", "x3.png", "x4.png"):
        write_png(tmp_path / "img" / name)
    table = pd.DataFrame({
        "file": ["x1.png", "x2.png", "x3.png", "x4.png"],
        "diagnosis": ["osteoporosis", "normal", "osteopenia", "normal"],
        "pid": ["p1", "p1", "p2", "p3"],
        "projection": ["ap", "pa", "", "ap"],
        "age": ["70", "71", "65", "50"],
    })
    path = tmp_path / "labels.csv"
    table.to_csv(path, index=False)
    return path


def test_from_csv_maps_labels_and_counts_the_excluded_rows(tmp_path):
    path = _label_table(tmp_path)
    with pytest.warns(UserWarning, match="1 row"):
        df = from_csv(path, tmp_path / "img", "file", "diagnosis", patient_column="pid", view_column="projection",
                      label_map={"osteoporosis": "osteo", "normal": "normal"}, source="clinic")
    assert df.attrs["excluded"] == {"label 'osteopenia' not in label_map": 1}
    assert df["image_id"].tolist() == ["x1", "x2", "x4"]
    assert df["label"].tolist() == ["osteo", "normal", "normal"]
    assert df["patient_id"].tolist() == ["p1", "p1", "p3"]
    assert df["view"].tolist() == ["AP", "PA", "AP"]
    assert df["age"].tolist() == ["70", "71", "50"]  # other columns travel along
    assert df.attrs["patient_ids_from_images"] is False


def test_from_csv_names_a_label_column_that_does_not_exist(tmp_path):
    path = _label_table(tmp_path)
    with pytest.raises(ManifestError) as err:
        from_csv(path, tmp_path / "img", "file", "Diagnosis")
    message = str(err.value)
    assert "label_column='Diagnosis'" in message
    assert "['file', 'diagnosis', 'pid', 'projection', 'age']" in message


def test_from_csv_names_every_missing_file_with_its_row(tmp_path):
    path = _label_table(tmp_path)
    (tmp_path / "img" / "x2.png").unlink()
    (tmp_path / "img" / "x4.png").unlink()
    with pytest.raises(ManifestError) as err:
        from_csv(path, tmp_path / "img", "file", "diagnosis")
    message = str(err.value)
    assert "2 image file(s)" in message
    assert "row 1 (line 3)" in message and "x2.png" in message
    assert "row 3 (line 5)" in message and "x4.png" in message


def test_from_csv_takes_a_split_the_data_brings(tmp_path):
    path = _label_table(tmp_path)
    table = pd.read_csv(path).assign(fold=["train", "train", "val", "test"])
    table.to_csv(path, index=False)
    df = from_csv(path, tmp_path / "img", "file", "diagnosis", split_column="fold")
    assert df["split"].tolist() == ["train", "train", "val", "test"]
    assert df.attrs["patient_ids_from_images"] is True and (df["patient_id"] == df["image_id"]).all()


# ------------------------------------------------------------------------------------------
# NIH layout (header names holding commas), Kermany and Hannover on tiny copies


NIH_HEADER_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                   "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")


def _tiny_nih(tmp_path: Path, size: int = 512) -> Path:
    root = tmp_path / "nih"
    for name in ("00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png"):
        write_png(root / "images" / name, size, size)
    # The original 2017 release ends every line with a comma; the header has 9 names for 12 fields.
    (root / "Data_Entry_2017.csv").write_text("\n".join([
        NIH_HEADER_2017,
        "00000001_000.png,Pneumonia|Effusion,0,1,57,M,PA,2500,2048,0.168,0.168,",
        "00000001_001.png,No Finding,1,1,57,M,AP,2500,2048,0.168,0.168,",
        "00000002_000.png,Cardiomegaly,0,2,81,F,PA,2682,2749,0.143,0.143,",
        "00000003_000.png,No Finding,0,3,45,F,ap,2992,2991,0.143,0.143,",
    ]) + "\n")
    (root / "BBox_List_2017.csv").write_text("\n".join([
        "Image Index,Finding Label,Bbox [x,y,w,h],,,",
        "00000001_000.png,Pneumonia,100.0,200.0,400.0,300.0,,,",
        "00000001_000.png,Effusion,600.0,500.0,100.0,120.0,,,",
        "00000002_000.png,Cardiomegaly,300.0,300.0,400.0,400.0,,,",
    ]) + "\n")
    return root


def test_bracketed_header_is_expanded_into_one_name_per_field(tmp_path):
    root = _tiny_nih(tmp_path)
    table = read_bracketed_csv(root / "Data_Entry_2017.csv")
    assert list(table.columns[-4:]) == ["OriginalImage[Width]", "OriginalImage[Height]",
                                        "OriginalImagePixelSpacing[x]", "OriginalImagePixelSpacing[y]"]
    assert table.loc[0, "OriginalImage[Height]"] == "2048"
    boxes = read_bracketed_csv(root / "BBox_List_2017.csv")
    assert list(boxes.columns) == ["Image Index", "Finding Label", "Bbox[x]", "Bbox[y]", "Bbox[w]", "Bbox[h]"]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b[x,y]\n1,2\n")
    with pytest.raises(ManifestError, match="line 2 has 2 fields"):
        read_bracketed_csv(bad)


def test_nih_builder_on_a_tiny_copy_scales_boxes_and_counts_excluded_rows(tmp_path):
    root = _tiny_nih(tmp_path, size=512)
    with pytest.warns(UserWarning, match="neither contain 'Pneumonia'"):
        df = nih_cxr14(root)
    assert df.attrs["excluded"] == {"finding labels neither contain 'Pneumonia' nor equal 'No Finding'": 1}
    assert df.attrs["boxes_on_excluded_images"] == 1  # the Cardiomegaly box sits on the excluded image
    df = df.set_index("image_id")
    assert df["label"].to_dict() == {"00000001_000": "pneumonia", "00000001_001": "no_finding",
                                     "00000003_000": "no_finding"}
    assert df.at["00000003_000", "view"] == "AP" and df.at["00000001_000", "sex"] == "M"
    assert df.at["00000001_000", "age"] == 57 and df.at["00000001_001", "follow_up"] == 1
    # 512 px files: NIH's 1024-space boxes are halved.
    assert df.at["00000001_000", "boxes"] == [
        {"x": 50.0, "y": 100.0, "w": 200.0, "h": 150.0, "label": "Pneumonia"},
        {"x": 300.0, "y": 250.0, "w": 50.0, "h": 60.0, "label": "Effusion"},
    ]
    assert df.at["00000001_001", "boxes"] is None


def test_nih_builder_lists_missing_images_or_counts_them_when_asked(tmp_path):
    root = _tiny_nih(tmp_path)
    (root / "images" / "00000003_000.png").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ManifestError, match=r"1 labelled image\(s\) not found.*00000003_000\.png"):
            nih_cxr14(root)
        df = nih_cxr14(root, missing="exclude", bbox=False)
    assert len(df) == 2 and df.attrs["excluded"]["image file not present"] == 1


def test_kermany_takes_patients_from_original_file_names(tmp_path):
    write_png(tmp_path / "bacterial" / "person12_bacteria_45.jpeg")
    write_png(tmp_path / "bacterial" / "person12_bacteria_46.jpeg")
    write_png(tmp_path / "viral" / "person3_virus_7.jpeg")
    write_png(tmp_path / "normal" / "person3_virus_7.jpeg")  # a repeated file name in another folder
    df = kermany(tmp_path)
    assert df["image_id"].is_unique and len(df) == 4
    assert sorted(df["patient_id"]) == ["person12", "person12", "person3", "person3"]
    assert df.attrs["patient_ids_from_images"] is False
    (tmp_path / "normal").rename(tmp_path / "NORMAL")
    with pytest.raises(ManifestError, match=r"missing \['normal'\]"):
        kermany(tmp_path)


def test_hannover_layout_and_a_missing_png(tmp_path):
    write_png(tmp_path / "png" / "aa11.png")
    write_png(tmp_path / "png" / "bb22.png")
    (tmp_path / "data.csv").write_text("patient_id,image_id,sex,age,modality,projection\n"
                                       "p1,aa11,f,61,CR,ap\np1,bb22,f,,DX,pa\n")
    df = hannover(tmp_path)
    assert df["view"].tolist() == ["AP", "PA"] and df["patient_id"].tolist() == ["p1", "p1"]
    assert df["label"].tolist() == ["covid", "covid"] and df["age"].isna().tolist() == [False, True]
    (tmp_path / "png" / "bb22.png").unlink()
    with pytest.raises(ManifestError, match=r"row 1 \(line 3\).*bb22\.png"):
        hannover(tmp_path)


# ------------------------------------------------------------------------------------------
# Factory, pools, sizes


def test_build_manifest_reads_synthetic_and_rejects_unknown_kinds(tmp_path):
    write_png(tmp_path / "c" / "x.png")
    df = from_folder(tmp_path)
    write_manifest(df, tmp_path / "manifest.csv")
    assert build_manifest("synthetic", tmp_path)["image_id"].tolist() == ["c/x"]
    assert build_manifest("synthetic", tmp_path / "manifest.csv")["path"].tolist() == df["path"].tolist()
    with pytest.raises(ManifestError, match=r"unknown manifest kind 'nih'.*'nih_cxr14'"):
        build_manifest("nih", tmp_path)


def test_concat_prefixes_clashing_image_and_patient_ids_with_the_source(tmp_path):
    write_png(tmp_path / "one" / "normal" / "x.png")
    write_png(tmp_path / "two" / "normal" / "x.png")
    write_png(tmp_path / "three" / "other" / "y.png")
    a = from_folder(tmp_path / "one", source="one")
    b = from_folder(tmp_path / "two", source="two")
    c = from_folder(tmp_path / "three", source="three")
    pooled = concat_manifests(a, b, c)
    assert pooled["image_id"].tolist() == ["one:normal/x", "two:normal/x", "other/y"]
    assert pooled["patient_id"].tolist() == ["one:normal/x", "two:normal/x", "other/y"]
    with pytest.raises(ManifestError, match="same source given twice"):
        concat_manifests(a, a)


def test_add_image_sizes_reads_headers_and_names_unreadable_files(tmp_path):
    write_png(tmp_path / "c" / "wide.png", width=30, height=10)
    df = from_folder(tmp_path)
    assert df["width"].isna().all()
    sized = add_image_sizes(df)
    assert (sized.loc[0, "width"], sized.loc[0, "height"]) == (30, 10)
    broken = tmp_path / "c" / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(ManifestError, match=r"(?s)1 file\(s\) could not be read.*row 0 \(image_id='c/broken'\): .*broken\.png: not a recognised"):
        add_image_sizes(from_folder(tmp_path))
