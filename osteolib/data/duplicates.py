"""Find copies of one radiograph in a folder: pre-augmented files (flipped, rotated, shifted, cropped,
re-exposed, recompressed) and the same picture under two names.

A copy in train and another in test inflates the test score, and a perceptual hash (see
:func:`osteolib.data.splits.near_duplicates`) misses a copy as soon as it is flipped or rotated by a
few degrees. :func:`find_copies` works in two steps:

1. **Shortlist.** Every image becomes a small thumbnail whose pixel values are replaced by their
   ranks (any brightness, contrast or gamma change is a monotone map of the values, and ranks do not
   see a monotone map). A blurred 16 px disc of it is compared with the 4 flips x 7 rotations
   (-15 deg to +15 deg) of every other image in one matrix product; each image keeps its
   ``neighbours`` most similar images, with the flip and rotation that fitted best.
2. **Verification.** Each shortlisted pair is aligned at 64 px: the flip from the shortlist, rotations
   around its angle, the shift by phase correlation. The score is the correlation of the two
   rank images over the part of the central disc that both cover. A well-aligned copy scores near 1;
   different radiographs score lower, by how much depends on how alike they look (below), because noise,
   film grain and fine bone texture differ. Pairs at or above ``threshold`` are reported.

Measured limit (bench/near_duplicates.py): on synthetic shoulders, whose distinct patients are one
anatomy template under slightly different poses, the 64 px low-pass score does not separate copies
from look-alike patients well enough (see the report in bench/results/near_duplicates.json); a finer
verification (higher resolution, scale/anisotropic search, sub-pixel alignment) is the next step.
On the smoke profile's data (``load_dataset("synthetic_shoulder", n_patients=160, difficulty=0.2, size=64,
seed=0)``, no copies at all) this version reports 521 pairs, every one between different patients (scores up
to 0.992): it must NOT gate a default run until that count is 0. Tried and measured (not adopted yet): a
shortlist on the whitened low-frequency log-magnitude FFT (64 px, |k| <= 16, 2 flips x 13 rotations) keeps
76 % of true pairs among 30 neighbours (this one: 22 %); a verification by patch-wise affine alignment at
128 px and high-pass residual correlation did not separate either (copies median 0.47-0.79, distinct
look-alikes 0.20-0.49 median and up to 0.46-0.79 max, for high-pass sigma 0.6-2 px): the synthetic patients'
sharp anatomical edges, not only their noise, survive the high-pass.

Images come either from the files (decoded once each with :func:`osteolib.data.io.read_xray`) or,
better in the audit notebook, from the preprocessing cache's arrays, which are decoded already.
The detector does not need the split: run it before :func:`osteolib.data.splits.patient_split`
so that copies can be grouped into one patient (see :func:`osteolib.data.splits.group_copies`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

THUMB = 64          # verification size (px): fine enough for the noise and texture that tell radiographs apart
SHORT = 16          # shortlist descriptor size (px): coarse, so shifts and small misalignments barely matter
FLIPS = ("none", "h", "v", "hv")  # "hv" is a 180 deg rotation; together they cover every flip a lab applies
SHORTLIST_ANGLES = (-15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0)
REFINE_STEPS = (-2.5, 0.0, 2.5)  # around the shortlist's angle (its grid step is 5 deg)
MAX_SHIFT = 0.2     # largest shift searched, as a share of the side (10 % shift plus crop offsets)
MIN_OVERLAP = 0.5   # a score needs at least this share of the central disc covered by both images
DEFAULT_THRESHOLD = 0.95
DEFAULT_NEIGHBOURS = 8
PAIR_COLUMNS = ["image_id_a", "image_id_b", "score", "transform", "flip", "rotation_deg", "shift_x", "shift_y",
                "split_a", "split_b", "patient_a", "patient_b"]


# ------------------------------------------------------------------------------------------------ inputs

def load_thumbnails(paths: Sequence[str], size: int = THUMB) -> np.ndarray:
    """Decode each file once (:func:`read_xray`) and resize it to size x size: a (N, size, size) float32 array."""
    from osteolib.data.io import read_xray

    out = np.zeros((len(paths), size, size), dtype=np.float32)
    for row, path in enumerate(paths):
        out[row] = _resize(read_xray(path).pixels, size)
    return out


def _resize(pixels: np.ndarray, size: int) -> np.ndarray:
    # Pillow's bilinear filter anti-aliases when shrinking, so film grain averages out instead of aliasing.
    image = Image.fromarray(np.asarray(pixels, dtype=np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _disc(size: int, margin: float = 0.0) -> np.ndarray:
    """The inscribed disc: a rotation's empty corners never reach it."""
    centre = (size - 1) / 2
    y, x = np.mgrid[:size, :size]
    return (np.hypot(y - centre, x - centre) <= size / 2 - margin).astype(np.float32)


