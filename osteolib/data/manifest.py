"""Datasets as tables: every data set enters the pipeline as one manifest DataFrame.

One row per image, with the columns of :data:`MANIFEST_COLUMNS`. Builders turn each supported
layout into this table; everything downstream reads only it. The generic layouts (a folder of class
sub-folders, a CSV with configurable columns) are here; the built-in data sets (NIH ChestX-ray14, Kermany,
Hannover) and ``build_manifest`` are in :mod:`osteolib.data.sources`, the project's synthetic data in
:mod:`osteolib.data.synthetic`.

Expert regions travel with the row: ``boxes`` (pixel coordinates of the file as stored on disk)
and/or ``mask_path`` (a mask image on the same pixel grid as the image).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

MANIFEST_COLUMNS = [
    "image_id",
    "path",
    "label",
    "patient_id",
    "view",
    "source",
    "split",
    "width",
    "height",
    "boxes",
    "mask_path",
]
REQUIRED_COLUMNS = ["image_id", "path", "label", "patient_id"]
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest (or the table it was built from) is not usable; the message says where and what to do."""


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in MANIFEST_COLUMNS})


def normalise_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Give a builder's table the manifest's columns, order and types (missing optional columns filled)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest lacks required column(s) {missing}; it has {list(df.columns)}")
    out = df.copy()
    defaults: dict[str, Any] = {"view": "unknown", "source": "", "split": "", "width": pd.NA, "height": pd.NA,
                                "boxes": None, "mask_path": None}
    for column, default in defaults.items():
        if column not in out.columns:
            out[column] = [default] * len(out)
    for column in ("image_id", "path", "label", "patient_id", "view", "source", "split"):
        out[column] = out[column].fillna("" if column in ("split", "source") else "unknown").astype(str)
    out["width"] = pd.array(out["width"], dtype="Int64")
    out["height"] = pd.array(out["height"], dtype="Int64")
    out["boxes"] = [boxes_or_none(b) for b in out["boxes"]]
    out["mask_path"] = [None if is_missing(m) else str(m) for m in out["mask_path"]]
    extra = [c for c in out.columns if c not in MANIFEST_COLUMNS]
    return out[MANIFEST_COLUMNS + extra].reset_index(drop=True)


def validate_manifest(df: pd.DataFrame, check_files: bool = True) -> pd.DataFrame:
    """Raise :class:`ManifestError` listing every problem at once; return the table unchanged when sound.

    Checks: required columns, unique non-empty image ids, non-empty labels and patient ids, known
    split names, and (``check_files``) that every image and mask file exists.
    """
    problems: list[str] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest lacks required column(s) {missing}; it has {list(df.columns)}")
    duplicated = df["image_id"][df["image_id"].duplicated()].unique().tolist()
    if duplicated:
        problems.append(f"duplicate image_id(s) {duplicated[:10]}{' ...' if len(duplicated) > 10 else ''}")
    for column in ("image_id", "label", "patient_id", "path"):
        empty_rows = df.index[df[column].isna() | (df[column].astype(str).str.strip() == "")].tolist()
        if empty_rows:
            problems.append(f"empty {column} in row(s) {empty_rows[:10]}{' ...' if len(empty_rows) > 10 else ''}")
    if "split" in df.columns:
        bad = sorted(set(df["split"].astype(str)) - set(SPLITS) - {""})
        if bad:
            problems.append(f"unknown split name(s) {bad}; use one of {SPLITS} or leave empty")
    if check_files:
        for row, path in zip(df.index, df["path"]):
            if not Path(str(path)).is_file():
                problems.append(f"row {row} (image_id={df.at[row, 'image_id']!r}): image file not found: {path}")
        if "mask_path" in df.columns:
            for row, path in zip(df.index, df["mask_path"]):
                if not is_missing(path) and not Path(str(path)).is_file():
                    problems.append(f"row {row} (image_id={df.at[row, 'image_id']!r}): mask file not found: {path}")
    if problems:
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise ManifestError(f"{len(problems)} problem(s) in the manifest:\n  " + "\n  ".join(shown) + more)
    return df


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a manifest CSV: boxes as JSON, file paths relative to the CSV's folder (portable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = normalise_manifest(df)
    base = path.parent.resolve()
    out["path"] = [_relative_to(p, base) for p in out["path"]]
    out["mask_path"] = [None if m is None else _relative_to(m, base) for m in out["mask_path"]]
    out["boxes"] = [None if b is None else json.dumps(b) for b in out["boxes"]]
    out.to_csv(path, index=False)
    return path


