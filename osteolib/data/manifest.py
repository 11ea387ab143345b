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
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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


class LabelError(ManifestError):
    """Labels cannot become classes as they are; ``where`` names the table, column or folder."""

    def __init__(self, where: str, problem: str, hint: str) -> None:
        self.where, self.problem, self.hint = where, problem, hint
        super().__init__(f"{where}: {problem}. What to do: {hint}")


# ---------------------------------------------------------------------------------------------
# Labels: the one place raw labels (folder names, table cells, a manifest's column) become classes
# ---------------------------------------------------------------------------------------------

DROP = "drop"  # label_map value that drops a class (None / YAML null does too)


def case_variants(labels: Iterable[Any]) -> list[list[str]]:
    """Groups of distinct labels that differ only in case (``[["Normal", "normal"]]``)."""
    groups: dict[str, set[str]] = {}
    for label in labels:
        groups.setdefault(str(label).casefold(), set()).add(str(label))
    return [sorted(g) for g in groups.values() if len(g) > 1]


def label_mapping(classes: Iterable[str], label_map: Any, where: str = "label_map",
                  unmapped: str = "keep") -> dict[str, str | None]:
    """Check a ``label_map`` ({class: new class | "drop" | None}) against the classes; the full mapping.

    Keys and values are matched and written without surrounding whitespace. ``unmapped="keep"``: classes the
    map does not name stay as they are, and a key naming no class is an error (a misspelt key would
    otherwise do nothing). ``unmapped="drop"``: the map is a whitelist; classes it does not name map to None.
    """
    if unmapped not in ("keep", "drop"):
        raise ValueError(f"unmapped={unmapped!r}: use 'keep' or 'drop'")
    if not isinstance(label_map, Mapping):
        raise LabelError(where, f"must be a mapping {{class: new class or drop}}, got {label_map!r}",
                         "write e.g. {osteopenia: drop} or {osteopenia: osteoporosis}")
    classes = sorted({str(c) for c in classes})
    mapping: dict[str, str | None] = {c: (c if unmapped == "keep" else None) for c in classes}
    for raw, new in label_map.items():
        key = str(raw).strip()
        if key not in mapping:
            if unmapped == "drop":
                continue  # a whitelist may name labels this table does not use
            raise LabelError(f"{where}.{key}", f"{key!r} is not a class of the data set (its classes are "
                             f"{classes})", "correct the spelling or remove the entry")
        if new is None or str(new).strip().lower() == DROP:
            mapping[key] = None
        elif isinstance(new, (str, int)) and not isinstance(new, bool) and str(new).strip():
            mapping[key] = str(new).strip()
        else:
            raise LabelError(f"{where}.{key}", f"maps to {new!r}", "map to a class name or to drop")
    return mapping


