"""Named data sets: one call from a profile's data-set name, or a spec of a lab's own data, to a manifest.

The built-in data sets' builders live in :mod:`osteolib.data.builtin` (:func:`nih_cxr14`, :func:`kermany`,
:func:`hannover`).

``load_dataset("nih_cxr14", data_root)`` finds the NIH subset under the real-data root; ``load_dataset(
"synthetic_shoulder", n_patients=200)`` generates (or reuses) the project's own synthetic X-rays. Pools for the
chest pretraining stage are lists of names (``load_pool(["kermany", "hannover"], data_root)``).

A lab's own data enter through a *spec* (a mapping, written in a profile) in place of a name, both for the target
data set and for each entry of a pool; :func:`check_dataset_spec` checks one before any work, :func:`load_spec`
builds its manifest::

    {kind: folder, root: DIR, patient_from: REGEX}          # DIR/<class>/**/<image>; patient from the file name
    {kind: folder, root: DIR, labels: none}                 # unlabelled images at any depth (a pretraining pool)
    {kind: csv, table: FILE, image_dir: DIR, path_column: file, label_column: diagnosis,
     patient_column: patient, view_column: view, label_map: {osteopenia: drop}}
    ... regions: {boxes: FILE}  or  regions: {masks: DIR}   # expert regions in the files' pixel space

Relative paths resolve against the data root.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from osteolib.data.manifest import (
    DROP,
    IMAGE_EXTENSIONS,
    FolderScan,
    LabelError,
    ManifestError,
    add_image_sizes,
    case_variants,
    concat_manifests,
    finish_manifest,
    from_csv,
    from_folder,
    from_image_folder,
    label_mapping,
    normalise_labels,
    patient_from_name,
    read_manifest,
    read_table,
    scan_class_folder,
)
from osteolib.data.builtin import REAL_FOLDERS, SYNTHETIC, hannover, kermany, nih_cxr14
from osteolib.data.synthetic.datasets import ensure_synthetic
from osteolib.data.clinical import ClinicalError, join_clinical, read_clinical_table
from osteolib.paths import real_data_root, require_real_data_root

# ---------------------------------------------------------------------------------------------
# The name registry
# ---------------------------------------------------------------------------------------------

def _real_builder(name: str) -> Callable[..., pd.DataFrame]:
    return {"nih_cxr14": nih_cxr14, "kermany": kermany, "hannover": hannover}[name]


def known_datasets() -> list[str]:
    return sorted([*REAL_FOLDERS, *SYNTHETIC])


def locate(name: str, data_root: str | os.PathLike | None = None) -> Path:
    """The folder of a real data set under the data root (or the data root itself if it is that folder)."""
    root = require_real_data_root(data_root)
    for folder in REAL_FOLDERS[name]:
        if (root / folder).is_dir():
            return root / folder
    if root.name in REAL_FOLDERS[name]:
        return root
    raise FileNotFoundError(f"data set {name!r} not found under {root}: expected one of the folders "
                            f"{list(REAL_FOLDERS[name])}")


def load_dataset(name: str | dict[str, Any], data_root: str | os.PathLike | None = None,
                 label_map: dict[str, Any] | None = None, **options: Any) -> pd.DataFrame:
    """A manifest for a named data set, or for a spec of one's own data (see :func:`load_spec`).

    Synthetic sets take the generator's parameters as options; for a spec, options are further spec keys.
    ``label_map`` (notebook 00's parameter) merges or drops classes: for a spec it joins the spec's own
    ``label_map`` (see :func:`with_label_map`) so that it can merge spellings the builder would refuse; for a
    built-in set it is applied to the manifest (:func:`apply_label_map`).
    """
    if isinstance(name, dict):
        return load_spec(with_label_map({**name, **options}, label_map), data_root, target=True)
    if name in SYNTHETIC:
        manifest = read_manifest(ensure_synthetic(SYNTHETIC[name], **options))
    elif name in REAL_FOLDERS:
        manifest = _real_builder(name)(locate(name, data_root), **options)
    else:
        raise ValueError(f"unknown data set {name!r}: known data sets are {known_datasets()}")
    return apply_label_map(manifest, label_map)


def with_label_map(spec: dict[str, Any], label_map: dict[str, Any] | None) -> dict[str, Any]:
    """The spec with a profile's ``label_map`` joined to its own (the profile's entry wins for one class)."""
    if not label_map:
        return spec
    return {**spec, "label_map": {**(spec.get("label_map") or {}), **label_map}}


def load_pool(names: Sequence[str], data_root: str | os.PathLike | None = None,
              options: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    """Several data sets as one manifest (e.g. the chest pretraining pool)."""
    if isinstance(names, (str, dict)):
        names = [names]
    options = options or {}
    return concat_manifests(*(
        load_spec(n, data_root, where=f"chest_datasets[{i}]") if isinstance(n, dict)
        else load_dataset(n, data_root, **options.get(n, {})) for i, n in enumerate(names)))


# ---------------------------------------------------------------------------------------------
# Specs: a lab's own folder or label table, named in a profile instead of a built-in data set
# ---------------------------------------------------------------------------------------------

SPEC_KINDS = ("folder", "csv")
_COMMON_SPEC_KEYS = ("kind", "source", "labels", "label_map", "regions", "view", "clinical")
SPEC_KEYS = {
    "folder": _COMMON_SPEC_KEYS + ("root", "patient_from"),
    "csv": _COMMON_SPEC_KEYS + ("table", "image_dir", "path_column", "label_column", "patient_column",
                                "view_column", "id_column", "split_column"),
}
BOX_COLUMNS = ("image", "x", "y", "width", "height")  # + optional "label"; pixels of the file as stored
UNLABELLED = "unlabelled"  # the label of every image of a `labels: none` spec
PLACEHOLDER = "CHANGE_ME"  # the root of profiles/own_data.yaml until the user sets it
SPEC_EXAMPLES = ("{kind: folder, root: DIR, patient_from: '^(?P<patient>[^_]+)_'} or "
                 "{kind: csv, table: FILE, image_dir: DIR, path_column: ..., label_column: ...}")


class DatasetSpecError(ManifestError):
    """A data-set spec cannot be used; ``where`` is its place in the profile (``dataset.root``)."""

    def __init__(self, where: str, problem: str, hint: str) -> None:
        self.where, self.problem, self.hint = where, problem, hint
        super().__init__(f"{where}: {problem}. What to do: {hint}")


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def map_classes(classes: Sequence[str], label_map: Any, where: str = "label_map") -> dict[str, str | None]:
    """Check a ``label_map`` ({class: new class | "drop" | null}) against the classes; return the full mapping."""
    try:
        return label_mapping(classes, label_map, where)
    except LabelError as err:
        raise DatasetSpecError(err.where, err.problem, err.hint) from None


def check_case_variants(labels: Sequence[str], where: str) -> None:
    """Stop on class names that differ only in case (see :func:`osteolib.data.manifest.normalise_labels`)."""
    _labels_or_spec_error(labels, where)


def _labels_or_spec_error(labels: Sequence[str], where: str, **options: Any) -> tuple[list[str | None], dict[str, int]]:
    try:
        return normalise_labels(labels, where, **options)
    except LabelError as err:
        raise DatasetSpecError(err.where, err.problem, err.hint) from None


def apply_label_map(df: pd.DataFrame, label_map: dict[str, Any] | None, where: str = "label_map") -> pd.DataFrame:
    """Merge or drop classes: ``{osteopenia: osteoporosis}`` renames, ``{osteopenia: drop}`` drops the rows.

    Labels go through :func:`osteolib.data.manifest.normalise_labels` (the builders' own rules); dropped rows
    are counted in ``attrs["excluded"]``; a key naming no class of the manifest is an error, and so are
    classes that still differ only in case afterwards.
    """
    if not label_map:
        return df
    attrs = dict(df.attrs)
    labels, dropped = _labels_or_spec_error(df["label"], where, label_map=label_map, map_where=where,
                                            fix="map every spelling", merge="add them to label_map: {example}")
    keep = np.array([label is not None for label in labels], dtype=bool)
    out = df.assign(label=labels)[keep].reset_index(drop=True)
    if out.empty:
        raise DatasetSpecError(where, "drops every image", "keep at least one class")
    out.attrs = {**attrs, "excluded": {**attrs.get("excluded", {}), **dropped}}
    return out


def _resolve(value: Any, data_root: str | os.PathLike | None, where: str, what: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise DatasetSpecError(where, f"needs the {what}, got {value!r}",
                               "give a path, absolute or relative to data_root")
    if PLACEHOLDER in str(value):
        raise DatasetSpecError(where, f"{str(value)!r} is the placeholder of the own_data profile",
                               f"set it to your {what} (absolute, or relative to data_root), or let "
                               f"`osteo init DIR` write a profile for your folder")
    path = Path(str(value)).expanduser()
    if path.is_absolute():
        return path
    base = real_data_root(data_root)
    if base is None:
        raise DatasetSpecError(where, f"relative path {str(value)!r} but no data root is set "
                               f"(data_root={data_root!r}, $OSTEOLIB_DATA_ROOT unset or missing)",
                               "give an absolute path, or set data_root in the profile / --data-root")
    return base / path


def _spec_kind(spec: Any, where: str) -> str:
    if not isinstance(spec, dict):
        raise DatasetSpecError(where, f"is neither a data-set name nor a spec: {spec!r}",
                               f"use one of {known_datasets()} or a spec {SPEC_EXAMPLES}")
    kind = spec.get("kind")
    if kind not in SPEC_KINDS:
        raise DatasetSpecError(f"{where}.kind", f"unknown kind {kind!r}",
                               f"use kind: folder (class sub-folders) or kind: csv (a label table); "
                               f"built-in data sets are named directly: {known_datasets()}")
    unknown = sorted(set(spec) - set(SPEC_KEYS[kind]))
    if unknown:
        raise DatasetSpecError(where, f"unknown key(s) {unknown} for kind {kind}",
                               f"remove them; a {kind} spec takes {list(SPEC_KEYS[kind])}")
    return kind


def check_dataset_spec(spec: str | dict[str, Any], data_root: str | os.PathLike | None = None,
                       where: str = "dataset", target: bool = False) -> dict[str, Any]:
    """Check a data set named in a profile before any work; return it resolved (absolute paths, its classes).

    ``spec`` is a built-in name (only the name is checked) or a spec mapping (see the module docstring).
    ``target`` (notebook 00's data set) requires labels and at least two classes. Everything that can be
    checked without decoding an image is: folders and files exist, columns are in the table, ``patient_from``
    matches the file names, class names are not case variants, ``label_map`` names existing classes and every
    row of a box table names an image. Raises :class:`DatasetSpecError` naming ``where`` and what to do.
    """
    if isinstance(spec, str):
        if spec not in known_datasets():
            raise DatasetSpecError(where, f"unknown data set {spec!r}",
                                   f"use one of {known_datasets()} or a spec {SPEC_EXAMPLES}")
        return {"kind": "builtin", "name": spec}
    kind = _spec_kind(spec, where)
    labels = spec.get("labels", "given")
    labelled = not (labels is False or str(labels).strip().lower() in ("none", "no", "false"))
    if labels != "given" and labelled:
        raise DatasetSpecError(f"{where}.labels", f"unknown value {labels!r}",
                               "write labels: none for unlabelled images (pretraining), or leave it out")
    if target and not labelled:
        raise DatasetSpecError(f"{where}.labels", "the target data set (notebook 00) needs labels",
                               "remove labels: none; unlabelled images belong in 01's chest_datasets")
    out: dict[str, Any] = {"kind": kind, "labelled": labelled, "source": spec.get("source"),
                           "view": spec.get("view"), "where": where}
    keys: dict[str, list[Path]] = {}  # names a box row may use -> the image files they name

    def add_key(key: str, file: Path) -> None:
        keys.setdefault(key, []).append(file)

    if kind == "folder":
        root = _resolve(spec.get("root"), data_root, f"{where}.root", "folder of X-rays")
        if not root.is_dir():
            raise DatasetSpecError(f"{where}.root", f"folder not found: {root}",
                                   "check the path (relative paths resolve against data_root)")
        out["root"] = str(root)
        if labelled:
            scan = scan_class_folder(root)
            if not scan.classes:
                found = f"{len(scan.loose)} image(s) directly in it" if scan.loose else "no image files"
                raise DatasetSpecError(f"{where}.root", f"{root} has no class sub-folder holding images ({found}; "
                                       f"empty class folders: {scan.empty})",
                                       "put the images into one sub-folder per class (root/<class>/...), or "
                                       "write labels: none for unlabelled images")
            files = scan.files
            raw_classes = sorted(scan.classes)
            blank = [c for c in raw_classes if not c.strip()]
            if blank:
                raise DatasetSpecError(f"{where}.root", f"class folder name(s) {blank} are blank", "rename them")
            row_labels: list[str] = [name for name, class_files in scan.classes.items() for _ in class_files]
            first_line = None
            labels_where, fix = f"{where}.root", f"rename the class folders in {root}"
            for name, class_files in scan.classes.items():
                for f in class_files:
                    add_key(f.relative_to(root / name).as_posix(), f)
            out["scan"] = scan
        else:
            files = _image_files(root)
            if not files:
                raise DatasetSpecError(f"{where}.root", f"{root} holds no image files at any depth "
                                       f"(extensions {IMAGE_EXTENSIONS})", "check the path")
            class_names = [UNLABELLED]
        for f in files:
            add_key(f.name, f)
            add_key(f.relative_to(root).as_posix(), f)
        out["image_keys_base"] = str(root)
        pattern_text = spec.get("patient_from")
        out["patient_from"] = pattern_text
        if pattern_text is not None:
            try:
                pattern = re.compile(str(pattern_text))
            except re.error as err:
                raise DatasetSpecError(f"{where}.patient_from", f"{pattern_text!r} is not a valid regular "
                                       f"expression ({err})", "fix it, e.g. '^(?P<patient>P\\d+)_'") from None
            unmatched = [f.name for f in files if patient_from_name(pattern, f.name) is None]
            if len(unmatched) == len(files):
                raise DatasetSpecError(f"{where}.patient_from", f"{pattern_text!r} matches none of the "
                                       f"{len(files)} file names (e.g. {[f.name for f in files[:3]]})",
                                       "the pattern is searched in the file name, not the folder; give it a "
                                       "group named patient, e.g. '^(?P<patient>[^_]+)_'")
            if unmatched:
                raise DatasetSpecError(f"{where}.patient_from", f"{pattern_text!r} does not match "
                                       f"{len(unmatched)} of {len(files)} file names, e.g. {unmatched[:5]}",
                                       "widen the pattern, or rename those files")
    else:
        table_path = _resolve(spec.get("table"), data_root, f"{where}.table", "label table (CSV)")
        if not table_path.is_file():
            raise DatasetSpecError(f"{where}.table", f"file not found: {table_path}",
                                   "check the path (relative paths resolve against data_root)")
        image_dir = (_resolve(spec["image_dir"], data_root, f"{where}.image_dir", "image folder")
                     if spec.get("image_dir") is not None else table_path.parent)
        if not image_dir.is_dir():
            raise DatasetSpecError(f"{where}.image_dir", f"folder not found: {image_dir}",
                                   "check the path (relative paths resolve against data_root)")
        table = _read_spec_table(table_path, f"{where}.table", "label table")
        columns = {"path_column": spec.get("path_column", "path"),
                   "label_column": spec.get("label_column", "label") if labelled else spec.get("label_column"),
                   "patient_column": spec.get("patient_column"), "view_column": spec.get("view_column"),
                   "id_column": spec.get("id_column"), "split_column": spec.get("split_column")}
        for arg, column in columns.items():
            if column is not None and column not in table.columns:
                raise DatasetSpecError(f"{where}.{arg}", f"column {column!r} is not in {table_path}",
                                       f"set {arg} to one of the table's columns {list(table.columns)}")
        out.update(table=str(table_path), image_dir=str(image_dir), image_keys_base=str(image_dir), **columns)
        if labelled:
            row_labels = table[columns["label_column"]].tolist()
            first_line = 2
            labels_where = f"{where}.label_column"
            fix = f"correct column {columns['label_column']!r} of {table_path}"
        else:
            class_names = [UNLABELLED]
        for value in table[columns["path_column"]]:
            f = Path(value.strip())
            f = f if f.is_absolute() else image_dir / f
            add_key(value.strip().replace("\\", "/"), f)
            add_key(f.name, f)
    if spec.get("label_map") is not None and not labelled:
        raise DatasetSpecError(f"{where}.label_map", "labels: none has no classes to map", "remove label_map")
    if labelled:  # the builders' own label rules (osteolib.data.manifest.normalise_labels), checked before any work
        mapped, _ = _labels_or_spec_error(
            row_labels, labels_where if spec.get("label_map") is None else f"{where}.label_map",
            label_map=spec.get("label_map"), map_where=f"{where}.label_map", fix=fix, first_line=first_line,
            merge="merge them with label_map: {example} in this data-set spec",
            unit="row" if first_line else "image")
        class_names = sorted({c for c in mapped if c is not None})
        if not class_names:
            raise DatasetSpecError(f"{where}.label_map", "drops every class", "keep at least one class")
    out["label_map"] = spec.get("label_map")
    if target and len(class_names) < 2:
        raise DatasetSpecError(where, f"only one class {class_names}", "the target task needs two or more classes")
    out["classes"] = class_names
    out["regions"] = _check_regions(spec.get("regions"), data_root, f"{where}.regions", keys)
    out["clinical"] = _check_clinical(spec.get("clinical"), data_root, f"{where}.clinical")
    out["image_files"] = sorted({f for files in keys.values() for f in files})
    return out


def _check_clinical(clinical: Any, data_root, where: str) -> dict[str, Any]:
    """``clinical: {table: FILE, id_column: ..., columns: [...]}``: the patient table exists, its id column and
    columns are there and each patient has one row (read once here; joined by :func:`load_spec`)."""
    if clinical is None:
        return {}
    if not isinstance(clinical, dict) or "table" not in clinical or "id_column" not in clinical \
            or set(clinical) - {"table", "id_column", "columns"}:
        raise DatasetSpecError(where, f"must be {{table: FILE, id_column: COLUMN, columns: [...]}}, got {clinical!r}",
                               "table: a CSV or Excel file with one row per patient; columns: optional, default all")
    path = _resolve(clinical["table"], data_root, f"{where}.table", "clinical table (CSV or Excel)")
    columns = clinical.get("columns")
    try:
        table = read_clinical_table(path, str(clinical["id_column"]), columns)
    except ClinicalError as err:
        raise DatasetSpecError(where, str(err), "fix the table or the spec") from None
    return {"table": str(path), "frame": table}


def _read_spec_table(path: Path, where: str, what: str, allow_no_rows: bool = False) -> pd.DataFrame:
    try:
        return read_table(path, what, allow_no_rows=allow_no_rows)
    except ManifestError as err:
        problem, _, hint = str(err).partition(". What to do: ")
        raise DatasetSpecError(where, problem, hint or "save it as comma-separated text with a header row") from None


def _check_regions(regions: Any, data_root, where: str, keys: dict[str, list[Path]]) -> dict[str, Any]:
    if regions is None:
        return {}
    if not isinstance(regions, dict) or not regions or set(regions) - {"boxes", "masks"}:
        raise DatasetSpecError(where, f"must be {{boxes: FILE}} and/or {{masks: DIR}}, got {regions!r}",
                               "boxes: a CSV image,x,y,width,height[,label]; masks: a folder of mask images")
    out: dict[str, Any] = {}
    if regions.get("masks") is not None:
        masks = _resolve(regions["masks"], data_root, f"{where}.masks", "folder of mask images")
        if not masks.is_dir():
            raise DatasetSpecError(f"{where}.masks", f"folder not found: {masks}", "check the path")
        out["masks"] = str(masks)
    if regions.get("boxes") is not None:
        path = _resolve(regions["boxes"], data_root, f"{where}.boxes", "box table (CSV)")
        if not path.is_file():
            raise DatasetSpecError(f"{where}.boxes", f"file not found: {path}", "check the path")
        table = _read_spec_table(path, f"{where}.boxes", "box table", allow_no_rows=True)
        absent = [c for c in BOX_COLUMNS if c not in table.columns]
        if absent:
            raise DatasetSpecError(f"{where}.boxes", f"{path} lacks column(s) {absent} (it has {list(table.columns)})",
                                   f"write the header {','.join(BOX_COLUMNS)}[,label] (pixels of the image file)")
        if table.empty:
            warnings.warn(f"{where}.boxes: {path} has a header but no rows: no image gets an expert box",
                          stacklevel=3)
        boxes: list[tuple[int, Path, dict[str, Any]]] = []
        for r, record in enumerate(table.to_dict("records")):
            name = record["image"].strip().replace("\\", "/")
            row = f"{path} row {r} (line {r + 2})"
            found = keys.get(name, [])
            if not found:
                raise DatasetSpecError(f"{where}.boxes", f"{row} names image {name!r}, which is not among the "
                                       f"data set's images", "write the image's file name or its path relative to "
                                       "the data set's folder, or remove the row")
            if len(set(found)) > 1:
                raise DatasetSpecError(f"{where}.boxes", f"{row}: {name!r} names {len(set(found))} images "
                                       f"{[str(f) for f in sorted(set(found))][:3]}",
                                       "write the path relative to the data set's folder instead of the file name")
            try:
                x, y, w, h = (float(record[c]) for c in BOX_COLUMNS[1:])
            except ValueError:
                raise DatasetSpecError(f"{where}.boxes", f"{row}: coordinates are not numbers: {record}",
                                       "write x, y, width, height in pixels") from None
            if not (w > 0 and h > 0 and x >= 0 and y >= 0):
                raise DatasetSpecError(f"{where}.boxes", f"{row}: box x={x}, y={y}, width={w}, height={h} "
                                       f"is empty or negative", "fix the row (pixels of the image file)")
            box = {"x": x, "y": y, "w": w, "h": h}
            if "label" in table.columns:
                box["label"] = record["label"].strip()
            boxes.append((r, found[0], box))
        out["boxes"] = str(path)
        out["box_rows"] = boxes
    return out


def load_spec(spec: dict[str, Any], data_root: str | os.PathLike | None = None, where: str = "dataset",
              target: bool = False) -> pd.DataFrame:
    """The manifest of a spec (checked first by :func:`check_dataset_spec`).

    Image sizes are read from the headers; expert regions are attached as ``boxes`` / ``mask_path``;
    ``label_map`` merges or drops classes as the builder reads the labels (dropped rows counted in
    ``attrs["excluded"]``, their boxes in ``attrs["boxes_on_excluded_images"]``). Images beside the class folders
    and empty class folders are warned about and listed in ``attrs["excluded_files"]`` /
    ``attrs["empty_class_folders"]`` (by :func:`osteolib.data.manifest.from_folder`).
    """
    spec_info = check_dataset_spec(spec, data_root, where, target=target)
    if spec_info["kind"] == "builtin":
        return load_dataset(spec_info["name"], data_root)
    source = spec_info["source"]
    label_map = spec_info["label_map"] or None
    if spec_info["kind"] == "folder" and spec_info["labelled"]:
        df = from_folder(spec_info["root"], source=source, patient_from=spec_info["patient_from"],
                         label_map=label_map)
    elif spec_info["kind"] == "folder":
        df = from_image_folder(spec_info["root"], source=source, patient_from=spec_info["patient_from"])
    else:
        df = from_csv(spec_info["table"], spec_info["image_dir"], spec_info["path_column"],
                      spec_info["label_column"] if spec_info["labelled"] else None, spec_info["patient_column"],
                      spec_info["view_column"], spec_info["id_column"], label_map, source,
                      spec_info["split_column"], unmapped="keep")
    attrs = dict(df.attrs)
    attrs["excluded"] = dict(attrs.get("excluded", {}))
    if spec_info["view"] is not None:
        df["view"] = [str(spec_info["view"]).strip().upper() if v in ("", "unknown") else v
                      for v in df.get("view", pd.Series(["unknown"] * len(df)))]
    df = add_image_sizes(df)
    regions = spec_info["regions"]
    in_manifest = {str(Path(p).resolve()) for p in df["path"]}
    left_out = {f for f in spec_info["image_files"] if str(f.resolve()) not in in_manifest} if label_map else set()
    if "box_rows" in regions:
        df, n_left_out = _attach_boxes(df, regions, f"{where}.regions.boxes", left_out)
        if n_left_out:
            attrs["boxes_on_excluded_images"] = n_left_out
    if "masks" in regions:
        df, extra = _attach_masks(df, Path(regions["masks"]), f"{where}.regions.masks",
                                  {f.stem for f in left_out})
        attrs.update(extra)
    if attrs.get("patient_ids_from_images") and spec_info["labelled"]:
        warnings.warn(f"{where}: no patient ids (each image counts as its own patient, so images of one patient "
                      f"can land in two splits); set patient_from (a regex on the file name with a group named "
                      f"patient) or patient_column", stacklevel=2)
    out = finish_manifest(df, attrs["excluded"])
    clinical = spec_info["clinical"]
    if clinical:  # the patient table, joined by patient; what did not match is counted for the audit
        joined = join_clinical(out, clinical["frame"])
        out = joined.manifest
        attrs["clinical_join"] = {"table": clinical["table"], "covariates": joined.columns,
                                  "patients_without_row": joined.patients_without_row,
                                  "rows_without_images": joined.rows_without_images}
        if joined.patients_without_row:
            warnings.warn(f"{where}.clinical: {len(joined.patients_without_row)} patient(s) have no row in "
                          f"{clinical['table']} (e.g. {joined.patients_without_row[:5]}); their covariates are "
                          f"missing (imputed later from the training split)", stacklevel=2)
    out.attrs = attrs
    return out


def _attach_boxes(df: pd.DataFrame, regions: dict[str, Any], where: str,
                  left_out: set[Path]) -> tuple[pd.DataFrame, int]:
    """Boxes onto their rows; box rows of images label_map dropped (``left_out``) are counted, not attached."""
    by_path = {str(Path(p).resolve()): i for i, p in enumerate(df["path"])}
    boxes: dict[int, list[dict[str, Any]]] = {}
    n_left_out = 0
    for r, file, box in regions["box_rows"]:
        i = by_path.get(str(file.resolve()))
        if i is None and file in left_out:
            n_left_out += 1
            continue
        if i is None:  # checked before; only a file the builder left out gets here
            raise DatasetSpecError(where, f"{regions['boxes']} row {r} (line {r + 2}) names {file}, which is not "
                                   f"in the manifest", "remove the row")
        width, height = df.at[i, "width"], df.at[i, "height"]
        if box["x"] + box["w"] > width + 0.5 or box["y"] + box["h"] > height + 0.5:
            raise DatasetSpecError(where, f"{regions['boxes']} row {r} (line {r + 2}): box {box} reaches outside "
                                   f"{file.name} ({width} x {height} px)",
                                   "boxes are in the pixels of the image file as stored; rescale them")
        boxes.setdefault(i, []).append(box)
    out = df.copy()
    out["boxes"] = [boxes.get(i) for i in range(len(df))]
    return out, n_left_out


def _attach_masks(df: pd.DataFrame, masks: Path, where: str,
                  left_out_stems: set[str] = frozenset()) -> tuple[pd.DataFrame, dict[str, Any]]:
    from PIL import Image

    by_stem: dict[str, list[int]] = {}
    for i, p in enumerate(df["path"]):
        by_stem.setdefault(Path(p).stem, []).append(i)
    chosen: dict[int, Path] = {}
    orphans: list[str] = []
    of_left_out = 0
    for mask in _image_files(masks):
        stem = mask.stem
        if stem not in by_stem and stem.lower().endswith("_mask"):
            stem = stem[:-5]
        rows = by_stem.get(stem)
        if not rows and (mask.stem in left_out_stems or stem in left_out_stems):
            of_left_out += 1  # the mask of an image label_map dropped
            continue
        if not rows:
            orphans.append(mask.name)
            continue
        if len(rows) > 1:
            raise DatasetSpecError(where, f"mask {mask} matches {len(rows)} images with the stem {stem!r}: "
                                   f"{[df.at[i, 'path'] for i in rows][:3]}", "give those images unique file names")
        if rows[0] in chosen:
            raise DatasetSpecError(where, f"two masks for image {df.at[rows[0], 'path']}: {chosen[rows[0]]} and "
                                   f"{mask}", "keep one mask per image")
        with Image.open(mask) as image:
            size = image.size
        expected = (int(df.at[rows[0], "width"]), int(df.at[rows[0], "height"]))
        if size != expected:
            raise DatasetSpecError(where, f"mask {mask} is {size[0]} x {size[1]} px but its image is "
                                   f"{expected[0]} x {expected[1]}", "masks must be on the image's pixel grid")
        chosen[rows[0]] = mask
    out = df.copy()
    out["mask_path"] = [str(chosen[i].resolve()) if i in chosen else None for i in range(len(df))]
    extra: dict[str, Any] = {"masks_of_excluded_images": of_left_out} if of_left_out else {}
    if orphans:
        extra["masks_without_image"] = orphans
        warnings.warn(f"{where}: {len(orphans)} mask(s) in {masks} match no image by file name stem: "
                      f"{orphans[:10]}", stacklevel=3)
    return out, extra
