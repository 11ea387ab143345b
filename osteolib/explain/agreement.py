"""Agreement of saliency maps with expert regions (pure numpy, one map and one boolean region at a time).

:func:`pointing_game`, :func:`energy_in_region`, :func:`iou_dice` at Otsu / quantile thresholds
(:func:`map_threshold`), :func:`region_auc`; :func:`agreement_table` scores a batch into one row
per image (images without a region get a row too, marked and counted) and
:func:`agreement_summary` aggregates it.

Maps are ``(H, W)`` float arrays in [0, 1] (bright = relevant); regions are ``(H, W)`` bool arrays on the
same grid, as ``ImageCache.regions`` provides them.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy.ndimage import distance_transform_edt
from skimage.filters import threshold_otsu
from sklearn.metrics import roc_auc_score

DEFAULT_THRESHOLDS: tuple[str | float, ...] = ("otsu", 0.5, 0.8, 0.9)


def _check_pair(cam: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cam = np.asarray(cam, dtype=np.float64)
    region = np.asarray(region)
    if cam.ndim != 2:
        raise ValueError(f"cam must be a 2-D map (H, W), got shape {cam.shape}")
    if region.shape != cam.shape:
        raise ValueError(f"region shape {region.shape} differs from cam shape {cam.shape}: resample one onto the other's grid")
    if not np.isfinite(cam).all():
        raise ValueError("cam has non-finite values")
    region = region.astype(bool)
    if not region.any():
        raise ValueError("region is empty: an image without an expert region has no agreement score")
    return cam, region


def pointing_game(cam: np.ndarray, region: np.ndarray, tolerance_px: float = 0) -> float:
    """1.0 if the map's maximum lies in the region (grown by ``tolerance_px``), else 0.0.

    Ties are scored as the share of maximal pixels inside, i.e. the expected hit when the tie is
    broken at random: a flat map scores the region's area share (chance), neither a free hit nor a miss.
    """
    cam, region = _check_pair(cam, region)
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
    if tolerance_px > 0:
        region = distance_transform_edt(~region) <= tolerance_px
    peaks = cam == cam.max()
    return float(region[peaks].mean())


def energy_in_region(cam: np.ndarray, region: np.ndarray) -> float:
    """Share of the map's total (non-negative) mass inside the region; NaN for an all-zero map."""
    cam, region = _check_pair(cam, region)
    if cam.min() < 0:
        raise ValueError("energy_in_region needs a non-negative map (e.g. after ReLU / min-max, as compute_cams gives)")
    total = cam.sum()
    return float(cam[region].sum() / total) if total > 0 else math.nan


def map_threshold(cam: np.ndarray, rule: str | float) -> float:
    """The value above which a map counts as "on": ``"otsu"`` or a quantile q in (0, 1) of its values.

    A constant map gets its own value as threshold, so nothing is above it (an empty mask).
    """
    cam = np.asarray(cam, dtype=np.float64)
    if isinstance(rule, str):
        if rule != "otsu":
            raise ValueError(f"threshold rule must be 'otsu' or a quantile in (0, 1), got {rule!r}")
        if cam.max() == cam.min():
            return float(cam.max())
        return float(threshold_otsu(cam))
    if not 0 < float(rule) < 1:
        raise ValueError(f"quantile threshold must lie in (0, 1), got {rule!r}")
    return float(np.quantile(cam, float(rule)))


def iou_dice(cam: np.ndarray, region: np.ndarray, threshold: float | str = "otsu") -> tuple[float, float]:
    """IoU and Dice of ``cam > threshold`` with the region; ``threshold`` is a map value or ``"otsu"``."""
    cam, region = _check_pair(cam, region)
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold must be a map value or 'otsu', got {threshold!r}")
        threshold = map_threshold(cam, "otsu")
    on = cam > float(threshold)
    overlap = np.logical_and(on, region).sum()
    union = np.logical_or(on, region).sum()
    return float(overlap / union), float(2 * overlap / (on.sum() + region.sum()))


def region_auc(cam: np.ndarray, region: np.ndarray) -> float:
    """ROC AUC of the map's values separating region from non-region pixels (threshold-free).

    1 = every region pixel outranks every other pixel, 0.5 = no separation (e.g. a flat map),
    0 = inverted; NaN when the region covers the whole image (nothing to separate it from).
    """
    cam, region = _check_pair(cam, region)
    if region.all():
        return math.nan
    return float(roc_auc_score(region.ravel(), cam.ravel()))


def _threshold_name(rule: str | float) -> str:
    return "otsu" if rule == "otsu" else f"q{float(rule) * 100:g}"


def _measure_names(thresholds: Sequence[str | float]) -> list[str]:
    names = ["region_fraction", "pointing_game", "energy_in_region", "region_auc"]
    for rule in thresholds:
        names += [f"iou_{_threshold_name(rule)}", f"dice_{_threshold_name(rule)}", f"threshold_{_threshold_name(rule)}"]
    return names


