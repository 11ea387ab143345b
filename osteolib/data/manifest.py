"""Datasets as tables: every data set enters the pipeline as one manifest DataFrame.

One row per image, with the columns of :data:`MANIFEST_COLUMNS`. Builders turn each supported
layout (a folder of class sub-folders, a CSV with configurable columns, NIH ChestX-ray14, Kermany,
Hannover, the project's synthetic data) into this table; everything downstream reads only it.

Expert regions travel with the row: ``boxes`` (pixel coordinates of the file as stored on disk)
and/or ``mask_path`` (a mask image on the same pixel grid as the image).
"""
from __future__ import annotations

import csv
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
# Builders: one function per supported layout, each returning a normalised, validated manifest.
# Rows a builder leaves out are counted in ``df.attrs["excluded"]`` ({reason: count}) and warned
# about; ``df.attrs["patient_ids_from_images"]`` is True where no patient identity was available,
# so the audit can say that a patient-level split is not possible for that data.
# ---------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")
NIH_PUBLISHED_SIZE = 1024  # NIH's boxes are in the pixel space of its published 1024x1024 PNGs
KERMANY_CLASSES = ("normal", "bacterial", "viral")
# Original Kermany file names carry the patient: person12_bacteria_45.jpeg, person1_virus_6.jpeg.
KERMANY_PATIENT_PATTERN = r"^(?P<patient>person\d+)_"
MANIFEST_KINDS = ("folder", "csv", "nih_cxr14", "kermany", "hannover", "synthetic")


def from_folder(root: str | os.PathLike, source: str | None = None,
                patient_from: str | None = None) -> pd.DataFrame:
    """A folder of class sub-folders (label = sub-folder name) holding image files at any depth.

    ``image_id`` is ``"<class>/<path below the class folder, without extension>"`` (the extension is
    kept where two files differ only by it). ``patient_from`` is a regular expression searched in
    each file name; its group ``patient`` (or its first group, or the whole match) is the patient
    id. Without it every image is its own patient and ``attrs["patient_ids_from_images"]`` is True.
    Files whose extension is not an image extension are counted in ``attrs["excluded"]``.
    """
    root = _existing_dir(root, "from_folder root")
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
                patient = _patient_from_name(pattern, file.name)
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
        _warn_excluded(root, excluded, examples=[str(p) for p in not_images[:3]])
    df = _finish(pd.DataFrame(rows), excluded)
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
    image_dir = _existing_dir(image_dir, "from_csv image_dir")
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
        _warn_excluded(csv_path, excluded)
    df = _finish(df, excluded)
    df.attrs["patient_ids_from_images"] = patient_column is None
    return df


