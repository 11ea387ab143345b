"""Synthetic X-rays, geometry: an anatomy frame seen through a pose, attenuation on a film, exposure.

Anatomy is a sum of attenuation line integrals (projected chords of ellipsoids, tubes and plates) on a
:class:`Canvas` (pixel grid with anatomy coordinates) collected by a :class:`Film`; :func:`expose` turns the
attenuation into a radiograph (photon noise, detector blur, film curve, grain).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage


# Linear attenuation per anatomy unit (one unit = the image width in the canonical frame).
MU_SOFT = 3.0
MU_BONE = 9.0


@dataclass(frozen=True)
class Pose:
    """Where the canonical anatomy frame lands in the picture (fractions of the image width)."""

    rotation_deg: float = 0.0
    scale: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0


class Canvas:
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


def ellipsoid_chords(u: np.ndarray, v: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float,
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


def tube_chords(canvas: Canvas, window: tuple[slice, slice],
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


def polyline(points: Any, radii: Any, inner: Any = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points, radii, inner) with the per-vertex values broadcast to the number of points."""
    points = np.asarray(points, dtype=np.float64)
    return (points, np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(points),)),
            np.broadcast_to(np.asarray(inner, dtype=np.float64), (len(points),)))


def smooth_curve(control: Sequence[Sequence[float]], n: int = 14, closed: bool = False) -> np.ndarray:
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


class Film:
    """Accumulates the attenuation (line integral along the beam) of every structure on a canvas."""

    def __init__(self, canvas: Canvas):
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
        outer, core = ellipsoid_chords(u, v, cx, cy, a, b, angle, min(a, b) if depth is None else depth, inner)
        self.attenuation[window] += mu * (outer - core)

    def tube(self, mu: float, points: Any, radii: Any, inner: Any = 0.0) -> None:
        """A hollow round bone (or soft-tissue cylinder when inner is 0) along a polyline."""
        self.tubes(mu, [polyline(points, radii, inner)])

    def tubes(self, mu: float, polylines: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """One bone made of several joined tubes (their union; see :func:`tube_chords`)."""
        reach = max(float(r.max()) for _, r, _ in polylines)
        everything = np.vstack([p for p, _, _ in polylines])
        window = self.canvas.window(everything[:, 0].min() - reach, everything[:, 1].min() - reach,
                                    everything[:, 0].max() + reach, everything[:, 1].max() + reach)
        if window is None:
            return
        outer, core = tube_chords(self.canvas, window, polylines)
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


def band_noise(rng: np.random.Generator, shape: tuple[int, int], fine: float, coarse: float) -> np.ndarray:
    """Band-pass filtered white noise with unit standard deviation (structures between fine and coarse px)."""
    white = rng.standard_normal(shape).astype(np.float32)
    band = ndimage.gaussian_filter(white, fine) - ndimage.gaussian_filter(white, coarse)
    return band / max(float(band.std()), 1e-6)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field (about ``cells`` blobs across) with unit standard deviation.

    Made by bicubic upsampling of a small grid of white noise: far cheaper than a wide gaussian filter.
    """
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def low_pass(image: np.ndarray, sigma: float) -> np.ndarray:
    """A wide gaussian blur, computed on a smaller copy (a wide kernel at full size is slow)."""
    size = image.shape[0]
    factor = max(1, int(sigma // 3))
    small_size = max(8, size // factor)
    small = np.asarray(Image.fromarray(image.astype(np.float32)).resize((small_size, small_size), Image.Resampling.BOX))
    small = ndimage.gaussian_filter(small, sigma * small_size / size, mode="nearest")
    return np.asarray(Image.fromarray(small.astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC))


def ridges(noise: np.ndarray, width: float) -> np.ndarray:
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


def draw_exposure(rng: np.random.Generator) -> Exposure:
    return Exposure(photons=float(rng.uniform(700, 2500)), blur_px=float(rng.uniform(0.6, 1.0)),
                    contrast=float(rng.uniform(0.85, 1.2)), gamma=float(rng.uniform(0.8, 1.25)),
                    fog=float(rng.uniform(0.0, 0.05)), grain=float(rng.uniform(0.004, 0.012)),
                    heel=float(rng.uniform(0.0, 0.25)), heel_angle=float(rng.uniform(0.0, 2 * np.pi)))


BLUR_TRUNCATE = 4.0  # the detector blur kernel ends at this many sigmas; the evidence margin covers it


def blur_sigma(exposure: Exposure, size: int) -> float:
    return exposure.blur_px * size / 256.0


def expose(rng: np.random.Generator, attenuation: np.ndarray, exposure: Exposure) -> np.ndarray:
    """Photon noise, detector blur, film curve, grain: attenuation -> MONOCHROME2 image in [0, 1].

    Every step is pointwise except the detector blur, whose kernel ends at ``BLUR_TRUNCATE`` sigmas:
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
    measured = ndimage.gaussian_filter(measured.astype(np.float32), blur_sigma(exposure, size),
                                       truncate=BLUR_TRUNCATE)
    image = 1.0 - np.exp(-exposure.contrast * np.maximum(measured, 0.0))
    image = exposure.fog + (1.0 - exposure.fog) * image ** exposure.gamma
    image = image + exposure.grain * rng.standard_normal(image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def soft_union(film: Film, rng: np.random.Generator, pieces: list[tuple[str, tuple]]) -> None:
    """Add overlapping soft-tissue volumes as one body (largest chord, so overlaps are not brighter)."""
    canvas = film.canvas
    body = np.zeros(film.attenuation.shape, dtype=np.float32)
    everywhere = (slice(0, canvas.size), slice(0, canvas.size))
    for kind, args in pieces:
        if kind == "ellipsoid":
            chord, _ = ellipsoid_chords(canvas.u, canvas.v, *args, 0.0)
        else:
            points, radius = args
            chord, _ = tube_chords(canvas, everywhere, [polyline(points, radius)])
        np.maximum(body, chord, out=body)
    # Muscle and fat layers are not uniform: a faint, coarse texture through the soft tissue.
    layers = smooth_noise(rng, canvas.size, 10)
    film.attenuation += MU_SOFT * body * (1.0 + 0.025 * layers)