def agreement_measures(cam: np.ndarray, region: np.ndarray, thresholds: Sequence[str | float] = DEFAULT_THRESHOLDS,
                       tolerance_px: float = 0) -> dict[str, float]:
    """Every agreement measure of one map with one (non-empty) region, as a flat dict."""
    cam, region = _check_pair(cam, region)
    row: dict[str, float] = {
        "region_fraction": float(region.mean()),
        "pointing_game": pointing_game(cam, region, tolerance_px),
        "energy_in_region": energy_in_region(cam, region),
        "region_auc": region_auc(cam, region),
    }
    for rule in thresholds:
        name = _threshold_name(rule)
        value = map_threshold(cam, rule)
        row[f"iou_{name}"], row[f"dice_{name}"] = iou_dice(cam, region, value)
        row[f"threshold_{name}"] = value
    return row


def agreement_table(
    cams: np.ndarray,
    regions: np.ndarray,
    has_region: Sequence[bool] | np.ndarray,
    image_ids: Sequence[str],
    *,
    thresholds: Sequence[str | float] = DEFAULT_THRESHOLDS,
    tolerance_px: float = 0,
    **identifiers: Any,
) -> pd.DataFrame:
    """One row per image with every agreement measure; images without a usable region are kept.

    ``cams`` (N, H, W) and ``regions`` (N, H, W) (e.g. ``ImageCache.regions`` rows, any values where
    ``has_region`` is False). ``identifiers`` become columns: a scalar is repeated (``method="gradcam"``,
    ``backbone=...``, ``seed=0``), a sequence of length N is per image. Rows without a region get
    ``has_region=False``, NaN measures and a ``note``; a flagged region that is empty on this grid is
    also kept, with NaN measures and a note saying so. Measures are described at each function.
    """
    cams = np.asarray(cams)
    regions = np.asarray(regions)
    has_region = np.asarray(has_region, dtype=bool).reshape(-1)
    ids = [str(i) for i in image_ids]
    n = len(ids)
    if cams.ndim != 3 or cams.shape != regions.shape or len(cams) != n or len(has_region) != n:
        raise ValueError(
            f"agreement_table: cams {cams.shape}, regions {regions.shape}, has_region ({len(has_region)},) and "
            f"{n} image_ids must all describe the same N images (cams and regions as (N, H, W) on one grid)"
        )
    for rule in thresholds:
        map_threshold(np.zeros(1), rule)  # a bad rule fails here, before any image is scored
    if len(set(ids)) != n:
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"agreement_table: image_ids repeat: {dupes[:10]}")
    columns: dict[str, list[Any]] = {}
    for key, value in identifiers.items():
        if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray, pd.Series)):
            columns[key] = [value] * n
        elif len(value) == n:
            columns[key] = list(value)
        else:
            raise ValueError(f"agreement_table: identifier {key!r} has {len(value)} values for {n} images")
    measure_names = _measure_names(thresholds)
    rows = []
    for i, image_id in enumerate(ids):
        row: dict[str, Any] = {"image_id": image_id, "has_region": bool(has_region[i]), "note": ""}
        if not has_region[i]:
            row["note"] = "no expert region"
        elif not np.asarray(regions[i]).any():
            row["note"] = "expert region is empty on this grid"
        if row["note"]:
            row.update({name: math.nan for name in measure_names})
        else:
            try:
                row.update(agreement_measures(cams[i], regions[i], thresholds, tolerance_px))
            except ValueError as err:
                raise ValueError(f"image {image_id!r} (row {i}): {err}") from err
        rows.append(row)
    table = pd.DataFrame(rows)
    for key, values in columns.items():
        table.insert(len(table.columns), key, values)
    return table


# Summarised per group; region_fraction is the chance level of the pointing game and of the energy share.
AGREEMENT_MEASURES = ("region_fraction", "pointing_game", "energy_in_region", "region_auc")


def agreement_summary(table: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Counts and mean / standard deviation of every measure, per group of ``by`` columns.

    ``n_images`` = ``n_scored`` + ``n_without_region`` + ``n_empty_region``: every image of the table
    is accounted for. The mean pointing game is the hit rate.
    """
    by = list(by)
    missing = [c for c in ["image_id", "has_region", "note", *by] if c not in table.columns]
    if missing:
        raise ValueError(f"agreement_summary: the table lacks columns {missing}; pass agreement_table's output")
    measures = [c for c in table.columns if c in AGREEMENT_MEASURES or c.startswith(("iou_", "dice_"))]
    groups = table.groupby(by, sort=True, dropna=False) if by else [((), table)]
    rows = []
    for key, group in groups:
        scored = group[group["note"] == ""]
        row: dict[str, Any] = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row.update(
            n_images=len(group),
            n_with_region=int(group["has_region"].sum()),
            n_without_region=int((~group["has_region"].astype(bool)).sum()),
            n_empty_region=int((group["has_region"].astype(bool) & (group["note"] != "")).sum()),
            n_scored=len(scored),
        )
        for m in measures:
            values = scored[m].astype(float)
            row[f"{m}_mean"] = float(values.mean()) if values.notna().any() else math.nan
            row[f"{m}_std"] = float(values.std(ddof=1)) if values.notna().sum() > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)
