"""Synthetic X-rays: chest-like radiographs for pretraining, shoulder-like ones with a known truth.

A fresh clone has no real X-rays, so the default pipeline runs on data generated here, deterministically
from a seed, and written as PNG files plus a manifest CSV in the project's one manifest format.

Two families:

* **chest** (``synthetic-chest``): thorax outline, dark lung fields with vascular texture, curved ribs,
  spine, heart and aortic shadows, clavicles, diaphragm domes; varied pose, body habitus and exposure.
  Unlabelled (label ``"unlabelled"``): they only feed self-supervised pretraining.
* **shoulder** (``synthetic-shoulder``): AP and scapular-Y views of a shoulder with the proximal humerus
  (cortex and trabecular bone), glenoid, acromion, coracoid, clavicle, ribs, lung and soft tissue.
  "Osteoporosis" means a lower cortical thickness index (CTI) and sparser, lower-contrast trabeculae.
  The class signal lives only in the humerus; every target image gets that region as a ground-truth
  evidence mask and box, saved the way expert annotations are saved, so explanation maps can later be
  checked against a known truth.

How images are made: anatomy is a sum of attenuation line integrals (projected chords of ellipsoids,
tubes and plates, bones as hollow shells so cortices show as bright rims), seen through a pose
(rotation, scale, shift) and a mirror for the side; then photon (quantum) noise, detector blur, a film
characteristic curve with per-image exposure, and film grain. Everything but the humerus is drawn from
distributions that do not depend on the label, and no operation spreads the humerus further than the
detector blur, which the mask's margin covers.

Effect size: each patient has a latent bone quality ``q ~ N(mu_class, 1)``; the class means lie
``MAX_EFFECT * (1 - difficulty)`` apart (0 = obvious, 1 = no signal). CTI and trabecular density and
contrast follow ``q`` with a little independent noise, so what a model can see is about ``q``.

Confounder: a lead laterality marker (a bright "R"/"L" letter in a corner, never inside the evidence
mask). With strength ``c``, train and val images carry it with probability ``0.5 + 0.5 c t`` where
``t`` runs from -1 (first class) to +1 (last class); test images carry it with probability 0.5 whatever
the label, so a model that learned the marker is found out on the test split.

Determinism: patient (or chest image) ``k`` draws from its own child seed ``SeedSequence(seed,
spawn_key=(k,))``, so it is the same whatever the data set size. Labels are balanced in blocks of one
patient per class. The split (patient level, stratified by label) needs all patients, so it depends on
``n``; it changes an image only through the marker, and not at all when ``confounder == 0``.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import multiprocessing
import os
import secrets
import shutil
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import draw

from osteolib.data import manifest as manifest_module
from osteolib import paths

GENERATOR_VERSION = 1  # bump whenever the pictures change, so ensure_synthetic stops reusing old copies
CHEST_SOURCE = "synthetic-chest"
SHOULDER_SOURCE = "synthetic-shoulder"
DEFAULT_CLASSES: tuple[str, ...] = ("normal", "osteoporosis")
THREE_CLASSES: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")
DEFAULT_RATIOS: tuple[float, float, float] = (0.77, 0.11, 0.12)
UNLABELLED = "unlabelled"
EVIDENCE_LABEL = "evidence"
MIN_SIZE = 32
# Distance between the first and last class means of the latent bone quality (in its standard
# deviations) at difficulty 0; difficulty d scales it by (1 - d).
MAX_EFFECT = 4.0

# Linear attenuation per anatomy unit (one unit = the image width in the canonical frame).
_MU_SOFT = 3.0
_MU_BONE = 9.0


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------

def _as_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (
            isinstance(value, float) and value.is_integer()):
        raise ValueError(f"{name} must be a whole number >= {minimum}; got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def _as_unit(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]; got {value!r}")
    return number


def _as_ratios(value: Any) -> tuple[float, float, float]:
    try:
        ratios = tuple(float(r) for r in value)
    except (TypeError, ValueError):
        raise ValueError(f"ratios must be three numbers (train, val, test) summing to 1; got {value!r}") from None
    if len(ratios) != 3 or any(not np.isfinite(r) or r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6 \
            or ratios[0] <= 0:
        raise ValueError(f"ratios must be three non-negative numbers (train, val, test) summing to 1 with train > 0; "
                         f"got {value!r}")
    return ratios  # type: ignore[return-value]


def _as_classes(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ValueError(f"classes must be a sequence of class names ordered from healthy to most severe, "
                         f"e.g. {DEFAULT_CLASSES}; got the single string {value!r}")
    classes = tuple(str(c) for c in value)
    if len(classes) < 2 or len(set(classes)) != len(classes) or any(not c.strip() for c in classes):
        raise ValueError(f"classes must be at least two distinct non-empty names ordered from healthy to most "
                         f"severe, e.g. {DEFAULT_CLASSES} or {THREE_CLASSES}; got {value!r}")
    return classes


@dataclass(frozen=True)
class ChestSettings:
    """Everything that determines a synthetic chest data set (validated on construction)."""

    n_images: int = 600
    seed: int = 0
    size: int = 256
    ratios: tuple[float, float, float] = DEFAULT_RATIOS

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_images", _as_int("n_images", self.n_images, 1))
        object.__setattr__(self, "seed", _as_int("seed", self.seed, 0))
        object.__setattr__(self, "size", _as_int("size", self.size, MIN_SIZE))
        object.__setattr__(self, "ratios", _as_ratios(self.ratios))


@dataclass(frozen=True)
class ShoulderSettings:
    """Everything that determines a synthetic shoulder data set (validated on construction)."""

    n_patients: int = 270
    seed: int = 0
    size: int = 256
    difficulty: float = 0.5
    confounder: float = 0.0
    classes: tuple[str, ...] = DEFAULT_CLASSES
    ratios: tuple[float, float, float] = DEFAULT_RATIOS

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", _as_int("seed", self.seed, 0))
        object.__setattr__(self, "size", _as_int("size", self.size, MIN_SIZE))
        object.__setattr__(self, "difficulty", _as_unit("difficulty", self.difficulty))
        object.__setattr__(self, "confounder", _as_unit("confounder", self.confounder))
        object.__setattr__(self, "classes", _as_classes(self.classes))
        object.__setattr__(self, "ratios", _as_ratios(self.ratios))
        n_classes = len(self.classes)
        object.__setattr__(self, "n_patients", _as_int(f"n_patients (at least one per class, {n_classes})",
                                                        self.n_patients, n_classes))


# --------------------------------------------------------------------------------------------------
# Geometry: an anatomy frame seen through a pose
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pose:
    """Where the canonical anatomy frame lands in the picture (fractions of the image width)."""

    rotation_deg: float = 0.0
    scale: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0


class _Canvas:
    """Pixel grid of one image with the anatomy coordinates (u, v) of every pixel centre.

    Anatomy coordinates are in units of the image width, origin top-left, u to the right, v down;
    the pose rotates/scales/shifts the anatomy about the image centre.
    """

    def __init__(self, size: int, pose: Pose):
        self.size = size
        self.pose = pose
        theta = np.deg2rad(pose.rotation_deg)
        self._cos, self._sin = float(np.cos(theta)), float(np.sin(theta))
        self._cx, self._cy = 0.5 + pose.shift_x, 0.5 + pose.shift_y
        centres = ((np.arange(size, dtype=np.float32) + 0.5) / size)
        py, px = np.meshgrid(centres, centres, indexing="ij")
        dx, dy = (px - self._cx) / pose.scale, (py - self._cy) / pose.scale
        self.u = (0.5 + self._cos * dx + self._sin * dy).astype(np.float32)
        self.v = (0.5 - self._sin * dx + self._cos * dy).astype(np.float32)
        self.pixels_per_unit = size * pose.scale

    def to_pixels(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anatomy coordinates -> continuous (row, col) pixel coordinates."""
        du, dv = np.asarray(u) - 0.5, np.asarray(v) - 0.5
        col = (self._cx + self.pose.scale * (self._cos * du - self._sin * dv)) * self.size - 0.5
        row = (self._cy + self.pose.scale * (self._sin * du + self._cos * dv)) * self.size - 0.5
        return row, col

    def window(self, u0: float, v0: float, u1: float, v1: float) -> tuple[slice, slice] | None:
        """The pixel rectangle covering an anatomy-space box, or None when it is off the picture."""
        rows, cols = [], []
        scale, size = self.pose.scale, self.size
        for u, v in ((u0, v0), (u1, v0), (u0, v1), (u1, v1)):
            du, dv = u - 0.5, v - 0.5
            cols.append((self._cx + scale * (self._cos * du - self._sin * dv)) * size - 0.5)
            rows.append((self._cy + scale * (self._sin * du + self._cos * dv)) * size - 0.5)
        r0, r1 = max(int(np.floor(min(rows))) - 1, 0), min(int(np.ceil(max(rows))) + 2, size)
        c0, c1 = max(int(np.floor(min(cols))) - 1, 0), min(int(np.ceil(max(cols))) + 2, size)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def fill_polygon(self, polygon: Sequence[Sequence[float]]) -> np.ndarray:
        """A float32 0/1 image of a closed outline given in anatomy coordinates."""
        pts = np.asarray(polygon, dtype=np.float64)
        rows, cols = self.to_pixels(pts[:, 0], pts[:, 1])
        picture = Image.new("L", (self.size, self.size), 0)
        # PIL's polygon fill is fast; its coordinates are pixel corners, ours pixel centres.
        ImageDraw.Draw(picture).polygon(list(zip((cols + 0.5).tolist(), (rows + 0.5).tolist())), fill=1)
        return np.asarray(picture, dtype=np.float32)


