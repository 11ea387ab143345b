"""Synthetic X-rays, chest radiographs: unlabelled chest-like frontal films for self-supervised pretraining."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import draw

from osteolib.data.synthetic.geometry import (
    MU_BONE,
    MU_SOFT,
    Canvas,
    Exposure,
    Film,
    Pose,
    draw_exposure,
    ellipsoid_chords,
    expose,
    low_pass,
    smooth_curve,
    smooth_noise,
    soft_union,
)
from osteolib.data.synthetic.marker import CORNERS, draw_marker
from osteolib.data.synthetic.settings import MIN_SIZE, as_int


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
    return ChestParameters(view=view, pose=pose, exposure=draw_exposure(rng),
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
    return smooth_curve(np.asarray(control) + jitter, n=90, closed=True)


def _vessel_tree(canvas: Canvas, rng: np.random.Generator, hilum: tuple[float, float], side: int) -> np.ndarray:
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
    return render_chest(rng, as_int("size", size, MIN_SIZE))[0]


def render_chest(rng: np.random.Generator, size: int) -> tuple[np.ndarray, ChestParameters]:
    p = _draw_chest_parameters(rng)
    film = Film(Canvas(size, p.pose))
    canvas = film.canvas
    w, h = p.thorax_half_width, p.lung_height
    soft = 1.0 + rng.normal(0.0, 0.08)  # body habitus

    # Soft tissue: trunk, neck, shoulders and upper arms as one body.
    pieces: list[tuple[str, tuple]] = [("ellipsoid", (0.5, 0.72, w + 0.08, 0.82, 0.0, 0.2 * soft)),
                                       ("tube", ([(0.5, -0.2), (0.5, 0.12)], 0.085 * soft))]
    for side in (-1, 1):
        pieces.append(("ellipsoid", (0.5 + side * (w + 0.02), 0.17, 0.15, 0.09, 0.0, 0.11 * soft)))
        pieces.append(("tube", ([(0.5 + side * (w + 0.1), 0.15), (0.5 + side * (w + 0.13), 1.2)], 0.07 * soft)))
    soft_union(film, rng, pieces)
    for side in (-1, 1):
        arm = [(0.5 + side * (w + 0.11), 0.17), (0.5 + side * (w + 0.14), 1.2)]
        film.tube(MU_BONE, arm, 0.022, inner=0.55)  # humeral shafts at the film edge
        film.ellipsoid(MU_BONE * 0.7, 0.5 + side * (w + 0.12), 0.16, 0.065, 0.06, inner=0.88)  # humeral heads
        # Scapular blades over the upper lateral lung, and their lateral borders.
        film.plate(MU_BONE * 0.012, [(0.5 + side * (w + 0.07), 0.13), (0.5 + side * (w - 0.08), 0.17),
                                      (0.5 + side * (w - 0.05), 0.46), (0.5 + side * (w + 0.02), 0.5)], 0.008)
        film.tube(MU_BONE * 0.5, [(0.5 + side * (w + 0.06), 0.2), (0.5 + side * (w - 0.04), 0.46)], 0.01, inner=0.5)

    # Lungs: air replaces tissue; the heart and great vessels push into the medial lung.
    lungs = film.region([_lung_outline(side, p, rng) for side in (-1, 1)], soften=0.08)
    hw = p.heart_half_width
    for centre, axes, angle in (((0.535, 0.07 + h - 0.13), (hw, hw * 0.8), -15.0), ((0.55, 0.25), (0.032, 0.03), 0.0)):
        window = canvas.window(centre[0] - axes[0], centre[1] - axes[0], centre[0] + axes[0], centre[1] + axes[0])
        if window is not None:
            shadow, _ = ellipsoid_chords(canvas.u[window], canvas.v[window], *centre, *axes, angle, 1.0, 0.0)
            lungs[window] *= np.clip(1.0 - 3.0 * shadow, 0.0, 1.0)
    # Vessels branch from the hila and thin out towards the periphery.
    hila = np.exp(-(((canvas.u - 0.5) / 0.16) ** 2 + ((canvas.v - 0.42) / 0.2) ** 2))
    px = size / 256.0
    vessels = sum(_vessel_tree(canvas, rng, (0.5 + side * 0.08, 0.43), side) for side in (-1, 1))
    # A drawn line is one pixel wide at any size: scale its weight so a vessel keeps its width in anatomy.
    vessels = ndimage.gaussian_filter(vessels, 0.6 * px) * min(px, 1.0)
    mottle = smooth_noise(rng, size, 30)
    film.attenuation -= lungs * (0.72 * soft - 0.22 * hila - 0.04 * mottle)
    film.attenuation += lungs * vessels * 0.45
    # Trachea: an air column down the upper mediastinum to the carina.
    film.tube(-MU_SOFT, [(0.5, -0.1), (0.5, 0.2), (0.505, 0.3)], 0.018, inner=0.0)
    if p.gastric_bubble:
        film.ellipsoid(-MU_SOFT, 0.6, 0.07 + h + 0.02, 0.045, 0.025, depth=0.05)

    # Spine: faint vertebral bodies with their pedicles, seen through the mediastinum.
    for k in range(18):
        film.ellipsoid(MU_BONE * 0.35, 0.5, -0.02 + k * 0.058, 0.033, 0.022, depth=0.02, inner=0.7)
        for side in (-1, 1):
            film.ellipsoid(MU_BONE * 0.5, 0.5 + side * 0.026, -0.02 + k * 0.058, 0.008, 0.011, inner=0.5)

    # Ribs: posterior arcs leave the spine, rise a little, then sweep out and down along the chest
    # wall; fainter anterior arcs run back down and in towards the sternum.
    spacing = h / 10.0
    for side in (-1, 1):
        x = lambda f: 0.5 + side * f  # noqa: E731
        for i in range(10):
            y = 0.075 + i * spacing
            reach = w * (0.7 + 0.3 * min(i, 3) / 3)
            posterior = smooth_curve([(x(0.035), y), (x(0.09), y - 0.012), (x(reach * 0.5), y + 0.012),
                                       (x(reach * 0.85), y + 0.055), (x(reach), y + 0.12)], n=9)
            film.tube(MU_BONE, posterior, np.linspace(0.009, 0.013, 9) * (1 + rng.normal(0, 0.04, 9)), inner=0.62)
            anterior = smooth_curve([(x(reach), y + 0.12), (x(reach * 0.9), y + 0.18),
                                      (x(reach * 0.65), y + 0.25), (x(reach * 0.35), y + 0.3)], n=7)
            film.tube(MU_BONE * 0.4, anterior, 0.013, inner=0.6)
        # Clavicles: S-shaped, from the sternal notch out and up to the shoulder.
        clavicle = smooth_curve([(x(0.035), 0.16), (x(0.12), 0.145), (x(w * 0.7), 0.11), (x(w + 0.08), 0.125)], n=12)
        film.tube(MU_BONE, clavicle, 0.016, inner=0.55)

    image = expose(rng, film.attenuation, p.exposure)
    # Computed-radiography processing sharpens detail (unsharp mask); there is no class signal here.
    smooth = low_pass(image, 0.04 * size)
    image = np.clip(image + 0.6 * (image - smooth), 0.0, 1.0)
    if p.marker:
        image = draw_marker(image, "L" if rng.random() < 0.5 else "R", CORNERS[int(rng.integers(0, 2))])
    return image.astype(np.float32), p
