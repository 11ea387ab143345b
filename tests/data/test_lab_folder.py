"""The synthetic lab folder looks like a lab's own data, and the own-data specs read it as a user's profile would."""
from __future__ import annotations

import pandas as pd
import pytest

from osteolib.data.io import read_xray
from osteolib.data.sources import load_dataset
from osteolib.data.synthetic.lab_folder import write_lab_folder

PATIENT = r"^(?P<patient>P\d+)_"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return write_lab_folder(tmp_path_factory.mktemp("lab") / "xrays", n_patients=16, size=48, copy_fraction=0.3,
                            n_dicom=2, seed=3)


def test_the_folder_has_what_a_lab_folder_has(lab):
    files = sorted(p for p in lab.root.rglob("*") if p.is_file() and p.name != "boxes.csv")
    assert len(files) == lab.n_images
    assert {p.parts[-3] for p in files} == {"normal", "osteoporosis"}  # <class>/<batch>/<file>
    assert sum(p.suffix == ".dcm" for p in files) == 2
    assert len(lab.copies) > 0 and all((lab.root / c).is_file() for c in lab.copies["copy"])
    for copy, original in zip(lab.copies["copy"], lab.copies["original"]):
        assert copy.split("/")[0] == original.split("/")[0]  # a copy keeps its class
        assert read_xray(lab.root / copy).pixels.shape == read_xray(lab.root / original).pixels.shape
    boxes = pd.read_csv(lab.boxes)
    assert list(boxes.columns) == ["image", "x", "y", "width", "height", "label"]
    assert all((lab.root / image).is_file() for image in boxes["image"])


def test_a_folder_spec_reads_it_with_patients_and_expert_boxes(lab):
    spec = {"kind": "folder", "root": str(lab.root), "patient_from": PATIENT, "regions": {"boxes": str(lab.boxes)}}
    manifest = load_dataset(spec)
    assert len(manifest) == lab.n_images
    assert set(manifest["label"]) == {"normal", "osteoporosis"}
    # one or two views per patient, plus the planted copies under their own patient names
    assert manifest["patient_id"].nunique() == 16 + len(lab.copies)
    with_box = manifest["boxes"].map(bool)
    assert with_box.sum() == len(pd.read_csv(lab.boxes))


def test_a_csv_spec_reads_the_label_table_and_keeps_its_extra_columns(tmp_path):
    lab = write_lab_folder(tmp_path / "xrays", n_patients=10, size=48, copy_fraction=0.0, n_dicom=1, layout="csv")
    spec = {"kind": "csv", "table": str(lab.table), "image_dir": str(lab.root), "path_column": "file",
            "label_column": "diagnosis", "patient_column": "patient", "view_column": "view"}
    manifest = load_dataset(spec)
    assert len(manifest) == lab.n_images
    assert {"age", "sex", "site"} <= set(manifest.columns)
    assert manifest["patient_id"].nunique() == 10


def test_it_refuses_to_write_over_an_existing_folder(lab):
    with pytest.raises(FileExistsError):
        write_lab_folder(lab.root)
