"""Runs the chosen row families in one process and writes the results (:mod:`bench.report`).

Every row measures its osteolib side and its reference side in this process, one after the other, under the same
``torch.set_num_threads``; the device is the GPU when there is one, else the CPU. A row that fails keeps its error
text and the suite goes on; the exit status is 1 when any row failed. Ctrl-C stops the suite, and the rows measured
so far are still written (the record then says ``interrupted``).
"""
from __future__ import annotations

import datetime as dt
import importlib
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any, Iterator

import torch

from bench.context import Context
from bench.goals import cpu_tier
from bench.machine import machine_info, pick_device
from bench.plan import measure_row
from bench.report import markdown_table, write_results
from bench.settings import Settings


def _error_row(family: str, err: BaseException) -> dict[str, Any]:
    return {"family": family, "name": "(setting up the family)", "unit": "", "osteolib": None, "reference": None,
            "ratio": None, "goal": None, "goal_note": "", "goal_met": None, "busy": False, "load": None,
            "settings": {}, "peak_rss_mb": None, "error": f"{type(err).__name__}: {err}"[:2000]}


def family_rows(family: str, ctx: Context) -> Iterator[dict[str, Any]]:
    try:
        plans = importlib.import_module(f"bench.families.{family}").plans(ctx)
    except Exception as err:
        traceback.print_exc()
        yield _error_row(family, err)
        return
    for plan in plans:
        print(f"bench: [{family}] {plan.name} ...", flush=True)
        yield measure_row(plan, ctx.threads, ctx.device, profile=ctx.settings.profile)


def _summary(row: dict[str, Any]) -> str:
    if row["error"]:
        return f"bench: [{row['family']}] {row['name']}: error: {row['error'][:300]}"
    ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
    return (f"bench: [{row['family']}] {row['name']}: osteolib {row['osteolib']:.3g}, reference "
            f"{row['reference']:.3g} {row['unit']}, ratio {ratio}{' (busy)' if row['busy'] else ''}")


def run(settings: Settings) -> int:
    torch.set_num_threads(settings.threads)
    device = pick_device()
    started = dt.datetime.now()
    record: dict[str, Any] = {
        "benchmark": "osteo bench", "quick": settings.quick,
        "note": "quick run: tiny sizes for tests, the figures mean nothing" if settings.quick else "",
        "started": started.isoformat(timespec="seconds"), "argv": list(settings.argv),
        "machine": machine_info(settings.threads, device), "goal_tier": cpu_tier(),
        "settings": {"families": list(settings.families), "image_size": settings.image_size,
                     "images": settings.images, "steady_seconds": settings.steady_seconds,
                     "warmup_steps": settings.warmup_steps, "min_steps": settings.min_steps,
                     "max_steps": settings.max_steps, "torch_compile_rows": settings.use_compile,
                     "profile": settings.profile},
        "load_average_at_start": os.getloadavg(), "rows": [], "interrupted": False,
    }
    print(f"bench: {record['machine']['cpu_model']}, {settings.threads} threads, device {device}, families "
          f"{', '.join(settings.families)}{' (quick)' if settings.quick else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="osteo-bench-") as scratch:
        ctx = Context(settings, device, record["goal_tier"], Path(scratch))
        try:
            for family in settings.families:
                for row in family_rows(family, ctx):
                    record["rows"].append(row)
                    print(_summary(row), flush=True)
        except KeyboardInterrupt:
            record["interrupted"] = True
            print("bench: interrupted; writing the rows measured so far", flush=True)
    finished = dt.datetime.now()
    record["finished"] = finished.isoformat(timespec="seconds")
    record["wall_seconds"] = round((finished - started).total_seconds(), 1)
    record["load_average_at_end"] = os.getloadavg()
    json_path, md_path = write_results(record, settings.out, started.strftime("%Y%m%d-%H%M%S"))
    print()
    print(markdown_table(record))
    print(f"bench: wrote {json_path} and {md_path}", flush=True)
    if record["interrupted"]:
        return 130
    return 1 if any(row["error"] for row in record["rows"]) else 0
