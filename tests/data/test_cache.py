"""The preprocessing cache: geometry, regions, keys that follow files and settings, atomic builds."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from osteolib.data import CacheBuildError, CacheSettings, ImageCache, cache_key, geometry_for, rasterise_boxes
from osteolib.data import nih_cxr14, normalise_manifest


def write_png(path: Path, pixels: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return str(path)


def half_bright(width: int, height: int) -> np.ndarray:
    """Left half 255 (bone-bright), right half 0."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, : width // 2] = 255
    return pixels


def manifest(rows: list[dict]) -> pd.DataFrame:
    for n, row in enumerate(rows):
        row.setdefault("image_id", f"img{n}")
        row.setdefault("label", "x")
        row.setdefault("patient_id", row["image_id"])
    return normalise_manifest(pd.DataFrame(rows))


def no_partial_builds(root: Path) -> bool:
    return not any(p.name.startswith(".building-") for p in root.iterdir()) if root.exists() else True


# ------------------------------------------------------------------------------------------
# Geometry and regions on hand-made images


def test_letterbox_pads_centred_with_black_and_scales_boxes(tmp_path):
    wide = write_png(tmp_path / "wide.png", half_bright(40, 20))
    tall = write_png(tmp_path / "tall.png", np.full((40, 10), 200, dtype=np.uint8))
    df = manifest([{"image_id": "wide", "path": wide, "boxes": [{"x": 8, "y": 4, "w": 16, "h": 8, "label": "lesion"}]},
                   {"image_id": "tall", "path": tall}])
    cache = ImageCache.build(df, 20, root=tmp_path / "cache", progress=False)
    assert isinstance(cache.images, np.memmap) and cache.images.shape == (2, 20, 20)
    assert cache.images.dtype == np.uint8 and cache.regions.dtype == np.uint8
    # 40x20 -> 20x10 content, 5 rows of black above and below.
    assert cache.geometry("wide") == (0.5, 0.0, 5.0)
    image = cache.images[cache.index["wide"]]
    assert (image[:5] == 0).all() and (image[15:] == 0).all()
    assert (image[5:15, :9] == 255).all() and (image[5:15, 11:] == 0).all()
    # 10x40 -> 5x20 content, centred: columns 7..11.
    assert cache.geometry("tall") == (0.5, 7.0, 0.0)
    tall_image = cache.images[cache.index["tall"]]
    assert (tall_image[:, 7:12] == 200).all() and (tall_image[:, :7] == 0).all() and (tall_image[:, 12:] == 0).all()
    # The box (8, 4, 16, 8) in file pixels is (4, 2 + 5, 8, 4) in cache pixels, label kept.
    assert cache.boxes("wide") == [{"x": 4.0, "y": 7.0, "w": 8.0, "h": 4.0, "label": "lesion"}]
    assert cache.boxes("tall") == []
    region = cache.regions[cache.index["wide"]]
    assert region.sum() == 8 * 4 and (region[7:11, 4:12] == 1).all()
    assert cache.has_region.tolist() == [True, False] and cache.regions[1].sum() == 0


def test_stretch_mode_scales_each_axis(tmp_path):
    path = write_png(tmp_path / "wide.png", half_bright(40, 20))
    cache = ImageCache.build(manifest([{"path": path, "boxes": [{"x": 0, "y": 0, "w": 20, "h": 10}]}]),
                             CacheSettings(20, mode="stretch"), root=tmp_path / "cache", progress=False)
    assert tuple(cache.geometry_xy("img0")) == (0.5, 1.0, 0.0, 0.0)
    assert cache.boxes("img0") == [{"x": 0.0, "y": 0.0, "w": 10.0, "h": 10.0}]
    assert (cache.images[0][:, :9] == 255).all() and (cache.images[0][:, 11:] == 0).all()
    with pytest.raises(ValueError, match="use geometry_xy"):
        cache.geometry("img0")


