"""Small figure helpers shared by every stage: one style, figures saved as PNG and PDF."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np


def save_figure(fig: plt.Figure, folder: str | Path, name: str, formats: tuple[str, ...] = ("png", "pdf"),
                dpi: int = 150) -> list[Path]:
    """Save ``fig`` as ``<folder>/<name>.<fmt>`` for each format; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = folder / f"{name}.{fmt}"
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        paths.append(path)
    return paths


def show_xray(ax: plt.Axes, image: np.ndarray, title: str | None = None) -> None:
    """An X-ray as a radiologist sees it: grey scale, bright = dense, no axes."""
    ax.imshow(image, cmap="gray", vmin=0, vmax=1 if image.dtype.kind == "f" else 255, interpolation="lanczos")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)


def draw_boxes(ax: plt.Axes, boxes: list[dict] | None, color: str = "yellow", label: bool = True) -> None:
    """Outline expert boxes ({x, y, w, h, label} in the displayed image's pixels)."""
    from matplotlib.patches import Rectangle

    for box in boxes or []:
        ax.add_patch(Rectangle((box["x"], box["y"]), box["w"], box["h"], fill=False, edgecolor=color, linewidth=1.2))
        if label and box.get("label"):
            ax.text(box["x"], box["y"] - 2, str(box["label"]), color=color, fontsize=6, va="bottom")


def draw_mask_outline(ax: plt.Axes, mask: np.ndarray, color: str = "cyan") -> None:
    if mask is not None and np.any(mask):
        ax.contour(mask > 0, levels=[0.5], colors=[color], linewidths=0.8)
