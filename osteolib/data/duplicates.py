"""Find copies of one radiograph in a folder: pre-augmented files (flipped, rotated, shifted, cropped,
re-exposed, recompressed) and the same picture under two names.

A copy in train and another in test inflates the test score, and a perceptual hash (see
:func:`osteolib.data.splits.near_duplicates`) misses a copy as soon as it is flipped or rotated by a few
degrees. Two radiographs of different patients may look alike as a whole (one anatomy, one pose), but their
fine structure (trabeculae, film grain, noise) differs point by point. :func:`find_copies` therefore asks
whether many small local patterns of one image reappear in the other *in one rigid arrangement*:

1. **Keypoints.** Each image, its longer side reduced to :data:`DETECT_SIZE` (never enlarged) and its grey
   levels stretched between the 0.5th and 99.5th percentiles, gets SIFT keypoints and descriptors (OpenCV),
   once as it is and once mirrored left-right. SIFT descriptors are normalised gradient histograms: brightness,
   contrast and gamma changes and JPEG recompression barely move them, and each keypoint carries its own
   orientation, so rotations do not either. A mirror is the one change SIFT does not absorb, hence the second,
   mirrored set (an up-down flip is a left-right mirror plus a half turn).
2. **Matches that stand out from the crowd** (:func:`distinctive_matches`): one approximate nearest-neighbour
   index (FLANN) over every image's descriptors; a descriptor matches its nearest one in image b only when that is
   clearly nearer than its nearest one in the :data:`CROWD`-th nearest other image, so patterns every radiograph
   of one anatomy shares do not count.
3. **One rigid arrangement** (:func:`fit_similarity`): a similarity transform (rotation, scale, shift; a mirror
   when the mirrored set matched) fitted by RANSAC; ``matches`` is how many distinct keypoints it explains.
   Copies keep dozens; look-alikes a handful.
4. **The fine detail** (:func:`texture_agreement`): image b laid onto a by that transform (refitted as an affine
   map, since a crop resized back stretches one axis more), the correlation of the finest detail (film grain,
   trabeculae) in every 16 px square both cover; ``texture`` is its lower quartile. Look-alikes in one pose line
   up along their bone edges in a few squares; only a copy agrees in most of them.

A pair is reported when ``matches >= min_matches`` and ``texture >= min_texture``. Measured (bench/, CPU
"Intel(R) Xeon(R) Processor", 2 cores): on 150 synthetic shoulders with 3 augmented copies each (flips,
rotations to 15 deg, shifts and crops to 10 %, brightness/contrast/gamma, JPEG 60-95) at 256 px, pair recall
99.6 %, every copy tied to its original, no false pair among 178,800 distinct-source comparisons; at 128 px,
pair recall 93.6 %, copies tied 99.1 %, 1 false pair (2 of 600 images); on 600 real NIH radiographs of 456
patients no pair between two patients (at most 6 matches, texture at most 0.11). Below about 128 px the fine
detail is gone and copies are missed rather than invented (the smoke profile's 64 px look-alikes reach 9 matches,
under the threshold). These figures were measured with ``min_texture`` 0.2, since raised to 0.25 (see
:data:`DEFAULT_MIN_TEXTURE`). FLANN's trees and RANSAC are seeded: one manifest always gives the same pairs on one
machine; SIFT's keypoints can differ slightly between CPUs.

The detector does not need the split: run it before :func:`osteolib.data.splits.patient_split` so that copies
can be grouped into one patient (see :func:`osteolib.data.splits.group_copies`).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np
import pandas as pd

from osteolib.utils import usable_cores

DETECT_SIZE = 256       # longer side (px) the detector looks at: fine texture survives, SIFT stays fast
FEATURES = 300          # keypoints kept per image (the strongest)
CONTRAST = 0.005        # SIFT's contrast threshold; OpenCV's 0.04 finds almost nothing in a soft radiograph
RATIO = 0.8             # a match must be this much nearer than the crowd's (Lowe's ratio test, against the crowd)
REPROJECTION_PX = 3.0   # at DETECT_SIZE (scaled down for smaller images): a match agrees with the transform
LOOKUP_K = 16           # nearest descriptors looked up per descriptor (enough to reach CROWD other images)
CROWD = 6               # the match must beat the nearest descriptor of the CROWD-th nearest other image
MAX_ROTATION_DEG = 30.0  # after any flip: augmentation scripts rotate by a few degrees (the issue: up to 15)
SCALE_RANGE = (0.75, 1.33)  # crops of up to ~25 % resized back, or the other way round
DEFAULT_MIN_MATCHES = 12  # look-alikes of the synthetic template reach 9 at 64 px, where grain is gone
DETAIL_SIGMA = 0.6      # px at the detector image: the grain and trabecular scale that tells radiographs apart
PATCH = 16              # px: the squares whose fine detail is compared one by one
# copies: 1st percentile 0.34; look-alike candidates: 99th percentile 0.09 (bench). 0.25, not 0.2: SIFT's keypoints
# depend on the CPU's vector unit, and on an AMD EPYC (AVX-512) one look-alike pair of the bench's 256-px fixture
# reached texture 0.207 with 21 matches (its copies' lowest: 0.344)
DEFAULT_MIN_TEXTURE = 0.25
DEFAULT_NEIGHBOURS = 12
SEED = 0
PAIR_COLUMNS = ["image_id_a", "image_id_b", "matches", "texture", "transform", "flip", "rotation_deg", "scale",
                "shift_x", "shift_y", "split_a", "split_b", "patient_a", "patient_b"]


@dataclass
class Keypoints:
    """One image's keypoint positions (x, y at DETECT_SIZE scale) and SIFT descriptors, as is and mirrored.

    The mirrored set's positions are given in the *unmirrored* image's frame with x negated, so that a
    transform fitted on them is a proper similarity whose reflection is the mirror itself."""
    points: np.ndarray
    descriptors: np.ndarray
    mirrored_points: np.ndarray
    mirrored_descriptors: np.ndarray
    image: np.ndarray  # the detector image (uint8), for the texture check

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape[:2]


# ------------------------------------------------------------------------------------------------ keypoints

def to_detector_image(pixels: np.ndarray) -> np.ndarray:
    """uint8 image whose longer side is at most DETECT_SIZE, grey levels stretched between the 0.5th and 99.5th
    percentiles (8-bit, 16-bit and float inputs all end up alike)."""
    array = np.asarray(pixels, dtype=np.float32)
    if array.ndim == 3:
        array = array.mean(axis=2)
    low, high = np.percentile(array, [0.5, 99.5])
    array = np.clip((array - low) / max(float(high - low), 1e-6), 0, 1) * 255
    height, width = array.shape
    factor = DETECT_SIZE / max(height, width)
    if factor >= 1:  # never enlarged: an enlarged small image has smooth anatomy only, which look-alikes share
        return array.round().astype(np.uint8)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(array, size, interpolation=cv2.INTER_AREA).round().astype(np.uint8)  # area: no aliasing


def keypoints(image: np.ndarray, sift: cv2.SIFT | None = None) -> Keypoints:
    """SIFT keypoints of a detector image (:func:`to_detector_image`), as is and mirrored left-right."""
    sift = sift or cv2.SIFT_create(nfeatures=FEATURES, contrastThreshold=CONTRAST)
    found = []
    for mirror in (False, True):
        view = np.ascontiguousarray(image[:, ::-1]) if mirror else image
        points, descriptors = sift.detectAndCompute(view, None)
        xy = np.array([p.pt for p in points], np.float32).reshape(-1, 2)
        if mirror:  # back to the unmirrored frame, x negated: the mirror becomes part of the transform
            xy[:, 0] = xy[:, 0] - (image.shape[1] - 1)
        found += [xy, descriptors if descriptors is not None else np.zeros((0, 128), np.float32)]
    return Keypoints(*found, image=image)


def image_keypoints(images: Sequence[np.ndarray] | None, paths: Sequence[str] | None = None,
                    progress: Callable | None = None) -> list[Keypoints]:
    """Keypoints of each image (arrays, or files decoded with :func:`osteolib.data.io.read_xray`)."""
    from osteolib.data.io import read_xray

    count = len(images) if images is not None else len(paths)

    def keypoints_of(row: int) -> Keypoints:
        pixels = images[row] if images is not None else read_xray(paths[row]).pixels
        return keypoints(to_detector_image(pixels))  # a SIFT of its own per call: one per thread

    # decoding and SIFT release the GIL: one thread per usable core, in row order; the progress bar counts rows
    # as their results arrive (and keeps its total)
    rows = range(count)
    with ThreadPoolExecutor(usable_threads()) as pool:
        found = pool.map(keypoints_of, rows)
        return [next(found) for _ in (progress(rows) if progress else rows)]


def usable_threads() -> int:
    """One thread per core this process may use (a --jobs cell is pinned to its share), at most 4."""
    return max(1, min(4, usable_cores()))


# ------------------------------------------------------------------------------------------------ matching

def distinctive_matches(found: Sequence[Keypoints], neighbours: int = DEFAULT_NEIGHBOURS) -> pd.DataFrame:
    """Keypoint matches between images that stand out from the crowd: columns a, b, mirrored, query, train.

    All descriptors go into one approximate nearest-neighbour index (FLANN k-d trees). A descriptor of image a
    (as is, or mirrored) matches its nearest descriptor in image b only when that is clearly nearer
    (:data:`RATIO`) than its nearest descriptor in the :data:`CROWD`-th nearest other image. Radiographs of one
    anatomy share many patterns that are about equally near in every other image and so never match;
    a copy's patterns are far nearer in the copy than in anyone else. Comparing with the CROWD-th image
    rather than the second lets a radiograph have up to CROWD - 1 copies. Per image (and mirror) only the
    ``neighbours`` images with most matches are kept.
    """
    sizes = [len(k.descriptors) for k in found]
    owners = np.repeat(np.arange(len(found)), sizes)
    if len(found) < 2 or len(owners) == 0:
        return pd.DataFrame(columns=["a", "b", "mirrored", "query", "train"])
    cv2.setRNGSeed(SEED)  # FLANN's randomised trees: the same matches on every run
    index = cv2.flann_Index(np.concatenate([k.descriptors for k in found]).astype(np.float32),
                            {"algorithm": 1, "trees": 4})
    k = min(LOOKUP_K, len(owners))

    def lookup(descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The k nearest descriptors of each (rows of indices, L2 distances), or None for an image without any."""
        if len(descriptors) == 0:
            return None
        nearest, squared = index.knnSearch(descriptors.astype(np.float32), k, params={"checks": 64})
        return nearest, np.sqrt(squared)  # FLANN's L2 is squared

    # the searches release the GIL: one thread per usable core (the index is only read)
    with ThreadPoolExecutor(usable_threads()) as pool:
        looked_up = list(pool.map(lambda item: (lookup(item.descriptors), lookup(item.mirrored_descriptors)), found))
    before = np.triu(np.ones((k, k), bool), 1)  # before[i, j]: look-up i comes before j
    frames = []
    for a, results in enumerate(looked_up):
        for mirrored, result in zip((False, True), results):
            if result is None:
                continue
            nearest, distance = result
            owner = owners[nearest]
            # each other image's nearest descriptor, in distance order: not this image, not an owner seen before
            first = (owner != a) & ~((owner[:, :, None] == owner[:, None, :]) & before).any(axis=1)
            rank = np.cumsum(first, axis=1) - 1
            at_crowd = first & (rank == CROWD - 1)
            # fewer than CROWD other images within reach: the farthest descriptor looked up stands in
            crowd = np.where(at_crowd.any(axis=1), (distance * at_crowd).sum(axis=1), distance[:, -1])
            query, position = np.nonzero(first & (rank < CROWD - 1) & (distance < RATIO * crowd[:, None]))
            if len(query):
                table = pd.DataFrame({"b": owner[query, position], "query": query,
                                      "train": nearest[query, position].astype(np.int64)})
                kept = table["b"].value_counts().index[:neighbours]
                frames.append(table[table["b"].isin(kept)].assign(a=a, mirrored=mirrored))
    if not frames:
        return pd.DataFrame(columns=["a", "b", "mirrored", "query", "train"])
    matches = pd.concat(frames, ignore_index=True)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    matches["train"] = matches["train"].to_numpy() - offsets[matches["b"].to_numpy()]  # index within image b
    return matches[["a", "b", "mirrored", "query", "train"]]


