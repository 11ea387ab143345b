"""The suite's results on disk: ``<out>/<YYYYmmdd-HHMMSS>.json`` (everything) and ``.md`` (the table of ratios),
never written over an earlier pair (a suffix ``-2``, ``-3`` ... is added), and the same table for the terminal."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from osteolib.utils import to_json

from bench.profiling import profile_markdown


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _met(row: dict[str, Any]) -> str:
    if row.get("error"):
        return "error"
    if row["goal"] is None:
        return "—"
    return "met" if row["goal_met"] else "missed"


def markdown_table(record: dict[str, Any]) -> str:
    machine = record["machine"]
    lines = [f"# osteo bench {record['stem']}", ""]
    if record["quick"]:
        lines += ["**Quick run (tiny sizes, for tests): these figures mean nothing.**", ""]
    lines += [f"CPU: {machine['cpu_model']}; bf16 flags: {'yes' if machine['cpu_bf16_flags'] else 'no'} "
              f"(goals for {record['goal_tier']} CPUs); device {machine['device']}; torch {machine['torch']}; "
              f"{machine['threads']} threads of {machine['cpus_usable']} usable cores.", ""]
    busy = sum(bool(row["busy"]) for row in record["rows"])
    if busy:
        lines += [f"**{busy} of {len(record['rows'])} rows were measured on a busy machine (marked busy): "
                  "they are not clean figures.**", ""]
    lines += ["| row | osteolib | reference | unit | ratio | goal | met | busy | peak RSS MiB (osteolib / reference) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in record["rows"]:
        rss = row.get("peak_rss_mb") or {}
        goal = f"≥ {row['goal']:g}×" if row["goal"] is not None else "—"
        ratio = f"{row['ratio']:.2f}×" if row["ratio"] is not None else "—"
        lines.append(f"| {row['family']}: {row['name']} | {_number(row['osteolib'])} | {_number(row['reference'])} "
                     f"| {row['unit']} | {ratio} | {goal} | {_met(row)} | {'busy' if row['busy'] else ''} "
                     f"| {_number(rss.get('osteolib'))} / {_number(rss.get('reference'))} |")
    notes = [f"- {row['family']}: {row['name']}: {row['goal_note']}" for row in record["rows"] if row.get("goal_note")]
    notes += [f"- {row['family']}: {row['name']}: torch.compile's first step took "
              f"{row['osteolib_detail']['first_step_seconds']:.1f} s (compilation; not in the steady figure)"
              for row in record["rows"] if (row.get("osteolib_detail") or {}).get("torch_compile")]
    errors = [f"- {row['family']}: {row['name']}: {row['error']}" for row in record["rows"] if row.get("error")]
    if notes:
        lines += ["", "Notes:", *notes]
    if errors:
        lines += ["", "Errors:", *errors]
    lines += profile_markdown(record["rows"])
    return "\n".join(lines) + "\n"


def write_results(record: dict[str, Any], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write the JSON and the table; the stem gets a suffix when either file of that name exists."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        name = stem if attempt == 1 else f"{stem}-{attempt}"
        json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
        if md_path.exists():
            continue
        try:
            handle = open(json_path, "x")  # exclusive: two suites started in the same second cannot collide
        except FileExistsError:
            continue
        record["stem"] = name
        with handle:
            json.dump(to_json(record), handle, indent=2)
            handle.write("\n")
        md_path.write_text(markdown_table(record))
        return json_path, md_path
    raise FileExistsError(f"{out_dir}: 999 result files named {stem}*; choose another --out")
