"""Patient-level, label-stratified train/val/test splits, saved once and checked for leakage.

A patient's images always land in the same split (and so do patients who share an identical
image file, which would otherwise leak one image into two splits). Within each label stratum
the patients are shuffled with the seed and cut by the ratios with largest-remainder rounding.
The split is saved as a CSV so that every later notebook uses exactly the same one, and
:func:`check_no_leakage` fails loudly on any patient or identical image in two splits.
:func:`near_duplicates` lists perceptually similar images (phash) for the audit. Copies of one radiograph
(found by :mod:`osteolib.data.duplicates`) follow a policy: :func:`group_copies` before the split joins
them into one patient group, :func:`check_copies` after it stops on (or reports) copies in two splits.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from osteolib.data.manifest import SPLITS

DEFAULT_RATIOS = (0.77, 0.11, 0.12)


class SplitError(ValueError):
    """The split cannot be made or applied as asked; the message says why and what to do."""


class LeakageError(ValueError):
    """A patient or an identical image appears in more than one split."""


def patient_split(df: pd.DataFrame, ratios: Sequence[float] = DEFAULT_RATIOS, seed: int = 0,
                  keep_existing: bool = True, group_identical: bool = True,
                  hashes: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Return a copy of the manifest with ``split`` filled (train/val/test by ``ratios``).

    Patients are the unit; with ``group_identical`` patients that share a byte-identical image
    file are one unit too. A unit's stratum is its most frequent label (ties: alphabetically
    first). A manifest that already has a complete split column keeps it when ``keep_existing``
    (data that brings its own split), but is still checked. ``hashes`` (path -> sha256, from
    :func:`file_hashes`) saves re-reading the files.
    """
    ratios = _check_ratios(ratios)
    existing = df["split"].astype(str).str.strip() if "split" in df.columns else pd.Series("", index=df.index)
    if keep_existing and (existing != "").any():
        if not existing.isin(SPLITS).all():
            partial = df.loc[~existing.isin(SPLITS), "image_id"].tolist()
            raise SplitError(f"the manifest's split column is filled for some rows but not for {len(partial)} "
                             f"(e.g. {partial[:5]}); fill it completely or pass keep_existing=False to re-split")
        out = df.copy()
        check_no_leakage(out, hashes if group_identical else {}, check_content=group_identical)
        return out

    if group_identical and hashes is None:
        hashes = file_hashes(df["path"])
    units = _patient_units(df, hashes if group_identical else None)
    strata = _unit_strata(df, units)
    _check_every_split_filled(strata, ratios)

    rng = np.random.default_rng(seed)
    split_of_unit: dict[int, str] = {}
    for label in sorted(strata):
        members = np.array(sorted(strata[label]))
        rng.shuffle(members)
        counts = _largest_remainder(len(members), ratios)
        start = 0
        for name, count in zip(SPLITS, counts):
            for unit in members[start:start + count]:
                split_of_unit[int(unit)] = name
            start += count
    out = df.copy()
    out["split"] = [split_of_unit[u] for u in units]
    check_no_leakage(out, hashes if group_identical else {}, check_content=group_identical)
    return out


def check_no_leakage(df: pd.DataFrame, hashes: Mapping[str, str] | None = None,
                     check_content: bool = True) -> None:
    """Raise :class:`LeakageError` naming every patient, and every identical image pair, in two splits.

    ``hashes`` maps file path to sha256 (computed with :func:`file_hashes` when None and
    ``check_content``). Every row must have a split.
    """
    unsplit = df.loc[~df["split"].astype(str).isin(SPLITS), "image_id"].tolist()
    if unsplit:
        raise SplitError(f"{len(unsplit)} row(s) have no split (e.g. {unsplit[:5]}); run patient_split first")
    problems: list[str] = []
    splits_per_patient = df.groupby("patient_id")["split"].agg(lambda s: sorted(set(s)))
    leaking = splits_per_patient[splits_per_patient.map(len) > 1]
    for patient, splits in leaking.items():
        problems.append(f"patient {patient!r} is in {splits}")
    if check_content:
        if hashes is None:
            hashes = file_hashes(df["path"])
        digest = df["path"].astype(str).map(hashes)
        for _, group in df.assign(_hash=digest).groupby("_hash"):
            if group["split"].nunique() > 1:
                rows = group.sort_values(["split", "image_id"])
                first = rows.iloc[0]
                for _, other in rows.iloc[1:].iterrows():
                    if other["split"] != first["split"]:
                        problems.append(f"identical images {first['image_id']!r} ({first['split']}) and "
                                        f"{other['image_id']!r} ({other['split']})")
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise LeakageError(f"{len(problems)} leak(s) between splits:\n  {shown}{more}")


