"""Tests of osteolib.data.io: every file is generated in tmp_path; the real-data checks skip without the folder."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from osteolib.data import BadFilesError, XrayImage, XrayReadError, check_readable, read_xray, scan_files
from osteolib.paths import real_data_root

# A non-square gradient, so that a swapped width/height or a per-image stretch shows up.
GRAY = np.tile(np.linspace(10, 200, 7).astype(np.uint8), (5, 1))


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path)
    return path


def make_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    preamble: bool = True,
) -> Path:
    """A small uncompressed 16-bit DICOM secondary capture with optional rescale and window."""
    file_meta = FileMetaDataset()
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "P-0042"
    ds.ViewPosition = "AP"
    ds.PixelSpacing = [0.139, 0.14]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept if intercept is not None else 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype("<u2").tobytes()
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, enforce_file_format=False)  # no 128-byte preamble, no "DICM" marker
    return path


STORED = np.array([[0, 500, 1000, 1500], [2000, 2500, 3000, 4095], [100, 200, 300, 400]], dtype=np.uint16)


# ------------------------------------------------------------------ PNG / JPEG and colour modes


def test_8bit_png_divides_by_255_without_stretching(tmp_path):
    image = read_xray(save_png(tmp_path / "g.png", GRAY))
    assert isinstance(image, XrayImage)
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (5, 7)
    np.testing.assert_allclose(image.pixels, GRAY / 255.0, atol=1e-7)
    # 10..200 stays 10..200 (no min-max stretch to 0..1)
    assert image.pixels.min() == pytest.approx(10 / 255) and image.pixels.max() == pytest.approx(200 / 255)
    meta = image.meta
    assert (meta["format"], meta["bit_depth"], meta["width"], meta["height"]) == ("png", 8, 7, 5)
    assert meta["was_color"] is False and meta["window"] is None
    assert meta["path"] == os.path.abspath(tmp_path / "g.png")


def test_16bit_png_keeps_full_precision(tmp_path):
    values = np.array([[0, 1, 1000], [4095, 30000, 65535]], dtype=np.uint16)
    image = read_xray(save_png(tmp_path / "d16.png", values))
    assert image.meta["bit_depth"] == 16
    assert image.pixels[0, 2] == pytest.approx(1000 / 65535, rel=1e-6)
    assert image.pixels[0, 1] == pytest.approx(1 / 65535, rel=1e-6)  # 1 != 0: not collapsed to 8 bits
    assert image.pixels[1, 2] == pytest.approx(1.0)
    np.testing.assert_allclose(image.pixels, values / 65535.0, rtol=1e-6)


def test_16bit_big_endian_tiff(tmp_path):
    values = np.array([[0, 1000, 65535]], dtype=">u2")
    path = tmp_path / "be.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16B"
    image = read_xray(path)
    assert image.meta["format"] == "tiff" and image.meta["bit_depth"] == 16
    np.testing.assert_allclose(image.pixels, values.astype(np.float64) / 65535.0, rtol=1e-6)


def test_jpeg_gray_and_rgb_jpeg_of_gray(tmp_path):
    smooth = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    Image.fromarray(smooth).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(smooth).convert("RGB").save(tmp_path / "rgb.jpeg", quality=95)
    gray = read_xray(tmp_path / "g.jpg")
    rgb = read_xray(tmp_path / "rgb.jpeg")
    for image in (gray, rgb):
        assert image.meta["format"] == "jpeg" and image.pixels.shape == (48, 64)
        assert np.abs(image.pixels - smooth / 255.0).mean() < 3 / 255
        assert image.meta["was_color"] is False  # chroma rounding is not colour


def test_rgb_that_is_gray_equals_gray(tmp_path):
    gray = read_xray(save_png(tmp_path / "g.png", GRAY))
    rgb = read_xray(save_png(tmp_path / "rgb.png", GRAY, "RGB"))
    assert rgb.meta["mode"] == "RGB" and rgb.meta["was_color"] is False
    np.testing.assert_array_equal(rgb.pixels, gray.pixels)


def test_palette_and_la_modes_equal_gray(tmp_path):
    gray = read_xray(save_png(tmp_path / "g.png", GRAY)).pixels
    palette = read_xray(save_png(tmp_path / "p.png", GRAY, "P"))
    la = read_xray(save_png(tmp_path / "la.png", GRAY, "LA"))
    assert palette.meta["mode"] == "P" and la.meta["mode"] == "LA"
    np.testing.assert_array_equal(palette.pixels, gray)
    np.testing.assert_array_equal(la.pixels, gray)
    assert "dropped" in la.meta["alpha"]


def test_rgba_opaque_drops_alpha_and_transparent_composites_on_black(tmp_path):
    gray = read_xray(save_png(tmp_path / "g.png", GRAY)).pixels
    opaque = read_xray(save_png(tmp_path / "rgba.png", GRAY, "RGBA"))
    np.testing.assert_array_equal(opaque.pixels, gray)
    assert "opaque" in opaque.meta["alpha"]

    rgba = np.dstack([GRAY, GRAY, GRAY, np.full_like(GRAY, 255)])
    rgba[0, 0, 3] = 0
    rgba[1, 1, 3] = 128
    image = read_xray(save_png(tmp_path / "holes.png", rgba))
    assert image.pixels[0, 0] == 0.0
    assert image.pixels[1, 1] == pytest.approx(GRAY[1, 1] / 255 * 128 / 255, abs=1e-6)
    np.testing.assert_array_equal(image.pixels[2:], gray[2:])
    assert "2 of 35 pixels" in image.meta["alpha"]


def test_truly_colour_image_is_flagged_and_converted_by_luminance(tmp_path):
    rgb = np.dstack([GRAY, GRAY, GRAY])
    rgb[2, 3] = (255, 0, 0)  # a red annotation mark
    image = read_xray(save_png(tmp_path / "screenshot.png", rgb))
    assert image.meta["was_color"] is True
    assert "1 of 35 pixels are coloured" in image.meta["color_warning"]
    assert image.pixels[2, 3] == pytest.approx(0.299, abs=1e-3)
    np.testing.assert_allclose(image.pixels[0], GRAY[0] / 255.0, atol=1e-6)
    assert scan_files([tmp_path / "screenshot.png"])["was_color"].tolist() == [True]


# ------------------------------------------------------------------ DICOM


def test_dicom_monochrome2_applies_rescale_then_window(tmp_path):
    # modality value = 2 * stored - 1000; window 0 +- 1000 covers modality -1000..1000 = stored 0..1000
    path = make_dicom(tmp_path / "w.dcm", STORED, slope=2.0, intercept=-1000.0, window=(0.0, 2000.0))
    image = read_xray(path)
    px = image.pixels
    assert px.shape == (3, 4) and px.dtype == np.float32
    assert px[0, 0] == pytest.approx(0.0, abs=1e-3)  # modality -1000: window bottom
    assert px[0, 1] == pytest.approx(0.5, abs=1e-3)  # modality 0: window centre
    assert px[0, 2] == pytest.approx(1.0, abs=1e-3)  # modality 1000: window top
    assert px[1, 3] == 1.0  # far above the window: clipped, not stretched
    assert px[2, 1] == pytest.approx((2 * 200 - 1000 + 1000) / 2000, abs=1e-3)
    meta = image.meta
    assert meta["format"] == "dicom" and meta["photometric"] == "MONOCHROME2" and meta["bit_depth"] == 12
    assert meta["window"] == (0.0, 2000.0) and meta["rescale"] == (2.0, -1000.0)
    assert (meta["width"], meta["height"]) == (4, 3)
    assert meta["PatientID"] == "P-0042" and meta["ViewPosition"] == "AP"
    assert meta["PixelSpacing"] == pytest.approx((0.139, 0.14))


def test_dicom_without_window_uses_data_range(tmp_path):
    image = read_xray(make_dicom(tmp_path / "nowin.dcm", STORED))
    np.testing.assert_allclose(image.pixels, STORED / 4095.0, atol=1e-6)
    assert image.meta["window"] is None and "data min/max" in image.meta["range_source"]


def test_dicom_monochrome1_is_inverted(tmp_path):
    normal = read_xray(make_dicom(tmp_path / "m2.dcm", STORED, window=(2048, 4096)))
    inverted = read_xray(make_dicom(tmp_path / "m1.dcm", STORED, window=(2048, 4096), photometric="MONOCHROME1"))
    np.testing.assert_allclose(inverted.pixels, 1.0 - normal.pixels, atol=1e-6)
    assert inverted.pixels[0, 0] > 0.99  # stored 0 is bright air in MONOCHROME1 -> dense after inversion
    assert inverted.meta["inverted"] is True


def test_dicom_found_by_content_not_extension(tmp_path):
    reference = read_xray(make_dicom(tmp_path / "ref.dcm", STORED)).pixels
    no_preamble = make_dicom(tmp_path / "raw_export.bin", STORED, preamble=False)
    assert no_preamble.read_bytes()[128:132] != b"DICM"
    misnamed = make_dicom(tmp_path / "looks_like.png", STORED)
    for path in (no_preamble, misnamed):
        image = read_xray(path)
        assert image.meta["format"] == "dicom"
        np.testing.assert_array_equal(image.pixels, reference)


def test_bare_dicom_dataset_without_file_meta(tmp_path):
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Rows, ds.Columns = STORED.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = STORED.astype("<u2").tobytes()
    path = tmp_path / "bare_export"
    ds.save_as(path, implicit_vr=True, little_endian=True)
    image = read_xray(path)
    np.testing.assert_allclose(image.pixels, STORED / 4095.0, atol=1e-6)
    assert "Implicit VR Little Endian" in image.meta["transfer_syntax_note"]


# ------------------------------------------------------------------ bad files


def test_garbage_png_names_the_file(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(XrayReadError) as info:
        read_xray(path)
    assert info.value.path == str(path) and str(path) in str(info.value)
    assert "not a recognised image format" in info.value.reason
    assert "What to do" in str(info.value)


def test_truncated_png_and_jpeg_raise_on_full_decode(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)  # incompressible
    for name in ("cut.png", "cut.jpg"):
        whole = tmp_path / f"whole_{name}"
        Image.fromarray(noise).save(whole)
        data = whole.read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(XrayReadError, match="truncated or corrupt") as info:
            read_xray(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


def test_truncated_dicom_names_the_file(tmp_path):
    data = make_dicom(tmp_path / "whole.dcm", STORED).read_bytes()
    cut_pixels = tmp_path / "cut_pixels.dcm"
    cut_pixels.write_bytes(data[:-7])  # inside the pixel data
    cut_header = tmp_path / "cut_header.dcm"
    cut_header.write_bytes(data[:200])  # before the pixel data
    with pytest.raises(XrayReadError, match="pixel data cannot be decoded") as info:
        read_xray(cut_pixels)
    assert str(cut_pixels) in str(info.value) and "truncated" in info.value.hint
    with pytest.raises(XrayReadError, match="no pixel data") as info:
        read_xray(cut_header)
    assert str(cut_header) in str(info.value)


def _bad_path(folder: Path, kind: str) -> Path:
    if kind == "missing":
        return folder / "nowhere.png"
    if kind == "directory":
        return folder
    if kind == "empty":
        (folder / "empty.png").write_bytes(b"")
        return folder / "empty.png"
    (folder / "notes.txt").write_text("hello")
    return folder / "notes.txt"


@pytest.mark.parametrize(
    "kind, reason",
    [("missing", "file not found"), ("directory", "is a directory"), ("empty", "file is empty"),
     ("text", "not a recognised image format")],
)
def test_unreadable_paths_give_clear_reasons(tmp_path, kind, reason):
    path = _bad_path(tmp_path, kind)
    with pytest.raises(XrayReadError) as info:
        read_xray(path)
    assert reason in info.value.reason and str(path) in str(info.value)


def test_format_pillow_knows_but_is_not_an_xray_is_refused(tmp_path):
    path = tmp_path / "icon.ico"
    Image.fromarray(GRAY).save(path)
    with pytest.raises(XrayReadError, match="ICO files are not an X-ray format"):
        read_xray(path)


def test_non_text_path_is_an_error_not_a_crash():
    with pytest.raises(XrayReadError, match="no usable file path"):
        read_xray(float("nan"))


# ------------------------------------------------------------------ many files


def test_folder_scan_reports_every_bad_file_and_keeps_the_good(tmp_path):
    good = [save_png(tmp_path / "a.png", GRAY), make_dicom(tmp_path / "b.dcm", STORED)]
    (tmp_path / "sub").mkdir()
    good.append(save_png(tmp_path / "sub" / "c.png", np.array([[0, 65535]], dtype=np.uint16)))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg at all")
    missing = tmp_path / "gone.png"

    table = scan_files(tmp_path)  # a folder: every file below it
    assert len(table) == 5 and table["ok"].sum() == 3
    assert set(table.loc[~table["ok"], "path"]) == {str(tmp_path / "empty.png"), str(tmp_path / "junk.jpg")}

    inputs = [*good, tmp_path / "empty.png", missing, tmp_path / "junk.jpg"]
    table = scan_files(inputs)
    assert list(table.columns) == ["path", "ok", "reason", "format", "bit_depth", "width", "height", "was_color"]
    assert table["path"].tolist() == [str(p) for p in inputs]  # one row per path, same order
    assert table["ok"].tolist() == [True, True, True, False, False, False]
    assert table["format"].tolist()[:3] == ["png", "dicom", "png"]
    assert table["bit_depth"].tolist()[:3] == [8, 12, 16]
    assert table.loc[3:, "reason"].str.len().gt(0).all() and table.loc[:2, "reason"].eq("").all()
    assert table.loc[3:, "width"].isna().all()

    with pytest.raises(BadFilesError) as info:
        check_readable(inputs)
    error = info.value
    assert [path for path, _ in error.failures] == [str(p) for p in inputs[3:]]
    for path in inputs[3:]:
        assert str(path) in str(error)
    assert "3 of 6 file(s)" in str(error)

    pd.testing.assert_frame_equal(check_readable(good), scan_files(good))


def test_bad_files_listing_is_truncated_with_a_count(tmp_path):
    missing = [tmp_path / f"missing_{i:03d}.png" for i in range(57)]
    with pytest.raises(BadFilesError) as info:
        check_readable(missing)
    message = str(info.value)
    assert len(info.value.failures) == 57
    assert "missing_049.png" in message and "missing_050.png" not in message
    assert "and 7 more" in message


# ------------------------------------------------------------------ the real data


@pytest.mark.real_data
@pytest.mark.parametrize("pattern", ["nih-cxr14-subset/images/*.png", "kermany-pediatric-cxr/*/*.png",
                                     "hannover-covid-cxr/png/*.png"])
def test_real_pngs_read_as_gray_in_range(pattern):
    root = real_data_root()
    if root is None:
        pytest.skip("real X-ray folder not found (set OSTEOLIB_DATA_ROOT or provide ../shared/data)")
    files = sorted(root.glob(pattern))[:5]
    assert files, f"no files match {pattern} under {root}"
    for path in files:
        image = read_xray(path)
        assert image.pixels.ndim == 2 and image.pixels.dtype == np.float32
        assert max(image.pixels.shape) <= 256 and min(image.pixels.shape) > 32
        assert 0.0 <= image.pixels.min() < image.pixels.max() <= 1.0
        assert image.meta["format"] == "png" and image.meta["bit_depth"] == 8
        assert (image.meta["height"], image.meta["width"]) == image.pixels.shape
        with Image.open(path) as raw:  # the same values as the file, only divided by 255
            np.testing.assert_allclose(image.pixels, np.asarray(raw.convert("L")) / 255.0, atol=1e-6)
