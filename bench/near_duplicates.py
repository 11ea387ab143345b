"""Recall and false pairs of the copy detector (osteolib.data.duplicates) on synthetic shoulder radiographs.

    .venv/bin/python bench/near_duplicates.py [--patients 150] [--copies 3] [--size 256] [--seed 0]
                                              [--out bench/results/near_duplicates.json]

For ``--patients`` distinct synthetic patients (one radiograph each, saved as PNG; distinct patients share one
anatomy template, so look-alikes are the false-pair risk), writes ``--copies`` augmented copies of each the way
lab folders hold them (``N10_aug3.jpg`` beside ``N10.png``): random flips, a rotation in [-15, 15] deg, a shift of
up to 10 % per axis, a crop of up to 10 % per axis resized back, brightness/contrast/gamma changes and JPEG
recompression at quality 60-95. Every file is its own patient in the manifest (a lab folder without patient ids),
so only the detector can tie a copy to its original. Then runs :func:`find_copies` on the files and counts

* pair recall: true pairs (two files of one source radiograph) reported, over all true pairs;
* copy recall: copies put in their original's patient group by ``group_copies`` over the reported true pairs;
* false pairs: reported pairs of two different source radiographs, given two ways: the share of images involved
  in at least one false pair (the stricter one, the target is <= 1 %) and per distinct-source comparison.

Writes the measurement as JSON with the CPU model, counts and seconds.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from osteolib.data import synthetic
from osteolib.data.duplicates import DEFAULT_MIN_MATCHES, DEFAULT_MIN_TEXTURE, find_copies
from osteolib.data.splits import group_copies
from osteolib.utils import cpu_model


def make_copy(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """An augmented copy of a float [0, 1] image and what was done to it (the JPEG step happens on saving)."""
    size = image.shape[0]
    how = str(rng.choice(["none", "h", "v", "hv"], p=[0.3, 0.4, 0.15, 0.15]))
    out = image[:, ::-1] if "h" in how else image
    out = out[::-1] if "v" in how else out
    angle = float(rng.uniform(-15, 15))
    out = ndimage.rotate(out, angle, reshape=False, order=1, mode="constant", cval=0.0)
    shift = rng.uniform(-0.1, 0.1, size=2) * size
    out = ndimage.shift(out, shift, order=1, mode="constant", cval=0.0)
    crop = rng.uniform(0, 0.1, size=2) * size  # total crop per axis, at a random place, resized back
    top, left = rng.uniform(0, 1, size=2) * crop
    box = (left, top, left + size - crop[1], top + size - crop[0])
    out = np.asarray(Image.fromarray(out.astype(np.float32), mode="F").resize(
        (size, size), Image.Resampling.BILINEAR, box=box))
    brightness, contrast, gamma = rng.uniform(-0.1, 0.1), rng.uniform(0.8, 1.25), rng.uniform(0.7, 1.4)
    out = np.clip((np.clip(out, 0, 1) ** gamma - 0.5) * contrast + 0.5 + brightness, 0, 1)
    quality = int(rng.integers(60, 96))
    return out, {"flip": how, "angle": angle, "shift_y": shift[0], "shift_x": shift[1], "crop_y": crop[0],
                 "crop_x": crop[1], "brightness": brightness, "contrast": contrast, "gamma": gamma, "quality": quality}


def save(image: np.ndarray, path: Path, quality: int | None = None) -> None:
    pixels = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
    if quality is None:
        pixels.save(path)
    else:
        buffer = io.BytesIO()
        pixels.save(buffer, format="JPEG", quality=quality)
        path.write_bytes(buffer.getvalue())


def build_fixture(folder: Path, n_patients: int, copies: int, size: int, seed: int = 0) -> pd.DataFrame:
    """Originals N{k}.png and copies N{k}_aug{j}.jpg under folder; a manifest with a ``source`` truth column."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n_patients):
        label = synthetic.DEFAULT_CLASSES[k % 2]
        sample = synthetic.shoulder_radiograph(synthetic.child_rng(seed, k), size=size, label=label)
        original = folder / f"N{k}.png"
        save(sample.image, original)
        rows.append({"image_id": original.stem, "path": str(original), "label": label, "source": k, "copy": False})
        rng = synthetic.child_rng(seed + 1, k)
        for j in range(copies):
            image, done = make_copy(sample.image, rng)
            path = folder / f"N{k}_aug{j}.jpg"
            save(image, path, quality=done["quality"])
            rows.append({"image_id": path.stem, "path": str(path), "label": label, "source": k, "copy": True})
    table = pd.DataFrame(rows)
    table["patient_id"] = table["image_id"]  # a folder without patient ids: every file its own patient
    table["split"] = ""
    return table


