"""Figure helper: a grey X-ray with a saliency map, the expert region's outline and boxes on top (:func:`overlay`)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def overlay(
    image: np.ndarray,
    cam: np.ndarray | None = None,
    region: np.ndarray | None = None,
    boxes: Sequence[Mapping[str, Any]] | None = None,
    ax: Any = None,
    *,
    cmap: str = "jet",
    alpha: float = 0.4,
    title: str | None = None,
):
    """Draw a grey X-ray with a saliency map on top, the expert region's outline and boxes; returns the Axes.

    ``image`` (H, W) (or (1, H, W)); ``cam`` is resized bilinearly to the image for display if its
    grid differs; ``region`` (H, W) bool is outlined; ``boxes`` are dicts {"x","y","w","h","label"}
    in the image's pixel coordinates.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2:
        raise ValueError(f"overlay needs a single-channel image (H, W), got shape {image.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(image, cmap="gray", interpolation="nearest")
    if cam is not None:
        cam = np.asarray(cam, dtype=np.float32)
        if cam.shape != image.shape:
            from skimage.transform import resize

            cam = resize(cam, image.shape, order=1, preserve_range=True, anti_aliasing=False)
        ax.imshow(cam, cmap=cmap, alpha=alpha, vmin=0.0, vmax=max(1.0, float(cam.max())), interpolation="bilinear")
    if region is not None:
        region = np.asarray(region).astype(bool)
        if region.shape != image.shape:
            raise ValueError(f"overlay: region {region.shape} and image {image.shape} differ in shape")
        if region.any() and not region.all():
            ax.contour(region.astype(float), levels=[0.5], colors="lime", linewidths=1.2)
    for box in boxes or []:
        ax.add_patch(Rectangle((box["x"], box["y"]), box["w"], box["h"], fill=False, edgecolor="cyan", linewidth=1.2))
        if box.get("label"):
            ax.text(box["x"], box["y"] - 1, str(box["label"]), color="cyan", fontsize=7, va="bottom")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def errors_figure(images: Any, cams: Any, errors: Any, regions: Any = None, title: str = ""):
    """One column per error of :func:`osteolib.evaluation.stats.confident_errors` (false positives first): the image
    with its map, the expert region outlined where there is one, and the true label and positive probability."""
    import matplotlib.pyplot as plt

    n = len(errors)
    if n == 0:
        raise ValueError("no errors to show: the run called every image of the split correctly")
    fig, axes = plt.subplots(1, n, figsize=(2.1 * n, 2.5), squeeze=False)
    for k, row in enumerate(errors.itertuples()):
        region = None if regions is None else np.asarray(regions[k]).squeeze() > 0
        overlay(np.asarray(images[k]).squeeze(), cams[k], region=region if region is not None and region.any() else None,
                ax=axes[0, k])
        axes[0, k].set_title(f"{row.kind} #{row.rank}\ntrue {row.label}, p={row.prob_positive:.2f}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