def read_manifest(path: str | os.PathLike, check_files: bool = True) -> pd.DataFrame:
    """Read a manifest CSV written by :func:`write_manifest` (or by hand in the same schema)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest file not found: {path}")
    df = pd.read_csv(path, dtype={"image_id": str, "patient_id": str, "label": str, "split": str}, keep_default_na=False,
                     na_values={"width": [""], "height": [""]})
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: lacks required column(s) {missing}; it has {list(df.columns)}")
    base = path.parent.resolve()
    df["path"] = [str((base / p).resolve()) if not os.path.isabs(p) else p for p in df["path"].astype(str)]
    if "mask_path" in df.columns:
        df["mask_path"] = [None if is_missing(m) else str((base / str(m)).resolve()) for m in df["mask_path"]]
    if "boxes" in df.columns:
        df["boxes"] = [_parse_boxes(b, path, i) for i, b in enumerate(df["boxes"])]
    return validate_manifest(normalise_manifest(df), check_files=check_files)


def _parse_boxes(value: Any, path: Path, row: int) -> list[dict] | None:
    if is_missing(value):
        return None
    try:
        boxes = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: row {row}: 'boxes' is not valid JSON ({err}): {value!r}") from err
    return boxes_or_none(boxes)


def boxes_or_none(value: Any) -> list[dict] | None:
    if is_missing(value):
        return None
    if isinstance(value, str):
        value = json.loads(value)
    boxes = [dict(b) for b in value]
    for box in boxes:
        if not {"x", "y", "w", "h"} <= set(box):
            raise ManifestError(f"a box needs keys x, y, w, h (pixels of the stored file); got {box}")
    return boxes or None


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    if value is pd.NA:
        return True
    return isinstance(value, str) and value.strip() in ("", "nan", "None")


def _relative_to(path: str, base: Path) -> str:
    try:
        return os.path.relpath(str(path), base)
    except ValueError:  # another drive on Windows
        return str(path)


# ---------------------------------------------------------------------------------------------
# Builders of the generic layouts, each returning a normalised, validated manifest (those of the
# built-in data sets are in osteolib.data.sources and use the helpers below).
# Rows a builder leaves out are counted in ``df.attrs["excluded"]`` ({reason: count}) and warned
# about; ``df.attrs["patient_ids_from_images"]`` is True where no patient identity was available,
# so the audit can say that a patient-level split is not possible for that data.
# ---------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")


def from_folder(root: str | os.PathLike, source: str | None = None,
                patient_from: str | None = None) -> pd.DataFrame:
    """A folder of class sub-folders (label = sub-folder name) holding image files at any depth.

    ``image_id`` is ``"<class>/<path below the class folder, without extension>"`` (the extension is
    kept where two files differ only by it). ``patient_from`` is a regular expression searched in
    each file name; its group ``patient`` (or its first group, or the whole match) is the patient
    id. Without it every image is its own patient and ``attrs["patient_ids_from_images"]`` is True.
    Files whose extension is not an image extension are counted in ``attrs["excluded"]``.
    """
    root = existing_dir(root, "from_folder root")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ManifestError(f"{root}: no class sub-folders found; from_folder expects <root>/<class name>/<images>")
    pattern = _compile_patient_pattern(patient_from)
    rows: list[dict[str, Any]] = []
    not_images: list[Path] = []
    unmatched: list[str] = []
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        not_images += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        ids = _unique_ids(class_dir.name, [p.relative_to(class_dir) for p in images])
        for image_id, file in zip(ids, images):
            patient = image_id
            if pattern is not None:
                patient = patient_from_name(pattern, file.name)
                if patient is None:
                    unmatched.append(str(file))
            rows.append({"image_id": image_id, "path": str(file.resolve()), "label": class_dir.name,
                         "patient_id": patient, "source": source or root.name})
    if unmatched:
        raise ManifestError(
            f"patient_from={patient_from!r} does not match {len(unmatched)} file name(s), e.g. "
            f"{unmatched[:5]}; fix the pattern or leave patient_from=None (each image its own patient)")
    if not rows:
        raise ManifestError(f"{root}: the class sub-folders {[d.name for d in class_dirs]} hold no image files "
                            f"(extensions {IMAGE_EXTENSIONS})")
    excluded = {"not an image file (extension)": len(not_images)} if not_images else {}
    if not_images:
        warn_excluded(root, excluded, examples=[str(p) for p in not_images[:3]])
    df = finish_manifest(pd.DataFrame(rows), excluded)
    df.attrs["patient_ids_from_images"] = pattern is None
    return df


def from_csv(csv_path: str | os.PathLike, image_dir: str | os.PathLike, path_column: str, label_column: str,
             patient_column: str | None = None, view_column: str | None = None, id_column: str | None = None,
             label_map: dict[str, str] | None = None, source: str | None = None,
             split_column: str | None = None) -> pd.DataFrame:
    """A label table: one row per image, file paths relative to ``image_dir`` (or absolute).

    ``label_map`` maps raw labels to class names; rows whose raw label is not in it are excluded
    and counted. ``split_column`` takes a split the data brings with it (train/val/test). The
    CSV's other columns are kept unless their name is a manifest column.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ManifestError(f"label table not found: {csv_path}")
    image_dir = existing_dir(image_dir, "from_csv image_dir")
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    named = {"path_column": path_column, "label_column": label_column, "patient_column": patient_column,
             "view_column": view_column, "id_column": id_column, "split_column": split_column}
    absent = {arg: col for arg, col in named.items() if col is not None and col not in table.columns}
    if absent:
        raise ManifestError(
            f"{csv_path}: column(s) not found: "
            + ", ".join(f"{arg}={col!r}" for arg, col in absent.items())
            + f"; the table's columns are {list(table.columns)}")
    # CSV row r (0-based) is line r + 2 of the file (after the header); errors name both.
    table["_row"] = np.arange(len(table))
    excluded: dict[str, int] = {}
    raw_labels = table[label_column].str.strip()
    if label_map is not None:
        known = raw_labels.isin(list(label_map))
        for raw, count in raw_labels[~known].value_counts().sort_index().items():
            excluded[f"label {raw!r} not in label_map"] = int(count)
        table, raw_labels = table[known], raw_labels[known]
        labels = raw_labels.map(label_map)
    else:
        labels = raw_labels
    paths = [Path(p.strip()) for p in table[path_column]]
    paths = [p if p.is_absolute() else image_dir / p for p in paths]
    missing = [f"row {r} (line {r + 2}): {p}" for r, p in zip(table["_row"], paths) if not p.is_file()]
    if missing:
        raise ManifestError(f"{csv_path}: {len(missing)} image file(s) named in column {path_column!r} not found "
                            f"(relative to {image_dir}):\n  " + "\n  ".join(missing[:50])
                            + (f"\n  ... and {len(missing) - 50} more" if len(missing) > 50 else ""))
    if id_column is not None:
        ids = table[id_column].str.strip().tolist()
    else:
        ids = _unique_ids(None, [_relative_or_name(p, image_dir) for p in paths])
    df = pd.DataFrame({"image_id": ids, "path": [str(p.resolve()) for p in paths], "label": labels.tolist(),
                       "source": source or csv_path.parent.name})
    df["patient_id"] = table[patient_column].str.strip().tolist() if patient_column else df["image_id"]
    if view_column:
        df["view"] = [v.strip().upper() or "unknown" for v in table[view_column]]
    if split_column:
        df["split"] = [s.strip().lower() for s in table[split_column]]
    used = {c for c in named.values() if c}
    for column in table.columns:
        if column not in used and column != "_row" and column not in MANIFEST_COLUMNS:
            df[column] = table[column].tolist()
    if excluded:
        warn_excluded(csv_path, excluded)
    df = finish_manifest(df, excluded)
    df.attrs["patient_ids_from_images"] = patient_column is None
    return df