# ------------------------------------------------------------------------------------------------ verification

def fit_similarity(source: np.ndarray, target: np.ndarray, mirrored: bool, tolerance: float = REPROJECTION_PX
                   ) -> tuple[int, np.ndarray | None]:
    """The similarity transform (RANSAC) that explains most matched positions, and how many distinct source
    positions it explains (SIFT puts two keypoints on one spot when it sees two orientations there; they
    count once). ``mirrored``: the source positions are in the mirrored frame (x negated), undone in the
    returned 2x3; ``tolerance``: the largest distance (px) at which a match agrees. A transform no augmentation
    makes (rotation beyond :data:`MAX_ROTATION_DEG`, scale outside :data:`SCALE_RANGE`) counts as no fit.

    The returned 2x3 is refitted as a full affine map on the agreeing matches: a crop resized back to the
    original size stretches one axis more than the other, which a similarity cannot follow.
    """
    if len(source) < 3:
        return 0, None
    transform, inliers = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC,
                                                     ransacReprojThreshold=tolerance, maxIters=2000,
                                                     confidence=0.995)
    if transform is None:
        return 0, None
    agree = inliers.ravel().astype(bool)
    if agree.sum() >= 6:
        refined, _ = cv2.estimateAffine2D(source[agree], target[agree], method=cv2.LMEDS)
        transform = refined if refined is not None else transform
    if mirrored:  # x' = -x
        transform = transform @ np.diag([-1.0, 1.0, 1.0])
    _, degrees, scale = decompose(transform)
    if abs(degrees) > MAX_ROTATION_DEG or not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        return 0, None
    return len(np.unique(source[agree].round(1), axis=0)), transform


