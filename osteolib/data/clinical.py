"""A patient table beside the X-rays: read it, join it to the manifest by patient, and describe its columns.

A lab's clinical table (age, sex, BMI, menopause, fracture history ...) has one row per patient; the join is by
patient id, so every image of a patient gets the same covariates. Nothing is dropped silently: patients of the
manifest without a row and rows without any image are counted (and named) in :class:`ClinicalJoin`, which the audit
shows. :func:`describe_covariates` says what each column is (numeric, binary, categorical) and how much of it is
missing, per split.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

__all__ = ["ClinicalError", "ClinicalJoin", "read_clinical_table", "join_clinical", "covariate_kind",
           "describe_covariates", "clinical_columns_of"]


class ClinicalError(ValueError):
    """The clinical table cannot be used as given; the message names the file, column or rows."""


@dataclass
class ClinicalJoin:
    """The manifest with its patients' covariates, and what did not match."""

    manifest: pd.DataFrame
    columns: list[str]
    patients_without_row: list[str] = field(default_factory=list)
    rows_without_images: list[str] = field(default_factory=list)


def read_clinical_table(path: str | os.PathLike, id_column: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The table (CSV, or Excel .xlsx/.xls), one row per patient, indexed by ``id_column`` as text; ``columns``
    keeps those (default: every column but the id)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ClinicalError(f"clinical table {path}: no such file; give the path of the patient table (CSV or Excel)")
    table = pd.read_excel(path) if path.suffix.lower() in (".xlsx", ".xls") else pd.read_csv(path)
    if id_column not in table.columns:
        raise ClinicalError(f"clinical table {path}: no column {id_column!r} (its columns: {list(table.columns)}); "
                            f"set clinical.id_column to the column holding the patient id")
    ids = table[id_column].astype(str).str.strip()
    empty = table.index[(ids == "") | table[id_column].isna()]
    if len(empty):
        raise ClinicalError(f"clinical table {path}: rows {[int(i) + 2 for i in empty[:5]]} (file lines) have no "
                            f"{id_column}; every row needs its patient's id")
    repeated = ids[ids.duplicated(keep=False)]
    if len(repeated):
        raise ClinicalError(f"clinical table {path}: patient(s) {sorted(set(repeated))[:5]} have several rows (file "
                            f"lines {[int(i) + 2 for i in repeated.index[:6]]}); keep one row per patient")
    wanted = [c for c in table.columns if c != id_column] if columns is None else list(columns)
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise ClinicalError(f"clinical table {path}: no column(s) {missing} (its columns: {list(table.columns)})")
    if not wanted:
        raise ClinicalError(f"clinical table {path}: no covariate besides the id column {id_column!r}")
    return table[wanted].set_index(ids.rename("patient_id"))


def join_clinical(manifest: pd.DataFrame, table: pd.DataFrame) -> ClinicalJoin:
    """The manifest with ``table``'s columns joined by ``patient_id`` (a manifest column of the same name is an
    error: the covariate would be ambiguous). Patients without a row keep missing values and are listed."""
    clash = [c for c in table.columns if c in manifest.columns]
    if clash:
        raise ClinicalError(f"the clinical table's column(s) {clash} are manifest columns already; rename them in "
                            f"the table or leave them out of clinical.columns")
    patients = manifest["patient_id"].astype(str)
    joined = manifest.assign(**{c: patients.map(table[c]).to_numpy() for c in table.columns})
    known = set(table.index)
    without_row = sorted(set(patients) - known)
    without_images = sorted(known - set(patients))
    return ClinicalJoin(joined, list(table.columns), without_row, without_images)


def covariate_kind(values: pd.Series) -> str:
    """``binary`` (two distinct values), ``numeric`` or ``categorical``, from the values present."""
    present = values.dropna()
    if present.nunique() <= 2:
        return "binary"
    numeric = pd.to_numeric(present, errors="coerce")
    return "numeric" if numeric.notna().all() else "categorical"


def describe_covariates(manifest: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """One row per covariate: its kind, the missing share overall and per split, and a summary of its values
    (median [IQR] for numeric, level counts otherwise), patient-level (one row per patient)."""
    patients = manifest.drop_duplicates("patient_id")
    rows = []
    for column in columns:
        values = patients[column]
        kind = covariate_kind(values)
        if kind == "numeric":
            numbers = pd.to_numeric(values, errors="coerce")
            summary = f"{numbers.median():.3g} [{numbers.quantile(0.25):.3g}, {numbers.quantile(0.75):.3g}]"
        else:
            summary = ", ".join(f"{k}: {v}" for k, v in values.astype("string").value_counts().items())
        row = {"covariate": column, "kind": kind, "patients": len(values), "missing": float(values.isna().mean()),
               "summary": summary}
        if "split" in patients.columns:
            splits = patients["split"].astype(str)
            for split in [s for s in ("train", "val", "test") if (splits == s).any()]:
                row[f"missing_{split}"] = float(values[splits == split].isna().mean())
        rows.append(row)
    return pd.DataFrame(rows)


def clinical_columns_of(manifest: pd.DataFrame, requested: Sequence[str] | None = None) -> list[str]:
    """The clinical covariates of a manifest: ``requested`` (notebook 00's ``clinical_columns``; each must be a
    column), else the columns a spec's clinical table brought, else none."""
    if requested is not None:
        missing = [c for c in requested if c not in manifest.columns]
        if missing:
            raise ClinicalError(f"clinical_columns names {missing}, which the manifest does not have (its columns: "
                                f"{list(manifest.columns)}); join a clinical table in the data-set spec or fix the names")
        return list(requested)
    return list((manifest.attrs.get("clinical_join") or {}).get("covariates", []))
