"""``--profile``: where each side's time goes, for the rows whose goal is missed.

Each side runs once more under ``torch.profiler`` (the operators: their own CPU time, without their children) and
``cProfile`` (the Python functions: their own time), after its timed measurement, so the profilers' overhead never
touches the figure in the table. The shares are of the profiled run's total; a row's profile names the few
operators and functions that take most of it on each side, which is what a missed goal is explained from.
Work done in worker processes (the cache build's decoding pool) is not seen by either profiler: that side shows
its waiting.
"""
from __future__ import annotations

import cProfile
import pstats
import time
from typing import Any, Callable

TOP = 8


def _operators(prof: Any) -> list[dict[str, Any]]:
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"name": e.key, "calls": int(e.count), "self_seconds": round(e.self_cpu_time_total / 1e6, 3),
             "share": round(e.self_cpu_time_total / total, 3)} for e in events[:TOP]]


def _functions(stats: pstats.Stats, wall: float) -> list[dict[str, Any]]:
    rows = []
    for (file, line, function), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"name": f"{function} ({file.rsplit('/', 2)[-1] if '/' in file else file}:{line})",
                     "calls": int(calls), "self_seconds": round(own, 3), "share": round(own / wall, 3) if wall else None})
    rows.sort(key=lambda r: r["self_seconds"], reverse=True)
    return rows[:TOP]


def profile_side(measure: Callable[[], Any]) -> dict[str, Any]:
    """Run ``measure`` once under torch.profiler and cProfile; the top operators and Python functions by own time."""
    from torch.profiler import ProfilerActivity, profile

    measure = getattr(measure, "side", measure)  # a side shared between rows (timing.once): profile its work
    python = cProfile.Profile()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        python.enable()
        try:
            measure()
        finally:
            python.disable()
    wall = time.perf_counter() - started
    return {"wall_seconds": round(wall, 2), "operators": _operators(prof),
            "python": _functions(pstats.Stats(python), wall)}


def profile_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The "where the time goes" section of the results table: each profiled row's top entries per side."""
    lines: list[str] = []
    for row in rows:
        profiled = row.get("profile") or {}
        if not profiled:
            continue
        lines += ["", f"### {row['family']}: {row['name']}", ""]
        for side in ("osteolib", "reference"):
            found = profiled.get(side)
            if not found:
                continue
            if "error" in found:
                lines += [f"**{side}**: the profiled run failed ({found['error']}).", ""]
                continue
            lines.append(f"**{side}** ({found['wall_seconds']} s under the profilers). Operators by own CPU time: "
                         + "; ".join(f"`{o['name']}` {o['share']:.0%}" for o in found["operators"][:6])
                         + ". Python functions by own time: "
                         + "; ".join(f"`{f['name']}` {f['self_seconds']} s" for f in found["python"][:5]) + ".")
            lines.append("")
    return (["", "## Where the time goes (--profile)"] + lines) if lines else []