def fine_detail(image: np.ndarray) -> np.ndarray:
    """The finest structure of an image (film grain, trabeculae): a difference of Gaussians."""
    image = np.asarray(image, np.float32)
    return cv2.GaussianBlur(image, (0, 0), DETAIL_SIGMA) - cv2.GaussianBlur(image, (0, 0), 3 * DETAIL_SIGMA)


def texture_agreement(image_a: np.ndarray, image_b: np.ndarray, transform: np.ndarray) -> float:
    """How well the fine detail of b, laid onto a by ``transform`` (a -> b), agrees with a's, patch by patch.

    The correlation of :func:`fine_detail` in every :data:`PATCH` px square that lies inside both images; the
    result is their lower quartile. Two radiographs of one anatomy in one pose line up along their bone edges,
    which lifts a few patches; only a copy agrees in most of them, down to the grain. NaN when fewer than 4
    patches overlap.
    """
    height, width = image_a.shape[:2]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    laid = cv2.warpAffine(np.asarray(image_b, np.float32), transform, (width, height), flags=flags)
    inside = cv2.warpAffine(np.ones(image_b.shape[:2], np.float32), transform, (width, height), flags=flags) > 0.999
    rows, cols = height // PATCH, width // PATCH
    if rows * cols == 0:
        return float("nan")

    def patches(x: np.ndarray) -> np.ndarray:
        return x[:rows * PATCH, :cols * PATCH].reshape(rows, PATCH, cols, PATCH).swapaxes(1, 2).reshape(rows * cols, -1)

    # the blur reaches ~3 sigma into the rotation's empty corners: shrink the valid area by that much
    inside = cv2.erode(inside.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    x, y = patches(fine_detail(image_a)), patches(fine_detail(laid))
    keep = patches(inside).all(axis=1)
    x, y = x[keep] - x[keep].mean(axis=1, keepdims=True), y[keep] - y[keep].mean(axis=1, keepdims=True)
    energy = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    textured = energy > 1e-6
    if textured.sum() < 4:
        return float("nan")
    return float(np.quantile((x * y).sum(axis=1)[textured] / energy[textured], 0.25))


def verify(found: Sequence[Keypoints], matches: pd.DataFrame, min_matches: int = 1) -> pd.DataFrame:
    """The best verified alignment per unordered pair: columns a, b (a < b), matches, texture, transform (2x3,
    a -> b), shift_x, shift_y. ``texture`` (:func:`texture_agreement`) is measured for pairs with at least
    ``min_matches``; NaN for the others."""
    cv2.setRNGSeed(SEED)  # RANSAC's samples
    best: dict[tuple[int, int], tuple[int, np.ndarray | None]] = {}
    for (a, b, mirrored), group in matches.groupby(["a", "b", "mirrored"], sort=True):
        a, b = int(a), int(b)
        points = found[a].mirrored_points if mirrored else found[a].points
        tolerance = REPROJECTION_PX * max(found[b].shape) / DETECT_SIZE  # small images: a tighter tolerance
        count, transform = fit_similarity(points[group["query"].to_numpy()],
                                          found[b].points[group["train"].to_numpy()], bool(mirrored), tolerance)
        if a > b and transform is not None:  # every transform from the pair's first image to its second
            transform = cv2.invertAffineTransform(transform)
        key = (min(a, b), max(a, b))
        if key not in best or count > best[key][0]:
            best[key] = (count, transform)
    rows = []
    for (a, b), (count, transform) in sorted(best.items()):
        shift, texture = (np.nan, np.nan), np.nan
        if transform is not None:  # where a's centre lands, from b's centre: 0 for a flip or turn about the centre
            centre_a = (np.array(found[a].shape[::-1], float) - 1) / 2
            centre_b = (np.array(found[b].shape[::-1], float) - 1) / 2
            shift = transform[:, :2] @ centre_a + transform[:, 2] - centre_b
            if count >= min_matches:
                texture = texture_agreement(found[a].image, found[b].image, transform)
        rows.append((a, b, count, texture, transform, float(shift[0]), float(shift[1])))
    return pd.DataFrame(rows, columns=["a", "b", "matches", "texture", "transform", "shift_x", "shift_y"])


# ------------------------------------------------------------------------------------------------ the detector

def find_copies(manifest: pd.DataFrame, images: Sequence[np.ndarray] | None = None,
                min_matches: int = DEFAULT_MIN_MATCHES, min_texture: float = DEFAULT_MIN_TEXTURE,
                neighbours: int = DEFAULT_NEIGHBOURS, progress: Callable | None = None) -> pd.DataFrame:
    """Pairs of images that are copies of one radiograph, whatever flip, rotation, shift, crop, intensity
    change or recompression lies between them.

    ``images``: one array per manifest row, in row order; None decodes the files of ``manifest["path"]``
    (better: the preprocessing cache is too coarse for fine structure). ``min_matches``: the fewest keypoint
    matches one similarity transform must explain. ``neighbours``: candidates verified per image (and per
    mirror); raise it when one radiograph has more than about ``neighbours - 2`` copies. ``progress``: wraps
    the per-image loop (e.g. tqdm).

    Returns one row per pair (columns :data:`PAIR_COLUMNS`), most matches first: ``transform`` says how image
    a is flipped, rotated and scaled about its centre and shifted (in DETECT_SIZE pixels) to lie on image b.
    """
    table = manifest.reset_index(drop=True)
    if int(min_matches) < 1:
        raise ValueError(f"min_matches={min_matches}: a copy needs at least one match (the default is "
                         f"{DEFAULT_MIN_MATCHES}; fewer than about 8 lets look-alike radiographs through)")
    if images is not None and len(images) != len(table):
        raise ValueError(f"images holds {len(images)} arrays for a manifest of {len(table)} rows; "
                         "pass one array per manifest row, in row order")
    paths = None if images is not None else table["path"].astype(str).tolist()
    found = image_keypoints(images, paths, progress)
    checked = verify(found, distinctive_matches(found, neighbours), min_matches)
    copies = (checked["matches"] >= min_matches) & (checked["texture"] >= min_texture)
    return pair_table(table, checked[copies])


def pair_table(table: pd.DataFrame, found: pd.DataFrame) -> pd.DataFrame:
    """Verified pairs (row numbers a, b, matches, transform) as image ids, splits, patients and a readable
    transform."""
    a, b = found["a"].to_numpy(dtype=int), found["b"].to_numpy(dtype=int)
    split = table["split"].astype(str) if "split" in table.columns else pd.Series("", index=table.index)
    parts = [decompose(t) for t in found["transform"]]
    shift_x, shift_y = found["shift_x"].to_numpy(float).round(1), found["shift_y"].to_numpy(float).round(1)
    out = pd.DataFrame({
        "image_id_a": table["image_id"].astype(str).to_numpy()[a],
        "image_id_b": table["image_id"].astype(str).to_numpy()[b],
        "matches": found["matches"].to_numpy(dtype=int),
        "texture": found["texture"].to_numpy(dtype=float).round(3),
        "transform": [describe(*p, x, y) for p, x, y in zip(parts, shift_x, shift_y)],
        "flip": [p[0] for p in parts],
        "rotation_deg": [p[1] for p in parts],
        "scale": [p[2] for p in parts],
        "shift_x": shift_x,
        "shift_y": shift_y,
        "split_a": split.to_numpy()[a],
        "split_b": split.to_numpy()[b],
        "patient_a": table["patient_id"].astype(str).to_numpy()[a],
        "patient_b": table["patient_id"].astype(str).to_numpy()[b],
    }, columns=PAIR_COLUMNS)
    return out.sort_values(["matches", "image_id_a", "image_id_b"], ascending=[False, True, True]
                           ).reset_index(drop=True)


def decompose(transform: np.ndarray) -> tuple[str, float, float]:
    """The linear part of a 2x3 similarity (possibly with a mirror) as (flip, rotation in degrees within
    +-90, scale).

    A mirror is reported as a left-right flip ("h"), or an up-down flip ("v") when the rotation that goes
    with it is nearer a half turn; without a mirror, a half turn is reported as "hv" (both flips)."""
    linear = np.asarray(transform, dtype=float)[:, :2]
    mirrored = np.linalg.det(linear) < 0
    unmirrored = linear @ np.diag([-1.0, 1.0]) if mirrored else linear
    scale = float(np.sqrt(abs(np.linalg.det(unmirrored))))
    degrees = float(np.degrees(np.arctan2(unmirrored[1, 0], unmirrored[0, 0])))
    half_turn = abs(degrees) > 90
    if half_turn:
        degrees = degrees - 180 if degrees > 0 else degrees + 180
    how = ("v" if half_turn else "h") if mirrored else ("hv" if half_turn else "none")
    return how, round(degrees, 1), round(scale, 3)


def describe(how: str, degrees: float, scale: float, shift_x: float, shift_y: float) -> str:
    """A readable transform, e.g. "flip h, rotate +6 deg, scale 1.05, shift (+3, -2) px"."""
    parts = [] if how == "none" else [f"flip {how}"]
    if abs(degrees) >= 0.5:
        parts.append(f"rotate {degrees:+.0f} deg")
    if abs(scale - 1) >= 0.02:
        parts.append(f"scale {scale:.2f}")
    if abs(shift_x) >= 0.5 or abs(shift_y) >= 0.5:
        parts.append(f"shift ({shift_x:+.0f}, {shift_y:+.0f}) px")
    return ", ".join(parts) or "identical alignment"