def test_mask_regions_are_resized_with_nearest_and_placed_in_the_letterbox(tmp_path):
    image = write_png(tmp_path / "a.png", np.full((20, 40), 90, dtype=np.uint8))
    mask = np.zeros((20, 40), dtype=np.uint8)
    mask[10:20, 20:40] = 255  # bottom-right quarter
    mask_path = write_png(tmp_path / "a_mask.png", mask)
    df = manifest([{"path": image, "mask_path": mask_path, "boxes": [{"x": 0, "y": 0, "w": 4, "h": 4}]}])
    cache = ImageCache.build(df, 20, root=tmp_path / "cache", progress=False)
    region = cache.regions[0]
    assert set(np.unique(region)) == {0, 1}
    # The quarter becomes rows 5+5..5+10, columns 10..20 of the 20 px letterbox; the mask wins over the box.
    expected = np.zeros((20, 20), dtype=np.uint8)
    expected[10:15, 10:20] = 1
    assert np.array_equal(region, expected) and cache.has_region[0]
    small_mask = write_png(tmp_path / "small_mask.png", np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(CacheBuildError, match="mask is 10x10 but its image .* is 40x20"):
        ImageCache.build(manifest([{"path": image, "mask_path": small_mask}]), 20, root=tmp_path / "c2", progress=False)


def test_thin_boxes_keep_a_pixel_and_boxes_are_clipped():
    mask = rasterise_boxes([{"x": 3.2, "y": 3.2, "w": 0.2, "h": 0.2}, {"x": -5, "y": 8, "w": 7, "h": 30}], 10)
    assert mask[3, 3] == 1
    assert mask[8:, 0:2].all() and mask.sum() == 1 + 2 * 2
    geometry, content = geometry_for(300, 200, CacheSettings(64))
    assert content == (64, 43) and geometry.pad_y == (64 - 43) // 2


# ------------------------------------------------------------------------------------------
# Keys: rebuilt when anything that shapes the arrays changes, reused otherwise


def test_cache_is_reused_and_rebuilt_when_a_file_or_setting_changes(tmp_path, capsys):
    paths = [write_png(tmp_path / f"{n}.png", np.full((16, 16), 10 * n, dtype=np.uint8)) for n in range(3)]
    df = manifest([{"path": p} for p in paths])
    root = tmp_path / "cache"
    first = ImageCache.build(df, 16, root=root)
    again = ImageCache.build(df.copy(), 16, root=root)
    assert again.path == first.path and again.key == first.key
    assert "reusing" in capsys.readouterr().out

    stat = os.stat(paths[1])
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touch: same bytes
    assert ImageCache.build(df, 16, root=root, progress=False).key == first.key  # the key is the content
    write_png(Path(paths[1]), np.full((16, 16), 11, dtype=np.uint8))  # new content
    touched = ImageCache.build(df, 16, root=root, progress=False)
    assert touched.key != first.key and touched.path != first.path

    write_png(Path(paths[2]), np.full((16, 16), 250, dtype=np.uint8))  # rewrite with new content
    rewritten = ImageCache.build(df, 16, root=root, progress=False)
    assert rewritten.key not in (first.key, touched.key)
    assert rewritten.images[2].min() == 250 and first.images[2].max() == 20  # the old cache is left intact

    assert cache_key(df, CacheSettings(32)) != cache_key(df, CacheSettings(16))
    assert cache_key(df, CacheSettings(16, "stretch")) != cache_key(df, CacheSettings(16))
    boxed = df.assign(boxes=[[{"x": 1, "y": 1, "w": 2, "h": 2}], None, None])
    assert cache_key(boxed, CacheSettings(16)) != cache_key(df, CacheSettings(16))
    assert cache_key(df.assign(label="other"), CacheSettings(16)) == cache_key(df, CacheSettings(16))
    assert sorted(p.name for p in root.iterdir() if p.name != "content-hashes.json") == sorted(
        {first.path.name, touched.path.name, rewritten.path.name})


def test_undecodable_and_missing_files_are_all_listed_and_nothing_is_cached(tmp_path):
    good = write_png(tmp_path / "good.png", np.zeros((8, 8), dtype=np.uint8))
    (tmp_path / "broken1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "broken2.png").write_bytes(b"")
    df = manifest([{"path": good}, {"path": str(tmp_path / "broken1.png")}, {"path": str(tmp_path / "broken2.png")}])
    root = tmp_path / "cache"
    with pytest.raises(CacheBuildError) as err:
        ImageCache.build(df, 16, root=root, progress=False)
    message = str(err.value)
    assert "2 of 3 file(s) could not be decoded" in message
    assert "broken1.png" in message and "broken2.png: file is empty" in message and "good.png" not in message
    assert list(root.iterdir()) == []  # the temporary folder is gone, no cache folder exists
    missing = df.assign(path=[good, str(tmp_path / "gone.png"), str(tmp_path / "gone2.png")])
    with pytest.raises(CacheBuildError, match=r"(?s)2 file\(s\) of the manifest are missing.*gone\.png.*gone2\.png"):
        ImageCache.build(missing, 16, root=root, progress=False)
    with pytest.raises(ValueError, match="integer >= 8"):
        CacheSettings(4)
    with pytest.raises(ValueError, match="letterbox"):
        CacheSettings(16, mode="crop")


def test_pool_build_equals_serial_build_and_pixel_stats(tmp_path):
    rng = np.random.default_rng(0)
    paths = [write_png(tmp_path / "img" / f"{n}.png", rng.integers(0, 256, size=(24, 18))) for n in range(70)]
    df = manifest([{"path": p} for p in paths])
    pooled = ImageCache.build(df, 12, root=tmp_path / "pooled", progress=False, workers=2)
    serial = ImageCache.build(df, 12, root=tmp_path / "serial", progress=False, workers=1)
    assert np.array_equal(np.asarray(pooled.images), np.asarray(serial.images))
    assert pooled.image_ids == df["image_id"].tolist() and no_partial_builds(tmp_path / "pooled")
    ids = ["img3", "img10", "img42"]
    values = np.asarray(serial.images)[[3, 10, 42]] / 255.0
    mean, std = serial.pixel_stats(ids)
    assert mean == pytest.approx(values.mean()) and std == pytest.approx(values.std())
    reopened = ImageCache.open(serial.path)
    assert reopened.index["img42"] == 42 and reopened.size == 12
    with pytest.raises(KeyError, match="'nope' is not in this cache"):
        reopened.boxes("nope")


# ------------------------------------------------------------------------------------------
# Real data


@pytest.mark.real_data
def test_real_nih_cache_keeps_boxes_and_regions(real_data_root, tmp_path):
    df = nih_cxr14(real_data_root / "nih-cxr14-subset")
    cache = ImageCache.build(df, 64, root=tmp_path, progress=False)
    assert cache.images.shape == (1000, 64, 64) and cache.has_region.sum() == 44
    boxed = df[df["boxes"].notna()]
    for image_id, boxes in zip(boxed["image_id"], boxed["boxes"]):
        assert cache.geometry(image_id) == (0.25, 0.0, 0.0)
        scaled = cache.boxes(image_id)
        assert [b["x"] for b in scaled] == pytest.approx([b["x"] * 0.25 for b in boxes])
        assert cache.regions[cache.index[image_id]].sum() > 0
    assert cache.regions[~cache.has_region].sum() == 0
    mean, std = cache.pixel_stats()
    assert 0.2 < mean < 0.8 and 0.1 < std < 0.4