def _ellipsoid_chords(u: np.ndarray, v: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float,
                      depth: float, inner: float) -> tuple[np.ndarray, np.ndarray]:
    """Beam chords through a solid ellipsoid and through its hollow core (core axes scaled by ``inner``)."""
    c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    x, y = u - cx, v - cy
    r2 = ((c * x + s * y) / a) ** 2 + ((-s * x + c * y) / b) ** 2
    outer = 2.0 * depth * np.sqrt(np.maximum(1.0 - r2, 0.0))
    if inner <= 0:
        return outer, np.zeros_like(outer)
    core = 2.0 * depth * inner * np.sqrt(np.maximum(1.0 - r2 / inner ** 2, 0.0))
    return outer, core


def _tube_chords(canvas: _Canvas, window: tuple[slice, slice],
                 polylines: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Beam chords through the union of round tubes, each along a polyline with a radius and a hollow
    fraction per vertex, over a pixel window: (outer chord, chord through the hollow core).

    Taking the largest chord over segments (rather than summing, or the nearest segment) joins
    segments and branching tubes without bright overlaps; segment ends are round caps. Each segment
    only touches the pixels near it, which keeps long thin bones (ribs) cheap.
    """
    rows, cols = window
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    outer = np.zeros(shape, dtype=np.float32)
    core = np.zeros(shape, dtype=np.float32)
    for points, radii, inner in polylines:
        for i in range(len(points) - 1):
            (x0, y0), (x1, y1) = points[i], points[i + 1]
            reach = max(radii[i], radii[i + 1])
            near = canvas.window(min(x0, x1) - reach, min(y0, y1) - reach, max(x0, x1) + reach, max(y0, y1) + reach)
            if near is None:
                continue
            r0, r1 = max(near[0].start, rows.start), min(near[0].stop, rows.stop)
            c0, c1 = max(near[1].start, cols.start), min(near[1].stop, cols.stop)
            if r0 >= r1 or c0 >= c1:
                continue
            ux, vy = canvas.u[r0:r1, c0:c1] - x0, canvas.v[r0:r1, c0:c1] - y0
            dx, dy = x1 - x0, y1 - y0
            t = (ux * dx + vy * dy) * (1.0 / max(dx * dx + dy * dy, 1e-12))
            np.clip(t, 0.0, 1.0, out=t)
            ex, ey = ux - t * dx, vy - t * dy
            d2 = ex * ex + ey * ey
            radius = radii[i] + t * (radii[i + 1] - radii[i]) if radii[i] != radii[i + 1] else radii[i]
            local = (slice(r0 - rows.start, r1 - rows.start), slice(c0 - cols.start, c1 - cols.start))
            chord = radius * radius - d2
            np.maximum(chord, 0.0, out=chord)
            np.sqrt(chord, out=chord)
            np.maximum(outer[local], 2.0 * chord, out=outer[local])
            if inner[i] > 0 or inner[i + 1] > 0:
                hollow = radius * (inner[i] + t * (inner[i + 1] - inner[i]) if inner[i] != inner[i + 1] else inner[i])
                chord = hollow * hollow - d2
                np.maximum(chord, 0.0, out=chord)
                np.sqrt(chord, out=chord)
                np.maximum(core[local], 2.0 * chord, out=core[local])
    return outer, core


def _polyline(points: Any, radii: Any, inner: Any = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points, radii, inner) with the per-vertex values broadcast to the number of points."""
    points = np.asarray(points, dtype=np.float64)
    return (points, np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(points),)),
            np.broadcast_to(np.asarray(inner, dtype=np.float64), (len(points),)))


def _smooth_curve(control: Sequence[Sequence[float]], n: int = 14, closed: bool = False) -> np.ndarray:
    """n points along a smooth curve through the control points (uniform Catmull-Rom spline)."""
    pts = np.asarray(control, dtype=np.float64)
    if closed:
        padded = np.vstack([pts[-1:], pts, pts[:2]])
    else:  # reflect the end points so the curve starts and ends on them
        padded = np.vstack([2 * pts[0] - pts[1], pts, 2 * pts[-1] - pts[-2]])
    spans = len(padded) - 3
    position = np.linspace(0.0, spans, n)
    index = np.minimum(position.astype(int), spans - 1)
    t = (position - index)[:, None]
    p0, p1, p2, p3 = padded[index], padded[index + 1], padded[index + 2], padded[index + 3]
    return 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                  + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3)