def normalise_labels(labels: Iterable[Any], where: str, label_map: Mapping | None = None, *,
                     unmapped: str = "keep", map_where: str | None = None, fix: str = "correct the labels",
                     merge: str = "merge them with label_map: {example}", unit: str = "row",
                     first_line: int | None = None) -> tuple[list[str | None], dict[str, int]]:
    """Raw labels -> class names, the same way for every builder; returns (labels, {exclusion reason: count}).

    1. Surrounding whitespace is stripped: ``"normal "`` and ``"normal"`` are one class.
    2. ``label_map`` (see :func:`label_mapping`) renames, merges or drops classes; a dropped row's label is None
       and is counted as ``"label 'x' dropped by label_map"`` (or ``"... not in label_map"`` for a whitelist).
    3. Labels that still differ only in case (``Normal``, ``normal``, ``NORMAL``) raise :class:`LabelError`
       listing each spelling with its count (and first line, when ``first_line`` is the line of the first
       label), and the ``label_map`` that merges them into the most frequent spelling. So do empty labels.

    ``where`` names the labels' place (a folder, ``table.csv: column 'diagnosis'``, a spec key) in errors,
    ``map_where`` the label_map's; ``fix`` and ``merge`` are the two remedies offered (``{example}`` becomes
    the label_map as YAML, ``{example_py}`` as Python); ``unit`` names what a label belongs to (row, image).
    """
    raw = ["" if is_missing_label(value) else str(value).strip() for value in labels]
    excluded: dict[str, int] = {}
    out: list[str | None] = list(raw)
    if label_map is not None:
        mapping = label_mapping(raw, label_map, map_where or "label_map", unmapped)
        out = [mapping[label] for label in raw]
        dropped: dict[str, int] = {}
        for label, new in zip(raw, out):
            if new is None:
                dropped[label] = dropped.get(label, 0) + 1
        named = {str(k).strip() for k in label_map}
        for label in sorted(dropped):
            reason = "dropped by label_map" if label in named else "not in label_map"
            excluded[f"label {label!r} {reason}"] = dropped[label]
    blank = [i for i, label in enumerate(out) if label == ""]
    if blank:
        shown = [_row_name(i, first_line) for i in blank[:10]]
        raise LabelError(where, f"{len(blank)} empty label(s): {', '.join(shown)}{' ...' if len(blank) > 10 else ''}",
                         f"{fix}: fill in the label or remove those rows/files")
    kept = [label for label in out if label is not None]
    variants = case_variants(kept)
    if variants:
        counts: dict[str, int] = {}
        first: dict[str, int] = {}
        for i, label in enumerate(out):
            if label is not None:
                counts[label] = counts.get(label, 0) + 1
                first.setdefault(label, i)
        details, example, example_py = [], [], {}
        for group in variants:
            target = max(group, key=lambda v: (counts[v], v.islower(), [-ord(ch) for ch in v]))
            example += [f"{v}: {target}" for v in group if v != target]
            example_py.update({v: target for v in group if v != target})
            for v in group:
                at = f", first at {_row_name(first[v], first_line)}" if first_line is not None else ""
                details.append(f"{v!r} {counts[v]} {unit}(s){at}")
        raise LabelError(where, f"class names that differ only in case: {variants} ({'; '.join(details)})",
                         f"{fix} so that each class has one spelling, or "
                         + merge.format(example="{" + ", ".join(example) + "}", example_py=example_py))
    return out, excluded


