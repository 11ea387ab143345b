"""Synthetic X-rays, laterality marker: the optional confounder (a lead "R"/"L" letter in a corner).

See :mod:`osteolib.data.synthetic` for how its probability follows the label in train and val but not in test.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage import draw


_GLYPHS = {
    "L": ["1....", "1....", "1....", "1....", "1....", "1....", "11111"],
    "R": ["1111.", "1...1", "1...1", "1111.", "1.1..", "1..1.", "1...1"],
}
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def marker_footprint(size: int, corner: str) -> tuple[int, int, int, int]:
    """(row, col, height, width) of the marker block in a corner."""
    cell = max(1, round(size * 0.012))
    height, width = 9 * cell, 7 * cell  # 7x5 glyph plus a one-cell plastic rim
    margin = max(2, round(size * 0.04))
    row = margin if corner.startswith("top") else size - margin - height
    col = margin if corner.endswith("left") else size - margin - width
    return row, col, height, width


def draw_marker(image: np.ndarray, letter: str, corner: str) -> np.ndarray:
    """Burn a lead letter in its plastic block into the image (saturated white, like lead)."""
    size = image.shape[0]
    row, col, height, width = marker_footprint(size, corner)
    cell = height // 9
    out = image.copy()
    rr, cc = draw.rectangle((row, col), extent=(height, width), shape=out.shape)
    out[rr, cc] = np.clip(out[rr, cc] + 0.12, 0.0, 1.0)  # the faint plastic holder
    glyph = np.array([[ch == "1" for ch in line] for line in _GLYPHS[letter]])
    for gr, gc in zip(*np.nonzero(glyph)):
        rr, cc = draw.rectangle((row + (gr + 1) * cell, col + (gc + 1) * cell), extent=(cell, cell), shape=out.shape)
        out[rr, cc] = 1.0
    return out


def marker_probability(split: str, label: str, classes: Sequence[str], confounder: float) -> float:
    """Chance that an image carries the laterality marker (see :mod:`osteolib.data.synthetic`)."""
    if split == "test":
        return 0.5
    classes = tuple(classes)
    position = -1.0 + 2.0 * classes.index(label) / (len(classes) - 1)
    return 0.5 + 0.5 * confounder * position