class _Film:
    """Accumulates the attenuation (line integral along the beam) of every structure on a canvas."""

    def __init__(self, canvas: _Canvas):
        self.canvas = canvas
        self.attenuation = np.zeros((canvas.size, canvas.size), dtype=np.float32)

    def ellipsoid(self, mu: float, cx: float, cy: float, a: float, b: float, angle: float = 0.0,
                  depth: float | None = None, inner: float = 0.0) -> None:
        """A (hollow when ``inner`` > 0) ellipsoid; ``depth`` is its half-thickness along the beam."""
        reach = max(a, b)
        window = self.canvas.window(cx - reach, cy - reach, cx + reach, cy + reach)
        if window is None:
            return
        u, v = self.canvas.u[window], self.canvas.v[window]
        outer, core = _ellipsoid_chords(u, v, cx, cy, a, b, angle, min(a, b) if depth is None else depth, inner)
        self.attenuation[window] += mu * (outer - core)

    def tube(self, mu: float, points: Any, radii: Any, inner: Any = 0.0) -> None:
        """A hollow round bone (or soft-tissue cylinder when inner is 0) along a polyline."""
        self.tubes(mu, [_polyline(points, radii, inner)])

    def tubes(self, mu: float, polylines: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """One bone made of several joined tubes (their union; see :func:`_tube_chords`)."""
        reach = max(float(r.max()) for _, r, _ in polylines)
        everything = np.vstack([p for p, _, _ in polylines])
        window = self.canvas.window(everything[:, 0].min() - reach, everything[:, 1].min() - reach,
                                    everything[:, 0].max() + reach, everything[:, 1].max() + reach)
        if window is None:
            return
        outer, core = _tube_chords(self.canvas, window, polylines)
        self.attenuation[window] += mu * (outer - core)

    def plate(self, mu_thickness: float, polygon: Sequence[Sequence[float]], blur: float) -> None:
        """A thin flat bone (scapular blade): a filled outline, softened by ``blur`` anatomy units."""
        mask = self.canvas.fill_polygon(polygon)
        self.attenuation += mu_thickness * ndimage.gaussian_filter(mask, blur * self.canvas.pixels_per_unit)

    def region(self, polygons: Sequence[np.ndarray], soften: float) -> np.ndarray:
        """A smooth 0..1 'depth' map of closed outlines: 0 outside, rising to 1 about ``soften`` inside."""
        mask = np.zeros(self.attenuation.shape, dtype=bool)
        for polygon in polygons:
            mask |= self.canvas.fill_polygon(polygon) > 0
        depth = ndimage.distance_transform_edt(mask) / max(soften * self.canvas.pixels_per_unit, 1e-6)
        return np.sqrt(np.clip(depth, 0.0, 1.0)).astype(np.float32)


def _band_noise(rng: np.random.Generator, shape: tuple[int, int], fine: float, coarse: float) -> np.ndarray:
    """Band-pass filtered white noise with unit standard deviation (structures between fine and coarse px)."""
    white = rng.standard_normal(shape).astype(np.float32)
    band = ndimage.gaussian_filter(white, fine) - ndimage.gaussian_filter(white, coarse)
    return band / max(float(band.std()), 1e-6)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field (about ``cells`` blobs across) with unit standard deviation.

    Made by bicubic upsampling of a small grid of white noise: far cheaper than a wide gaussian filter.
    """
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _low_pass(image: np.ndarray, sigma: float) -> np.ndarray:
    """A wide gaussian blur, computed on a smaller copy (a wide kernel at full size is slow)."""
    size = image.shape[0]
    factor = max(1, int(sigma // 3))
    small_size = max(8, size // factor)
    small = np.asarray(Image.fromarray(image.astype(np.float32)).resize((small_size, small_size), Image.Resampling.BOX))
    small = ndimage.gaussian_filter(small, sigma * small_size / size, mode="nearest")
    return np.asarray(Image.fromarray(small.astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC))


def _ridges(noise: np.ndarray, width: float) -> np.ndarray:
    """Thin connected lines along the zero crossings of band noise: a trabecular / vascular network."""
    return np.exp(-(noise / max(width, 1e-3)) ** 2)


@dataclass(frozen=True)
class Exposure:
    """Acquisition and processing of one image; drawn the same way for every class."""

    photons: float  # photons per pixel at full transmission, at 256 px (scaled for other sizes)
    blur_px: float  # detector unsharpness (gaussian sigma) at 256 px
    contrast: float  # steepness of the film curve
    gamma: float
    fog: float  # base brightness of unexposed film
    grain: float  # film grain standard deviation
    heel: float  # relative beam strength change from the image centre to its edge
    heel_angle: float  # direction of that change (radians)


def _draw_exposure(rng: np.random.Generator) -> Exposure:
    return Exposure(photons=float(rng.uniform(700, 2500)), blur_px=float(rng.uniform(0.6, 1.0)),
                    contrast=float(rng.uniform(0.85, 1.2)), gamma=float(rng.uniform(0.8, 1.25)),
                    fog=float(rng.uniform(0.0, 0.05)), grain=float(rng.uniform(0.004, 0.012)),
                    heel=float(rng.uniform(0.0, 0.25)), heel_angle=float(rng.uniform(0.0, 2 * np.pi)))


_BLUR_TRUNCATE = 4.0  # the detector blur kernel ends at this many sigmas; the evidence margin covers it


def _blur_sigma(exposure: Exposure, size: int) -> float:
    return exposure.blur_px * size / 256.0


def _expose(rng: np.random.Generator, attenuation: np.ndarray, exposure: Exposure) -> np.ndarray:
    """Photon noise, detector blur, film curve, grain: attenuation -> MONOCHROME2 image in [0, 1].

    Every step is pointwise except the detector blur, whose kernel ends at ``_BLUR_TRUNCATE`` sigmas:
    an anatomical change moves no pixel further away than that (the evidence mask's margin).
    """
    size = attenuation.shape[0]
    photons = exposure.photons * (256.0 / size) ** 2  # bigger pixels collect more photons
    # Heel effect: the beam is a little stronger on one side (direction and strength vary per image).
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    heel = 1.0 + exposure.heel * (np.cos(exposure.heel_angle) * ramp[None, :]
                                  + np.sin(exposure.heel_angle) * ramp[:, None])
    counts = photons * heel * np.exp(-attenuation)
    counts = counts + np.sqrt(counts) * rng.standard_normal(counts.shape).astype(np.float32)
    measured = -np.log(np.maximum(counts, 0.5) / photons)
    measured = ndimage.gaussian_filter(measured.astype(np.float32), _blur_sigma(exposure, size),
                                       truncate=_BLUR_TRUNCATE)
    image = 1.0 - np.exp(-exposure.contrast * np.maximum(measured, 0.0))
    image = exposure.fog + (1.0 - exposure.fog) * image ** exposure.gamma
    image = image + exposure.grain * rng.standard_normal(image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Laterality marker (the optional confounder)
# --------------------------------------------------------------------------------------------------

_GLYPHS = {
    "L": ["1....", "1....", "1....", "1....", "1....", "1....", "11111"],
    "R": ["1111.", "1...1", "1...1", "1111.", "1.1..", "1..1.", "1...1"],
}
_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def _marker_footprint(size: int, corner: str) -> tuple[int, int, int, int]:
    """(row, col, height, width) of the marker block in a corner."""
    cell = max(1, round(size * 0.012))
    height, width = 9 * cell, 7 * cell  # 7x5 glyph plus a one-cell plastic rim
    margin = max(2, round(size * 0.04))
    row = margin if corner.startswith("top") else size - margin - height
    col = margin if corner.endswith("left") else size - margin - width
    return row, col, height, width


def _draw_marker(image: np.ndarray, letter: str, corner: str) -> np.ndarray:
    """Burn a lead letter in its plastic block into the image (saturated white, like lead)."""
    size = image.shape[0]
    row, col, height, width = _marker_footprint(size, corner)
    cell = height // 9
    out = image.copy()
    rr, cc = draw.rectangle((row, col), extent=(height, width), shape=out.shape)
    out[rr, cc] = np.clip(out[rr, cc] + 0.12, 0.0, 1.0)  # the faint plastic holder
    glyph = np.array([[ch == "1" for ch in line] for line in _GLYPHS[letter]])
    for gr, gc in zip(*np.nonzero(glyph)):
        rr, cc = draw.rectangle((row + (gr + 1) * cell, col + (gc + 1) * cell), extent=(cell, cell), shape=out.shape)
        out[rr, cc] = 1.0
    return out


# --------------------------------------------------------------------------------------------------
# Chest radiographs
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChestParameters:
    """What one synthetic chest radiograph was made from."""

    view: str
    pose: Pose
    exposure: Exposure
    thorax_half_width: float
    lung_height: float
    heart_half_width: float
    marker: bool
    gastric_bubble: bool


def _draw_chest_parameters(rng: np.random.Generator) -> ChestParameters:
    view = "AP" if rng.random() < 0.5 else "PA"
    # AP films are portable bedside films: more rotation and magnification, a bigger-looking heart.
    rotation = rng.normal(0.0, 4.0 if view == "AP" else 2.0)
    pose = Pose(rotation_deg=float(np.clip(rotation, -10, 10)), scale=float(rng.uniform(0.88, 1.05)),
                shift_x=float(rng.uniform(-0.03, 0.03)), shift_y=float(rng.uniform(-0.04, 0.04)))
    heart = rng.uniform(0.14, 0.19) * (1.12 if view == "AP" else 1.0)
    return ChestParameters(view=view, pose=pose, exposure=_draw_exposure(rng),
                           thorax_half_width=float(rng.uniform(0.38, 0.45)),
                           lung_height=float(rng.uniform(0.64, 0.76)), heart_half_width=float(heart),
                           marker=bool(rng.random() < 0.5), gastric_bubble=bool(rng.random() < 0.6))


def _lung_outline(side: int, p: ChestParameters, rng: np.random.Generator) -> np.ndarray:
    """Closed outline of one lung; side -1 = patient's right (image left), +1 = patient's left."""
    w, h = p.thorax_half_width, p.lung_height
    top, base = 0.07, 0.07 + h
    dome = base - (0.07 if side < 0 else 0.05)  # the right hemidiaphragm sits higher (liver)
    x = lambda f: 0.5 + side * f  # noqa: E731 - distance from the midline, mirrored per side
    jitter = rng.normal(0.0, 0.006, size=(11, 2))
    control = [
        (x(0.16), top), (x(w * 0.7), top + 0.07), (x(w * 0.92), top + 0.24), (x(w * 0.99), top + 0.45),
        (x(w * 0.97), base), (x(w * 0.75), dome - 0.02), (x(w * 0.45), dome - 0.075), (x(0.1), dome - 0.04),
        (x(0.07), top + 0.45), (x(0.065), top + 0.22), (x(0.08), top + 0.06),
    ]
    return _smooth_curve(np.asarray(control) + jitter, n=90, closed=True)


def _vessel_tree(canvas: _Canvas, rng: np.random.Generator, hilum: tuple[float, float], side: int) -> np.ndarray:
    """Pulmonary vessels of one lung: branching lines from the hilum, fainter at every split."""
    segments: list[tuple[float, float, float, float, float]] = []  # x0, y0, x1, y1, weight
    # (start, angle, length, weight, generation); angles in degrees, 0 = lateral, 90 = down.
    stack = [(hilum, angle + rng.normal(0, 8), 0.08, 1.0, 0) for angle in (-70.0, -30.0, 10.0, 50.0, 80.0)]
    while stack:
        (x0, y0), angle, length, weight, generation = stack.pop()
        theta = np.deg2rad(angle)
        x1, y1 = x0 + side * length * np.cos(theta), y0 + length * np.sin(theta)
        segments.append((x0, y0, x1, y1, weight))
        if generation < 4:
            for turn in (-1, 1):
                stack.append(((x1, y1), angle + turn * rng.uniform(12, 35), length * rng.uniform(0.6, 0.85),
                              weight * 0.72, generation + 1))
    ends = np.asarray(segments)
    rows0, cols0 = canvas.to_pixels(ends[:, 0], ends[:, 1])
    rows1, cols1 = canvas.to_pixels(ends[:, 2], ends[:, 3])
    all_rr, all_cc, all_val = [], [], []
    for r0, c0, r1, c1, weight in zip(np.round(rows0).astype(int), np.round(cols0).astype(int),
                                      np.round(rows1).astype(int), np.round(cols1).astype(int), ends[:, 4]):
        rr, cc, val = draw.line_aa(r0, c0, r1, c1)
        all_rr.append(rr)
        all_cc.append(cc)
        all_val.append(weight * val)
    rr, cc, val = np.concatenate(all_rr), np.concatenate(all_cc), np.concatenate(all_val)
    keep = (rr >= 0) & (rr < canvas.size) & (cc >= 0) & (cc < canvas.size)
    tree = np.zeros((canvas.size, canvas.size), dtype=np.float32)
    np.maximum.at(tree, (rr[keep], cc[keep]), val[keep].astype(np.float32))
    return tree


def chest_radiograph(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One chest-like frontal radiograph: float32 (size, size) in [0, 1], bright = dense."""
    return _render_chest(rng, _as_int("size", size, MIN_SIZE))[0]


def _render_chest(rng: np.random.Generator, size: int) -> tuple[np.ndarray, ChestParameters]:
    p = _draw_chest_parameters(rng)
    film = _Film(_Canvas(size, p.pose))
    canvas = film.canvas
    w, h = p.thorax_half_width, p.lung_height
    soft = 1.0 + rng.normal(0.0, 0.08)  # body habitus

    # Soft tissue: trunk, neck, shoulders and upper arms as one body.
    pieces: list[tuple[str, tuple]] = [("ellipsoid", (0.5, 0.72, w + 0.08, 0.82, 0.0, 0.2 * soft)),
                                       ("tube", ([(0.5, -0.2), (0.5, 0.12)], 0.085 * soft))]
    for side in (-1, 1):
        pieces.append(("ellipsoid", (0.5 + side * (w + 0.02), 0.17, 0.15, 0.09, 0.0, 0.11 * soft)))
        pieces.append(("tube", ([(0.5 + side * (w + 0.1), 0.15), (0.5 + side * (w + 0.13), 1.2)], 0.07 * soft)))
    _soft_union(film, rng, pieces)
    for side in (-1, 1):
        arm = [(0.5 + side * (w + 0.11), 0.17), (0.5 + side * (w + 0.14), 1.2)]
        film.tube(_MU_BONE, arm, 0.022, inner=0.55)  # humeral shafts at the film edge
        film.ellipsoid(_MU_BONE * 0.7, 0.5 + side * (w + 0.12), 0.16, 0.065, 0.06, inner=0.88)  # humeral heads
        # Scapular blades over the upper lateral lung, and their lateral borders.
        film.plate(_MU_BONE * 0.012, [(0.5 + side * (w + 0.07), 0.13), (0.5 + side * (w - 0.08), 0.17),
                                      (0.5 + side * (w - 0.05), 0.46), (0.5 + side * (w + 0.02), 0.5)], 0.008)
        film.tube(_MU_BONE * 0.5, [(0.5 + side * (w + 0.06), 0.2), (0.5 + side * (w - 0.04), 0.46)], 0.01, inner=0.5)

    # Lungs: air replaces tissue; the heart and great vessels push into the medial lung.
    lungs = film.region([_lung_outline(side, p, rng) for side in (-1, 1)], soften=0.08)
    hw = p.heart_half_width
    for centre, axes, angle in (((0.535, 0.07 + h - 0.13), (hw, hw * 0.8), -15.0), ((0.55, 0.25), (0.032, 0.03), 0.0)):
        window = canvas.window(centre[0] - axes[0], centre[1] - axes[0], centre[0] + axes[0], centre[1] + axes[0])
        if window is not None:
            shadow, _ = _ellipsoid_chords(canvas.u[window], canvas.v[window], *centre, *axes, angle, 1.0, 0.0)
            lungs[window] *= np.clip(1.0 - 3.0 * shadow, 0.0, 1.0)
    # Vessels branch from the hila and thin out towards the periphery.
    hila = np.exp(-(((canvas.u - 0.5) / 0.16) ** 2 + ((canvas.v - 0.42) / 0.2) ** 2))
    px = size / 256.0
    vessels = sum(_vessel_tree(canvas, rng, (0.5 + side * 0.08, 0.43), side) for side in (-1, 1))
    # A drawn line is one pixel wide at any size: scale its weight so a vessel keeps its width in anatomy.
    vessels = ndimage.gaussian_filter(vessels, 0.6 * px) * min(px, 1.0)
    mottle = _smooth_noise(rng, size, 30)
    film.attenuation -= lungs * (0.72 * soft - 0.22 * hila - 0.04 * mottle)
    film.attenuation += lungs * vessels * 0.45
    # Trachea: an air column down the upper mediastinum to the carina.
    film.tube(-_MU_SOFT, [(0.5, -0.1), (0.5, 0.2), (0.505, 0.3)], 0.018, inner=0.0)
    if p.gastric_bubble:
        film.ellipsoid(-_MU_SOFT, 0.6, 0.07 + h + 0.02, 0.045, 0.025, depth=0.05)

    # Spine: faint vertebral bodies with their pedicles, seen through the mediastinum.
    for k in range(18):
        film.ellipsoid(_MU_BONE * 0.35, 0.5, -0.02 + k * 0.058, 0.033, 0.022, depth=0.02, inner=0.7)
        for side in (-1, 1):
            film.ellipsoid(_MU_BONE * 0.5, 0.5 + side * 0.026, -0.02 + k * 0.058, 0.008, 0.011, inner=0.5)

    # Ribs: posterior arcs leave the spine, rise a little, then sweep out and down along the chest
    # wall; fainter anterior arcs run back down and in towards the sternum.
    spacing = h / 10.0
    for side in (-1, 1):
        x = lambda f: 0.5 + side * f  # noqa: E731
        for i in range(10):
            y = 0.075 + i * spacing
            reach = w * (0.7 + 0.3 * min(i, 3) / 3)
            posterior = _smooth_curve([(x(0.035), y), (x(0.09), y - 0.012), (x(reach * 0.5), y + 0.012),
                                       (x(reach * 0.85), y + 0.055), (x(reach), y + 0.12)], n=9)
            film.tube(_MU_BONE, posterior, np.linspace(0.009, 0.013, 9) * (1 + rng.normal(0, 0.04, 9)), inner=0.62)
            anterior = _smooth_curve([(x(reach), y + 0.12), (x(reach * 0.9), y + 0.18),
                                      (x(reach * 0.65), y + 0.25), (x(reach * 0.35), y + 0.3)], n=7)
            film.tube(_MU_BONE * 0.4, anterior, 0.013, inner=0.6)
        # Clavicles: S-shaped, from the sternal notch out and up to the shoulder.
        clavicle = _smooth_curve([(x(0.035), 0.16), (x(0.12), 0.145), (x(w * 0.7), 0.11), (x(w + 0.08), 0.125)], n=12)
        film.tube(_MU_BONE, clavicle, 0.016, inner=0.55)

    image = _expose(rng, film.attenuation, p.exposure)
    # Computed-radiography processing sharpens detail (unsharp mask); there is no class signal here.
    smooth = _low_pass(image, 0.04 * size)
    image = np.clip(image + 0.6 * (image - smooth), 0.0, 1.0)
    if p.marker:
        image = _draw_marker(image, "L" if rng.random() < 0.5 else "R", _CORNERS[int(rng.integers(0, 2))])
    return image.astype(np.float32), p


# --------------------------------------------------------------------------------------------------
# Shoulder radiographs
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShoulderPatient:
    """One patient's anatomy: the bone quality (the class signal) and class-independent build."""

    label: str
    bone_quality: float  # latent q; higher = healthier
    cti: float  # cortical thickness index of the humeral diaphysis, 1 - medullary / outer diameter
    trabecular_density: float  # 0..1, how much of the marrow space the trabecular network fills
    trabecular_contrast: float  # 0..1, how dense the individual trabeculae are
    side: str  # "R" or "L"
    bone_scale: float  # humerus size
    soft_tissue: float  # soft-tissue thickness factor
    marker_draw: float  # uniform(0, 1); the marker is present when it falls below the split's probability


def class_means(classes: Sequence[str] = DEFAULT_CLASSES, difficulty: float = 0.5) -> dict[str, float]:
    """Mean latent bone quality per class: evenly spaced, ``MAX_EFFECT * (1 - difficulty)`` from first to last."""
    classes = _as_classes(classes)
    effect = MAX_EFFECT * (1.0 - _as_unit("difficulty", difficulty))
    positions = np.linspace(0.5, -0.5, len(classes))  # healthy first
    return {name: float(effect * pos) for name, pos in zip(classes, positions)}


def draw_shoulder_patient(rng: np.random.Generator, label: str, difficulty: float = 0.5,
                          classes: Sequence[str] = DEFAULT_CLASSES) -> ShoulderPatient:
    """Draw one patient of class ``label``; only bone quality (and what follows from it) depends on the class."""
    means = class_means(classes, difficulty)
    if label not in means:
        raise ValueError(f"label {label!r} is not one of classes {tuple(means)}")
    # Draw every number in the same order for every class so the class moves nothing but q.
    z, e_cti, e_density, e_contrast = rng.standard_normal(4)
    q = means[label] + z
    return ShoulderPatient(
        label=label, bone_quality=float(q),
        cti=float(np.clip(0.36 + 0.045 * q + 0.015 * e_cti, 0.12, 0.62)),
        trabecular_density=float(np.clip(0.55 + 0.1 * q + 0.04 * e_density, 0.08, 1.0)),
        trabecular_contrast=float(np.clip(0.6 + 0.1 * q + 0.04 * e_contrast, 0.1, 1.0)),
        side="R" if rng.random() < 0.5 else "L",
        bone_scale=float(np.clip(rng.normal(1.0, 0.06), 0.85, 1.15)),
        soft_tissue=float(rng.uniform(0.8, 1.25)),
        marker_draw=float(rng.random()),
    )


@dataclass
class ShoulderSample:
    """One synthetic shoulder radiograph with its ground truth.

    ``image`` float32 (S, S) in [0, 1]; ``mask`` uint8 (S, S) 0/1 where the class signal lives;
    ``box`` the mask's bounding box ``{"x", "y", "w", "h", "label": "evidence"}`` in pixels.
    """

    image: np.ndarray
    mask: np.ndarray
    box: dict
    patient: ShoulderPatient
    view: str
    marker: bool
    marker_corner: str
    pose: Pose
    exposure: Exposure
    abduction_deg: float

    @property
    def label(self) -> str:
        return self.patient.label

    def parameters(self) -> dict[str, Any]:
        """The generating parameters as one flat row (for parameters.csv and explanation texts)."""
        row: dict[str, Any] = {k: v for k, v in asdict(self.patient).items() if k != "marker_draw"}
        row.update(view=self.view, marker=self.marker, marker_corner=self.marker_corner,
                   abduction_deg=self.abduction_deg)
        row.update({f"pose_{k}": v for k, v in asdict(self.pose).items()})
        row.update({f"exposure_{k}": v for k, v in asdict(self.exposure).items()})
        row.update(evidence_x=self.box["x"], evidence_y=self.box["y"], evidence_w=self.box["w"],
                   evidence_h=self.box["h"], evidence_area_fraction=float(self.mask.mean()))
        return row


def _humerus(film: _Film, rng: np.random.Generator, patient: ShoulderPatient, head: tuple[float, float],
             shaft_dir_deg: float, neck_offset: tuple[float, float]) -> np.ndarray:
    """Draw the proximal humerus; return its silhouette (bool) - the only place the class acts.

    Head, greater tuberosity and shaft are hollow shells whose outer shapes do not depend on the
    class; the cortical thickness (CTI) sets their cores, and trabeculae fill the cores.
    """
    canvas, s = film.canvas, patient.bone_scale
    cti = patient.cti
    hx, hy = head
    radius = 0.12 * s
    top = (hx + neck_offset[0] * s, hy + neck_offset[1] * s)
    direction = np.array([-np.sin(np.deg2rad(shaft_dir_deg)), np.cos(np.deg2rad(shaft_dir_deg))])
    along = np.array([0.0, 0.12, 0.26, 0.5, 1.3])
    axis = np.asarray(top) + along[:, None] * direction
    radii = s * np.array([0.095, 0.078, 0.062, 0.057, 0.055])
    # The cortex is thin at the metaphysis and reaches its full thickness (CTI) down the diaphysis.
    cores = 1.0 - cti * np.array([0.3, 0.55, 0.9, 1.0, 1.0])
    tuberosity = (top[0] - 0.05 * s * np.cos(np.deg2rad(shaft_dir_deg)), top[1] - 0.045 * s)

    reach = 0.2 * s
    window = canvas.window(min(hx, top[0]) - reach, hy - reach, max(hx, top[0]) + reach, 1.5)
    silhouette = np.zeros(film.attenuation.shape, dtype=bool)
    if window is None:
        return silhouette
    u, v = canvas.u[window], canvas.v[window]
    parts = [
        _ellipsoid_chords(u, v, hx, hy, radius, radius * 0.96, 0.0, radius * 0.9, 1.0 - 0.13 * cti),
        _ellipsoid_chords(u, v, *tuberosity, 0.05 * s, 0.06 * s, 20.0, 0.05 * s, 1.0 - 0.25 * cti),
        _tube_chords(canvas, window, [(axis, radii, cores)]),
    ]
    # Union of the parts: the largest chord keeps one outline with no inner seams (a sum would draw
    # bright overlaps, a soft maximum bright ridges where the parts meet).
    outer = np.maximum.reduce([p[0] for p in parts])
    core = np.maximum.reduce([p[1] for p in parts])

    # Trabeculae: a ridge network filling the core, densest in the head and metaphysis, thinning to
    # fatty marrow down the shaft. Sparser and fainter with lower bone quality.
    px = canvas.size / 256.0
    network = _ridges(_band_noise(rng, u.shape, 0.9 * px + 0.2, 3.5 * px + 0.5),
                      0.15 + 0.6 * patient.trabecular_density)
    distal = np.clip(((u - top[0]) * direction[0] + (v - top[1]) * direction[1]) / 0.3, 0.0, 1.0)
    fill = (1.0 - 0.75 * distal) * (0.25 + 0.75 * network) * patient.trabecular_contrast
    film.attenuation[window] += _MU_BONE * (outer - core) + _MU_BONE * 0.45 * core * fill
    silhouette[window] = outer > 0
    return silhouette


def _soft_union(film: _Film, rng: np.random.Generator, pieces: list[tuple[str, tuple]]) -> None:
    """Add overlapping soft-tissue volumes as one body (largest chord, so overlaps are not brighter)."""
    canvas = film.canvas
    body = np.zeros(film.attenuation.shape, dtype=np.float32)
    everywhere = (slice(0, canvas.size), slice(0, canvas.size))
    for kind, args in pieces:
        if kind == "ellipsoid":
            chord, _ = _ellipsoid_chords(canvas.u, canvas.v, *args, 0.0)
        else:
            points, radius = args
            chord, _ = _tube_chords(canvas, everywhere, [_polyline(points, radius)])
        np.maximum(body, chord, out=body)
    # Muscle and fat layers are not uniform: a faint, coarse texture through the soft tissue.
    layers = _smooth_noise(rng, canvas.size, 10)
    film.attenuation += _MU_SOFT * body * (1.0 + 0.025 * layers)


def _shoulder_ap(film: _Film, rng: np.random.Generator, patient: ShoulderPatient, abduction: float) -> np.ndarray:
    """Canonical right shoulder, AP: humerus lateral (image left), scapula and chest wall medial."""
    s, st = patient.bone_scale, patient.soft_tissue
    hx, hy = 0.42 + rng.normal(0, 0.01), 0.4 + rng.normal(0, 0.01)
    shaft = 4.0 + abduction
    direction = (-np.sin(np.deg2rad(shaft)), np.cos(np.deg2rad(shaft)))
    _soft_union(film, rng, [
        ("ellipsoid", (1.02, 0.85, 0.56, 0.95, 0.0, 0.22 * st)),  # chest wall
        ("ellipsoid", (0.95, 0.0, 0.45, 0.2, -10.0, 0.15 * st)),  # trapezius and neck base
        ("ellipsoid", (hx - 0.04, hy + 0.02, 0.21 * st, 0.25 * st, 0.0, 0.16 * st)),  # deltoid
        ("tube", ([(hx - 0.06, hy + 0.1), (hx - 0.06 + 1.2 * direction[0], hy + 0.1 + 1.2 * direction[1])],
                  0.17 * st)),  # upper arm
    ])
    # Lung medially, behind the ribs.
    lung = film.region([_smooth_curve([(0.7, 0.3), (0.95, 0.2), (1.3, 0.25), (1.3, 1.3), (0.8, 1.3), (0.68, 0.75)],
                                      n=40, closed=True)], soften=0.1)
    mottle = _smooth_noise(rng, film.canvas.size, 30)
    film.attenuation -= lung * (0.85 * st - 0.02 * mottle)
    for j in range(6):
        y = 0.16 + 0.15 * j + rng.normal(0, 0.005)
        rib = _smooth_curve([(1.15, y - 0.02), (0.95, y), (0.8, y + 0.06), (0.7, y + 0.16), (0.66, y + 0.28)], n=10)
        film.tube(_MU_BONE * 0.8, rib, 0.016, inner=0.6)

    # Scapula: blade, lateral border, glenoid rim, spine and acromion, coracoid.
    gx, gy = hx + 0.11 * s, hy + 0.02
    film.plate(_MU_BONE * 0.03, [(gx, gy - 0.07), (gx + 0.08, gy - 0.14), (1.1, 0.26), (1.1, 0.9),
                                 (gx + 0.25, gy + 0.62), (gx + 0.03, gy + 0.1)], 0.01)
    film.tube(_MU_BONE, _smooth_curve([(gx + 0.03, gy + 0.09), (gx + 0.12, gy + 0.38), (gx + 0.25, gy + 0.65)], n=8),
              0.02 * s, inner=0.5)
    film.ellipsoid(_MU_BONE, gx, gy, 0.035 * s, 0.1 * s, angle=-5.0, inner=0.72)
    spine = _smooth_curve([(hx - 0.13 * s, hy - 0.17 * s), (hx - 0.02, hy - 0.2 * s), (hx + 0.12, hy - 0.17 * s),
                           (0.78, hy - 0.1), (1.1, hy - 0.05)], n=12)
    film.tube(_MU_BONE, spine, np.linspace(0.03, 0.022, 12) * s, inner=0.55)
    coracoid = _smooth_curve([(gx + 0.1, gy - 0.2), (gx + 0.1, gy - 0.13), (gx + 0.05, gy - 0.1)], n=6)
    film.tube(_MU_BONE, coracoid, np.linspace(0.03, 0.022, 6) * s, inner=0.45)
    # Clavicle: S-shaped, from the acromioclavicular joint medially and upwards, out of the picture.
    clavicle = _smooth_curve([(hx + 0.05, hy - 0.23 * s), (0.62, hy - 0.25), (0.8, hy - 0.32), (1.12, hy - 0.34)],
                             n=12)
    film.tube(_MU_BONE, clavicle, np.linspace(0.026, 0.034, 12) * s, inner=0.55)

    return _humerus(film, rng, patient, (hx, hy), shaft, neck_offset=(-0.065, 0.085))


def _shoulder_y(film: _Film, rng: np.random.Generator, patient: ShoulderPatient, abduction: float) -> np.ndarray:
    """Canonical scapular Y view: the scapula's body, acromion and coracoid form a Y over the humeral head."""
    s, st = patient.bone_scale, patient.soft_tissue
    cx, cy = 0.5 + rng.normal(0, 0.01), 0.42 + rng.normal(0, 0.01)
    shaft = -4.0 + 0.5 * abduction  # the humeral shaft projects over the scapular body
    direction = (-np.sin(np.deg2rad(shaft)), np.cos(np.deg2rad(shaft)))
    _soft_union(film, rng, [
        ("ellipsoid", (0.5, 0.9, 0.75, 0.85, 0.0, 0.2 * st)),  # the thorax seen obliquely
        ("ellipsoid", (0.5, 0.38, 0.36, 0.32, 0.0, 0.16 * st)),  # shoulder cap
        ("tube", ([(cx - 0.02, cy + 0.08), (cx - 0.02 + 1.2 * direction[0], cy + 0.08 + 1.2 * direction[1])],
                  0.16 * st)),
    ])
    mottle = _smooth_noise(rng, film.canvas.size, 30)
    for lung_x in (0.08, 0.92):  # lung in front of and behind the scapular body
        lung = np.exp(-((film.canvas.u - lung_x) / 0.3) ** 2 - ((film.canvas.v - 1.0) / 0.4) ** 2)
        film.attenuation -= lung * (0.8 * st - 0.02 * mottle)
    for j in range(6):
        y = 0.3 + 0.14 * j + rng.normal(0, 0.005)
        film.tube(_MU_BONE * 0.45, _smooth_curve([(-0.15, y + 0.3), (0.3, y + 0.12), (0.7, y + 0.05), (1.15, y + 0.08)],
                                                 n=10), 0.016, inner=0.6)
    # The Y, one bone: body seen edge on (two thick borders), spine and acromion posterior, coracoid anterior.
    film.tubes(_MU_BONE, [
        _polyline(_smooth_curve([(cx, cy), (cx + 0.05, cy + 0.35), (cx + 0.12, cy + 0.8)], n=10),
                  np.linspace(0.065, 0.035, 10) * s, 0.7),
        _polyline(_smooth_curve([(cx, cy), (cx + 0.15, cy - 0.2), (cx + 0.22, cy - 0.36)], n=8),
                  np.linspace(0.055, 0.035, 8) * s, 0.6),
        _polyline(_smooth_curve([(cx, cy), (cx - 0.12, cy - 0.15), (cx - 0.2, cy - 0.16), (cx - 0.24, cy - 0.12)], n=8),
                  np.linspace(0.045, 0.025, 8) * s, 0.5),
    ])
    clavicle = _smooth_curve([(cx + 0.02, cy - 0.3), (cx + 0.2, cy - 0.38), (cx + 0.45, cy - 0.5)], n=8)
    film.tube(_MU_BONE, clavicle, 0.036 * s, inner=0.55)  # clavicle, foreshortened
    return _humerus(film, rng, patient, (cx - 0.01, cy - 0.01), shaft, neck_offset=(-0.01, 0.1))


def _evidence(silhouette: np.ndarray, blur_sigma: float) -> np.ndarray:
    """The humerus plus the reach of the detector blur kernel: exactly where the class can change a pixel."""
    margin = int(np.ceil(_BLUR_TRUNCATE * blur_sigma)) + 1
    return ndimage.binary_dilation(silhouette, iterations=margin).astype(np.uint8)


def _box_of(mask: np.ndarray) -> dict:
    rows, cols = np.nonzero(mask)
    return {"x": int(cols.min()), "y": int(rows.min()), "w": int(cols.max() - cols.min() + 1),
            "h": int(rows.max() - rows.min() + 1), "label": EVIDENCE_LABEL}


def shoulder_radiograph(rng: np.random.Generator, size: int = 256, label: str = "normal", difficulty: float = 0.5,
                        marker: bool = False, view: str = "AP", classes: Sequence[str] = DEFAULT_CLASSES,
                        patient: ShoulderPatient | None = None) -> ShoulderSample:
    """One shoulder-like radiograph with its evidence mask and box.

    ``patient`` (from :func:`draw_shoulder_patient`) lets several views share one anatomy (``label``,
    ``difficulty`` and ``classes`` are then the patient's); without it a patient of class ``label`` is
    drawn from ``rng`` first. ``view`` is "AP" or "Y". ``marker`` burns in the laterality marker.
    """
    size = _as_int("size", size, MIN_SIZE)
    if view not in ("AP", "Y"):
        raise ValueError(f"view must be 'AP' or 'Y'; got {view!r}")
    if patient is None:
        patient = draw_shoulder_patient(rng, label, difficulty, classes)
    pose = Pose(rotation_deg=float(rng.normal(0.0, 4.0)), scale=float(rng.uniform(0.9, 1.08)),
                shift_x=float(rng.uniform(-0.04, 0.04)), shift_y=float(rng.uniform(-0.04, 0.04)))
    exposure = _draw_exposure(rng)
    abduction = float(rng.uniform(-4.0, 10.0))
    film = _Film(_Canvas(size, pose))
    silhouette = (_shoulder_ap if view == "AP" else _shoulder_y)(film, rng, patient, abduction)
    image = _expose(rng, film.attenuation, exposure)
    mask = _evidence(silhouette, _blur_sigma(exposure, size))
    if patient.side == "L":  # a left shoulder is the mirror image of the canonical right one
        image, mask = image[:, ::-1].copy(), mask[:, ::-1].copy()
    if not mask.any():
        raise RuntimeError("internal error: the humerus fell outside the picture; the pose ranges are wrong")

    # The marker goes in a corner clear of the evidence (the draw happens whether or not it is used,
    # so turning the confounder on changes nothing else in the image).
    order = list(rng.permutation(len(_CORNERS)))
    corner = ""
    for index in order:
        row, col, height, width = _marker_footprint(size, _CORNERS[index])
        if not mask[max(row - 2, 0):row + height + 2, max(col - 2, 0):col + width + 2].any():
            corner = _CORNERS[index]
            break
    if marker:
        if not corner:
            raise RuntimeError("internal error: no corner of the picture is clear of the evidence mask")
        image = _draw_marker(image, patient.side, corner)
    return ShoulderSample(image=image, mask=mask, box=_box_of(mask), patient=patient, view=view, marker=marker,
                          marker_corner=corner if marker else "", pose=pose, exposure=exposure,
                          abduction_deg=abduction)


# --------------------------------------------------------------------------------------------------
# Data sets on disk
# --------------------------------------------------------------------------------------------------

def _child_rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _balanced_label(seed: int, k: int, classes: tuple[str, ...]) -> str:
    """Label of patient k: each block of len(classes) patients holds every class once, shuffled."""
    block, position = divmod(k, len(classes))
    order = _child_rng(seed, 1_000_000_000, block).permutation(len(classes))  # a key no patient uses
    return classes[int(order[position])]


def _allocate(n: int, ratios: tuple[float, float, float]) -> list[int]:
    """Split n items into counts following ratios (largest remainder), every used split non-empty if possible."""
    exact = np.asarray(ratios) * n
    counts = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[index] += 1
    wanted = [i for i, r in enumerate(ratios) if r > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] += 1
    return counts.tolist()


def _assign_splits(seed: int, labels: list[str], ratios: tuple[float, float, float]) -> list[str]:
    """Patient-level split stratified by label, deterministic from the seed."""
    splits = [""] * len(labels)
    rng = _child_rng(seed, 2_000_000_000)
    for label in sorted(set(labels)):
        members = [k for k, lab in enumerate(labels) if lab == label]
        members = [members[i] for i in rng.permutation(len(members))]
        start = 0
        for name, count in zip(manifest_module.SPLITS, _allocate(len(members), ratios)):
            for k in members[start:start + count]:
                splits[k] = name
            start += count
    return splits


def marker_probability(split: str, label: str, classes: Sequence[str], confounder: float) -> float:
    """Chance that an image carries the laterality marker (see the module docstring)."""
    if split == "test":
        return 0.5
    classes = tuple(classes)
    position = -1.0 + 2.0 * classes.index(label) / (len(classes) - 1)
    return 0.5 + 0.5 * confounder * position


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, compress_level=6)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _counts(df: pd.DataFrame, by: list[str]) -> dict[str, int]:
    return {"/".join(str(k) for k in (key if isinstance(key, tuple) else (key,))): int(n)
            for key, n in df.groupby(by, sort=True).size().items()}


def _resolve_workers(workers: int | None, n_items: int) -> int:
    """How many processes to use: None = every core (at most 8) when the job is big enough to pay off."""
    if workers is None:
        return min(os.cpu_count() or 1, 8) if n_items >= 48 else 1
    return _as_int("workers", workers, 1)


def _run_all(function: Any, jobs: list[tuple], workers: int) -> list:
    """``[function(*job) for job in jobs]``, in order, optionally spread over processes.

    Results are identical whatever ``workers`` is: every job draws from its own seed. Linux forks
    (fast, nothing re-imported); elsewhere processes are spawned, which needs the calling script to
    guard its entry point with ``if __name__ == "__main__":`` as usual for multiprocessing.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [function(*job) for job in jobs]
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        return list(pool.map(function, *zip(*jobs), chunksize=max(1, len(jobs) // (8 * workers))))


def _chest_job(out_dir: str, seed: int, k: int, size: int, split: str) -> tuple[dict, dict]:
    """Render and save chest image k; return its manifest row and its parameter row."""
    image, p = _render_chest(_child_rng(seed, k), size)
    image_id = f"chest-{k:05d}"
    path = Path(out_dir) / "images" / f"{image_id}.png"
    _save_png(_to_uint8(image), path)
    row = {"image_id": image_id, "path": str(path.resolve()), "label": UNLABELLED, "patient_id": f"chest-p{k:05d}",
           "view": p.view, "source": CHEST_SOURCE, "split": split, "width": size, "height": size, "boxes": None,
           "mask_path": None}
    parameters = {"image_id": image_id, "view": p.view, "thorax_half_width": p.thorax_half_width,
                  "lung_height": p.lung_height, "heart_half_width": p.heart_half_width, "marker": p.marker,
                  "gastric_bubble": p.gastric_bubble}
    parameters.update({f"pose_{name}": value for name, value in asdict(p.pose).items()})
    parameters.update({f"exposure_{name}": value for name, value in asdict(p.exposure).items()})
    return row, parameters


def _shoulder_job(out_dir: str, settings: ShoulderSettings, k: int, label: str, split: str) -> list[tuple[dict, dict]]:
    """Render and save the images of shoulder patient k; return (manifest row, parameter row) per image."""
    rng = _child_rng(settings.seed, k)
    patient = draw_shoulder_patient(rng, label, settings.difficulty, settings.classes)
    views = ["AP", "Y"] if rng.random() < 0.5 else ["AP"]
    marker = patient.marker_draw < marker_probability(split, label, settings.classes, settings.confounder)
    out = []
    for j, view in enumerate(views):
        sample = shoulder_radiograph(_child_rng(settings.seed, k, j), settings.size, view=view, marker=marker,
                                     patient=patient)
        image_id = f"shoulder-{k:05d}-{view.lower()}"
        image_path = Path(out_dir) / "images" / f"{image_id}.png"
        mask_path = Path(out_dir) / "masks" / f"{image_id}.png"
        _save_png(_to_uint8(sample.image), image_path)
        _save_png(sample.mask * np.uint8(255), mask_path)
        row = {"image_id": image_id, "path": str(image_path.resolve()), "label": label,
               "patient_id": f"shoulder-p{k:05d}", "view": view, "source": SHOULDER_SOURCE, "split": split,
               "width": settings.size, "height": settings.size, "boxes": [sample.box],
               "mask_path": str(mask_path.resolve()), "side": patient.side, "marker": sample.marker}
        out.append((row, {"image_id": image_id, "patient_id": row["patient_id"], "split": split,
                          **sample.parameters()}))
    return out


def write_chest_dataset(out_dir: str | os.PathLike, n_images: int = 600, seed: int = 0, size: int = 256,
                        ratios: Sequence[float] = DEFAULT_RATIOS, workers: int | None = None) -> Path:
    """Write chest-like radiographs (one patient each) as PNGs plus manifest.csv; return the manifest path.

    Also writes ``parameters.csv`` (per-image generating parameters) and ``generator.json``.
    ``workers`` (processes; None = all cores for big jobs) never changes the result.
    """
    settings = ChestSettings(n_images=n_images, seed=seed, size=size, ratios=tuple(ratios))
    workers = _resolve_workers(workers, settings.n_images)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    splits = _assign_splits(settings.seed, [UNLABELLED] * settings.n_images, settings.ratios)
    jobs = [(str(out_dir), settings.seed, k, settings.size, splits[k]) for k in range(settings.n_images)]
    results = _run_all(_chest_job, jobs, workers)
    table = manifest_module.normalise_manifest(pd.DataFrame([row for row, _ in results]))
    manifest_path = manifest_module.write_manifest(table, out_dir / "manifest.csv")
    pd.DataFrame([parameters for _, parameters in results]).to_csv(out_dir / "parameters.csv", index=False)
    _write_json(out_dir / "generator.json", {
        "generator": "osteolib.data.synthetic", "version": GENERATOR_VERSION, "kind": "chest",
        "parameters": _settings_payload(settings), "n_images": len(table),
        "images_per_split": _counts(table, ["split"]), "views": _counts(table, ["view"]),
        "files": {"manifest": "manifest.csv", "parameters": "parameters.csv", "images": "images/"},
        "complete": True,
    })
    return manifest_path


def write_shoulder_dataset(out_dir: str | os.PathLike, n_patients: int = 270, seed: int = 0, size: int = 256,
                           difficulty: float = 0.5, confounder: float = 0.0,
                           classes: Sequence[str] = DEFAULT_CLASSES,
                           ratios: Sequence[float] = DEFAULT_RATIOS, workers: int | None = None) -> Path:
    """Write shoulder-like radiographs (1-2 views per patient) with evidence masks; return manifest.csv's path.

    Writes ``images/<image_id>.png``, ``masks/<image_id>.png`` (0/255), ``manifest.csv`` (split
    column filled, boxes and mask_path set, extra columns ``side`` and ``marker``), ``parameters.csv``
    (per-image generating parameters) and ``generator.json`` (settings and counts).
    ``workers`` (processes; None = all cores for big jobs) never changes the result.
    """
    settings = ShoulderSettings(n_patients=n_patients, seed=seed, size=size, difficulty=difficulty,
                                confounder=confounder, classes=tuple(classes), ratios=tuple(ratios))
    workers = _resolve_workers(workers, settings.n_patients)
    out_dir = Path(out_dir)
    for folder in ("images", "masks"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    labels = [_balanced_label(settings.seed, k, settings.classes) for k in range(settings.n_patients)]
    splits = _assign_splits(settings.seed, labels, settings.ratios)
    jobs = [(str(out_dir), settings, k, labels[k], splits[k]) for k in range(settings.n_patients)]
    results = [item for patient in _run_all(_shoulder_job, jobs, workers) for item in patient]
    table = manifest_module.normalise_manifest(pd.DataFrame([row for row, _ in results]))
    manifest_path = manifest_module.write_manifest(table, out_dir / "manifest.csv")
    pd.DataFrame([parameters for _, parameters in results]).to_csv(out_dir / "parameters.csv", index=False)
    patients = table.drop_duplicates("patient_id")
    marked = table[table["marker"].astype(bool)]
    _write_json(out_dir / "generator.json", {
        "generator": "osteolib.data.synthetic", "version": GENERATOR_VERSION, "kind": "shoulder",
        "parameters": _settings_payload(settings),
        "class_means_bone_quality": class_means(settings.classes, settings.difficulty),
        "n_images": len(table), "n_patients": len(patients),
        "patients_per_split_and_label": _counts(patients, ["split", "label"]),
        "images_per_split_and_label": _counts(table, ["split", "label"]),
        "images_with_marker_per_split_and_label": _counts(marked, ["split", "label"]) if len(marked) else {},
        "views": _counts(table, ["view"]),
        "files": {"manifest": "manifest.csv", "parameters": "parameters.csv", "images": "images/", "masks": "masks/"},
        "complete": True,
    })
    return manifest_path


# --------------------------------------------------------------------------------------------------
# The idempotent entry point
# --------------------------------------------------------------------------------------------------

_KINDS = {"chest": (ChestSettings, write_chest_dataset), "shoulder": (ShoulderSettings, write_shoulder_dataset)}


def _settings_payload(settings: ChestSettings | ShoulderSettings) -> dict[str, Any]:
    payload = asdict(settings)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in payload.items()}


def settings_for(kind: str, **params: Any) -> ChestSettings | ShoulderSettings:
    """Validated settings of a kind; unknown kinds or parameter names raise ValueError naming them."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}; got {kind!r}")
    settings_type = _KINDS[kind][0]
    known = set(inspect.signature(settings_type).parameters)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for kind {kind!r}; known: {sorted(known)}")
    return settings_type(**params)


