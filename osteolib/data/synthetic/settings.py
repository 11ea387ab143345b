"""Synthetic X-rays, settings: the constants of the generator and the validated settings of a data set.

``as_int`` / ``as_unit`` / ``as_classes`` are the checks the settings use; the renderers and writers use them too.
"""
from __future__ import annotations

import re

from dataclasses import dataclass
from typing import Any

import numpy as np


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


def as_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (
            isinstance(value, float) and value.is_integer()):
        raise ValueError(f"{name} must be a whole number >= {minimum}; got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def as_unit(name: str, value: Any) -> float:
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


def as_classes(value: Any) -> tuple[str, ...]:
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
        object.__setattr__(self, "n_images", as_int("n_images", self.n_images, 1))
        object.__setattr__(self, "seed", as_int("seed", self.seed, 0))
        object.__setattr__(self, "size", as_int("size", self.size, MIN_SIZE))
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
    # another hospital: its name goes into the source ("synthetic-shoulder-<site>") and the patient ids, so a second
    # synthetic set can serve as an external test set (empty: the default site, ids as before)
    site: str = ""
    # None: no clinical columns; a share in [0, 1]: each patient gets age, sex and BMI whose association with the
    # label grows with it (0: none), and a T-score that defines the label (the leakage guard's test case)
    clinical_signal: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", as_int("seed", self.seed, 0))
        if self.clinical_signal is not None:
            object.__setattr__(self, "clinical_signal", as_unit("clinical_signal", self.clinical_signal))
        object.__setattr__(self, "size", as_int("size", self.size, MIN_SIZE))
        if not isinstance(self.site, str) or not re.fullmatch(r"[A-Za-z0-9_]*", self.site):
            raise ValueError(f"site must be letters, digits or '_' (it becomes part of file and patient names); "
                             f"got {self.site!r}")
        object.__setattr__(self, "difficulty", as_unit("difficulty", self.difficulty))
        object.__setattr__(self, "confounder", as_unit("confounder", self.confounder))
        object.__setattr__(self, "classes", as_classes(self.classes))
        object.__setattr__(self, "ratios", _as_ratios(self.ratios))
        n_classes = len(self.classes)
        object.__setattr__(self, "n_patients", as_int(f"n_patients (at least one per class, {n_classes})",
                                                        self.n_patients, n_classes))
