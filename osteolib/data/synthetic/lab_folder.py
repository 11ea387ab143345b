"""A synthetic folder shaped like a lab's own X-rays: to try the "your own data" path end to end, and to test it.

Real folders shared by labs are messy in known ways, and this one is too:

* class sub-folders with images at any depth (``<class>/<batch>/P017_ap.png``), or a label table instead
  (``layout="csv"``: ``images/`` plus ``labels.csv`` with extra columns age, sex, site and a short report);
* patient ids only in the file names (``P017_...``);
* **pre-augmented copies** of some radiographs under another patient's name (``P903_ap.jpg``: flipped, rotated
  up to ±15°, shifted up to 10 %, re-exposed, JPEG-recompressed) — the leakage a split must not let through;
* a few images stored as DICOM;
* an expert **box table** ``boxes.csv`` (``image, x, y, width, height, label`` in each file's pixel space) taken from
  the generator's evidence masks.

``write_lab_folder`` returns where it wrote, plus the truth (which files are copies of which) so a detector can be
scored against it.
"""
from __future__ import annotations

import io as _bytes_io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from osteolib.data.manifest import read_manifest
from osteolib.data.synthetic.datasets import write_shoulder_dataset
from osteolib.data.synthetic.settings import DEFAULT_CLASSES

LAYOUTS = ("folders", "csv")


@dataclass(frozen=True)
class LabFolder:
    root: Path  # the folder a user would point a profile at
    table: Path | None  # labels.csv for layout "csv"
    boxes: Path  # the expert box table
    copies: pd.DataFrame  # columns copy, original (paths relative to root): the planted copies
    n_images: int


def augment_copy(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A pre-augmented copy of a uint8 radiograph as a lab's augmentation script makes one: a flip (half the time),
    a rotation in [-15°, 15°], a shift of up to 10 %, brightness/contrast/gamma; returns it and a description."""
    out = image.astype(np.float64) / 255.0
    steps = []
    if rng.random() < 0.5:
        out, _ = out[:, ::-1], steps.append("flip")
    angle = float(rng.uniform(-15, 15))
    out = ndimage.rotate(out, angle, reshape=False, order=1, mode="nearest")
    shift = rng.uniform(-0.1, 0.1, size=2) * np.array(out.shape)
    out = ndimage.shift(out, shift, order=1, mode="nearest")
    gain, offset, gamma = rng.uniform(0.8, 1.2), rng.uniform(-0.08, 0.08), rng.uniform(0.8, 1.25)
    out = np.clip(np.clip(out, 0, 1) ** gamma * gain + offset, 0, 1)
    steps.append(f"rot {angle:+.1f} shift {shift[0]:+.1f},{shift[1]:+.1f} gain {gain:.2f} gamma {gamma:.2f}")
    return np.round(out * 255).astype(np.uint8), "; ".join(steps)


def _save_jpeg(array: np.ndarray, path: Path, quality: int) -> None:
    buffer = _bytes_io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    path.write_bytes(buffer.getvalue())


def write_dicom(array: np.ndarray, path: Path, patient_id: str, view: str) -> Path:
    """A 16-bit monochrome DICOM secondary capture of a uint8 image (scaled to 12 bits), as a modality writes it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.ViewPosition = "DX", patient_id, view.upper()
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (array.astype(np.uint16) * 16).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


FINDINGS = ("normal bone density, intact cortex", "mildly reduced bone density", "reduced bone density, thin cortex")


def report_text(label: str, view: str, classes: Sequence[str]) -> str:
    """A short radiologist-style report: the view and a finding by the class's rank (healthy first, as a
    report written from the image would word it), e.g. ``AP view. Reduced bone density, thin cortex.``"""
    rank = list(classes).index(label)
    level = 0 if rank == 0 else (2 if rank == len(classes) - 1 else 1)
    return f"{str(view).upper()} view. {FINDINGS[level].capitalize()}."


def write_lab_folder(out_dir: str | os.PathLike, n_patients: int = 40, size: int = 64, seed: int = 0,
                     difficulty: float = 0.3, copy_fraction: float = 0.15, n_dicom: int = 3,
                     layout: str = "folders", classes: Sequence[str] = DEFAULT_CLASSES) -> LabFolder:
    """Write a lab-style folder of synthetic shoulder radiographs into ``out_dir`` (which must not exist)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose one of {LAYOUTS}")
    root = Path(out_dir)
    if root.exists():
        raise FileExistsError(f"{root} exists: write_lab_folder writes a new folder")
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as scratch:
        manifest = read_manifest(write_shoulder_dataset(scratch, n_patients=n_patients, seed=seed, size=size,
                                                        difficulty=difficulty, classes=classes, workers=1))
        rows, boxes, copies = [], [], []
        dicom_rows = set(rng.choice(len(manifest), size=min(n_dicom, len(manifest)), replace=False).tolist())
        patient_names = {pid: f"P{j:03d}" for j, pid in enumerate(dict.fromkeys(manifest["patient_id"]))}
        for k, item in enumerate(manifest.itertuples()):
            patient = patient_names[item.patient_id]
            stem = f"{patient}_{item.view}"
            folder = Path("images") if layout == "csv" else Path(item.label) / f"batch{k % 3}"
            name = stem + (".dcm" if k in dicom_rows else ".png")
            (root / folder).mkdir(parents=True, exist_ok=True)
            pixels = np.asarray(Image.open(item.path).convert("L"))
            if k in dicom_rows:
                write_dicom(pixels, root / folder / name, patient, item.view)
            else:
                shutil.copyfile(item.path, root / folder / name)
            rows.append({"file": (folder / name).as_posix(), "diagnosis": item.label, "patient": patient,
                         "view": item.view, "age": int(rng.integers(50, 90)), "sex": str(rng.choice(["F", "M"])),
                         "site": f"site{k % 2 + 1}", "report": report_text(item.label, item.view, classes)})
            for box in item.boxes or []:
                boxes.append({"image": (folder / name).as_posix(), "x": box["x"], "y": box["y"],
                              "width": box["w"], "height": box["h"], "label": item.label})
            if rng.random() < copy_fraction:  # the same radiograph under another patient's name, augmented
                copy, how = augment_copy(pixels, rng)
                copy_patient = f"P{900 + len(copies):03d}"
                copy_name = folder / f"{copy_patient}_{item.view}.jpg"
                _save_jpeg(copy, root / copy_name, quality=int(rng.integers(60, 96)))
                copies.append({"copy": copy_name.as_posix(), "original": (folder / name).as_posix(), "how": how})
                rows.append({**rows[-1], "file": copy_name.as_posix(), "patient": copy_patient})
    pd.DataFrame(boxes).to_csv(root / "boxes.csv", index=False)
    table = None
    if layout == "csv":
        table = root / "labels.csv"
        pd.DataFrame(rows).to_csv(table, index=False)
    return LabFolder(root=root, table=table, boxes=root / "boxes.csv", copies=pd.DataFrame(copies, columns=[
        "copy", "original", "how"]), n_images=len(rows))