def dataset_folder_name(kind: str, **params: Any) -> str:
    """``<kind>-<hash>``: the hash covers the generator version and every (defaulted) parameter."""
    settings = settings_for(kind, **params)
    key = json.dumps({"kind": kind, "version": GENERATOR_VERSION, "parameters": _settings_payload(settings)},
                     sort_keys=True)
    return f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _is_complete(folder: Path) -> bool:
    info = folder / "generator.json"
    if not (info.is_file() and (folder / "manifest.csv").is_file()):
        return False
    try:
        if not json.loads(info.read_text()).get("complete"):
            return False
        manifest_module.read_manifest(folder / "manifest.csv", check_files=True)
    except (ValueError, OSError):
        return False
    return True


def ensure_synthetic(kind: str, root: str | os.PathLike | None = None, workers: int | None = None,
                     **params: Any) -> Path:
    """Return the manifest of a synthetic data set, generating it only when no complete copy exists.

    ``kind`` is "chest" or "shoulder"; ``params`` are those of :func:`write_chest_dataset` /
    :func:`write_shoulder_dataset`. The folder is ``<root>/<kind>-<hash of all parameters>`` (root
    defaults to ``osteolib.paths.synthetic_dir()``). Generation happens in a temporary sibling folder
    renamed into place at the end, so an interrupted run never leaves a data set that is later
    trusted. Parameters are validated before anything is written; ``workers`` only sets the speed.
    """
    settings = settings_for(kind, **params)
    if workers is not None:
        _as_int("workers", workers, 1)
    root = Path(root) if root is not None else paths.synthetic_dir()
    folder = root / dataset_folder_name(kind, **params)
    if _is_complete(folder):
        return folder / "manifest.csv"
    root.mkdir(parents=True, exist_ok=True)
    if folder.exists():
        warnings.warn(f"{folder} is incomplete or damaged (files missing or generator.json absent); regenerating it",
                      stacklevel=2)
        stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        folder.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    temporary = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _KINDS[kind][1](temporary, workers=workers, **_settings_payload(settings))
        try:
            temporary.rename(folder)
        except OSError:
            # Another process finished the same data set first; theirs is identical, keep it.
            if not _is_complete(folder):
                raise
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return folder / "manifest.csv"