def is_missing_label(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _row_name(index: int, first_line: int | None) -> str:
    return f"row {index}" + (f" (line {index + first_line})" if first_line is not None else "")


# ---------------------------------------------------------------------------------------------
# Tables: label tables, box tables and manifests are read the same way
# ---------------------------------------------------------------------------------------------


def read_table(path: str | os.PathLike, what: str = "table", allow_no_rows: bool = False) -> pd.DataFrame:
    """A CSV as strings (no NA guessing), or a :class:`ManifestError` naming the file and what is wrong.

    An empty (0-byte) file, a header without rows (unless ``allow_no_rows``), a line with another number
    of fields than the header, or text that is not UTF-8 each stop here, with the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: {what} not found. What to do: check the path")
    if path.stat().st_size == 0:
        raise ManifestError(f"{path}: the {what} is empty (0 bytes). What to do: the export or copy was probably "
                            f"interrupted; write it again (a header row, then one row per image)")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{path}: the {what} holds no header row (only blank lines). What to do: write it "
                            f"again (a header row, then one row per image)") from None
    except pd.errors.ParserError as err:
        raise ManifestError(f"{path}: the {what} is not a well-formed CSV ({err}). What to do: check that line "
                            f"(a comma or quote inside a value needs quoting) and save it again as "
                            f"comma-separated text") from None
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: the {what} is not UTF-8 text ({err}). What to do: save it as CSV (UTF-8)"
                            ) from None
    table.columns = [str(c).strip() for c in table.columns]
    if table.empty and not allow_no_rows:
        raise ManifestError(f"{path}: the {what} has a header ({list(table.columns)}) but no rows. What to do: "
                            f"check that the export finished, or point at the right file")
    return table


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
    """Read a manifest CSV written by :func:`write_manifest` (or by hand in the same schema).

    Cells that cannot be what their column says (``boxes`` that are not a JSON list of boxes, a ``width``
    that is not a whole number, an empty or case-variant label) raise :class:`ManifestError` naming the
    file and the row.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest file not found: {path}")
    raw = read_table(path, "manifest")  # checks the file; every cell as written
    # the other columns with their types guessed, as the manifest has always been read (a `marker` column of
    # 0/1 stays numbers, an `age` column ints); only the schema's text columns are forced to strings
    df = pd.read_csv(path, dtype={"image_id": str, "patient_id": str, "label": str, "split": str},
                     keep_default_na=False, encoding="utf-8-sig")
    df.columns = raw.columns
    for column in ("width", "height", "boxes"):
        if column in raw.columns:
            df[column] = raw[column]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: lacks required column(s) {missing}; it has {list(df.columns)}")
    base = path.parent.resolve()
    df["path"] = [str((base / p).resolve()) if not os.path.isabs(p) else p for p in df["path"].astype(str)]
    if "mask_path" in df.columns:
        df["mask_path"] = [None if is_missing(m) else str((base / str(m)).resolve()) for m in df["mask_path"]]
    if "boxes" in df.columns:
        df["boxes"] = [_parse_boxes(b, path, i) for i, b in enumerate(df["boxes"])]
    for column in ("width", "height"):
        if column in df.columns:
            df[column] = _whole_numbers(df[column], path, column)
    df["label"], _ = normalise_labels(df["label"], f"{path}: column 'label'", fix="correct the manifest's label "
                                      "column", merge="build the manifest again with label_map: {example}",
                                      first_line=2)
    return validate_manifest(normalise_manifest(df), check_files=check_files)


def _whole_numbers(values: Iterable[Any], path: Path, column: str) -> pd.arrays.IntegerArray:
    out: list[Any] = []
    for row, value in enumerate(values):
        text = "" if is_missing(value) else str(value).strip()
        if text == "":
            out.append(pd.NA)
            continue
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number == int(number) and number > 0):
            raise ManifestError(f"{path}: row {row} (line {row + 2}): {column!r} is {text!r}, not a whole number of "
                                f"pixels. What to do: correct the cell, or empty it (add_image_sizes reads it "
                                f"from the file)")
        out.append(int(number))
    return pd.array(out, dtype="Int64")


def _parse_boxes(value: Any, path: Path, row: int) -> list[dict] | None:
    if is_missing(value):
        return None
    where = f"{path}: row {row} (line {row + 2}): 'boxes'"
    try:
        boxes = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as err:
        raise ManifestError(f"{where} is not valid JSON ({err}): {value!r}. What to do: write a JSON list of boxes "
                            f"in the file's pixels, e.g. [{{\"x\": 10, \"y\": 20, \"w\": 30, \"h\": 40}}], or "
                            f"leave the cell empty") from err
    try:
        return boxes_or_none(boxes)
    except ManifestError as err:
        raise ManifestError(f"{where}: {err}") from None


BOX_KEYS = ("x", "y", "w", "h")


def boxes_or_none(value: Any) -> list[dict] | None:
    """A list of boxes ``{"x", "y", "w", "h", ...}`` (pixels of the stored file), or None for none.

    Raises :class:`ManifestError` for anything else: not a list, an entry that is not a mapping, a missing
    coordinate, a coordinate that is not a finite number, or a width/height that is not positive.
    """
    if is_missing(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ManifestError(f"boxes {value!r} are not valid JSON ({err})") from None
    if isinstance(value, Mapping) or not isinstance(value, Iterable) or isinstance(value, (str, bytes)):
        raise ManifestError(f"boxes must be a list of boxes {{x, y, w, h}}; got {value!r}")
    boxes = []
    for box in value:
        if not isinstance(box, Mapping):
            raise ManifestError(f"a box must be a mapping with keys x, y, w, h (pixels of the stored file); got {box!r}")
        box = dict(box)
        if not set(BOX_KEYS) <= set(box):
            raise ManifestError(f"a box needs keys x, y, w, h (pixels of the stored file); got {box}")
        for key in BOX_KEYS:
            number = box[key]
            if isinstance(number, bool) or not isinstance(number, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(float(number)):
                raise ManifestError(f"box coordinate {key}={number!r} is not a finite number; got {box}")
        if not (box["w"] > 0 and box["h"] > 0):
            raise ManifestError(f"box width and height must be positive; got {box}")
        boxes.append(box)
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


@dataclass
class FolderScan:
    """What a folder of class sub-folders holds, without reading an image."""

    root: Path
    classes: dict[str, list[Path]] = field(default_factory=dict)  # class folder -> its image files, any depth
    empty: list[str] = field(default_factory=list)  # class folders without an image file
    loose: list[Path] = field(default_factory=list)  # image files beside the class folders (no class)
    not_images: list[Path] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(files) for name, files in self.classes.items()}

    @property
    def files(self) -> list[Path]:
        return [f for files in self.classes.values() for f in files]


def scan_class_folder(root: str | os.PathLike) -> FolderScan:
    """List ``root/<class>/**/<image>`` as :func:`from_folder` reads it (hidden files and folders skipped)."""
    root = Path(root)
    scan = FolderScan(root)
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
            scan.loose.append(entry)
        elif entry.is_dir():
            files = sorted(p for p in entry.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(entry).parts))
            images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            scan.not_images += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
            if images:
                scan.classes[entry.name] = images
            else:
                scan.empty.append(entry.name)
    return scan