def normalise(images: np.ndarray) -> np.ndarray:
    """Rank images: each pixel's rank within its image, blurred a little, zero mean and unit variance on the disc.

    Ranks make every monotone intensity change (brightness, contrast, gamma, a different film curve)
    vanish; the blur (1 px) absorbs JPEG blocking and resampling differences.
    """
    n = len(images)
    thumbs = np.stack([_resize(image, THUMB) if image.shape != (THUMB, THUMB) else np.asarray(image, np.float32)
                       for image in images]) if n else np.zeros((0, THUMB, THUMB), np.float32)
    flat = thumbs.reshape(n, -1)
    ranks = flat.argsort(axis=1).argsort(axis=1).astype(np.float32) / max(flat.shape[1] - 1, 1)
    ranks = ndimage.gaussian_filter(ranks.reshape(n, THUMB, THUMB), sigma=(0, 1.0, 1.0))
    disc = _disc(THUMB)
    inside = disc.astype(bool)
    mean = ranks[:, inside].mean(axis=1)[:, None, None]
    std = ranks[:, inside].std(axis=1)[:, None, None] + 1e-6
    return ((ranks - mean) / std).astype(np.float32)


# ------------------------------------------------------------------------------------------------ transforms

def flip(images: np.ndarray, how: str) -> np.ndarray:
    """Flip the last two axes: "none", "h" (left-right), "v" (up-down) or "hv" (both)."""
    if how == "h":
        return images[..., ::-1]
    if how == "v":
        return images[..., ::-1, :]
    if how == "hv":
        return images[..., ::-1, ::-1]
    return images


def rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate a stack (N, S, S) about each image's centre by ``degrees``, bilinear, zero outside the frame.

    One gather for the whole stack: scipy's affine_transform on a 3-D stack interpolates along the
    stack axis too (8 neighbours instead of 4) and was the detector's slowest step.
    """
    images = np.asarray(images, dtype=np.float32)
    if degrees == 0:
        return np.ascontiguousarray(images)
    size = images.shape[-1]
    t = np.deg2rad(degrees)
    centre = (size - 1) / 2
    y, x = np.mgrid[:size, :size].astype(np.float32) - centre
    src_y = np.cos(t) * y + np.sin(t) * x + centre  # where each output pixel reads from
    src_x = -np.sin(t) * y + np.cos(t) * x + centre
    y0, x0 = np.floor(src_y).astype(int), np.floor(src_x).astype(int)
    fy, fx = (src_y - y0).astype(np.float32), (src_x - x0).astype(np.float32)
    out = np.zeros(images.shape[:-2] + (size, size), np.float32)
    for dy, dx, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yy, xx = y0 + dy, x0 + dx
        inside = (yy >= 0) & (yy < size) & (xx >= 0) & (xx < size)
        out += images[..., np.clip(yy, 0, size - 1), np.clip(xx, 0, size - 1)] * (weight * inside)
    return out


# ------------------------------------------------------------------------------------------------ shortlist

def _descriptors(thumbs: np.ndarray, how: str, degrees: float) -> np.ndarray:
    """Unit vectors of the blurred SHORT px disc of each image after ``flip(how)`` then ``rotate(degrees)``."""
    n = len(thumbs)
    half = thumbs.reshape(n, THUMB // 2, 2, THUMB // 2, 2).mean(axis=(2, 4))  # rotate at 32 px: 4x cheaper
    turned = rotate(flip(half, how), degrees)
    factor = turned.shape[-1] // SHORT
    small = turned.reshape(n, SHORT, factor, SHORT, factor).mean(axis=(2, 4))
    small = ndimage.gaussian_filter(small, sigma=(0, 1.0, 1.0))  # a shift of a pixel or two hardly changes it
    disc = _disc(SHORT).astype(bool)
    vectors = small[:, disc]
    vectors = vectors - vectors.mean(axis=1, keepdims=True)
    return (vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-6)).astype(np.float32)


def shortlist(thumbs: np.ndarray, neighbours: int = DEFAULT_NEIGHBOURS) -> pd.DataFrame:
    """Each image's ``neighbours`` most similar others over 4 flips x 7 rotations: columns a, b, flip, angle, similarity.

    ``b`` flipped by ``flip`` and then rotated by ``angle`` looks most like ``a``. An unordered pair found from
    both sides is kept once (the more similar direction).
    """
    n = len(thumbs)
    k = min(neighbours, n - 1)
    if k <= 0:
        return pd.DataFrame(columns=["a", "b", "flip", "angle", "similarity"])
    variants = [(how, angle) for how in FLIPS for angle in SHORTLIST_ANGLES]
    reference = _descriptors(thumbs, "none", 0.0)
    stacked = np.concatenate([_descriptors(thumbs, how, angle) for how, angle in variants])  # (V*N, D)
    rows: list[tuple[int, int, int, float]] = []
    block = max(1, 4_000_000 // max(len(stacked), 1))  # keeps each similarity block near 16 MB
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = (reference[start:stop] @ stacked.T).reshape(stop - start, len(variants), n)
        best_variant = sims.argmax(axis=1)
        best = sims.max(axis=1)
        best[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # never an image with itself
        nearest = np.argpartition(-best, k - 1, axis=1)[:, :k]
        for offset, row in enumerate(nearest):
            for b in row:
                rows.append((start + offset, int(b), int(best_variant[offset, b]), float(best[offset, b])))
    table = pd.DataFrame(rows, columns=["a", "b", "variant", "similarity"])
    table["key"] = [(min(a, b), max(a, b)) for a, b in zip(table["a"], table["b"])]
    table = table.sort_values("similarity", ascending=False).drop_duplicates("key").sort_values(["a", "b"])
    table["flip"] = [variants[v][0] for v in table["variant"]]
    table["angle"] = [variants[v][1] for v in table["variant"]]
    return table[["a", "b", "flip", "angle", "similarity"]].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ verification

def _padded_fft(images: np.ndarray, pad: int) -> np.ndarray:
    return np.fft.rfft2(images, s=(pad, pad))


def _aligned_scores(a: np.ndarray, b: np.ndarray, b_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For stacks of reference ``a`` and moving ``b`` (already flipped and rotated): the correlation on the
    shared part of the disc after the phase-correlation shift, and that shift (dy, dx) per pair.

    ``b_valid`` (S, S) marks where ``b`` holds picture rather than rotation fill.
    """
    n, size = len(a), a.shape[-1]
    reach = int(round(MAX_SHIFT * size))
    pad = size + reach + (-(size + reach)) % 16  # linear, not circular, correlation for every searched shift
    disc = _disc(size)
    fa = _padded_fft(a * disc, pad)
    fb = _padded_fft(b * b_valid, pad)
    cross = fa * np.conj(fb)
    surface = np.fft.irfft2(cross / (np.abs(cross) + 1e-3 * np.abs(cross).mean()), s=(pad, pad))
    lags = np.r_[0:reach + 1, pad - reach:pad]  # shifts 0..reach and -reach..-1 in FFT order
    window = surface[:, lags][:, :, lags].reshape(n, -1)
    peak = window.argmax(axis=1)
    dy = lags[peak // len(lags)]
    dx = lags[peak % len(lags)]
    dy = np.where(dy > reach, dy - pad, dy)
    dx = np.where(dx > reach, dx - pad, dx)
    # b moved by (dy, dx): b_s(y, x) = b(y - dy, x - dx); outside b's frame is padding (invalid).
    grid = np.arange(size)
    ys = (grid[None, :] - dy[:, None]) % pad
    xs = (grid[None, :] - dx[:, None]) % pad
    b_pad = np.zeros((n, pad, pad), np.float32)
    b_pad[:, :size, :size] = b
    v_pad = np.zeros((pad, pad), np.float32)
    v_pad[:size, :size] = b_valid
    index = np.arange(n)[:, None, None]
    moved = b_pad[index, ys[:, :, None], xs[:, None, :]]
    mask = v_pad[ys[:, :, None], xs[:, None, :]] * disc
    return _masked_correlation(a, moved, mask, disc.sum()), np.stack([dy, dx], axis=1)


def _masked_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray, disc_area: float) -> np.ndarray:
    """Pearson correlation of a and b over mask, per image; -1 where the overlap is too small to judge."""
    weight = mask.reshape(len(a), -1)
    count = weight.sum(axis=1)
    a_flat, b_flat = a.reshape(len(a), -1), b.reshape(len(b), -1)
    mean_a = (a_flat * weight).sum(axis=1) / np.maximum(count, 1)
    mean_b = (b_flat * weight).sum(axis=1) / np.maximum(count, 1)
    da, db = (a_flat - mean_a[:, None]) * weight, (b_flat - mean_b[:, None]) * weight
    score = (da * db).sum(axis=1) / np.sqrt((da * da).sum(axis=1) * (db * db).sum(axis=1) + 1e-9)
    return np.where(count >= MIN_OVERLAP * disc_area, score, -1.0)


