"""Who is in each partition: the table of the partitions' characteristics a reviewer reads first (CLAIM's and
TRIPOD+AI's "participants" items).

One column per partition (train, val, test and the external test set when there is one), one row per
characteristic: images, patients, images per class, age (mean ± sd, median [IQR], missing), sex, view and source
-- each where the manifest has it. Counts come with their share of the partition's images.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

__all__ = ["PARTITIONS", "partition_table"]

PARTITIONS = ("train", "val", "test", "external")
CATEGORIES = ("sex", "view", "source")


def _count(n: int, total: int) -> str:
    return f"{n} ({100 * n / total:.0f} %)" if total else "0"


def _age(values: pd.Series) -> list[tuple[str, str]]:
    ages = pd.to_numeric(values, errors="coerce")
    known = ages.dropna()
    if known.empty:
        return [("age, years: mean ± sd", "-"), ("age, years: median [IQR]", "-"),
                ("age missing", _count(int(ages.isna().sum()), len(ages)))]
    q1, median, q3 = known.quantile([0.25, 0.5, 0.75])
    return [("age, years: mean ± sd", f"{known.mean():.1f} ± {known.std(ddof=1) if len(known) > 1 else 0:.1f}"),
            ("age, years: median [IQR]", f"{median:.0f} [{q1:.0f}-{q3:.0f}]"),
            ("age missing", _count(int(ages.isna().sum()), len(ages)))]


def partition_table(manifest: pd.DataFrame, classes: Sequence[str], external: pd.DataFrame | None = None) -> pd.DataFrame:
    """Characteristics (rows) by partition (columns), as display strings; a ``characteristic`` column first.

    ``manifest`` is the split target manifest; ``external`` the external test set's (notebook 00).
    """
    parts = {s: manifest[manifest["split"] == s] for s in PARTITIONS[:3] if (manifest["split"] == s).any()}
    if external is not None and len(external):
        parts["external"] = external
    frames = list(parts.values())
    has = lambda column: any(column in f.columns and f[column].notna().any() for f in frames)  # noqa: E731
    rows: dict[str, dict[str, str]] = {}

    def put(name: str, values: dict[str, str]) -> None:
        rows.setdefault(name, {}).update(values)

    for part, frame in parts.items():
        total = len(frame)
        put("images", {part: str(total)})
        put("patients", {part: str(frame["patient_id"].nunique())})
        for name in classes:
            put(f"class: {name}", {part: _count(int((frame["label"] == name).sum()), total)})
        if has("age"):
            for name, value in _age(frame["age"] if "age" in frame.columns else pd.Series([None] * total)):
                put(name, {part: value})
        for column in CATEGORIES:
            if not has(column):
                continue
            values = frame[column].fillna("unknown").astype(str) if column in frame.columns \
                else pd.Series(["unknown"] * total)
            for level, n in values.value_counts().sort_index().items():
                put(f"{column}: {level}", {part: _count(int(n), total)})
    # rows of one characteristic together (a level only the external set has would otherwise come last)
    prefixes = list(dict.fromkeys(name.split(":")[0] for name in rows))
    ordered = sorted(rows, key=lambda name: prefixes.index(name.split(":")[0]))
    table = pd.DataFrame.from_dict({k: rows[k] for k in ordered}, orient="index").reindex(columns=list(parts)).fillna("0")
    return table.rename_axis("characteristic").reset_index()