LOOSE_REASON = "image file(s) loose beside the class folders (no class)"


def from_folder(root: str | os.PathLike, source: str | None = None, patient_from: str | None = None,
                label_map: Mapping | None = None) -> pd.DataFrame:
    """A folder of class sub-folders (label = sub-folder name) holding image files at any depth.

    ``image_id`` is ``"<class>/<path below the class folder, without extension>"`` (the extension is
    kept where two files differ only by it). ``patient_from`` is a regular expression searched in
    each file name; its group ``patient`` (or its first group, or the whole match) is the patient
    id. Without it every image is its own patient and ``attrs["patient_ids_from_images"]`` is True.
    Labels go through :func:`normalise_labels`: folder names differing only in case stop the build unless
    ``label_map`` ({folder name: class | "drop"}) merges them.

    Nothing is left out quietly: files whose extension is not an image extension, images lying beside the
    class folders (listed in ``attrs["excluded_files"]``) and rows ``label_map`` drops are counted in
    ``attrs["excluded"]``; class folders without an image are listed in ``attrs["empty_class_folders"]``;
    each of these is also warned about.
    """
    root = existing_dir(root, "from_folder root")
    scan = scan_class_folder(root)
    if not scan.classes and not scan.empty:
        found = f" ({len(scan.loose)} image(s) directly in it)" if scan.loose else ""
        raise ManifestError(f"{root}: no class sub-folders found{found}; from_folder expects "
                            f"<root>/<class name>/<images>")
    if not scan.classes:
        raise ManifestError(f"{root}: the class sub-folders {scan.empty} hold no image files "
                            f"(extensions {IMAGE_EXTENSIONS})")
    pattern = _compile_patient_pattern(patient_from)
    rows: list[dict[str, Any]] = []
    unmatched: list[str] = []
    for name, images in scan.classes.items():
        class_dir = root / name
        ids = _unique_ids(name, [p.relative_to(class_dir) for p in images])
        for image_id, file in zip(ids, images):
            patient = image_id
            if pattern is not None:
                patient = patient_from_name(pattern, file.name)
                if patient is None:
                    unmatched.append(str(file))
            rows.append({"image_id": image_id, "path": str(file.resolve()), "label": name,
                         "patient_id": patient, "source": source or root.name})
    if unmatched:
        raise ManifestError(
            f"patient_from={patient_from!r} does not match {len(unmatched)} file name(s), e.g. "
            f"{unmatched[:5]}; fix the pattern or leave patient_from=None (each image its own patient)")
    df = pd.DataFrame(rows)
    labels, excluded = normalise_labels(df["label"], f"{root}: class folders", label_map,
                                        fix="rename the class folders", unit="image",
                                        merge="merge them with from_folder(..., label_map={example_py})")
    df = df.assign(label=labels)[[label is not None for label in labels]]
    if df.empty:
        raise ManifestError(f"{root}: label_map={dict(label_map or {})} drops every image; keep at least one class")
    if scan.not_images:
        excluded = {"not an image file (extension)": len(scan.not_images), **excluded}
    if scan.loose:
        excluded[LOOSE_REASON] = len(scan.loose)
    warn_folder(root, scan, excluded)
    df = finish_manifest(df, excluded)
    df.attrs["patient_ids_from_images"] = pattern is None
    if scan.loose:
        df.attrs["excluded_files"] = [str(p) for p in scan.loose]
    if scan.empty:
        df.attrs["empty_class_folders"] = list(scan.empty)
    return df