def verify(thumbs: np.ndarray, candidates: pd.DataFrame, batch: int = 256) -> pd.DataFrame:
    """Align each candidate pair (flip from the shortlist, rotations around its angle, phase-correlation shift)
    and score it; returns the candidates with score, rotation_deg, shift_y, shift_x at the best alignment."""
    out = candidates.copy()
    out["score"], out["rotation_deg"], out["shift_y"], out["shift_x"] = -1.0, 0.0, 0, 0
    ones = np.ones((1, THUMB, THUMB), np.float32)
    for (how, angle), group in candidates.groupby(["flip", "angle"]):
        for start in range(0, len(group), batch):
            part = group.iloc[start:start + batch]
            a = thumbs[part["a"].to_numpy()]
            b = np.ascontiguousarray(flip(thumbs[part["b"].to_numpy()], how))
            for step in REFINE_STEPS:
                degrees = float(angle + step)
                valid = (rotate(ones, degrees)[0] > 0.999).astype(np.float32)
                score, shift = _aligned_scores(a, rotate(b, degrees), valid)
                better = score > out.loc[part.index, "score"].to_numpy()
                chosen = part.index[better]
                out.loc[chosen, "score"] = score[better]
                out.loc[chosen, "rotation_deg"] = degrees
                out.loc[chosen, "shift_y"] = shift[better, 0]
                out.loc[chosen, "shift_x"] = shift[better, 1]
    return out


# ------------------------------------------------------------------------------------------------ the detector

def find_copies(manifest: pd.DataFrame, images: np.ndarray | Sequence[np.ndarray] | None = None,
                threshold: float = DEFAULT_THRESHOLD, neighbours: int = DEFAULT_NEIGHBOURS) -> pd.DataFrame:
    """Pairs of images that are copies of one radiograph, whatever flip, rotation (up to 15 deg), shift, crop,
    intensity change or recompression lies between them (see the benchmark for how well).

    ``images``: one array per manifest row, in row order (e.g. the preprocessing cache's arrays, which saves
    decoding every file again); None reads the files of ``manifest["path"]``. ``threshold``: the lowest
    aligned correlation reported. On synthetic shoulders (bench/near_duplicates.py) copies score
    0.45-0.99 and different look-alike patients up to 0.98, so this threshold trades recall for few false pairs;
    a real data set should check the reported pairs by eye. ``neighbours``: candidates verified per image; raise it when
    one radiograph has more than about ``neighbours - 2`` copies.

    Returns one row per pair (columns :data:`PAIR_COLUMNS`), best score first: ``transform`` says how image b
    was flipped, rotated and shifted (in 64 px thumbnail pixels) to lie on image a.
    """
    table = manifest.reset_index(drop=True)
    if images is None:
        images = load_thumbnails(table["path"].astype(str).tolist())
    if len(images) != len(table):
        raise ValueError(f"images holds {len(images)} arrays for a manifest of {len(table)} rows; "
                         "pass one array per manifest row, in row order (e.g. cache.images[rows])")
    thumbs = normalise(np.asarray([_resize(image, THUMB) if np.shape(image) != (THUMB, THUMB)
                                   else np.asarray(image, np.float32) for image in images]).reshape(-1, THUMB, THUMB))
    candidates = shortlist(thumbs, neighbours)
    checked = verify(thumbs, candidates) if len(candidates) else candidates.assign(
        score=[], rotation_deg=[], shift_y=[], shift_x=[])
    found = checked[checked["score"] >= threshold]
    return _pair_table(table, found)


def _pair_table(table: pd.DataFrame, found: pd.DataFrame) -> pd.DataFrame:
    a, b = found["a"].to_numpy(dtype=int), found["b"].to_numpy(dtype=int)
    split = table["split"].astype(str) if "split" in table.columns else pd.Series("", index=table.index)
    out = pd.DataFrame({
        "image_id_a": table["image_id"].to_numpy()[a],
        "image_id_b": table["image_id"].to_numpy()[b],
        "score": found["score"].to_numpy(dtype=float).round(4),
        "transform": [describe(h, r, x, y) for h, r, x, y in
                      zip(found["flip"], found["rotation_deg"], found["shift_x"], found["shift_y"])],
        "flip": found["flip"].to_numpy(dtype=object),
        "rotation_deg": found["rotation_deg"].to_numpy(dtype=float),
        "shift_x": found["shift_x"].to_numpy(dtype=int),
        "shift_y": found["shift_y"].to_numpy(dtype=int),
        "split_a": split.to_numpy()[a],
        "split_b": split.to_numpy()[b],
        "patient_a": table["patient_id"].astype(str).to_numpy()[a],
        "patient_b": table["patient_id"].astype(str).to_numpy()[b],
    }, columns=PAIR_COLUMNS)
    return out.sort_values(["score", "image_id_a", "image_id_b"], ascending=[False, True, True]).reset_index(drop=True)


def describe(how: str, degrees: float, shift_x: int, shift_y: int) -> str:
    """A readable transform, e.g. "flip h, rotate +6 deg, shift (+3, -2) px"."""
    parts = [] if how == "none" else [f"flip {how}"]
    if degrees:
        parts.append(f"rotate {degrees:+.0f} deg")
    if shift_x or shift_y:
        parts.append(f"shift ({int(shift_x):+d}, {int(shift_y):+d}) px")
    return ", ".join(parts) or "identical alignment"