def nih_cxr14(root: str | os.PathLike, positive: str = "Pneumonia", negative: str = "No Finding",
              bbox: bool = True, missing: str = "error") -> pd.DataFrame:
    """NIH ChestX-ray14: ``images/`` (or ``images_*/images/``) + ``Data_Entry_2017*.csv`` (+ ``BBox_List_2017*.csv``).

    Label ``positive.lower()`` ("pneumonia") when the finding labels contain ``positive``,
    ``negative`` ("no_finding") when they equal ``negative``; other rows are excluded and counted.
    Boxes are scaled from NIH's 1024x1024 space to the size of the file on disk and keep their
    finding label. ``missing="exclude"`` counts label rows without an image file (a partial
    download) instead of raising.
    """
    root = _existing_dir(root, "nih_cxr14 root")
    if missing not in ("error", "exclude"):
        raise ManifestError(f"nih_cxr14: missing={missing!r}; use 'error' or 'exclude'")
    entry_csv = _one_file(root, "Data_Entry_2017*.csv")
    entries = read_bracketed_csv(entry_csv)
    listed = set(entries["Image Index"]) if "Image Index" in entries.columns else set()
    needed = ["Image Index", "Finding Labels", "Patient ID", "View Position"]
    absent = [c for c in needed if c not in entries.columns]
    if absent:
        raise ManifestError(f"{entry_csv}: lacks column(s) {absent}; it has {list(entries.columns)}")
    on_disk = {p.name: p for p in sorted(root.glob("images*/**/*.png"))}
    if not on_disk:
        raise ManifestError(f"{root}: no PNG files under images/ (NIH layout: <root>/images/*.png)")

    positive_class, negative_class = _class_name(positive), _class_name(negative)
    findings = entries["Finding Labels"].str.strip()
    is_positive = findings.str.split("|").apply(lambda labels: positive in labels)
    is_negative = ~is_positive & (findings == negative)
    excluded: dict[str, int] = {}
    neither = int((~is_positive & ~is_negative).sum())
    if neither:
        excluded[f"finding labels neither contain {positive!r} nor equal {negative!r}"] = neither
    entries = entries.assign(label=np.where(is_positive, positive_class, negative_class))[is_positive | is_negative]

    has_file = entries["Image Index"].isin(list(on_disk))
    if not has_file.all():
        absent_files = entries.loc[~has_file, "Image Index"].tolist()
        if missing == "error":
            raise ManifestError(
                f"{entry_csv}: {len(absent_files)} labelled image(s) not found under {root}/images*: "
                f"{absent_files[:20]}{' ...' if len(absent_files) > 20 else ''}; "
                f"pass missing='exclude' to build from the images present")
        excluded["image file not present"] = len(absent_files)
        entries = entries[has_file]

    df = pd.DataFrame({
        "image_id": entries["Image Index"].str.replace(r"\.png$", "", regex=True).tolist(),
        "path": [str(on_disk[name].resolve()) for name in entries["Image Index"]],
        "label": entries["label"].tolist(),
        "patient_id": entries["Patient ID"].str.strip().tolist(),
        "view": entries["View Position"].str.strip().str.upper().replace("", "unknown").tolist(),
        "source": "nih-cxr14",
        "finding_labels": findings[entries.index].tolist(),
    })
    for column, name in (("Patient Age", "age"), ("Follow-up #", "follow_up")):
        if column in entries.columns:
            df[name] = pd.array(pd.to_numeric(entries[column], errors="coerce"), dtype="Int64")
    if "Patient Gender" in entries.columns:
        df["sex"] = entries["Patient Gender"].str.strip().str.upper().tolist()
    df = add_image_sizes(df)

    boxes_by_image: dict[str, list[dict]] = {}
    unattached = 0
    if bbox:
        bbox_files = sorted(root.glob("BBox_List_2017*.csv"))
        if len(bbox_files) > 1:
            raise ManifestError(f"{root}: several box tables {[p.name for p in bbox_files]}; keep one")
        if bbox_files:
            boxes_by_image, unattached = _nih_boxes(bbox_files[0], df)
    df["boxes"] = [boxes_by_image.get(i) for i in df["image_id"]]
    if excluded:
        _warn_excluded(entry_csv, excluded)
    out = _finish(df, excluded)
    out.attrs["patient_ids_from_images"] = False
    out.attrs["boxes_on_excluded_images"] = unattached
    out.attrs["images_without_label_row"] = len(set(on_disk) - listed)
    return out


def kermany(root: str | os.PathLike) -> pd.DataFrame:
    """Kermany pediatric chest X-rays: ``normal/``, ``bacterial/``, ``viral/``.

    File names repeat across the folders, so image ids carry the class ("viral/nonaugmentedtrain_3").
    Original Kermany names (``person12_bacteria_45.jpeg``) give the patient; otherwise each image
    is its own patient and ``attrs["patient_ids_from_images"]`` is True.
    """
    root = _existing_dir(root, "kermany root")
    absent = [c for c in KERMANY_CLASSES if not (root / c).is_dir()]
    if absent:
        raise ManifestError(f"{root}: Kermany layout needs sub-folders {list(KERMANY_CLASSES)}; missing {absent}")
    extra = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in KERMANY_CLASSES
                   and not p.name.startswith("."))
    if extra:
        raise ManifestError(f"{root}: unexpected sub-folder(s) {extra} beside {list(KERMANY_CLASSES)}; "
                            f"use from_folder for other class sets")
    df = from_folder(root, source="kermany")
    pattern = re.compile(KERMANY_PATIENT_PATTERN)
    patients = [_patient_from_name(pattern, Path(p).name) for p in df["path"]]
    df["patient_id"] = [p if p is not None else i for p, i in zip(patients, df["image_id"])]
    df = add_image_sizes(df)
    df.attrs["patient_ids_from_images"] = any(p is None for p in patients)
    return df