def score(table: pd.DataFrame, pairs: pd.DataFrame) -> dict:
    """Recall and false pairs of ``pairs`` against the fixture's ``source`` column (see the module docstring)."""
    source = dict(zip(table["image_id"], table["source"]))
    same = np.array([source[a] == source[b] for a, b in zip(pairs["image_id_a"], pairs["image_id_b"])], bool)
    sizes = table.groupby("source").size()
    true_pairs = int((sizes * (sizes - 1) // 2).sum())
    n = len(table)
    distinct_comparisons = n * (n - 1) // 2 - true_pairs
    false = pairs[~same]
    in_false = set(false["image_id_a"]) | set(false["image_id_b"])
    # Copy recall: the true pairs joined into patient groups by group_copies, as notebook 00's `group` does
    group = dict(zip(table["image_id"], group_copies(table, pairs[same])["patient_id"]))
    copies = table[table["copy"]]
    originals = dict(zip(table.loc[~table["copy"], "source"], table.loc[~table["copy"], "image_id"]))
    tied = sum(group[i] == group[originals[s]] for i, s in zip(copies["image_id"], copies["source"]))
    return {
        "images": n, "true_pairs": true_pairs, "true_pairs_found": int(same.sum()),
        "pair_recall": round(float(same.sum()) / max(true_pairs, 1), 4),
        "copies": len(copies), "copies_tied_to_original": int(tied),
        "copy_recall": round(tied / max(len(copies), 1), 4),
        "false_pairs": int(len(false)),
        "images_in_a_false_pair": len(in_false),
        "false_pair_image_share": round(len(in_false) / n, 4),
        "distinct_source_comparisons": distinct_comparisons,
        "false_pairs_per_distinct_comparison": len(false) / max(distinct_comparisons, 1),
        "fewest_true_matches": int(pairs.loc[same, "matches"].min()) if same.any() else None,
        "most_false_matches": int(false["matches"].max()) if len(false) else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=150)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-matches", type=int, default=None, help="default: the detector's")
    parser.add_argument("--min-texture", type=float, default=None, help="default: the detector's")
    parser.add_argument("--out", default="bench/results/near_duplicates.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        table = build_fixture(Path(folder), args.patients, args.copies, args.size, args.seed)
        built = time.perf_counter() - started
        started = time.perf_counter()
        # every verified candidate, to see how matches and texture spread; the detector's thresholds applied after
        every = find_copies(table, min_matches=1, min_texture=-np.inf)
        seconds = time.perf_counter() - started
        threshold = DEFAULT_MIN_MATCHES if args.min_matches is None else args.min_matches
        texture = DEFAULT_MIN_TEXTURE if args.min_texture is None else args.min_texture
        pairs = every[(every["matches"] >= threshold) & (every["texture"] >= texture)]
    result = {
        "benchmark": "near_duplicates", "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "settings": {**vars(args), "min_matches": threshold, "min_texture": texture},
        "fixture_seconds": round(built, 2), "detector_seconds_including_decode": round(seconds, 2),
        **score(table, pairs),
        "match_spread_of_verified_candidates": _spread(table, every),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _spread(table: pd.DataFrame, pairs: pd.DataFrame) -> dict:
    """Quantiles of matches and texture agreement for true and for false candidate pairs: the margins around the
    thresholds (true pairs: the low end; false pairs: the high end)."""
    source = dict(zip(table["image_id"], table["source"]))
    same = np.array([source[a] == source[b] for a, b in zip(pairs["image_id_a"], pairs["image_id_b"])], bool)
    out = {}
    for column in ("matches", "texture"):
        true, false = pairs.loc[same, column].dropna(), pairs.loc[~same, column].dropna()
        out[column] = {
            "true": {f"q{q:g}": round(float(true.quantile(q)), 3) for q in (0.0, 0.01, 0.05, 0.5)} if len(true) else {},
            "false": {f"q{q:g}": round(float(false.quantile(q)), 3) for q in (1.0, 0.99, 0.95, 0.5)} if len(false) else {},
        }
    return out


if __name__ == "__main__":
    main()
