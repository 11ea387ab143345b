"""``osteo init DIR``: look at a folder of X-rays (one sub-folder per class) and write a profile for it.

Prints the classes and their image counts, what would be left out (images beside the class folders, empty class
folders, files that are not images) and whether patient ids can be read from the file names; then writes a copy
of ``profiles/own_data.yaml`` (comments kept) whose ``dataset`` points at DIR. An existing file is never
overwritten.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

from osteolib.cli.profiles import PROFILES_DIR

TEMPLATE = PROFILES_DIR / "own_data.yaml"
ROOT_LINE = re.compile(r"^(?P<indent>\s*)root: CHANGE_ME/my_xrays\b.*$", re.MULTILINE)
PATIENT_LINE = re.compile(r"^(?P<indent>\s*)# patient_from: .*$", re.MULTILINE)
# Candidate patterns for patient ids in file names, most specific first: "P012_left.png", "12345-2.dcm", ...
PATIENT_PATTERNS = (
    r"^(?P<patient>[A-Za-z]*\d+)[_\-]",
    r"^(?P<patient>[^_.]+)_",
    r"^(?P<patient>[^_\-.]+)[_\-]",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="folder of X-rays: one sub-folder per class, images at any depth")
    parser.add_argument("--out", help="profile to write (default: profiles/<folder name>.yaml); never overwritten")
    parser.add_argument("--name", help="the profile's name (default: the file name of --out)")


def guess_patient_pattern(names: list[str]) -> tuple[str | None, int]:
    """The first candidate pattern that matches every file name and groups some images by patient.

    Returns (pattern, number of patients), or (None, number of images) where no candidate fits.
    """
    for pattern in PATIENT_PATTERNS:
        compiled = re.compile(pattern)
        patients = [m.group("patient") if (m := compiled.search(n)) else None for n in names]
        if None in patients:
            continue
        counts = Counter(patients)
        if 1 < len(counts) < len(names):
            return pattern, len(counts)
    return None, len(names)


def profile_text(template: str, root: Path, name: str, patient_from: str | None) -> str:
    """The template with ``name`` and ``dataset.root`` set (and ``patient_from`` when one was found)."""
    text, count = ROOT_LINE.subn(lambda m: f"{m.group('indent')}root: {_yaml_string(str(root))}", template, count=1)
    if count != 1:
        raise ValueError(f"{TEMPLATE}: no line 'root: CHANGE_ME/my_xrays' to fill in")
    text = re.sub(r"^name: .*$", f"name: {name}", text, count=1, flags=re.MULTILINE)
    if patient_from is not None:
        text = PATIENT_LINE.sub(lambda m: f"{m.group('indent')}patient_from: {_yaml_string(patient_from)}"
                                f"  # found by osteo init: check it", text, count=1)
    return text


def _yaml_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def run(args: argparse.Namespace) -> int:
    from osteolib.data.sources import scan_class_folder

    folder = Path(args.folder).expanduser().resolve()
    if not folder.is_dir():
        print(f"osteo init: error: folder not found: {folder}", flush=True)
        return 1
    out = Path(args.out) if args.out else PROFILES_DIR / f"{_slug(folder.name)}.yaml"
    if out.exists():
        print(f"osteo init: error: {out} exists; it is not overwritten. What to do: choose another --out, or "
              f"remove the file first", flush=True)
        return 1
    scan = scan_class_folder(folder)
    if not scan.classes:
        print(f"osteo init: error: {folder} has no sub-folder holding images ({len(scan.loose)} image(s) directly "
              f"in it). What to do: put the images into one sub-folder per class (<folder>/<class>/...)", flush=True)
        return 1
    total = sum(scan.counts.values())
    print(f"{folder}: {total} images in {len(scan.classes)} classes")
    width = max(len(c) for c in scan.classes)
    for name, count in scan.counts.items():
        print(f"  {name:<{width}}  {count:>6}")
    if len(scan.classes) < 2:
        print("warning: only one class; the target task needs two or more class sub-folders")
    if scan.loose:
        print(f"warning: {len(scan.loose)} image(s) beside the class folders have no class and will be left out: "
              f"{[p.name for p in scan.loose[:10]]}")
    if scan.empty:
        print(f"warning: empty class folder(s) {scan.empty} (no images) will be left out")
    if scan.not_images:
        print(f"note: {len(scan.not_images)} file(s) are not images and will be left out, e.g. "
              f"{[p.name for p in scan.not_images[:3]]}")
    pattern, patients = guess_patient_pattern([p.name for p in scan.files])
    if pattern is None:
        print("warning: no patient ids found in the file names: each image will count as its own patient, so "
              "images of one patient can land in two splits. If the file names carry the patient (e.g. "
              "P012_left.png), set patient_from in the profile, e.g. patient_from: '^(?P<patient>[^_]+)_'")
    else:
        print(f"patient ids: {patients} patients from the file names with patient_from: '{pattern}' (written into "
              f"the profile; check it)")
    name = args.name or out.stem
    text = profile_text(TEMPLATE.read_text(), folder, name, pattern)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "x") as handle:  # "x": never overwrite, even if the file appeared meanwhile
        handle.write(text)
    print(f"wrote {out}\nnext: .venv/bin/osteo run --profile {out} --only 00   (the data audit)")
    return 0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_").lower() or "own_data"
