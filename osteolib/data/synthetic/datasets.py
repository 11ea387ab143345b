"""Synthetic X-rays, data sets on disk: PNG files plus manifest.csv, parameters.csv and generator.json.

``write_chest_dataset`` / ``write_shoulder_dataset`` render every image from its own child seed (optionally in
worker processes: the jobs are module-level functions, so they pickle); ``ensure_synthetic`` is the idempotent
entry point that generates a data set only when no complete copy exists.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import multiprocessing
import os
import secrets
import shutil
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from osteolib.data.manifest import SPLITS, normalise_manifest, read_manifest, write_manifest
from osteolib.data.synthetic.chest import render_chest
from osteolib.data.synthetic.marker import marker_probability
from osteolib.data.synthetic.settings import (
    CHEST_SOURCE,
    DEFAULT_CLASSES,
    DEFAULT_RATIOS,
    GENERATOR_VERSION,
    SHOULDER_SOURCE,
    UNLABELLED,
    ChestSettings,
    ShoulderSettings,
    as_int,
)
from osteolib.data.synthetic.shoulder import (class_means, draw_clinical_covariates, draw_shoulder_patient,
                                              shoulder_radiograph)
from osteolib.paths import synthetic_dir
from osteolib.utils import write_json

CLINICAL_STREAM = 7919  # the child-seed key of a patient's clinical covariates (apart from its images' streams)


def child_rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _balanced_label(seed: int, k: int, classes: tuple[str, ...]) -> str:
    """Label of patient k: each block of len(classes) patients holds every class once, shuffled."""
    block, position = divmod(k, len(classes))
    order = child_rng(seed, 1_000_000_000, block).permutation(len(classes))  # a key no patient uses
    return classes[int(order[position])]


def _allocate(n: int, ratios: tuple[float, float, float]) -> list[int]:
    """Split n items into counts following ratios (largest remainder), every used split non-empty if possible."""
    exact = np.asarray(ratios) * n
    counts = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[index] += 1
    wanted = [i for i, r in enumerate(ratios) if r > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] += 1
    return counts.tolist()


def _assign_splits(seed: int, labels: list[str], ratios: tuple[float, float, float]) -> list[str]:
    """Patient-level split stratified by label, deterministic from the seed."""
    splits = [""] * len(labels)
    rng = child_rng(seed, 2_000_000_000)
    for label in sorted(set(labels)):
        members = [k for k, lab in enumerate(labels) if lab == label]
        members = [members[i] for i in rng.permutation(len(members))]
        start = 0
        for name, count in zip(SPLITS, _allocate(len(members), ratios)):
            for k in members[start:start + count]:
                splits[k] = name
            start += count
    return splits


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, compress_level=6)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _counts(df: pd.DataFrame, by: list[str]) -> dict[str, int]:
    return {"/".join(str(k) for k in (key if isinstance(key, tuple) else (key,))): int(n)
            for key, n in df.groupby(by, sort=True).size().items()}


def _resolve_workers(workers: int | None, n_items: int) -> int:
    """How many processes to use: None = every core (at most 8) when the job is big enough to pay off."""
    if workers is None:
        return min(os.cpu_count() or 1, 8) if n_items >= 48 else 1
    return as_int("workers", workers, 1)


def _run_all(function: Any, jobs: list[tuple], workers: int) -> list:
    """``[function(*job) for job in jobs]``, in order, optionally spread over processes.

    Results are identical whatever ``workers`` is: every job draws from its own seed. Linux forks
    (fast, nothing re-imported); elsewhere processes are spawned, which needs the calling script to
    guard its entry point with ``if __name__ == "__main__":`` as usual for multiprocessing.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [function(*job) for job in jobs]
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        return list(pool.map(function, *zip(*jobs), chunksize=max(1, len(jobs) // (8 * workers))))


def _chest_job(out_dir: str, seed: int, k: int, size: int, split: str) -> tuple[dict, dict]:
    """Render and save chest image k; return its manifest row and its parameter row."""
    image, p = render_chest(child_rng(seed, k), size)
    image_id = f"chest-{k:05d}"
    path = Path(out_dir) / "images" / f"{image_id}.png"
    _save_png(_to_uint8(image), path)
    row = {"image_id": image_id, "path": str(path.resolve()), "label": UNLABELLED, "patient_id": f"chest-p{k:05d}",
           "view": p.view, "source": CHEST_SOURCE, "split": split, "width": size, "height": size, "boxes": None,
           "mask_path": None}
    parameters = {"image_id": image_id, "view": p.view, "thorax_half_width": p.thorax_half_width,
                  "lung_height": p.lung_height, "heart_half_width": p.heart_half_width, "marker": p.marker,
                  "gastric_bubble": p.gastric_bubble}
    parameters.update({f"pose_{name}": value for name, value in asdict(p.pose).items()})
    parameters.update({f"exposure_{name}": value for name, value in asdict(p.exposure).items()})
    return row, parameters


def _shoulder_job(out_dir: str, settings: ShoulderSettings, k: int, label: str, split: str) -> list[tuple[dict, dict]]:
    """Render and save the images of shoulder patient k; return (manifest row, parameter row) per image."""
    rng = child_rng(settings.seed, k)
    patient = draw_shoulder_patient(rng, label, settings.difficulty, settings.classes)
    views = ["AP", "Y"] if rng.random() < 0.5 else ["AP"]
    marker = patient.marker_draw < marker_probability(split, label, settings.classes, settings.confounder)
    clinical = {} if settings.clinical_signal is None else draw_clinical_covariates(
        child_rng(settings.seed, k, CLINICAL_STREAM), label, settings.clinical_signal, settings.classes)
    out = []
    for j, view in enumerate(views):
        sample = shoulder_radiograph(child_rng(settings.seed, k, j), settings.size, view=view, marker=marker,
                                     patient=patient)
        site = f"{settings.site}-" if settings.site else ""
        image_id = f"shoulder-{site}{k:05d}-{view.lower()}"
        image_path = Path(out_dir) / "images" / f"{image_id}.png"
        mask_path = Path(out_dir) / "masks" / f"{image_id}.png"
        _save_png(_to_uint8(sample.image), image_path)
        _save_png(sample.mask * np.uint8(255), mask_path)
        row = {"image_id": image_id, "path": str(image_path.resolve()), "label": label,
               "patient_id": f"shoulder-{site}p{k:05d}", "view": view,
               "source": f"{SHOULDER_SOURCE}-{settings.site}" if settings.site else SHOULDER_SOURCE, "split": split,
               "width": settings.size, "height": settings.size, "boxes": [sample.box],
               "mask_path": str(mask_path.resolve()), "side": patient.side, "marker": sample.marker, **clinical}
        out.append((row, {"image_id": image_id, "patient_id": row["patient_id"], "split": split,
                          **sample.parameters()}))
    return out


def write_chest_dataset(out_dir: str | os.PathLike, n_images: int = 600, seed: int = 0, size: int = 256,
                        ratios: Sequence[float] = DEFAULT_RATIOS, workers: int | None = None) -> Path:
    """Write chest-like radiographs (one patient each) as PNGs plus manifest.csv; return the manifest path.

    Also writes ``parameters.csv`` (per-image generating parameters) and ``generator.json``.
    ``workers`` (processes; None = all cores for big jobs) never changes the result.
    """
    settings = ChestSettings(n_images=n_images, seed=seed, size=size, ratios=tuple(ratios))
    workers = _resolve_workers(workers, settings.n_images)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    splits = _assign_splits(settings.seed, [UNLABELLED] * settings.n_images, settings.ratios)
    jobs = [(str(out_dir), settings.seed, k, settings.size, splits[k]) for k in range(settings.n_images)]
    results = _run_all(_chest_job, jobs, workers)
    table = normalise_manifest(pd.DataFrame([row for row, _ in results]))
    manifest_path = write_manifest(table, out_dir / "manifest.csv")
    pd.DataFrame([parameters for _, parameters in results]).to_csv(out_dir / "parameters.csv", index=False)
    write_json(out_dir / "generator.json", {
        "generator": "osteolib.data.synthetic", "version": GENERATOR_VERSION, "kind": "chest",
        "parameters": _settings_payload(settings), "n_images": len(table),
        "images_per_split": _counts(table, ["split"]), "views": _counts(table, ["view"]),
        "files": {"manifest": "manifest.csv", "parameters": "parameters.csv", "images": "images/"},
        "complete": True,
    })
    return manifest_path


def write_shoulder_dataset(out_dir: str | os.PathLike, n_patients: int = 270, seed: int = 0, size: int = 256,
                           difficulty: float = 0.5, confounder: float = 0.0,
                           classes: Sequence[str] = DEFAULT_CLASSES,
                           ratios: Sequence[float] = DEFAULT_RATIOS, site: str = "", clinical_signal: float | None = None,
                           workers: int | None = None) -> Path:
    """Write shoulder-like radiographs (1-2 views per patient) with evidence masks; return manifest.csv's path.

    Writes ``images/<image_id>.png``, ``masks/<image_id>.png`` (0/255), ``manifest.csv`` (split
    column filled, boxes and mask_path set, extra columns ``side`` and ``marker``), ``parameters.csv``
    (per-image generating parameters) and ``generator.json`` (settings and counts). With ``clinical_signal`` the
    manifest gains each patient's ``age``, ``sex``, ``bmi`` and ``t_score`` (:func:`draw_clinical_covariates`).
    ``workers`` (processes; None = all cores for big jobs) never changes the result.
    """
    settings = ShoulderSettings(n_patients=n_patients, seed=seed, size=size, difficulty=difficulty,
                                confounder=confounder, classes=tuple(classes), ratios=tuple(ratios), site=site,
                                clinical_signal=clinical_signal)
    workers = _resolve_workers(workers, settings.n_patients)
    out_dir = Path(out_dir)
    for folder in ("images", "masks"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    labels = [_balanced_label(settings.seed, k, settings.classes) for k in range(settings.n_patients)]
    splits = _assign_splits(settings.seed, labels, settings.ratios)
    jobs = [(str(out_dir), settings, k, labels[k], splits[k]) for k in range(settings.n_patients)]
    results = [item for patient in _run_all(_shoulder_job, jobs, workers) for item in patient]
    table = normalise_manifest(pd.DataFrame([row for row, _ in results]))
    manifest_path = write_manifest(table, out_dir / "manifest.csv")
    pd.DataFrame([parameters for _, parameters in results]).to_csv(out_dir / "parameters.csv", index=False)
    patients = table.drop_duplicates("patient_id")
    marked = table[table["marker"].astype(bool)]
    write_json(out_dir / "generator.json", {
        "generator": "osteolib.data.synthetic", "version": GENERATOR_VERSION, "kind": "shoulder",
        "parameters": _settings_payload(settings),
        "class_means_bone_quality": class_means(settings.classes, settings.difficulty),
        "n_images": len(table), "n_patients": len(patients),
        "patients_per_split_and_label": _counts(patients, ["split", "label"]),
        "images_per_split_and_label": _counts(table, ["split", "label"]),
        "images_with_marker_per_split_and_label": _counts(marked, ["split", "label"]) if len(marked) else {},
        "views": _counts(table, ["view"]),
        "files": {"manifest": "manifest.csv", "parameters": "parameters.csv", "images": "images/", "masks": "masks/"},
        "complete": True,
    })
    return manifest_path


# --------------------------------------------------------------------------------------------------
# The idempotent entry point
# --------------------------------------------------------------------------------------------------

_KINDS = {"chest": (ChestSettings, write_chest_dataset), "shoulder": (ShoulderSettings, write_shoulder_dataset)}


def _settings_payload(settings: ChestSettings | ShoulderSettings) -> dict[str, Any]:
    payload = asdict(settings)
    if payload.get("site") == "":
        del payload["site"]  # the default site keeps the folder names (hashes) data sets had before sites existed
    if payload.get("clinical_signal", 0) is None:
        del payload["clinical_signal"]  # likewise for data sets without clinical columns
    return {k: list(v) if isinstance(v, tuple) else v for k, v in payload.items()}


def settings_for(kind: str, **params: Any) -> ChestSettings | ShoulderSettings:
    """Validated settings of a kind; unknown kinds or parameter names raise ValueError naming them."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}; got {kind!r}")
    settings_type = _KINDS[kind][0]
    known = set(inspect.signature(settings_type).parameters)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for kind {kind!r}; known: {sorted(known)}")
    return settings_type(**params)


def dataset_folder_name(kind: str, **params: Any) -> str:
    """``<kind>-<hash>``: the hash covers the generator version and every (defaulted) parameter."""
    settings = settings_for(kind, **params)
    key = json.dumps({"kind": kind, "version": GENERATOR_VERSION, "parameters": _settings_payload(settings)},
                     sort_keys=True)
    return f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _is_complete(folder: Path) -> bool:
    info = folder / "generator.json"
    if not (info.is_file() and (folder / "manifest.csv").is_file()):
        return False
    try:
        if not json.loads(info.read_text()).get("complete"):
            return False
        read_manifest(folder / "manifest.csv", check_files=True)
    except (ValueError, OSError):
        return False
    return True


def ensure_synthetic(kind: str, root: str | os.PathLike | None = None, workers: int | None = None,
                     **params: Any) -> Path:
    """Return the manifest of a synthetic data set, generating it only when no complete copy exists.

    ``kind`` is "chest" or "shoulder"; ``params`` are those of :func:`write_chest_dataset` /
    :func:`write_shoulder_dataset`. The folder is ``<root>/<kind>-<hash of all parameters>`` (root
    defaults to ``osteolib.paths.synthetic_dir()``). Generation happens in a temporary sibling folder
    renamed into place at the end, so an interrupted run never leaves a data set that is later
    trusted. Parameters are validated before anything is written; ``workers`` only sets the speed.
    """
    settings = settings_for(kind, **params)
    if workers is not None:
        as_int("workers", workers, 1)
    root = Path(root) if root is not None else synthetic_dir()
    folder = root / dataset_folder_name(kind, **params)
    if _is_complete(folder):
        return folder / "manifest.csv"
    root.mkdir(parents=True, exist_ok=True)
    if folder.exists():
        warnings.warn(f"{folder} is incomplete or damaged (files missing or generator.json absent); regenerating it",
                      stacklevel=2)
        stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        folder.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    temporary = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _KINDS[kind][1](temporary, workers=workers, **_settings_payload(settings))
        try:
            temporary.rename(folder)
        except OSError:
            # Another process finished the same data set first; theirs is identical, keep it.
            if not _is_complete(folder):
                raise
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return folder / "manifest.csv"
