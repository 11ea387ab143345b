"""The built-in data sets' manifest builders: NIH ChestX-ray14 (with its radiologist boxes), Kermany pediatric
chest X-rays, Hannover COVID chest X-rays, and :func:`build_manifest` choosing a layout by name (the generic
``folder`` and ``csv`` layouts come from :mod:`osteolib.data.manifest`). :mod:`osteolib.data.sources` names them
for profiles.
"""
from __future__ import annotations

import csv
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from osteolib.data.manifest import (
    ManifestError,
    add_image_sizes,
    existing_dir,
    finish_manifest,
    from_csv,
    from_folder,
    patient_from_name,
    read_manifest,
    read_table,
    warn_excluded,
)

# folder names of the real data sets under the data root (the layout of ../shared/data)
REAL_FOLDERS = {
    "nih_cxr14": ("nih-cxr14-subset", "nih-cxr14", "ChestX-ray14"),
    "kermany": ("kermany-pediatric-cxr", "kermany", "chest_xray"),
    "hannover": ("hannover-covid-cxr", "hannover"),
}
SYNTHETIC = {"synthetic_shoulder": "shoulder", "synthetic_chest": "chest"}
NIH_PUBLISHED_SIZE = 1024  # NIH's boxes are in the pixel space of its published 1024x1024 PNGs
KERMANY_CLASSES = ("normal", "bacterial", "viral")
# Original Kermany file names carry the patient: person12_bacteria_45.jpeg, person1_virus_6.jpeg.
KERMANY_PATIENT_PATTERN = r"^(?P<patient>person\d+)_"
MANIFEST_KINDS = ("folder", "csv", "nih_cxr14", "kermany", "hannover", "synthetic")


# ---------------------------------------------------------------------------------------------
# Builders of the built-in data sets. Rows a builder leaves out are counted in ``df.attrs["excluded"]``
# ({reason: count}) and warned about; ``df.attrs["patient_ids_from_images"]`` is True where no patient
# identity was available, so the audit can say that a patient-level split is not possible for that data.
# ---------------------------------------------------------------------------------------------

def nih_cxr14(root: str | os.PathLike, positive: str = "Pneumonia", negative: str = "No Finding",
              bbox: bool = True, missing: str = "error") -> pd.DataFrame:
    """NIH ChestX-ray14: ``images/`` (or ``images_*/images/``) + ``Data_Entry_2017*.csv`` (+ ``BBox_List_2017*.csv``).

    Label ``positive.lower()`` ("pneumonia") when the finding labels contain ``positive``,
    ``negative`` ("no_finding") when they equal ``negative``; other rows are excluded and counted.
    Boxes are scaled from NIH's 1024x1024 space to the size of the file on disk and keep their
    finding label. ``missing="exclude"`` counts label rows without an image file (a partial
    download) instead of raising.
    """
    root = existing_dir(root, "nih_cxr14 root")
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
        warn_excluded(entry_csv, excluded)
    out = finish_manifest(df, excluded)
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
    root = existing_dir(root, "kermany root")
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
    patients = [patient_from_name(pattern, Path(p).name) for p in df["path"]]
    df["patient_id"] = [p if p is not None else i for p, i in zip(patients, df["image_id"])]
    df = add_image_sizes(df)
    df.attrs["patient_ids_from_images"] = any(p is None for p in patients)
    return df



def hannover(root: str | os.PathLike) -> pd.DataFrame:
    """Hannover Medical School COVID-19 chest X-rays: ``png/*.png`` + ``data.csv`` (every case COVID-19)."""
    root = existing_dir(root, "hannover root")
    table_path = root / "data.csv"
    if not table_path.is_file():
        raise ManifestError(f"{root}: data.csv not found (Hannover layout: <root>/data.csv + <root>/png/*.png)")
    table = read_table(table_path, "Hannover table (data.csv)")
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
    out = finish_manifest(add_image_sizes(df), {})
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


def _one_file(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        raise ManifestError(f"{root}: expected exactly one file matching {pattern!r}, found "
                            f"{[p.name for p in found] or 'none'}")
    return found[0]


def _class_name(raw: str) -> str:
    return re.sub(r"\W+", "_", raw.strip().lower()).strip("_")