def hannover(root: str | os.PathLike) -> pd.DataFrame:
    """Hannover Medical School COVID-19 chest X-rays: ``png/*.png`` + ``data.csv`` (every case COVID-19)."""
    root = _existing_dir(root, "hannover root")
    table_path = root / "data.csv"
    if not table_path.is_file():
        raise ManifestError(f"{root}: data.csv not found (Hannover layout: <root>/data.csv + <root>/png/*.png)")
    table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
    absent = [c for c in ("patient_id", "image_id", "projection") if c not in table.columns]
    if absent:
        raise ManifestError(f"{table_path}: lacks column(s) {absent}; it has {list(table.columns)}")
    paths = [root / "png" / f"{i.strip()}.png" for i in table["image_id"]]
    missing = [f"row {r} (line {r + 2}): {p}" for r, p in enumerate(paths) if not p.is_file()]
    if missing:
        raise ManifestError(f"{table_path}: {len(missing)} image file(s) not found:\n  " + "\n  ".join(missing[:50]))
    df = pd.DataFrame({
        "image_id": table["image_id"].str.strip().tolist(),
        "path": [str(p.resolve()) for p in paths],
        "label": "covid",
        "patient_id": table["patient_id"].str.strip().tolist(),
        "view": table["projection"].str.strip().str.upper().replace("", "unknown").tolist(),
        "source": "hannover",
    })
    if "sex" in table.columns:
        df["sex"] = table["sex"].str.strip().str.upper().tolist()
    if "age" in table.columns:
        df["age"] = pd.array(pd.to_numeric(table["age"], errors="coerce"), dtype="Int64")
    if "modality" in table.columns:
        df["modality"] = table["modality"].str.strip().tolist()
    unlisted = sorted({p.name for p in (root / "png").glob("*.png")} - {p.name for p in paths})
    out = _finish(add_image_sizes(df), {})
    out.attrs["patient_ids_from_images"] = False
    out.attrs["images_without_label_row"] = len(unlisted)
    if unlisted:
        warnings.warn(f"{root}/png: {len(unlisted)} PNG file(s) have no row in data.csv and are not in the "
                      f"manifest, e.g. {unlisted[:3]}", stacklevel=2)
    return out


def build_manifest(kind: str, root: str | os.PathLike, **options: Any) -> pd.DataFrame:
    """The builders by name: ``folder``, ``csv``, ``nih_cxr14``, ``kermany``, ``hannover``, ``synthetic``.

    ``csv`` takes ``root`` as the CSV file (image_dir defaults to its folder); ``synthetic`` reads
    ``root/manifest.csv`` (or ``root`` itself when it is the CSV) written by the synthetic generator.
    """
    if kind == "folder":
        return from_folder(root, **options)
    if kind == "csv":
        options.setdefault("image_dir", Path(root).parent)
        return from_csv(root, **options)
    if kind == "nih_cxr14":
        return nih_cxr14(root, **options)
    if kind == "kermany":
        return kermany(root, **options)
    if kind == "hannover":
        return hannover(root, **options)
    if kind == "synthetic":
        path = Path(root)
        return read_manifest(path if path.is_file() else path / "manifest.csv", **options)
    raise ManifestError(f"unknown manifest kind {kind!r}; known kinds: {list(MANIFEST_KINDS)}")


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


