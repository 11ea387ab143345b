"""Summaries over seeds and the results table: mean ± std per group, the study's table layout, Markdown and LaTeX."""
from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from osteolib.evaluation.predictions import RUN_COLUMNS, PredictionError, plain_scalar


def summarise_runs(metrics_df: pd.DataFrame, by: Sequence[str] = ("backbone", "scenario"),
                   metrics: Sequence[str] = ("accuracy", "auc")) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof=1) of each metric over the runs (seeds, folds) of each group.

    Columns: ``by``..., n_runs, then ``<metric>_mean``, ``<metric>_std``, ``<metric>_n`` (runs with a value;
    missing values are counted and warned about, never silently averaged away). Groups keep their order of
    first appearance. Refuses tables mixing splits, repeated runs, and groups mixing label fractions (or
    another identifier) that ``by`` does not separate.
    """
    by, metrics = list(by), list(metrics)
    missing = [c for c in by + metrics if c not in metrics_df.columns]
    if missing:
        raise PredictionError(f"metrics table lacks column(s) {missing}; it has {list(metrics_df.columns)}")
    if len(metrics_df) == 0:
        raise PredictionError("metrics table has no rows")
    if "split" in metrics_df.columns and metrics_df["split"].nunique(dropna=False) > 1:
        raise PredictionError(f"metrics table mixes splits {sorted(metrics_df['split'].astype(str).unique())}; "
                              f"summarise one, normally metrics_df[metrics_df['split'] == 'test']")
    identifiers = [c for c in RUN_COLUMNS if c in metrics_df.columns]
    repeated = metrics_df.duplicated(subset=list(dict.fromkeys(by + identifiers)), keep=False)
    # Without a seed or fold column runs cannot be told apart, so repetition can only be checked with one.
    if {"seed", "fold"} & set(identifiers) and repeated.any():
        raise PredictionError(f"{int(repeated.sum())} rows repeat a run ({identifiers}); each run must be counted once, "
                              f"e.g. rows {metrics_df.index[repeated].tolist()[:10]}")
    must_be_constant = [c for c in ("scenario", "backbone", "label_fraction") if c in metrics_df.columns and c not in by]
    rows: list[dict[str, Any]] = []
    for key, group in metrics_df.groupby(by, dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for column in must_be_constant:
            if group[column].nunique(dropna=False) > 1:
                raise PredictionError(f"group {dict(zip(by, key))} mixes {column} values "
                                      f"{sorted(group[column].astype(str).unique())}; add {column!r} to by")
        row: dict[str, Any] = {**{b: plain_scalar(k) for b, k in zip(by, key)}, "n_runs": len(group)}
        for metric in metrics:
            values = pd.to_numeric(group[metric], errors="coerce").to_numpy(dtype=np.float64)
            present = values[~np.isnan(values)]
            if len(present) < len(values):
                warnings.warn(f"{dict(zip(by, key))}: {len(values) - len(present)} of {len(values)} run(s) have no "
                              f"{metric!r} value; its mean and std use the other {len(present)}", stacklevel=2)
            row[f"{metric}_mean"] = float(present.mean()) if len(present) else math.nan
            row[f"{metric}_std"] = float(present.std(ddof=1)) if len(present) > 1 else math.nan
            row[f"{metric}_n"] = int(len(present))
        rows.append(row)
    return pd.DataFrame(rows)


def format_mean_std(mean: float, std: float, n: int | None = None, digits: int = 3) -> str:
    """'0.812 ± 0.014'; a single run has no spread: '0.812 (n=1)'; no value at all: 'n/a'."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}" + (f" (n={n})" if n is not None else "")
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_table(summary: pd.DataFrame, columns: Mapping[str, str] | None = None,
                  metric_names: Mapping[str, str] | None = None, digits: int = 3, show_n: bool = False) -> pd.DataFrame:
    """The study's Table 1 layout from :func:`summarise_runs`: Model, Learning method, ACC, AUC as
    "mean ± std" strings. ``columns`` renames the grouping columns, ``metric_names`` picks and renames metrics;
    ``show_n`` adds the number of runs."""
    columns = dict(columns or {"backbone": "Model", "scenario": "Learning method"})
    metric_names = dict(metric_names or {"accuracy": "ACC", "auc": "AUC"})
    missing = [c for c in columns if c not in summary.columns]
    missing += [f"{m}_mean/_std" for m in metric_names if f"{m}_mean" not in summary.columns]
    if missing:
        raise PredictionError(f"summary lacks {missing}; it has {list(summary.columns)} (build it with summarise_runs)")
    table = pd.DataFrame({title: summary[column].astype(str) for column, title in columns.items()})
    for metric, title in metric_names.items():
        counts = summary.get(f"{metric}_n", pd.Series([None] * len(summary), index=summary.index))
        table[title] = [format_mean_std(m, s, n, digits) for m, s, n in
                        zip(summary[f"{metric}_mean"], summary[f"{metric}_std"], counts)]
    if show_n:
        table["Runs"] = summary["n_runs"].astype(int).astype(str)
    return table.reset_index(drop=True)


def to_markdown(table: pd.DataFrame, path: str | os.PathLike | None = None) -> str:
    """A GitHub-flavoured markdown table of ``table``'s cells as text (written to ``path`` when given).

    Hand-written because pandas' ``to_markdown`` needs the ``tabulate`` package, which the project does not use.
    """
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = [cell(c) for c in table.columns]
    body = [[cell(v) for v in row] for row in table.itertuples(index=False)]
    widths = [max(len(h), 3, *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in body]
    text = "\n".join(lines) + "\n"
    _write_text(text, path)
    return text


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_NUMERIC_CELL = re.compile(r"^\s*(n/a|[-+]?\d+(\.\d+)?(\s*±\s*\d+(\.\d+)?)?(\s*\(n=\d+\))?)\s*$")


def to_latex(table: pd.DataFrame, path: str | os.PathLike | None = None, caption: str | None = None,
             label: str | None = None) -> str:
    """A booktabs LaTeX table of ``table`` (text columns left-aligned, number columns centred, ± as $\\pm$),
    written to ``path`` when given. Needs ``\\usepackage{booktabs}`` in the document."""
    def cell(value: Any) -> str:
        text = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(value))
        return text.replace("±", r"$\pm$")

    align = "".join("c" if all(_NUMERIC_CELL.match(str(v)) for v in table[c]) and len(table) else "l"
                    for c in table.columns)
    lines = [r"\begin{table}[ht]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{cell(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines += [rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(cell(c) for c in table.columns) + r" \\",
              r"\midrule"]
    lines += [" & ".join(cell(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    text = "\n".join(lines) + "\n"
    _write_text(text, path)
    return text


def _write_text(text: str, path: str | os.PathLike | None) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