def file_hashes(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """sha256 of each file's bytes, keyed by the path as given (as a string)."""
    from osteolib.data.cache import content_hash  # remembered per process while the file is unchanged

    hashes: dict[str, str] = {}
    for path in paths:
        key = str(path)
        if key not in hashes:
            hashes[key] = content_hash(key)
    return hashes


def perceptual_hashes(paths: Sequence[str], hash_size: int = 8) -> np.ndarray:
    """imagehash.phash of each image as packed bits: an (N, ceil(hash_size²/64)) uint64 array."""
    import imagehash
    from PIL import Image

    from osteolib.data.io import read_xray

    n_bits = hash_size * hash_size
    n_words = math.ceil(n_bits / 64)
    packed = np.zeros((len(paths), n_words * 8), dtype=np.uint8)
    for row, path in enumerate(paths):
        pixels = read_xray(path).pixels
        image = Image.fromarray(np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8))
        bits = imagehash.phash(image, hash_size=hash_size).hash.reshape(-1)
        packed[row, : math.ceil(n_bits / 8)] = np.packbits(bits)
    return packed.view(np.uint64)


def near_duplicates(df: pd.DataFrame, max_distance: int = 4, hash_size: int = 8,
                    phashes: np.ndarray | None = None) -> pd.DataFrame:
    """Pairs of images whose perceptual hashes differ in at most ``max_distance`` bits.

    Returns columns image_id_a, image_id_b, distance, split_a, split_b, label_a, label_b,
    same_patient, sorted by distance. The all-pairs Hamming distances are computed in blocks
    with numpy bit operations, so a few thousand images take well under a second after hashing.
    """
    if max_distance < 0:
        raise ValueError(f"max_distance={max_distance} must be >= 0")
    if phashes is None:
        phashes = perceptual_hashes(df["path"].astype(str).tolist(), hash_size)
    if len(phashes) != len(df):
        raise ValueError(f"phashes has {len(phashes)} rows for a manifest of {len(df)}")
    n = len(df)
    pairs_a: list[np.ndarray] = []
    pairs_b: list[np.ndarray] = []
    distances: list[np.ndarray] = []
    block = max(1, 2_000_000 // max(n, 1))  # keeps each XOR block near 16 MB per hash word
    for start in range(0, n, block):
        stop = min(n, start + block)
        xor = phashes[start:stop, None, :] ^ phashes[None, :, :]
        distance = np.bitwise_count(xor).sum(axis=2, dtype=np.int64)
        a, b = np.nonzero(distance <= max_distance)
        a = a + start
        keep = b > a  # each unordered pair once, never an image with itself
        pairs_a.append(a[keep])
        pairs_b.append(b[keep])
        distances.append(distance[a[keep] - start, b[keep]])
    a = np.concatenate(pairs_a) if pairs_a else np.zeros(0, dtype=int)
    b = np.concatenate(pairs_b) if pairs_b else np.zeros(0, dtype=int)
    d = np.concatenate(distances) if distances else np.zeros(0, dtype=int)
    table = df.reset_index(drop=True)
    split = table["split"].astype(str) if "split" in table.columns else pd.Series("", index=table.index)
    out = pd.DataFrame({
        "image_id_a": table["image_id"].to_numpy()[a],
        "image_id_b": table["image_id"].to_numpy()[b],
        "distance": d.astype(int),
        "split_a": split.to_numpy()[a],
        "split_b": split.to_numpy()[b],
        "label_a": table["label"].to_numpy()[a],
        "label_b": table["label"].to_numpy()[b],
        "same_patient": table["patient_id"].to_numpy()[a] == table["patient_id"].to_numpy()[b],
    })
    return out.sort_values(["distance", "image_id_a", "image_id_b"]).reset_index(drop=True)


def label_conflicts(df: pd.DataFrame, hashes: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Byte-identical images carrying different labels: one row per file content (sha256)."""
    if hashes is None:
        hashes = file_hashes(df["path"])
    rows = []
    for digest, group in df.assign(_hash=df["path"].astype(str).map(hashes)).groupby("_hash"):
        if group["label"].nunique() > 1:
            rows.append({"sha256": digest, "n_images": len(group),
                         "image_ids": ";".join(group["image_id"]), "labels": ";".join(group["label"]),
                         "patient_ids": ";".join(group["patient_id"])})
    return pd.DataFrame(rows, columns=["sha256", "n_images", "image_ids", "labels", "patient_ids"])


def save_split(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the split (image_id, patient_id, label, split) so later notebooks reuse it exactly."""
    unsplit = df.loc[~df["split"].astype(str).isin(SPLITS), "image_id"].tolist()
    if unsplit:
        raise SplitError(f"cannot save: {len(unsplit)} row(s) have no split (e.g. {unsplit[:5]})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df[["image_id", "patient_id", "label", "split"]].to_csv(path, index=False)
    return path


def apply_saved_split(df: pd.DataFrame, path: str | os.PathLike) -> pd.DataFrame:
    """A copy of the manifest with the split read from :func:`save_split`'s CSV.

    The saved file and the manifest must hold the same image ids with the same patients and
    labels; any difference is listed (the data changed since the split was made).
    """
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"saved split not found: {path}; make one with patient_split and save_split")
    saved = pd.read_csv(path, dtype=str, keep_default_na=False)
    absent = [c for c in ("image_id", "patient_id", "label", "split") if c not in saved.columns]
    if absent:
        raise SplitError(f"{path}: lacks column(s) {absent}; it has {list(saved.columns)}")
    saved = saved.set_index("image_id")
    only_manifest = sorted(set(df["image_id"]) - set(saved.index))
    only_saved = sorted(set(saved.index) - set(df["image_id"]))
    problems = []
    if only_manifest:
        problems.append(f"{len(only_manifest)} image id(s) of the manifest are not in the saved split: "
                        f"{only_manifest[:10]}{' ...' if len(only_manifest) > 10 else ''}")
    if only_saved:
        problems.append(f"{len(only_saved)} image id(s) of the saved split are not in the manifest: "
                        f"{only_saved[:10]}{' ...' if len(only_saved) > 10 else ''}")
    if not problems:
        for column in ("patient_id", "label"):
            now = df.set_index("image_id")[column].astype(str)
            differs = now[now != saved.loc[now.index, column]].index.tolist()
            if differs:
                problems.append(f"{len(differs)} image(s) have a different {column} than when the split was saved: "
                                f"{differs[:10]}")
        bad = sorted(set(saved["split"]) - set(SPLITS))
        if bad:
            problems.append(f"unknown split name(s) {bad} in the saved file")
    if problems:
        raise SplitError(f"{path} does not fit this manifest:\n  " + "\n  ".join(problems)
                         + "\nRebuild the split (patient_split + save_split) if the data changed on purpose.")
    out = df.copy()
    out["split"] = saved.loc[out["image_id"], "split"].to_numpy()
    try:
        check_no_leakage(out, check_content=False)
    except LeakageError as err:
        raise LeakageError(f"{path}: the saved split leaks: {err}\nRebuild the split with patient_split + "
                           "save_split (notebook 00) instead of editing it.") from err
    return out


def split_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Images and patients per split × label, with an "all" row per split and overall."""
    rows = []
    splits = [s for s in SPLITS if s in set(df["split"])] + sorted(set(df["split"]) - set(SPLITS))
    for split in splits + ["all"]:
        part = df if split == "all" else df[df["split"] == split]
        for label in sorted(df["label"].unique()) + ["all"]:
            cell = part if label == "all" else part[part["label"] == label]
            rows.append({"split": split, "label": label, "images": len(cell),
                         "patients": cell["patient_id"].nunique()})
    return pd.DataFrame(rows)


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(r) for r in ratios)
    if len(values) != 3:
        raise SplitError(f"ratios={tuple(ratios)} must give three values (train, val, test)")
    if any(not math.isfinite(r) or r < 0 for r in values):
        raise SplitError(f"ratios={values} must be non-negative numbers")
    if abs(sum(values) - 1.0) > 1e-6:
        raise SplitError(f"ratios={values} sum to {sum(values):.6g}; they must sum to 1 (e.g. {DEFAULT_RATIOS})")
    return values  # type: ignore[return-value]


def _largest_remainder(n: int, ratios: Sequence[float]) -> list[int]:
    """Integer shares of n by ratios: floors first, the leftover units to the largest remainders."""
    exact = [n * r for r in ratios]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _minimum_units(ratios: Sequence[float]) -> int:
    """The smallest count whose largest-remainder shares leave no positive-ratio split empty."""
    for n in range(1, 10_000):
        if all(c > 0 for c, r in zip(_largest_remainder(n, ratios), ratios) if r > 0):
            return n
    raise SplitError(f"ratios={tuple(ratios)} are too small to give every split a patient")


def _check_every_split_filled(strata: dict[str, list[int]], ratios: Sequence[float]) -> None:
    problems = []
    for label in sorted(strata):
        counts = _largest_remainder(len(strata[label]), ratios)
        for name, count, ratio in zip(SPLITS, counts, ratios):
            if ratio > 0 and count == 0:
                problems.append(f"class {label!r} has {len(strata[label])} patient(s): the {name} split "
                                f"(ratio {ratio}) would get none")
    if problems:
        raise SplitError("the split ratios leave a class without patients in a split:\n  " + "\n  ".join(problems)
                         + f"\nAt ratios {tuple(ratios)} a class needs at least {_minimum_units(ratios)} patients. "
                         "Add patients of that class, merge it with another class, or change the ratios "
                         "(a ratio of 0 leaves that split empty on purpose).")


def _patient_units(df: pd.DataFrame, hashes: Mapping[str, str] | None) -> list[int]:
    """A unit number per row: patients, joined where they share a byte-identical image (union-find)."""
    patients = df["patient_id"].astype(str).tolist()
    parent = {p: p for p in patients}

    def root(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    if hashes is not None:
        first_patient: dict[str, str] = {}
        for patient, path in zip(patients, df["path"].astype(str)):
            digest = hashes[path]
            if digest in first_patient:
                a, b = root(first_patient[digest]), root(patient)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first_patient[digest] = patient
    # Unit numbers follow the sorted root names, so they do not depend on the row order.
    roots = [root(p) for p in patients]
    number = {r: i for i, r in enumerate(sorted(set(roots)))}
    return [number[r] for r in roots]


def _unit_strata(df: pd.DataFrame, units: list[int]) -> dict[str, list[int]]:
    labels: dict[int, Counter] = {}
    for unit, label in zip(units, df["label"].astype(str)):
        labels.setdefault(unit, Counter())[label] += 1
    strata: dict[str, list[int]] = {}
    for unit, counter in labels.items():
        most = max(counter.values())
        label = sorted(lbl for lbl, c in counter.items() if c == most)[0]
        strata.setdefault(label, []).append(unit)
    return strata


# --------------------------------------------------------------------------------------------------
# Copies of one radiograph (pairs from osteolib.data.duplicates.find_copies): the split policy
# --------------------------------------------------------------------------------------------------

COPY_POLICIES = ("stop", "group", "ignore")


def check_copy_policy(policy: str) -> str:
    """The profile's ``near_duplicates`` value, checked before any work: one of :data:`COPY_POLICIES`."""
    if policy not in COPY_POLICIES:
        raise SplitError(f"near_duplicates={policy!r} is not a policy for copies of one radiograph: use one of "
                         f"{list(COPY_POLICIES)} (stop: end the run listing copies in two splits; group: one patient "
                         "group per radiograph before the split; ignore: only report them)")
    return policy


def group_copies(df: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """A copy of the manifest where copies of one radiograph share one patient group, so that
    :func:`patient_split` keeps them in one split. Call it BEFORE the split.

    Patients joined by a copy pair (transitively: union-find over the pairs) get the group id
    ``min(patient ids)`` in ``patient_id``; the original id is kept in ``patient_id_original``
    (a manifest grouped before keeps its first originals).
    """
    out = df.copy()
    if "patient_id_original" not in out.columns:
        out["patient_id_original"] = out["patient_id"].astype(str)
    patient_of = dict(zip(out["image_id"].astype(str), out["patient_id"].astype(str)))
    unknown = sorted({i for i in pd.concat([pairs["image_id_a"], pairs["image_id_b"]]).astype(str)} - set(patient_of))
    if unknown:
        raise SplitError(f"{len(unknown)} image id(s) of the copy pairs are not in the manifest: {unknown[:10]}; "
                         "find the copies on this manifest (find_copies(manifest, ...)) and group it")
    parent = {p: p for p in patient_of.values()}

    def root(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for a, b in zip(pairs["image_id_a"].astype(str), pairs["image_id_b"].astype(str)):
        ra, rb = root(patient_of[a]), root(patient_of[b])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the smallest id names the group: independent of pair order
    out["patient_id"] = [root(p) for p in out["patient_id"].astype(str)]
    return out


def copies_across_splits(df: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """The copy pairs whose two images sit in different splits, with file names and splits."""
    split_of = dict(zip(df["image_id"].astype(str), df["split"].astype(str)))
    path_of = dict(zip(df["image_id"].astype(str), df["path"].astype(str))) if "path" in df.columns else {}
    rows = []
    for pair in pairs.itertuples(index=False):
        a, b = str(pair.image_id_a), str(pair.image_id_b)
        if split_of.get(a) != split_of.get(b):
            rows.append({"image_id_a": a, "image_id_b": b, "split_a": split_of.get(a, "?"),
                         "split_b": split_of.get(b, "?"), "file_a": Path(path_of.get(a, a)).name,
                         "file_b": Path(path_of.get(b, b)).name, "matches": getattr(pair, "matches", None)})
    return pd.DataFrame(rows, columns=["image_id_a", "image_id_b", "split_a", "split_b", "file_a", "file_b", "matches"])


def check_copies(df: pd.DataFrame, pairs: pd.DataFrame, policy: str = "stop") -> pd.DataFrame:
    """Apply the copy policy AFTER the split; returns the copy pairs that cross splits.

    ``stop`` (default) raises :class:`LeakageError` naming every crossing pair (files and splits);
    ``group`` expects :func:`group_copies` to have run before the split, so a crossing pair is an
    error too (e.g. the data brought its own split); ``ignore`` only reports.
    """
    check_copy_policy(policy)
    crossing = copies_across_splits(df, pairs)
    if policy == "ignore" or crossing.empty:
        return crossing
    lines = [f"{r.file_a} ({r.split_a}) and {r.file_b} ({r.split_b})"
             + (f", {int(r.matches)} matching keypoints" if pd.notna(r.matches) else "")
             for r in crossing.itertuples(index=False)]
    shown = "\n  ".join(lines[:50]) + (f"\n  ... and {len(lines) - 50} more" if len(lines) > 50 else "")
    if policy == "group":
        remedy = ("copies were grouped before the split, yet some cross it: the data brings its own split "
                  "(which grouping cannot change) or the pairs were found on another manifest. Re-split with "
                  "patient_split(..., keep_existing=False), or set `near_duplicates: ignore` in the profile.")
    else:
        remedy = ("set `near_duplicates: group` in the profile to put copies in one patient group before the "
                  "split, or `near_duplicates: ignore` to accept them (the test score will be inflated).")
    raise LeakageError(f"{len(lines)} pair(s) of copies of one radiograph sit in different splits:\n  {shown}\n"
                       f"What to do: {remedy}")
