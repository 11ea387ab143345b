"""A plain decode-and-resize loop: every file through PIL once, as grey, resized to ``size`` x ``size``."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def decode_and_resize(files: Sequence[Path], size: int) -> np.ndarray:
    out = np.empty((len(files), size, size), dtype=np.uint8)
    for row, file in enumerate(files):
        with Image.open(file) as image:
            out[row] = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BILINEAR))
    return out
