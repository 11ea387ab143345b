"""The external test set, the partition table and the flow diagram of notebook 00 (issue 17)."""
from __future__ import annotations

import pandas as pd
import pytest

from osteolib.data import ManifestError, external, flow, partitions, sources, splits

CLASSES = ["normal", "osteoporosis"]
SMALL = {"n_patients": 24, "size": 64, "difficulty": 0.3}


@pytest.fixture(scope="module")
def target():
    manifest = sources.load_dataset("synthetic_shoulder", None, seed=0, **SMALL)
    return splits.patient_split(manifest.drop(columns="split"), seed=0)


def test_another_site_is_a_valid_external_set_and_half_of_it_is_taken_by_patient(target):
    value = {"dataset": "synthetic_shoulder", "options": {**SMALL, "seed": 1, "site": "b"}, "fraction": 0.5}
    half = external.build_external_set(value, None, CLASSES, target, seed=3)
    whole = sources.load_dataset("synthetic_shoulder", None, seed=1, site="b", **SMALL)
    assert half.attrs["chosen_from"] == {"images": len(whole), "patients": whole["patient_id"].nunique()}
    chosen = set(half["patient_id"])
    assert len(chosen) == whole["patient_id"].nunique() // 2
    # whole patients: every image of a chosen patient, none of the others
    assert set(whole.loc[whole["patient_id"].isin(chosen), "image_id"]) == set(half["image_id"])
    assert set(half["label"]) == set(CLASSES) and (half["split"] == "").all()
    again = external.build_external_set(value, None, CLASSES, target, seed=3)
    assert again["image_id"].tolist() == half["image_id"].tolist()  # fixed by the seed
    other = external.build_external_set(value, None, CLASSES, target, seed=4)
    assert set(other["patient_id"]) != chosen


def test_the_target_itself_or_unknown_labels_are_refused(target):
    with pytest.raises(ManifestError, match="in the target data too"):
        external.build_external_set({"dataset": "synthetic_shoulder", "options": {**SMALL, "seed": 0}}, None, CLASSES,
                                    target)
    site = {"dataset": "synthetic_shoulder", "options": {**SMALL, "seed": 1, "site": "b"}}
    with pytest.raises(ManifestError, match=r"not target classes \['healthy', 'sick'\].*label_map"):
        external.build_external_set(site, None, ["healthy", "sick"], target)
    mapped = external.build_external_set({**site, "label_map": {"normal": "healthy", "osteoporosis": "sick"}}, None,
                                         ["healthy", "sick"], target)
    assert set(mapped["label"]) == {"healthy", "sick"}
    with pytest.raises(ValueError, match="fraction must be a number in"):
        external.external_spec({"dataset": "kermany", "fraction": 0})
    with pytest.raises(ValueError, match="unknown key"):
        external.external_spec({"dataset": "kermany", "share": 0.5})


def test_the_pretraining_pool_loses_the_external_images_and_their_patients_other_images(target):
    site = {"dataset": "synthetic_shoulder", "options": {**SMALL, "seed": 1, "site": "b"}, "fraction": 0.5}
    half = external.build_external_set(site, None, CLASSES, target)
    pool = sources.load_dataset("synthetic_shoulder", None, seed=1, site="b", **SMALL)
    kept, dropped = external.exclude_external(pool, half)
    assert dropped == len(half) and len(kept) == len(pool) - len(half)
    assert not set(kept["patient_id"]) & set(half["patient_id"])
    assert external.exclude_external(pool, None) == (pool, 0)


def test_partition_table_and_flow_count_what_the_manifests_hold(target):
    manifest = target.assign(age=[20 + k % 60 for k in range(len(target))], sex=["F", "M"] * (len(target) // 2)
                             + ["F"] * (len(target) % 2))
    site = {"dataset": "synthetic_shoulder", "options": {**SMALL, "seed": 1, "site": "b"}}
    ext = external.build_external_set(site, None, CLASSES, target)
    table = partitions.partition_table(manifest, CLASSES, external=ext).set_index("characteristic")
    assert list(table.columns) == ["train", "val", "test", "external"]
    for part in ("train", "val", "test"):
        rows = manifest[manifest["split"] == part]
        assert table.loc["images", part] == str(len(rows))
        assert table.loc["patients", part] == str(rows["patient_id"].nunique())
        assert table.loc["class: normal", part].startswith(f"{(rows['label'] == 'normal').sum()} (")
    assert table.loc["age missing", "external"] == f"{len(ext)} (100 %)"  # the external set records no age
    assert table.loc["source: synthetic-shoulder-b", "external"] == f"{len(ext)} (100 %)"
    names = list(table.index)
    assert names.index("source: synthetic-shoulder-b") == names.index("source: synthetic-shoulder") + 1

    boxes = flow.flow_table(manifest, CLASSES, excluded={"unreadable": 2}, external=ext).set_index("box")
    assert boxes.loc["records", "images"] == len(manifest) + 2
    assert boxes.loc[["train", "val", "test"], "images"].sum() == boxes.loc["included", "images"] == len(manifest)
    assert boxes.loc["excluded", "detail"] == "unreadable"
    assert boxes.loc["external", "images"] == len(ext)
    figure = flow.flow_figure(flow.flow_table(manifest, CLASSES, excluded={"unreadable": 2}, external=ext))
    texts = " ".join(t.get_text() for t in figure.axes[0].texts)
    assert "Excluded (2 images)" in texts and "External test" in texts and f"{len(manifest)} images" in texts
