"""Synthetic X-rays, shoulder radiographs: AP and scapular-Y views with a known truth (the evidence mask).

The class acts only through the patient's latent bone quality, in the humerus; the evidence mask is the
humerus plus the reach of the detector blur.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from osteolib.data.synthetic.geometry import (
    BLUR_TRUNCATE,
    MU_BONE,
    Canvas,
    Exposure,
    Film,
    Pose,
    band_noise,
    blur_sigma,
    draw_exposure,
    ellipsoid_chords,
    expose,
    polyline,
    ridges,
    smooth_curve,
    smooth_noise,
    soft_union,
    tube_chords,
)
from osteolib.data.synthetic.marker import CORNERS, draw_marker, marker_footprint
from osteolib.data.synthetic.settings import (
    DEFAULT_CLASSES,
    EVIDENCE_LABEL,
    MAX_EFFECT,
    MIN_SIZE,
    as_classes,
    as_int,
    as_unit,
)


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
    classes = as_classes(classes)
    effect = MAX_EFFECT * (1.0 - as_unit("difficulty", difficulty))
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


def draw_clinical_covariates(rng: np.random.Generator, label: str, signal: float,
                             classes: Sequence[str] = DEFAULT_CLASSES) -> dict[str, Any]:
    """A patient's age, sex and BMI, associated with the class by ``signal`` (0: independent of it; 1: older, more
    often female, leaner with each class step towards the last), and a T-score that defines the class (DXA's
    convention: the last class below -2.5). Drawn from their own generator, so the images do not change."""
    classes = as_classes(classes)
    position = float(np.linspace(-0.5, 0.5, len(classes))[classes.index(label)])  # healthy -0.5 ... last +0.5
    age, female, bmi, t = rng.standard_normal(), rng.random(), rng.standard_normal(), rng.standard_normal()
    t_centres = np.linspace(-0.5, -3.2, len(classes))
    return {"age": int(np.clip(round(66 + 16 * signal * position + 8 * age), 40, 95)),
            "sex": "F" if female < 0.5 + 0.5 * signal * position else "M",
            "bmi": round(float(np.clip(26 - 5 * signal * position + 3.5 * bmi, 15, 45)), 1),
            "t_score": round(float(t_centres[classes.index(label)] + 0.35 * t), 2)}


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


def _humerus(film: Film, rng: np.random.Generator, patient: ShoulderPatient, head: tuple[float, float],
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
        ellipsoid_chords(u, v, hx, hy, radius, radius * 0.96, 0.0, radius * 0.9, 1.0 - 0.13 * cti),
        ellipsoid_chords(u, v, *tuberosity, 0.05 * s, 0.06 * s, 20.0, 0.05 * s, 1.0 - 0.25 * cti),
        tube_chords(canvas, window, [(axis, radii, cores)]),
    ]
    # Union of the parts: the largest chord keeps one outline with no inner seams (a sum would draw
    # bright overlaps, a soft maximum bright ridges where the parts meet).
    outer = np.maximum.reduce([p[0] for p in parts])
    core = np.maximum.reduce([p[1] for p in parts])

    # Trabeculae: a ridge network filling the core, densest in the head and metaphysis, thinning to
    # fatty marrow down the shaft. Sparser and fainter with lower bone quality.
    px = canvas.size / 256.0
    network = ridges(band_noise(rng, u.shape, 0.9 * px + 0.2, 3.5 * px + 0.5),
                      0.15 + 0.6 * patient.trabecular_density)
    distal = np.clip(((u - top[0]) * direction[0] + (v - top[1]) * direction[1]) / 0.3, 0.0, 1.0)
    fill = (1.0 - 0.75 * distal) * (0.25 + 0.75 * network) * patient.trabecular_contrast
    film.attenuation[window] += MU_BONE * (outer - core) + MU_BONE * 0.45 * core * fill
    silhouette[window] = outer > 0
    return silhouette


def _shoulder_ap(film: Film, rng: np.random.Generator, patient: ShoulderPatient, abduction: float) -> np.ndarray:
    """Canonical right shoulder, AP: humerus lateral (image left), scapula and chest wall medial."""
    s, st = patient.bone_scale, patient.soft_tissue
    hx, hy = 0.42 + rng.normal(0, 0.01), 0.4 + rng.normal(0, 0.01)
    shaft = 4.0 + abduction
    direction = (-np.sin(np.deg2rad(shaft)), np.cos(np.deg2rad(shaft)))
    soft_union(film, rng, [
        ("ellipsoid", (1.02, 0.85, 0.56, 0.95, 0.0, 0.22 * st)),  # chest wall
        ("ellipsoid", (0.95, 0.0, 0.45, 0.2, -10.0, 0.15 * st)),  # trapezius and neck base
        ("ellipsoid", (hx - 0.04, hy + 0.02, 0.21 * st, 0.25 * st, 0.0, 0.16 * st)),  # deltoid
        ("tube", ([(hx - 0.06, hy + 0.1), (hx - 0.06 + 1.2 * direction[0], hy + 0.1 + 1.2 * direction[1])],
                  0.17 * st)),  # upper arm
    ])
    # Lung medially, behind the ribs.
    lung = film.region([smooth_curve([(0.7, 0.3), (0.95, 0.2), (1.3, 0.25), (1.3, 1.3), (0.8, 1.3), (0.68, 0.75)],
                                      n=40, closed=True)], soften=0.1)
    mottle = smooth_noise(rng, film.canvas.size, 30)
    film.attenuation -= lung * (0.85 * st - 0.02 * mottle)
    for j in range(6):
        y = 0.16 + 0.15 * j + rng.normal(0, 0.005)
        rib = smooth_curve([(1.15, y - 0.02), (0.95, y), (0.8, y + 0.06), (0.7, y + 0.16), (0.66, y + 0.28)], n=10)
        film.tube(MU_BONE * 0.8, rib, 0.016, inner=0.6)

    # Scapula: blade, lateral border, glenoid rim, spine and acromion, coracoid.
    gx, gy = hx + 0.11 * s, hy + 0.02
    film.plate(MU_BONE * 0.03, [(gx, gy - 0.07), (gx + 0.08, gy - 0.14), (1.1, 0.26), (1.1, 0.9),
                                 (gx + 0.25, gy + 0.62), (gx + 0.03, gy + 0.1)], 0.01)
    film.tube(MU_BONE, smooth_curve([(gx + 0.03, gy + 0.09), (gx + 0.12, gy + 0.38), (gx + 0.25, gy + 0.65)], n=8),
              0.02 * s, inner=0.5)
    film.ellipsoid(MU_BONE, gx, gy, 0.035 * s, 0.1 * s, angle=-5.0, inner=0.72)
    spine = smooth_curve([(hx - 0.13 * s, hy - 0.17 * s), (hx - 0.02, hy - 0.2 * s), (hx + 0.12, hy - 0.17 * s),
                           (0.78, hy - 0.1), (1.1, hy - 0.05)], n=12)
    film.tube(MU_BONE, spine, np.linspace(0.03, 0.022, 12) * s, inner=0.55)
    coracoid = smooth_curve([(gx + 0.1, gy - 0.2), (gx + 0.1, gy - 0.13), (gx + 0.05, gy - 0.1)], n=6)
    film.tube(MU_BONE, coracoid, np.linspace(0.03, 0.022, 6) * s, inner=0.45)
    # Clavicle: S-shaped, from the acromioclavicular joint medially and upwards, out of the picture.
    clavicle = smooth_curve([(hx + 0.05, hy - 0.23 * s), (0.62, hy - 0.25), (0.8, hy - 0.32), (1.12, hy - 0.34)],
                             n=12)
    film.tube(MU_BONE, clavicle, np.linspace(0.026, 0.034, 12) * s, inner=0.55)

    return _humerus(film, rng, patient, (hx, hy), shaft, neck_offset=(-0.065, 0.085))


def _shoulder_y(film: Film, rng: np.random.Generator, patient: ShoulderPatient, abduction: float) -> np.ndarray:
    """Canonical scapular Y view: the scapula's body, acromion and coracoid form a Y over the humeral head."""
    s, st = patient.bone_scale, patient.soft_tissue
    cx, cy = 0.5 + rng.normal(0, 0.01), 0.42 + rng.normal(0, 0.01)
    shaft = -4.0 + 0.5 * abduction  # the humeral shaft projects over the scapular body
    direction = (-np.sin(np.deg2rad(shaft)), np.cos(np.deg2rad(shaft)))
    soft_union(film, rng, [
        ("ellipsoid", (0.5, 0.9, 0.75, 0.85, 0.0, 0.2 * st)),  # the thorax seen obliquely
        ("ellipsoid", (0.5, 0.38, 0.36, 0.32, 0.0, 0.16 * st)),  # shoulder cap
        ("tube", ([(cx - 0.02, cy + 0.08), (cx - 0.02 + 1.2 * direction[0], cy + 0.08 + 1.2 * direction[1])],
                  0.16 * st)),
    ])
    mottle = smooth_noise(rng, film.canvas.size, 30)
    for lung_x in (0.08, 0.92):  # lung in front of and behind the scapular body
        lung = np.exp(-((film.canvas.u - lung_x) / 0.3) ** 2 - ((film.canvas.v - 1.0) / 0.4) ** 2)
        film.attenuation -= lung * (0.8 * st - 0.02 * mottle)
    for j in range(6):
        y = 0.3 + 0.14 * j + rng.normal(0, 0.005)
        film.tube(MU_BONE * 0.45, smooth_curve([(-0.15, y + 0.3), (0.3, y + 0.12), (0.7, y + 0.05), (1.15, y + 0.08)],
                                                 n=10), 0.016, inner=0.6)
    # The Y, one bone: body seen edge on (two thick borders), spine and acromion posterior, coracoid anterior.
    film.tubes(MU_BONE, [
        polyline(smooth_curve([(cx, cy), (cx + 0.05, cy + 0.35), (cx + 0.12, cy + 0.8)], n=10),
                  np.linspace(0.065, 0.035, 10) * s, 0.7),
        polyline(smooth_curve([(cx, cy), (cx + 0.15, cy - 0.2), (cx + 0.22, cy - 0.36)], n=8),
                  np.linspace(0.055, 0.035, 8) * s, 0.6),
        polyline(smooth_curve([(cx, cy), (cx - 0.12, cy - 0.15), (cx - 0.2, cy - 0.16), (cx - 0.24, cy - 0.12)], n=8),
                  np.linspace(0.045, 0.025, 8) * s, 0.5),
    ])
    clavicle = smooth_curve([(cx + 0.02, cy - 0.3), (cx + 0.2, cy - 0.38), (cx + 0.45, cy - 0.5)], n=8)
    film.tube(MU_BONE, clavicle, 0.036 * s, inner=0.55)  # clavicle, foreshortened
    return _humerus(film, rng, patient, (cx - 0.01, cy - 0.01), shaft, neck_offset=(-0.01, 0.1))


