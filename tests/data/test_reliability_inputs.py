"""Inputs are read as they are (issue 19, item 3): every case here once went through quietly.

Labels are normalised in one place (whitespace stripped; case variants stop unless label_map merges them), 16-bit
colour files keep their 16 bits, a DICOM header declaring a huge image stops before any decoding, loose images and
empty class folders are reported, malformed manifest cells and empty tables name the file and the row, and the
preprocessing cache notices a file replaced by another of the same size and modification time.
"""
from __future__ import annotations

import os
import struct
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from osteolib.data import io
from osteolib.data.cache import ImageCache, cache_key, CacheSettings
from osteolib.data.io import XrayReadError, read_xray, scan_files
from osteolib.data.manifest import (
    LabelError,
    ManifestError,
    from_csv,
    from_folder,
    normalise_labels,
    read_manifest,
    write_manifest,
)
from osteolib.data.sources import DatasetSpecError, apply_label_map, check_dataset_spec, load_spec
from osteolib.data.synthetic.lab_folder import write_dicom


def first_line(err: pytest.ExceptionInfo) -> str:
    return str(err.value).splitlines()[0]


def png8(path: Path, value: int = 100, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full(size[::-1], value, dtype=np.uint8)
    pixels[0, 0] = (value + 50) % 256
    Image.fromarray(pixels).save(path)
    return path


# ------------------------------------------------------------------------------------------
# 1. Labels: one function for every way labels enter


def test_whitespace_is_stripped_and_case_variants_stop_with_every_spelling_listed():
    labels, excluded = normalise_labels([" normal", "normal ", "osteo"], "t.csv: column 'dx'")
    assert labels == ["normal", "normal", "osteo"] and excluded == {}
    with pytest.raises(LabelError) as err:
        normalise_labels(["Normal", "normal ", "NORMAL", "normal", "osteo"], "t.csv: column 'dx'", first_line=2)
    assert first_line(err) == (
        "t.csv: column 'dx': class names that differ only in case: [['NORMAL', 'Normal', 'normal']] "
        "('NORMAL' 1 row(s), first at row 2 (line 4); 'Normal' 1 row(s), first at row 0 (line 2); "
        "'normal' 2 row(s), first at row 1 (line 3)). What to do: correct the labels so that each class has one "
        "spelling, or merge them with label_map: {NORMAL: normal, Normal: normal}")
    merged, _ = normalise_labels(["Normal", "normal ", "NORMAL", "osteo"], "t", {"Normal": "normal", "NORMAL": "normal"})
    assert merged == ["normal", "normal", "normal", "osteo"]
    with pytest.raises(LabelError, match=r"^t: class names that differ only in case: \[\['NORMAL', 'normal'\]\]"):
        normalise_labels(["Normal", "normal", "NORMAL"], "t", {"Normal": "normal"})  # one spelling left unmerged
    with pytest.raises(LabelError, match=r"^t: 1 empty label\(s\): row 1 \(line 3\)"):
        normalise_labels(["a", "  ", "b"], "t", first_line=2)


def test_case_variant_class_folders_stop_from_folder_unless_label_map_merges_them(tmp_path):
    for name in ("Normal/a.png", "normal /b.png", "NORMAL/c.png", "normal/d.png", "osteo/e.png"):
        png8(tmp_path / name)
    with pytest.raises(LabelError) as err:
        from_folder(tmp_path)
    assert first_line(err) == (
        f"{tmp_path}: class folders: class names that differ only in case: [['NORMAL', 'Normal', 'normal']] "
        "('NORMAL' 1 image(s); 'Normal' 1 image(s); 'normal' 2 image(s)). What to do: rename the class folders so "
        "that each class has one spelling, or merge them with from_folder(..., label_map={'NORMAL': 'normal', "
        "'Normal': 'normal'})")
    df = from_folder(tmp_path, label_map={"NORMAL": "normal", "Normal": "normal"})
    assert df["label"].value_counts().to_dict() == {"normal": 4, "osteo": 1}
    dropped = from_folder(tmp_path, label_map={"NORMAL": "drop", "Normal": None})
    assert dropped["label"].value_counts().to_dict() == {"normal": 2, "osteo": 1}
    assert dropped.attrs["excluded"] == {"label 'NORMAL' dropped by label_map": 1,
                                         "label 'Normal' dropped by label_map": 1}


def _variant_table(tmp_path: Path) -> Path:
    rows = []
    for i, label in enumerate(["Normal", "normal ", " NORMAL", "normal", "osteo", "osteo"]):
        png8(tmp_path / "img" / f"x{i}.png", value=10 * i)
        rows.append({"file": f"x{i}.png", "dx": label, "pid": f"p{i}"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path / "labels.csv"


def test_case_variant_labels_of_a_table_stop_from_csv_naming_the_lines(tmp_path):
    table = _variant_table(tmp_path)
    with pytest.raises(LabelError) as err:
        from_csv(table, tmp_path / "img", "file", "dx")
    assert first_line(err).startswith(
        f"{table}: column 'dx': class names that differ only in case: [['NORMAL', 'Normal', 'normal']] "
        "('NORMAL' 1 row(s), first at row 2 (line 4); 'Normal' 1 row(s), first at row 0 (line 2); 'normal' 2 row(s), "
        "first at row 1 (line 3)). What to do: correct column 'dx' of the table so that each class has one spelling, "
        "or merge them with label_map={'NORMAL': 'normal', 'Normal': 'normal'}, unmapped='keep'")
    df = from_csv(table, tmp_path / "img", "file", "dx", label_map={"Normal": "normal", "NORMAL": "normal"},
                  unmapped="keep")
    assert df["label"].tolist() == ["normal"] * 4 + ["osteo"] * 2


def test_spec_stops_before_any_work_and_its_label_map_merges_the_variants(tmp_path):
    table = _variant_table(tmp_path)
    spec = {"kind": "csv", "table": str(table), "image_dir": str(tmp_path / "img"), "path_column": "file",
            "label_column": "dx", "patient_column": "pid"}
    with pytest.raises(DatasetSpecError) as err:
        check_dataset_spec(spec)
    assert first_line(err).startswith("dataset.label_column: class names that differ only in case: "
                                      "[['NORMAL', 'Normal', 'normal']] ('NORMAL' 1 row(s), first at row 2 (line 4)")
    assert first_line(err).endswith("or merge them with label_map: {NORMAL: normal, Normal: normal} in this "
                                    "data-set spec")
    merged = {**spec, "label_map": {"Normal": "normal", "NORMAL": "normal"}}
    assert check_dataset_spec(merged)["classes"] == ["normal", "osteo"]
    df = load_spec(merged)
    assert df["label"].value_counts().to_dict() == {"normal": 4, "osteo": 2}
    with pytest.raises(DatasetSpecError, match=r"^dataset.label_map: class names that differ only in case: "
                                               r"\[\['NORMAL', 'normal'\]\]"):
        check_dataset_spec({**spec, "label_map": {"Normal": "normal"}})
    # a label_map applied later (notebook 00's parameter) obeys the same rule
    with pytest.raises(DatasetSpecError, match=r"^label_map: class names that differ only in case"):
        apply_label_map(pd.DataFrame({"label": ["a", "B", "b"]}), {"a": "A"})


def test_spec_label_map_drop_takes_the_images_boxes_and_masks_with_it(tmp_path):
    table = _variant_table(tmp_path)
    (tmp_path / "boxes.csv").write_text("image,x,y,width,height\nx4.png,1,1,3,3\nx0.png,1,1,4,4\n")
    masks = tmp_path / "masks"
    png8(masks / "x5_mask.png")
    png8(masks / "x1_mask.png")
    spec = {"kind": "csv", "table": str(table), "image_dir": str(tmp_path / "img"), "path_column": "file",
            "label_column": "dx", "patient_column": "pid", "label_map": {"osteo": "drop", "Normal": "normal",
                                                                         "NORMAL": "normal"},
            "regions": {"boxes": str(tmp_path / "boxes.csv"), "masks": str(masks)}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the dropped class's regions go with it
        df = load_spec(spec)
    assert len(df) == 4 and set(df["label"]) == {"normal"}
    assert df.attrs["excluded"] == {"label 'osteo' dropped by label_map": 2}
    assert df.attrs["boxes_on_excluded_images"] == 1 and df.attrs["masks_of_excluded_images"] == 1
    assert df.set_index("image_id").at["x0", "boxes"] == [{"x": 1.0, "y": 1.0, "w": 4.0, "h": 4.0}]


def test_a_manifest_with_case_variant_labels_is_refused(tmp_path):
    png8(tmp_path / "a.png")
    png8(tmp_path / "b.png", 30)
    pd.DataFrame({"image_id": ["a", "b"], "path": ["a.png", "b.png"], "label": ["Osteo", "osteo"],
                  "patient_id": ["1", "2"]}).to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match=rf"^{tmp_path}/manifest.csv: column 'label': class names that differ "
                                            r"only in case: \[\['Osteo', 'osteo'\]\]"):
        read_manifest(tmp_path / "manifest.csv")


# ------------------------------------------------------------------------------------------
# 2. 16-bit colour files at full depth


def write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte: gray + alpha (2 channels) is a colour type OpenCV cannot write."""
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + array[r].astype(">u2").tobytes() for r in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type,
                                                                         0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


# 64 gray levels below 190/65535 that Pillow's 8-bit reading turned into one, plus the top of the range.
LEVELS = np.concatenate([np.arange(0, 190, 3), [30000, 65535]]).astype(np.uint16)
GRAY16 = np.tile(LEVELS, (3, 1))


@pytest.mark.parametrize("kind", ["rgb_png", "rgba_png", "gray_alpha_png", "rgb_tiff"])
def test_16bit_colour_files_that_are_gray_read_at_full_depth(tmp_path, kind):
    rgb = np.stack([GRAY16] * 3, axis=-1)
    opaque = np.full_like(GRAY16, 65535)
    if kind == "rgb_png":
        path = tmp_path / "x.png"
        cv2.imwrite(str(path), rgb)
    elif kind == "rgba_png":
        path = tmp_path / "x.png"
        cv2.imwrite(str(path), np.dstack([rgb, opaque]))
    elif kind == "gray_alpha_png":
        path = write_png16(tmp_path / "x.png", np.stack([GRAY16, opaque], axis=-1))
    else:
        path = tmp_path / "x.tif"
        cv2.imwrite(str(path), rgb)
    xray = read_xray(path)
    assert xray.meta["bit_depth"] == 16 and xray.meta["was_color"] is False
    assert len(np.unique(xray.pixels)) == len(LEVELS)  # Pillow alone gave 3 levels here
    np.testing.assert_array_equal(np.round(xray.pixels * 65535).astype(np.uint16), GRAY16)
    assert scan_files([path])["bit_depth"].tolist() == [16]


def test_16bit_colour_and_alpha_at_full_depth(tmp_path):
    rgb = np.stack([GRAY16, GRAY16, GRAY16 // 2], axis=-1)  # blue at half: a truly coloured file
    cv2.imwrite(str(tmp_path / "c.png"), rgb[..., ::-1])  # OpenCV writes BGR
    xray = read_xray(tmp_path / "c.png")
    assert xray.meta["bit_depth"] == 16 and xray.meta["mode"] == "RGB;16" and xray.meta["was_color"] is True
    expected = (rgb.astype(np.float32) @ io.LUMA_WEIGHTS) / 65535
    np.testing.assert_allclose(xray.pixels, expected, atol=1e-6)
    half = np.full_like(GRAY16, 32768)
    write_png16(tmp_path / "la.png", np.stack([GRAY16, half], axis=-1))
    composited = read_xray(tmp_path / "la.png")
    assert composited.meta["mode"] == "LA;16" and "compositing on black" in composited.meta["alpha"]
    np.testing.assert_allclose(composited.pixels, GRAY16 / 65535 * (32768 / 65535), atol=1e-6)


# ------------------------------------------------------------------------------------------
# 3. A DICOM header declaring a huge image stops before any decoding


def crafted_dicom(path: Path, rows: int, columns: int, frames: int = 1, pixel_bytes: bytes = b"\x00" * 16) -> Path:
    """A tiny file whose header declares rows x columns (x frames) 16-bit pixels."""
    write_dicom(np.zeros((2, 2), dtype=np.uint8), path, patient_id="P1", view="AP")
    from pydicom import dcmread

    ds = dcmread(path)
    ds.Rows, ds.Columns = rows, columns
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixel_bytes
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_declaring_8000_x_8000_stops_before_any_large_allocation(tmp_path, monkeypatch):
    monkeypatch.delenv(io.MAX_DICOM_PIXELS_ENV, raising=False)
    path = crafted_dicom(tmp_path / "bomb.dcm", 8000, 8000)
    assert path.stat().st_size < 2000
    tracemalloc.start()
    try:
        with pytest.raises(XrayReadError) as err:
            read_xray(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # decoding would have needed 128 MB
    assert first_line(err) == (
        f"{path}: DICOM header declares 8000 x 8000 pixels = 64,000,000 pixels, more than the limit of 50,000,000 "
        "(a guard against corrupt or hostile headers; nothing was decoded). What to do: if the image is genuine, "
        "raise the limit: set the environment variable OSTEOLIB_MAX_DICOM_PIXELS (e.g. "
        "OSTEOLIB_MAX_DICOM_PIXELS=64000000; none = no limit) or osteolib.data.io.MAX_DICOM_PIXELS before reading; "
        "otherwise re-export the file.")
    assert scan_files([path])["reason"].str.startswith("DICOM header declares 8000 x 8000").all()


def test_dicom_limit_counts_frames_and_is_set_by_constant_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(io.MAX_DICOM_PIXELS_ENV, raising=False)
    frames = np.stack([np.full((3, 4), 100 * (k + 1), dtype=np.uint16) for k in range(2)])
    path = crafted_dicom(tmp_path / "two.dcm", 3, 4, frames=2, pixel_bytes=frames.astype("<u2").tobytes())
    xray = read_xray(path)  # the first frame only, the count noted
    assert xray.meta["n_frames"] == 2 and xray.pixels.shape == (3, 4)
    monkeypatch.setattr(io, "MAX_DICOM_PIXELS", 20)
    with pytest.raises(XrayReadError, match=r"declares 4 x 3 pixels x 2 frames = 24 pixels, more than the limit "
                                            r"of 20"):
        read_xray(path)
    monkeypatch.setenv(io.MAX_DICOM_PIXELS_ENV, "none")
    assert read_xray(path).pixels.shape == (3, 4)
    monkeypatch.setenv(io.MAX_DICOM_PIXELS_ENV, "23")
    with pytest.raises(XrayReadError, match="more than the limit of 23"):
        read_xray(path)
    monkeypatch.setenv(io.MAX_DICOM_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match="^OSTEOLIB_MAX_DICOM_PIXELS='lots' is not a number of pixels") as err:
        read_xray(path)
    assert not isinstance(err.value, XrayReadError)  # the setting is wrong, not the file


# ------------------------------------------------------------------------------------------
# 4. Nothing a folder or table holds is left out quietly; malformed cells and empty tables name file and row


def test_loose_images_and_empty_class_folders_are_warned_and_listed(tmp_path):
    png8(tmp_path / "normal" / "a.png")
    png8(tmp_path / "osteo" / "b.png")
    png8(tmp_path / "stray.png")
    (tmp_path / "osteopenia").mkdir()
    (tmp_path / "osteopenia" / "readme.txt").write_text("no images yet")
    with pytest.warns(UserWarning) as record:
        df = from_folder(tmp_path)
    message = " ".join(str(w.message) for w in record)
    assert "1 image(s) beside the class folders have no class and are left out: ['stray.png']" in message
    assert "empty class folder(s) ['osteopenia'] (no image files, so no class)" in message
    assert df.attrs["excluded_files"] == [str(tmp_path / "stray.png")]
    assert df.attrs["empty_class_folders"] == ["osteopenia"]
    assert df.attrs["excluded"] == {"not an image file (extension)": 1,
                                    "image file(s) loose beside the class folders (no class)": 1}
    assert sorted(df["label"]) == ["normal", "osteo"]


@pytest.fixture
def manifest_csv(tmp_path) -> Path:
    for name in ("a", "b"):
        png8(tmp_path / f"{name}.png", size=(40, 30))
    df = pd.DataFrame({"image_id": ["a", "b"], "path": [str(tmp_path / "a.png"), str(tmp_path / "b.png")],
                       "label": ["x", "y"], "patient_id": ["1", "2"],
                       "boxes": [[{"x": 1, "y": 2, "w": 3, "h": 4}], None]})
    return write_manifest(df, tmp_path / "manifest.csv")


@pytest.mark.parametrize("cell, problem", [
    ("[{'x': 1}]", "'boxes' is not valid JSON (Expecting property name enclosed in double quotes"),
    ('{"x": 1, "y": 2, "w": 3, "h": 4}', "'boxes': boxes must be a list of boxes {x, y, w, h}; got {'x': 1"),
    ("[1, 2]", "'boxes': a box must be a mapping with keys x, y, w, h (pixels of the stored file); got 1"),
    ('[{"x": 1, "y": 2, "w": 3}]', "'boxes': a box needs keys x, y, w, h (pixels of the stored file)"),
    ('[{"x": "1", "y": 2, "w": 3, "h": 4}]', "'boxes': box coordinate x='1' is not a finite number"),
    ('[{"x": 1, "y": 2, "w": 0, "h": 4}]', "'boxes': box width and height must be positive"),
])
def test_malformed_boxes_cell_names_the_file_and_row(manifest_csv, cell, problem):
    table = pd.read_csv(manifest_csv, dtype=str, keep_default_na=False)
    table.loc[1, "boxes"] = cell
    table.to_csv(manifest_csv, index=False)
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest_csv)
    assert first_line(err).startswith(f"{manifest_csv}: row 1 (line 3): {problem}")


def test_malformed_width_cell_names_the_file_and_row(manifest_csv):
    table = pd.read_csv(manifest_csv, dtype=str, keep_default_na=False)
    table["width"] = ["40", "wide"]
    table.to_csv(manifest_csv, index=False)
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest_csv)
    assert first_line(err) == (f"{manifest_csv}: row 1 (line 3): 'width' is 'wide', not a whole number of pixels. "
                               "What to do: correct the cell, or empty it (add_image_sizes reads it from the file)")


def test_empty_tables_name_the_file(tmp_path, manifest_csv):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    header_only = tmp_path / "header.csv"
    header_only.write_text("image_id,path,label,patient_id\n")
    png8(tmp_path / "img" / "x.png")
    with pytest.raises(ManifestError) as err:
        read_manifest(empty)
    assert first_line(err) == (f"{empty}: the manifest is empty (0 bytes). What to do: the export or copy was "
                               "probably interrupted; write it again (a header row, then one row per image)")
    with pytest.raises(ManifestError, match=rf"^{header_only}: the manifest has a header \(\['image_id', 'path', "
                                            r"'label', 'patient_id'\]\) but no rows"):
        read_manifest(header_only)
    with pytest.raises(ManifestError, match=rf"^{empty}: the label table is empty \(0 bytes\)"):
        from_csv(empty, tmp_path / "img", "file", "dx")
    spec = {"kind": "csv", "table": str(empty), "image_dir": str(tmp_path / "img")}
    with pytest.raises(DatasetSpecError, match=rf"^dataset.table: {empty}: the label table is empty \(0 bytes\)"):
        check_dataset_spec(spec)
    (tmp_path / "labels.csv").write_text("path,label\nx.png,a\nx.png,b,extra\n")
    with pytest.raises(ManifestError, match=rf"^{tmp_path}/labels.csv: the label table is not a well-formed CSV "
                                            r"\(Error tokenizing data. C error: Expected 2 fields in line 3, saw 3"):
        from_csv(tmp_path / "labels.csv", tmp_path / "img", "path", "label")
    (tmp_path / "labels.csv").write_text("path,label\nx.png,a\n,b\n")
    with pytest.raises(ManifestError, match=r"1 row\(s\) have an empty 'path' cell: \['row 1 \(line 3\)'\]"):
        from_csv(tmp_path / "labels.csv", tmp_path / "img", "path", "label")
    (tmp_path / "labels.csv").write_text("path,label\nx.png,a\n")
    with pytest.raises(DatasetSpecError, match=rf"^dataset.regions.boxes: {empty}: the box table is empty"):
        check_dataset_spec({**spec, "table": str(tmp_path / "labels.csv"), "regions": {"boxes": str(empty)}})


# ------------------------------------------------------------------------------------------
# 5. The cache keys on content: a file replaced by another of the same size and mtime is noticed


def test_cache_notices_a_file_replaced_with_the_same_size_and_mtime(tmp_path):
    paths = [png8(tmp_path / f"{n}.png", value=40 * n + 20, size=(16, 16)) for n in range(3)]
    df = pd.DataFrame({"image_id": ["a", "b", "c"], "path": [str(p) for p in paths]})
    root = tmp_path / "cache"
    first = ImageCache.build(df, 16, root=root, progress=False)
    before = os.stat(paths[1])
    replacement = tmp_path / "other.png"
    png8(replacement, value=200, size=(16, 16))
    assert replacement.stat().st_size == before.st_size  # same size ...
    os.replace(replacement, paths[1])
    os.utime(paths[1], ns=(before.st_atime_ns, before.st_mtime_ns))  # ... and the same mtime
    assert (os.stat(paths[1]).st_size, os.stat(paths[1]).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = ImageCache.build(df, 16, root=root, progress=False)
    assert second.key != first.key and second.path != first.path
    assert second.images[1][8, 8] == 200 and first.images[1][8, 8] == 60  # the new bytes; the old cache intact
    # rewritten in place (same inode), same size and mtime: noticed as well
    png8(paths[1], value=61, size=(16, 16))
    os.utime(paths[1], ns=(before.st_atime_ns, before.st_mtime_ns))
    third = ImageCache.build(df, 16, root=root, progress=False)
    assert third.key not in (first.key, second.key) and third.images[1][8, 8] == 61
    png8(paths[1], value=60, size=(16, 16))  # the original bytes again: the original cache
    assert ImageCache.build(df, 16, root=root, progress=False).path == first.path


def test_content_hashes_are_remembered_only_while_the_file_is_unchanged(tmp_path, monkeypatch):
    from osteolib.data import cache

    path = png8(tmp_path / "x.png")
    reads: list[str] = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        reads.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(cache, "RACY_SECONDS", 0.0)  # the file was written just now
    monkeypatch.setitem(cache.__dict__, "open", counting_open)
    cache.forget_content_hashes()
    time.sleep(0.05)
    digest = cache.content_hash(path)
    assert cache.content_hash(path) == digest and len(reads) == (1 if os.name == "posix" else 2)
    png8(path, value=101)  # same size, new bytes
    assert cache.content_hash(path) != digest and len(reads) == (2 if os.name == "posix" else 3)
    monkeypatch.setattr(cache, "RACY_SECONDS", 3600.0)  # changed within the hour: never trusted
    cache.forget_content_hashes()
    cache.content_hash(path), cache.content_hash(path)
    assert len(reads) == (4 if os.name == "posix" else 5)


def test_the_next_process_takes_the_hashes_from_the_cache_folder_and_still_notices_a_replacement(tmp_path,
                                                                                                 monkeypatch):
    from osteolib.data import cache

    paths = [png8(tmp_path / f"{n}.png", value=40 * n + 20) for n in range(3)]
    df = pd.DataFrame({"image_id": ["a", "b", "c"], "path": [str(p) for p in paths]})
    root = tmp_path / "cache"
    monkeypatch.setattr(cache, "RACY_SECONDS", 0.0)  # instead of waiting two seconds after writing the files
    time.sleep(0.05)
    cache.forget_content_hashes()
    first = ImageCache.build(df, 16, root=root, progress=False)
    memo = root / cache.HASH_MEMO_NAME
    assert memo.is_file() == (os.name == "posix")
    reads: list[str] = []
    real_open = open
    monkeypatch.setitem(cache.__dict__, "open", lambda f, *a, **k: reads.append(str(f)) or real_open(f, *a, **k))
    cache.forget_content_hashes()  # as in a new process
    assert cache.cache_key(df, CacheSettings(16), hash_memo=memo) == first.key
    assert reads == ([] if os.name == "posix" else [str(p) for p in paths])
    before = os.stat(paths[2])
    png8(paths[2], value=101)  # same size, new bytes, mtime set back
    os.utime(paths[2], ns=(before.st_atime_ns, before.st_mtime_ns))
    cache.forget_content_hashes()
    assert cache.cache_key(df, CacheSettings(16), hash_memo=memo) != first.key
    assert str(paths[2]) in reads


def test_an_empty_hannover_table_names_the_file(tmp_path):
    from osteolib.data.builtin import hannover

    (tmp_path / "png").mkdir()
    (tmp_path / "data.csv").write_bytes(b"")
    with pytest.raises(ManifestError, match=rf"^{tmp_path}/data.csv: the Hannover table \(data.csv\) is empty "
                                            r"\(0 bytes\)"):
        hannover(tmp_path)


def test_notebook_00s_label_map_merges_case_variants_of_a_spec(tmp_path):
    # the profile's label_map (notebook 00's parameter) reaches the spec, so it can merge what the builder refuses
    from osteolib.data.sources import load_dataset

    for name, label in (("a.png", "Normal"), ("b.png", "normal"), ("c.png", "osteoporosis")):
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(tmp_path / name)
    (tmp_path / "labels.csv").write_text("file,dx\na.png,Normal\nb.png,normal\nc.png,osteoporosis\n")
    spec = {"kind": "csv", "table": str(tmp_path / "labels.csv"), "image_dir": str(tmp_path), "path_column": "file",
            "label_column": "dx"}
    with pytest.raises(Exception, match="differ only in case"):
        load_dataset(spec)
    manifest = load_dataset(spec, label_map={"Normal": "normal"})
    assert sorted(manifest["label"]) == ["normal", "normal", "osteoporosis"]
