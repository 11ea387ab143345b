"""A row of the table before and after it is measured: :class:`Plan` says what to measure, :func:`measure_row`
measures both sides under a :class:`~bench.machine.LoadWatch` and gives the row as the JSON keeps it.

Every row is an osteolib figure beside a reference figure from the same process, same threads, batch size and
architecture; ``ratio = osteolib / reference`` (both in images/s, larger is better). A side that fails leaves the
row with its error text and no ratio; the suite goes on with the next row.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bench.machine import LoadWatch
from bench.profiling import profile_side
from bench.timing import Measurement, with_peak_memory


@dataclass
class Plan:
    family: str
    name: str
    unit: str
    osteolib: Callable[[], Measurement]
    reference: Callable[[], Measurement]
    settings: dict[str, Any] = field(default_factory=dict)
    goal: float | None = None
    goal_note: str = ""  # what the goal means where it is not "osteolib / reference >= goal"


def _side(measure: Callable[[], Measurement], threads: int,
          device: torch.device) -> tuple[Measurement | None, str | None]:
    torch.set_num_threads(threads)  # both sides start alike whatever an earlier side or library did
    try:
        return with_peak_memory(measure, device), None
    except Exception as err:  # the row records it; one broken row must not lose the others' figures
        traceback.print_exc()
        return None, f"{type(err).__name__}: {err}"[:2000]


def _profiles(plan: Plan, threads: int, measured: dict[str, Any]) -> dict[str, Any]:
    """Each measured side once more under the profilers (:mod:`bench.profiling`), after the timed runs."""
    found: dict[str, Any] = {}
    for side, measure in (("osteolib", plan.osteolib), ("reference", plan.reference)):
        if measured[side] is None:
            continue
        torch.set_num_threads(threads)
        try:
            found[side] = profile_side(measure)
        except Exception as err:  # a profiler failure must not lose the row's figures
            found[side] = {"error": f"{type(err).__name__}: {err}"[:500]}
    return found


def measure_row(plan: Plan, threads: int, device: torch.device, profile: bool = False) -> dict[str, Any]:
    with LoadWatch(threads) as watch:
        ours, our_error = _side(plan.osteolib, threads, device)
        theirs, their_error = (None, "not measured: the osteolib side failed") if ours is None \
            else _side(plan.reference, threads, device)
    load = watch.record()
    ratio = ours.value / theirs.value if ours is not None and theirs is not None and theirs.value > 0 else None
    met = None if ratio is None or plan.goal is None else bool(ratio >= plan.goal)
    errors = [f"osteolib: {our_error}"] if our_error else []
    if their_error and ours is not None:
        errors.append(f"reference: {their_error}")
    profiles = _profiles(plan, threads, {"osteolib": ours, "reference": theirs}) if profile else None
    return {
        "family": plan.family, "name": plan.name, "unit": plan.unit,
        "osteolib": None if ours is None else ours.value, "reference": None if theirs is None else theirs.value,
        "ratio": ratio, "goal": plan.goal, "goal_note": plan.goal_note, "goal_met": met,
        "busy": load["busy"], "load": load, "settings": plan.settings,
        "peak_rss_mb": {"osteolib": None if ours is None else ours.peak_rss_mb,
                        "reference": None if theirs is None else theirs.peak_rss_mb},
        "rss_reset_per_side": None if ours is None else ours.rss_reset,
        "osteolib_detail": None if ours is None else dict(ours.detail),
        "reference_detail": None if theirs is None else dict(theirs.detail),
        "error": "; ".join(errors) or None,
        "profile": profiles,
    }

