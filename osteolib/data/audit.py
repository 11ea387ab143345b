"""The data audit: what a reviewer should know about a data set before any model sees it.

Counts per class, split, view and source; patients; image sizes and bit depths; the normalisation constants;
near-duplicates and label conflicts; association between the label and acquisition factors (a confounder warning);
a sample grid with the expert regions drawn. Notebook 00 shows these and saves :func:`audit_summary` as JSON,
which later notebooks read (normalisation mean and std, class names, counts).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from osteolib.data.io import read_xray
from osteolib.data.manifest import ManifestError
from osteolib.data.splits import copies_across_splits
from osteolib.plotting import draw_boxes, draw_mask_outline, show_xray

# the study's published normalisation, shown beside the measured one
STUDY_MEAN, STUDY_STD = 0.5256, 0.252


def category_counts(df: pd.DataFrame, by: str) -> pd.DataFrame:
    """Images and patients per value of ``by`` and label."""
    grouped = df.groupby([by, "label"], dropna=False)
    return pd.DataFrame({"images": grouped.size(), "patients": grouped["patient_id"].nunique()}).reset_index()


def image_properties(scan: pd.DataFrame) -> pd.DataFrame:
    """Counts of image size / bit depth / format combinations from :func:`osteolib.data.io.scan_files`."""
    columns = [c for c in ("format", "bit_depth", "width", "height", "was_color") if c in scan.columns]
    return scan.groupby(columns, dropna=False).size().rename("images").reset_index().sort_values(
        "images", ascending=False, ignore_index=True)


def association(df: pd.DataFrame, factor: str, target: str = "label") -> dict[str, Any]:
    """Chi-square test and Cramér's V between the label and an acquisition factor (view, source, marker ...)."""
    table = pd.crosstab(df[factor].astype(str), df[target].astype(str))
    if table.shape[0] < 2 or table.shape[1] < 2:
        return {"factor": factor, "levels": int(table.shape[0]), "chi2": None, "p_value": None, "cramers_v": None}
    chi2, p, _, _ = stats.chi2_contingency(table, correction=False)
    n = table.to_numpy().sum()
    v = float(np.sqrt(chi2 / (n * (min(table.shape) - 1))))
    return {"factor": factor, "levels": int(table.shape[0]), "chi2": float(chi2), "p_value": float(p),
            "cramers_v": v}


def confounder_warnings(df: pd.DataFrame, factors: Sequence[str] = ("view", "source"), threshold: float = 0.2,
                        alpha: float = 0.01) -> tuple[pd.DataFrame, list[str]]:
    """Association table for each factor and a plain-language warning where the label is predictable from it."""
    rows = [association(df, f) for f in factors if f in df.columns]
    table = pd.DataFrame(rows)
    warnings = []
    for row in rows:
        if row["cramers_v"] is not None and row["cramers_v"] >= threshold and row["p_value"] < alpha:
            warnings.append(f"label is associated with {row['factor']} (Cramér's V = {row['cramers_v']:.2f}, "
                            f"p = {row['p_value']:.1e}): a model can partly predict the label from "
                            f"{row['factor']} alone; check explanations for shortcut learning")
    return table, warnings


def sample_grid(df: pd.DataFrame, per_class: int = 4, seed: int = 0, size: float = 1.8):
    """A grid of random images per class with expert boxes (yellow) and masks (cyan) drawn."""
    import matplotlib.pyplot as plt

    labels = sorted(df["label"].unique())
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(labels), per_class, figsize=(size * per_class, size * len(labels) + 0.3),
                             squeeze=False)
    for r, label in enumerate(labels):
        rows = df[df["label"] == label]
        # show annotated images first where there are any: they are what a reviewer wants to see
        annotated = rows[rows["boxes"].notna() | rows["mask_path"].notna()]
        plain = rows.drop(annotated.index)
        order = list(rng.permutation(annotated.index)) + list(rng.permutation(plain.index))
        for c in range(per_class):
            ax = axes[r, c]
            if c >= len(order):
                ax.set_axis_off()
                continue
            row = df.loc[order[c]]
            show_xray(ax, read_xray(row["path"]).pixels, f"{label} · {row['view']}\n{str(row['image_id'])[-24:]}")
            draw_boxes(ax, row["boxes"])
            if row["mask_path"]:
                draw_mask_outline(ax, read_xray(row["mask_path"]).pixels > 0.5)
    fig.tight_layout()
    return fig