def concat_manifests(*dfs: pd.DataFrame) -> pd.DataFrame:
    """Pool manifests (e.g. a pretraining pool of Kermany + Hannover) into one.

    Where image ids (or patient ids) of one manifest also occur in another, every id of the
    manifests involved is prefixed with its source ("kermany:normal/x"): identical ids in two data
    sets are different images, and identical patient ids are different people. Exclusion counts
    are summed; ``patient_ids_from_images`` is True when it is for any part.
    """
    if not dfs:
        raise ManifestError("concat_manifests needs at least one manifest")
    parts = [normalise_manifest(df) for df in dfs]
    for column in ("image_id", "patient_id"):
        owners: dict[str, set[int]] = {}
        for n, part in enumerate(parts):
            for value in part[column].unique():
                owners.setdefault(value, set()).add(n)
        clashing = sorted({n for owner in owners.values() if len(owner) > 1 for n in owner})
        for n in clashing:
            sources = parts[n]["source"].replace("", "part%d" % n)
            parts[n] = parts[n].assign(**{column: sources + ":" + parts[n][column]})
    pooled = pd.concat(parts, ignore_index=True)
    duplicated = pooled["image_id"][pooled["image_id"].duplicated()].unique().tolist()
    if duplicated:
        raise ManifestError(f"concat_manifests: image ids still repeat after prefixing with the source "
                            f"(the same source given twice?): {duplicated[:10]}")
    excluded: dict[str, int] = {}
    for df in dfs:
        for reason, count in df.attrs.get("excluded", {}).items():
            excluded[reason] = excluded.get(reason, 0) + count
    pooled.attrs = {"excluded": excluded,
                    "patient_ids_from_images": any(df.attrs.get("patient_ids_from_images", False) for df in dfs),
                    "sources": sorted(set(pooled["source"]))}
    return pooled


