"""The patient flow: from the records a data set lists to the images in each partition, with every exclusion and
its reason (the flow diagram CLAIM and TRIPOD+AI ask for), as a table and as a figure drawn from that table.
"""
from __future__ import annotations

import textwrap
from typing import Mapping, Sequence

import pandas as pd

__all__ = ["flow_table", "flow_figure"]


def flow_table(manifest: pd.DataFrame, classes: Sequence[str], excluded: Mapping[str, int] | None = None,
               external: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per box of the diagram: ``box, stage, images, patients, detail``.

    ``manifest`` is the split target manifest, ``excluded`` the builder's exclusions (reason -> images; the
    manifest's ``attrs["excluded"]``), ``external`` the external test set (its ``attrs["chosen_from"]`` and
    ``attrs["fraction"]`` say what it was taken from).
    """
    excluded = {str(k): int(v) for k, v in (excluded or {}).items()}
    n, p = len(manifest), manifest["patient_id"].nunique()
    rows = [{"box": "records", "stage": "target data set", "images": n + sum(excluded.values()), "patients": None,
             "detail": "image records listed by the data set"}]
    for reason, count in excluded.items():
        rows.append({"box": "excluded", "stage": "target data set", "images": count, "patients": None,
                     "detail": reason})
    rows.append({"box": "included", "stage": "target data set", "images": n, "patients": p,
                 "detail": ", ".join(f"{c}: {int((manifest['label'] == c).sum())}" for c in classes)})
    for split in ("train", "val", "test"):
        part = manifest[manifest["split"] == split]
        rows.append({"box": split, "stage": "partition", "images": len(part), "patients": part["patient_id"].nunique(),
                     "detail": ", ".join(f"{c}: {int((part['label'] == c).sum())}" for c in classes)})
    if external is not None and len(external):
        chosen = external.attrs.get("chosen_from") or {}
        fraction = float(external.attrs.get("fraction", 1.0))
        name = external.attrs.get("dataset", "external data set")
        rows.append({"box": "external_records", "stage": "external data set", "images": chosen.get("images"),
                     "patients": chosen.get("patients"), "detail": f"{name}, after its label map"})
        rows.append({"box": "external", "stage": "external data set", "images": len(external),
                     "patients": external["patient_id"].nunique(),
                     "detail": (f"{fraction:.0%} of its patients (seed {external.attrs.get('seed', 0)}), " if fraction < 1
                                else "") + ", ".join(f"{c}: {int((external['label'] == c).sum())}" for c in classes)})
    table = pd.DataFrame(rows)
    table["patients"] = table["patients"].astype("Int64")
    table["images"] = table["images"].astype("Int64")
    return table


def _text(row: pd.Series, title: str) -> str:
    count = f"{row['images']} images" + (f" · {row['patients']} patients" if pd.notna(row["patients"]) else "")
    return f"{title}\n{count}\n" + textwrap.fill(str(row["detail"]), 34)


def flow_figure(table: pd.DataFrame):
    """The flow diagram of :func:`flow_table`'s rows: target data set down the middle, exclusions to the side,
    the three partitions below, the external test set in its own column."""
    import matplotlib.pyplot as plt

    external = table[table["stage"] == "external data set"]
    fig, ax = plt.subplots(figsize=(10.5 if len(external) else 8.0, 5.6))
    ax.set_xlim(0, 10.5 if len(external) else 8.0)
    ax.set_ylim(0, 6)
    ax.axis("off")
    box = dict(boxstyle="round,pad=0.4", facecolor="#f3f6fa", edgecolor="#4a6fa5")
    side = dict(boxstyle="round,pad=0.4", facecolor="#fbf1ee", edgecolor="#b5533c")
    arrow = dict(arrowstyle="-|>", color="#333333", linewidth=1.0)

    def at(x: float, y: float, text: str, style: dict) -> None:
        ax.text(x, y, text, ha="center", va="center", fontsize=8, bbox=style, wrap=True)

    def link(x0: float, y0: float, x1: float, y1: float) -> None:
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=arrow)

    records = table[table["box"] == "records"].iloc[0]
    included = table[table["box"] == "included"].iloc[0]
    at(3.0, 5.4, _text(records, "Records in the data set"), box)
    link(3.0, 5.0, 3.0, 3.95)
    excluded = table[table["box"] == "excluded"]
    if len(excluded):
        reasons = "\n".join(textwrap.fill(f"{r.images}: {r.detail}", 40) for r in excluded.itertuples())
        at(6.1, 4.7, f"Excluded ({int(excluded['images'].sum())} images)\n{reasons}", side)
        link(3.0, 4.7, 4.4, 4.7)
    at(3.0, 3.5, _text(included, "Included"), box)
    for x, split in zip((1.0, 3.0, 5.0), ("train", "val", "test")):
        row = table[table["box"] == split].iloc[0]
        link(3.0, 3.05, x, 1.75)
        at(x, 1.2, _text(row, {"train": "Training", "val": "Validation", "test": "Test"}[split]), box)
    if len(external):
        records = external[external["box"] == "external_records"].iloc[0]
        chosen = external[external["box"] == "external"].iloc[0]
        at(9.0, 3.5, _text(records, "External data set"), box)
        link(9.0, 3.05, 9.0, 1.75)
        at(9.0, 1.2, _text(chosen, "External test"), box)
    ax.set_title("Flow of images and patients", fontsize=10)
    fig.tight_layout()
    return fig