def intensity_histogram(cache, ids_by_label: dict[str, Sequence[str]], bins: int = 64):
    """Pixel intensity distributions per class (from the cache: what the model will see)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for label, ids in ids_by_label.items():
        rows = [cache.index[i] for i in ids]
        values = np.asarray(cache.images[rows]).ravel() / 255.0
        ax.hist(values, bins=bins, density=True, histtype="step", label=f"{label} (n={len(rows)})")
    ax.set_xlabel("pixel intensity (0-1)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def class_order(labels: Sequence[str], classes: Sequence[str] | None = None,
                positive_class: str | None = None) -> tuple[list[str], str | None]:
    """The classes in the order later notebooks use: the positive class LAST (they take ``classes[-1]``).

    Without ``classes`` and ``positive_class``: the sorted labels (the default, unchanged). ``classes`` gives
    the order (names are stripped; it must name exactly the manifest's labels); ``positive_class`` (default:
    the last) is moved last when it is not. Returns the order and a note saying what was moved (or None).
    """
    present = sorted({str(label).strip() for label in labels})
    if classes is None and positive_class is None:
        return sorted(pd.unique(pd.Series(list(labels)))), None
    if classes is None:
        order = list(present)
    else:
        if isinstance(classes, str) or not all(isinstance(c, str) for c in classes):
            raise ManifestError(f"classes: must be a list of class names, got {classes!r}; write e.g. "
                                f"classes: [normal, osteoporosis]")
        order = [c.strip() for c in classes]
        repeated = sorted({c for c in order if order.count(c) > 1})
        missing, unknown = sorted(set(present) - set(order)), sorted(set(order) - set(present))
        if repeated or missing or unknown:
            raise ManifestError(
                f"classes: {list(classes)} does not name the data set's classes {present}"
                + (f"; repeated {repeated}" if repeated else "") + (f"; not listed {missing}" if missing else "")
                + (f"; not in the data {unknown}" if unknown else "")
                + ". What to do: list each class once, or merge/drop classes with label_map "
                  "({osteopenia: drop} or {osteopenia: osteoporosis})")
    if positive_class is None:
        return order, None
    positive = str(positive_class).strip()
    if positive not in order:
        raise ManifestError(f"positive_class: {positive_class!r} is not a class of the data set {order}. What to "
                            f"do: name one of them (None: the last)")
    if order[-1] == positive:
        return order, None
    moved = [c for c in order if c != positive] + [positive]
    return moved, (f"positive class {positive!r} moved last: classes {order} -> {moved} (later notebooks take "
                   f"the last class as the positive one)")


def audit_summary(df: pd.DataFrame, cache, scan: pd.DataFrame, near_dups: pd.DataFrame,
                  conflicts: pd.DataFrame, associations: pd.DataFrame, warnings: list[str],
                  settings: dict[str, Any], classes: Sequence[str] | None = None,
                  positive_class: str | None = None, copies: pd.DataFrame | None = None,
                  copy_policy: str | None = None) -> dict[str, Any]:
    """Everything later notebooks need from the audit, JSON-ready.

    ``copies`` (pairs from :func:`osteolib.data.duplicates.find_copies`) and the ``copy_policy`` applied to
    them add how many pairs were found, how many cross splits, and how many patients grouping joined.

    ``classes`` / ``positive_class`` (see :func:`class_order`) order ``"classes"`` with the positive class
    last and add ``"positive_class"``; without them the summary is as it always was (sorted classes).
    """
    train_ids = df.loc[df["split"] == "train", "image_id"].tolist()
    mean, std = cache.pixel_stats(train_ids)
    ordered = classes is not None or positive_class is not None
    classes = class_order(df["label"], classes, positive_class)[0] if ordered else sorted(df["label"].unique())
    extra_classes = {"positive_class": classes[-1]} if ordered else {}
    listed = {key: df.attrs[key] for key in ("excluded_files", "empty_class_folders", "masks_without_image",
                                             "clinical_join") if df.attrs.get(key)}
    return {
        "settings": settings,
        "classes": classes,
        **extra_classes,
        "n_images": int(len(df)),
        "n_patients": int(df["patient_id"].nunique()),
        "images_per_split": df["split"].value_counts().to_dict(),
        "patients_per_split": df.groupby("split")["patient_id"].nunique().to_dict(),
        "images_per_label_split": {f"{s}/{lab}": int(n) for (s, lab), n in df.groupby(["split", "label"]).size().items()},
        "views": df["view"].value_counts().to_dict(),
        "sources": df["source"].value_counts().to_dict(),
        "with_expert_region": int((df["boxes"].notna() | df["mask_path"].notna()).sum()),
        "image_sizes": scan.groupby(["width", "height"]).size().rename("n").reset_index().to_dict("records"),
        "bit_depths": scan["bit_depth"].value_counts().to_dict() if "bit_depth" in scan else {},
        "normalisation": {"mean": float(mean), "std": float(std), "computed_on": "train split, cached images",
                          "study_mean": STUDY_MEAN, "study_std": STUDY_STD},
        "cache": {"key": cache.key, "size": int(cache.size), "path": str(cache.path)},
        "near_duplicate_pairs": int(len(near_dups)),
        "near_duplicate_pairs_across_splits": int((near_dups["split_a"] != near_dups["split_b"]).sum())
        if len(near_dups) else 0,
        "label_conflicts": int(len(conflicts)),
        **(_copy_counts(df, copies, copy_policy) if copies is not None else {}),
        "associations": associations.to_dict("records"),
        "confounder_warnings": warnings,
        "excluded_rows": df.attrs.get("excluded", {}),
        **listed,
    }


def _copy_counts(df: pd.DataFrame, copies: pd.DataFrame, policy: str | None) -> dict[str, Any]:
    crossing = len(copies_across_splits(df, copies))
    joined = (int(df["patient_id_original"].nunique() - df["patient_id"].nunique())
              if "patient_id_original" in df.columns else 0)
    return {"copy_policy": policy, "copy_pairs": int(len(copies)), "copy_pairs_across_splits": int(crossing),
            "patients_joined_by_copies": joined}


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(data), indent=2, default=_jsonable, allow_nan=False))
    return path


def _plain(value: Any) -> Any:
    """JSON only allows string keys: pandas counts are keyed by numpy integers (bit depths, sizes)."""
    if isinstance(value, dict):
        return {str(_jsonable(k)) if not isinstance(k, str) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN is not JSON: an undefined statistic is null
        return None
    return value


def read_audit(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: notebook 00_data_audit writes it; run it first")
    return json.loads(path.read_text())


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
