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

Modules (imports point down this list): :mod:`.settings` (constants, validated settings), :mod:`.geometry`
(anatomy frame, attenuation, exposure), :mod:`.marker` (the laterality marker), :mod:`.chest`, :mod:`.shoulder`
(the two families), :mod:`.datasets` (data sets on disk and ``ensure_synthetic``). This package re-exports
their public API.
"""
from __future__ import annotations

from osteolib.data.synthetic import settings
from osteolib.data.synthetic.settings import (
    GENERATOR_VERSION,
    CHEST_SOURCE,
    SHOULDER_SOURCE,
    DEFAULT_CLASSES,
    THREE_CLASSES,
    DEFAULT_RATIOS,
    UNLABELLED,
    EVIDENCE_LABEL,
    MIN_SIZE,
    MAX_EFFECT,
    ChestSettings,
    ShoulderSettings,
)
from osteolib.data.synthetic import geometry
from osteolib.data.synthetic.geometry import (
    Pose,
    Exposure,
)
from osteolib.data.synthetic import marker
from osteolib.data.synthetic.marker import (
    CORNERS,
    marker_footprint,
    marker_probability,
)
from osteolib.data.synthetic import chest
from osteolib.data.synthetic.chest import (
    ChestParameters,
    chest_radiograph,
)
from osteolib.data.synthetic import shoulder
from osteolib.data.synthetic.shoulder import (
    ShoulderPatient,
    class_means,
    draw_shoulder_patient,
    ShoulderSample,
    shoulder_radiograph,
)
from osteolib.data.synthetic import datasets
from osteolib.data.synthetic.datasets import (
    child_rng,
    write_chest_dataset,
    write_shoulder_dataset,
    settings_for,
    dataset_folder_name,
    ensure_synthetic,
)

__all__ = [
    "settings",
    "geometry",
    "marker",
    "chest",
    "shoulder",
    "datasets",
    "GENERATOR_VERSION",
    "CHEST_SOURCE",
    "SHOULDER_SOURCE",
    "DEFAULT_CLASSES",
    "THREE_CLASSES",
    "DEFAULT_RATIOS",
    "UNLABELLED",
    "EVIDENCE_LABEL",
    "MIN_SIZE",
    "MAX_EFFECT",
    "ChestSettings",
    "ShoulderSettings",
    "Pose",
    "Exposure",
    "CORNERS",
    "marker_footprint",
    "marker_probability",
    "ChestParameters",
    "chest_radiograph",
    "ShoulderPatient",
    "class_means",
    "draw_shoulder_patient",
    "ShoulderSample",
    "shoulder_radiograph",
    "child_rng",
    "write_chest_dataset",
    "write_shoulder_dataset",
    "settings_for",
    "dataset_folder_name",
    "ensure_synthetic",
]