def read_bracketed_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read an NIH-style CSV whose header names hold commas inside brackets (all values as strings).

    ``OriginalImage[Width,Height]`` in the header covers two data fields; it becomes the columns
    ``OriginalImage[Width]`` and ``OriginalImage[Height]``. Empty trailing header fields (the
    ``,,,`` of NIH's box table) are dropped, and so are data fields under them, which must be empty.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        records = list(csv.reader(handle))
    if not records:
        raise ManifestError(f"{path}: empty file")
    names = _expand_bracket_header(records[0])
    while names and names[-1] == "":
        names.pop()
    rows: list[list[str]] = []
    for line, record in enumerate(records[1:], start=2):
        if not any(field.strip() for field in record):
            continue
        head, tail = record[:len(names)], record[len(names):]
        if len(head) < len(names) or any(field.strip() for field in tail):
            raise ManifestError(f"{path}: line {line} has {len(record)} fields where the header "
                                f"{names} expects {len(names)}: {record}")
        rows.append(head)
    return pd.DataFrame(rows, columns=names)


def _expand_bracket_header(tokens: list[str]) -> list[str]:
    names: list[str] = []
    pending: list[str] = []
    for token in tokens:
        if pending or ("[" in token and "]" not in token):
            pending.append(token)
            if "]" not in token:
                continue
            token, pending = ",".join(pending), []
        match = re.fullmatch(r"\s*(.*?)\s*\[(.*)\]\s*", token)
        if match and "," in match.group(2):
            stem = match.group(1)
            names += [f"{stem}[{part.strip()}]" for part in match.group(2).split(",")]
        else:
            names.append(token.strip())
    if pending:
        raise ManifestError(f"unbalanced '[' in CSV header {tokens}")
    return names


def _nih_boxes(bbox_csv: Path, df: pd.DataFrame) -> tuple[dict[str, list[dict]], int]:
    table = read_bracketed_csv(bbox_csv)
    by_axis = {m.group(1): c for c in table.columns if (m := re.fullmatch(r"Bbox ?\[([xywh])\]", c))}
    coordinate_columns = [by_axis[a] for a in "xywh" if a in by_axis]
    if "Image Index" not in table.columns or len(coordinate_columns) != 4:
        raise ManifestError(f"{bbox_csv}: expected columns 'Image Index', 'Finding Label', 'Bbox [x,y,w,h]'; "
                            f"read {list(table.columns)}")
    sizes = {i: (int(w), int(h)) for i, w, h in zip(df["image_id"], df["width"], df["height"])}
    boxes: dict[str, list[dict]] = {}
    unattached = 0
    for line, record in enumerate(table.to_dict("records"), start=2):
        image_id = re.sub(r"\.png$", "", record["Image Index"].strip())
        if image_id not in sizes:
            unattached += 1  # a box on an image the label rule left out
            continue
        try:
            x, y, w, h = (float(record[c]) for c in coordinate_columns)
        except ValueError as err:
            raise ManifestError(f"{bbox_csv}: line {line}: box coordinates are not numbers: {record}") from err
        width, height = sizes[image_id]
        sx, sy = width / NIH_PUBLISHED_SIZE, height / NIH_PUBLISHED_SIZE
        boxes.setdefault(image_id, []).append({"x": x * sx, "y": y * sy, "w": w * sx, "h": h * sy,
                                               "label": record.get("Finding Label", "").strip()})
    return boxes, unattached


def _finish(df: pd.DataFrame, excluded: dict[str, int]) -> pd.DataFrame:
    out = validate_manifest(normalise_manifest(df))
    out.attrs["excluded"] = dict(excluded)
    return out


def _warn_excluded(where: Any, excluded: dict[str, int], examples: list[str] | None = None) -> None:
    total = sum(excluded.values())
    detail = "; ".join(f"{reason}: {count}" for reason, count in excluded.items())
    example = f" (e.g. {examples})" if examples else ""
    warnings.warn(f"{where}: {total} row(s)/file(s) excluded from the manifest — {detail}{example}", stacklevel=3)


def _existing_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ManifestError(f"{what}: folder not found: {path}")
    return path


def _one_file(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        raise ManifestError(f"{root}: expected exactly one file matching {pattern!r}, found "
                            f"{[p.name for p in found] or 'none'}")
    return found[0]


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


def _patient_from_name(pattern: re.Pattern, name: str) -> str | None:
    match = pattern.search(name)
    if match is None:
        return None
    if "patient" in pattern.groupindex:
        return match.group("patient")
    return match.group(1) if pattern.groups else match.group(0)


def _class_name(raw: str) -> str:
    return re.sub(r"\W+", "_", raw.strip().lower()).strip("_")