def add_image_sizes(df: pd.DataFrame, overwrite: bool = False) -> pd.DataFrame:
    """Fill ``width``/``height`` from the files (a header read; DICOM through :func:`osteolib.data.io.read_xray`).

    Only rows where either is missing are read unless ``overwrite``. Every unreadable file is
    listed in one :class:`ManifestError`.
    """
    from PIL import Image, UnidentifiedImageError

    out = df.copy()
    for column in ("width", "height"):
        out[column] = pd.array(out[column], dtype="Int64") if column in out.columns else pd.array(
            [pd.NA] * len(out), dtype="Int64")
    todo = out.index if overwrite else out.index[out["width"].isna() | out["height"].isna()]
    problems: list[str] = []
    for row in todo:
        path = str(out.at[row, "path"])
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError) as err:
            if not Path(path).is_file():
                problems.append(f"row {row} (image_id={out.at[row, 'image_id']!r}): file not found: {path}")
                continue
            try:  # formats PIL cannot read (DICOM) go through the project's reader
                from osteolib.data.io import read_xray
                meta = read_xray(path).meta
                width, height = int(meta["width"]), int(meta["height"])
            except ValueError as io_err:
                problems.append(f"row {row} (image_id={out.at[row, 'image_id']!r}): {io_err}")
                continue
        out.at[row, "width"] = width
        out.at[row, "height"] = height
    if problems:
        raise ManifestError(f"add_image_sizes: {len(problems)} file(s) could not be read:\n  "
                            + "\n  ".join(problems[:50]))
    return out


def finish_manifest(df: pd.DataFrame, excluded: dict[str, int]) -> pd.DataFrame:
    out = validate_manifest(normalise_manifest(df))
    out.attrs["excluded"] = dict(excluded)
    return out


def warn_excluded(where: Any, excluded: dict[str, int], examples: list[str] | None = None) -> None:
    total = sum(excluded.values())
    detail = "; ".join(f"{reason}: {count}" for reason, count in excluded.items())
    example = f" (e.g. {examples})" if examples else ""
    warnings.warn(f"{where}: {total} row(s)/file(s) excluded from the manifest — {detail}{example}", stacklevel=3)


def existing_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ManifestError(f"{what}: folder not found: {path}")
    return path


def _unique_ids(prefix: str | None, relative_paths: list[Path]) -> list[str]:
    """Ids from paths without extension; where two files differ only by extension the extension stays."""
    stems = [p.with_suffix("").as_posix() for p in relative_paths]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    ids = [p.as_posix() if counts[s] > 1 else s for s, p in zip(stems, relative_paths)]
    return [f"{prefix}/{i}" if prefix else i for i in ids]


def _relative_or_name(path: Path, base: Path) -> Path:
    try:
        return path.relative_to(base)
    except ValueError:
        return Path(path.name)


def _compile_patient_pattern(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ManifestError(f"patient_from={pattern!r} is not a valid regular expression: {err}") from err


def patient_from_name(pattern: re.Pattern, name: str) -> str | None:
    match = pattern.search(name)
    if match is None:
        return None
    if "patient" in pattern.groupindex:
        return match.group("patient")
    return match.group(1) if pattern.groups else match.group(0)


def from_image_folder(root: str | os.PathLike, source: str | None = None, patient_from: str | None = None,
                      label: str = "unlabelled") -> pd.DataFrame:
    """A folder of images without labels (a pretraining pool): every image file at any depth, one label for all.

    ``image_id`` is the path below ``root`` without extension; ``patient_from`` as in :func:`from_folder`
    (without it every image is its own patient). Files that are not images are counted in ``attrs["excluded"]``.
    """
    root = existing_dir(root, "from_image_folder root")
    pattern = _compile_patient_pattern(patient_from)
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    not_images = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if not images:
        raise ManifestError(f"{root}: no image files at any depth (extensions {IMAGE_EXTENSIONS})")
    ids = _unique_ids(None, [p.relative_to(root) for p in images])
    patients = ids if pattern is None else [patient_from_name(pattern, p.name) for p in images]
    unmatched = [str(p) for p, patient in zip(images, patients) if patient is None]
    if unmatched:
        raise ManifestError(
            f"patient_from={patient_from!r} does not match {len(unmatched)} file name(s), e.g. "
            f"{unmatched[:5]}; fix the pattern or leave patient_from out (each image its own patient)")
    df = pd.DataFrame({"image_id": ids, "path": [str(p.resolve()) for p in images], "label": label,
                       "patient_id": patients, "source": source or root.name})
    excluded = {"not an image file (extension)": len(not_images)} if not_images else {}
    if not_images:
        warn_excluded(root, excluded, examples=[str(p) for p in not_images[:3]])
    df = finish_manifest(df, excluded)
    df.attrs["patient_ids_from_images"] = pattern is None
    return df