def _evidence(silhouette: np.ndarray, blur_sigma: float) -> np.ndarray:
    """The humerus plus the reach of the detector blur kernel: exactly where the class can change a pixel."""
    margin = int(np.ceil(BLUR_TRUNCATE * blur_sigma)) + 1
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
    size = as_int("size", size, MIN_SIZE)
    if view not in ("AP", "Y"):
        raise ValueError(f"view must be 'AP' or 'Y'; got {view!r}")
    if patient is None:
        patient = draw_shoulder_patient(rng, label, difficulty, classes)
    pose = Pose(rotation_deg=float(rng.normal(0.0, 4.0)), scale=float(rng.uniform(0.9, 1.08)),
                shift_x=float(rng.uniform(-0.04, 0.04)), shift_y=float(rng.uniform(-0.04, 0.04)))
    exposure = draw_exposure(rng)
    abduction = float(rng.uniform(-4.0, 10.0))
    film = Film(Canvas(size, pose))
    silhouette = (_shoulder_ap if view == "AP" else _shoulder_y)(film, rng, patient, abduction)
    image = expose(rng, film.attenuation, exposure)
    mask = _evidence(silhouette, blur_sigma(exposure, size))
    if patient.side == "L":  # a left shoulder is the mirror image of the canonical right one
        image, mask = image[:, ::-1].copy(), mask[:, ::-1].copy()
    if not mask.any():
        raise RuntimeError("internal error: the humerus fell outside the picture; the pose ranges are wrong")

    # The marker goes in a corner clear of the evidence (the draw happens whether or not it is used,
    # so turning the confounder on changes nothing else in the image).
    order = list(rng.permutation(len(CORNERS)))
    corner = ""
    for index in order:
        row, col, height, width = marker_footprint(size, CORNERS[index])
        if not mask[max(row - 2, 0):row + height + 2, max(col - 2, 0):col + width + 2].any():
            corner = CORNERS[index]
            break
    if marker:
        if not corner:
            raise RuntimeError("internal error: no corner of the picture is clear of the evidence mask")
        image = draw_marker(image, patient.side, corner)
    return ShoulderSample(image=image, mask=mask, box=_box_of(mask), patient=patient, view=view, marker=marker,
                          marker_corner=corner if marker else "", pose=pose, exposure=exposure,
                          abduction_deg=abduction)