def warn_folder(root: Path, scan: FolderScan, excluded: dict[str, int]) -> None:
    """One warning for everything a class folder held that did not become a row (see :func:`from_folder`)."""
    parts = []
    if scan.loose:
        parts.append(f"{len(scan.loose)} image(s) beside the class folders have no class and are left out: "
                     f"{[p.name for p in scan.loose][:10]}{' ...' if len(scan.loose) > 10 else ''}")
    if scan.empty:
        parts.append(f"empty class folder(s) {scan.empty} (no image files, so no class)")
    if scan.not_images:
        parts.append(f"{len(scan.not_images)} file(s) left out, not an image file (extension), e.g. "
                     f"{[str(p) for p in scan.not_images[:3]]}")
    if parts:
        warnings.warn(f"{root}: " + "; ".join(parts), stacklevel=3)


def from_csv(csv_path: str | os.PathLike, image_dir: str | os.PathLike, path_column: str,
             label_column: str | None, patient_column: str | None = None, view_column: str | None = None,
             id_column: str | None = None, label_map: Mapping | None = None, source: str | None = None,
             split_column: str | None = None, unmapped: str = "drop") -> pd.DataFrame:
    """A label table: one row per image, file paths relative to ``image_dir`` (or absolute).

    Labels go through :func:`normalise_labels` (whitespace stripped; spellings differing only in case stop
    the build, naming the rows). ``label_map`` maps raw labels to class names ("drop" or None drops); with
    ``unmapped="drop"`` (the default) it is a whitelist: rows whose raw label it does not name are excluded and
    counted; with ``unmapped="keep"`` they keep their label (a profile's label_map). ``label_column=None``
    labels every image ``"unlabelled"`` (a pretraining pool). ``split_column`` takes a split the data brings
    with it (train/val/test). The CSV's other columns are kept unless their name is a manifest column.
    An empty table, an empty path cell or a missing file stops with the file and the row.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ManifestError(f"label table not found: {csv_path}")
    image_dir = existing_dir(image_dir, "from_csv image_dir")
    table = read_table(csv_path, "label table")
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
    if label_column is None:
        labels, excluded = ["unlabelled"] * len(table), {}
    else:
        labels, excluded = normalise_labels(
            table[label_column], f"{csv_path}: column {label_column!r}", label_map, unmapped=unmapped,
            fix=f"correct column {label_column!r} of the table", first_line=2,
            merge=("merge them with label_map={example_py}, unmapped='keep'" if label_map is None
                   else "add {example_py} to label_map"))
    keep = np.array([label is not None for label in labels], dtype=bool)
    table = table[keep]
    labels = [label for label in labels if label is not None]
    if table.empty:
        raise ManifestError(f"{csv_path}: label_map={dict(label_map or {})} leaves no row ({excluded}); "
                            f"map at least one label of column {label_column!r}")
    blank = [f"row {r} (line {r + 2})" for r, p in zip(table["_row"], table[path_column]) if not p.strip()]
    if blank:
        raise ManifestError(f"{csv_path}: {len(blank)} row(s) have an empty {path_column!r} cell: {blank[:20]}. "
                            f"What to do: fill in the image file or remove the rows")
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
    df = pd.DataFrame({"image_id": ids, "path": [str(p.resolve()) for p in paths], "label": labels,
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
    unasked = {reason: count for reason, count in excluded.items() if not reason.endswith("dropped by label_map")}
    if unasked:  # rows the label_map drops by name are counted, not warned about: they were asked for
        warn_excluded(csv_path, unasked)
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
