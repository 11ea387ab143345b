"""How a figure is timed: :class:`StepClock` for training steps (both sides of a row use the same one),
:func:`timed` for one block of work, and :class:`Measurement`, what either gives back.

Training throughput is the steady state: the first ``warmup_steps`` steps (first oneDNN kernels, allocator
growth, a ``torch.compile``) are timed but left out, and the figure is the images of the later steps over their
time. A step's time runs from the end of the previous step (or the start of the epoch's loader) to the end of its
optimiser step, so loading and augmenting its batch is included; validation and checkpoint writes between epochs
are not. Measuring stops once at least ``min_steps`` steady steps took ``seconds`` in all, or after ``max_steps``:
the time a row takes is bounded by design, on a slow CPU and a fast GPU alike.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from bench.machine import peak_rss_mb, reset_peak_rss


@dataclass
class Measurement:
    """One side of a row: ``value`` in the row's unit (images/s), and what else was seen while measuring."""

    value: float
    detail: dict[str, Any] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    rss_reset: bool | None = None


@dataclass
class StepClock:
    warmup_steps: int
    min_steps: int
    max_steps: int
    seconds: float
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        self.intervals: list[float] = []
        self.waits: list[float] = []
        self.images: list[int] = []
        self._last = time.perf_counter()
        self._wait = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":  # queued GPU work belongs to the step that queued it
            torch.cuda.synchronize(self.device)

    def start_epoch(self) -> None:
        self._sync()
        self._last = time.perf_counter()

    def batch_ready(self) -> None:
        self._wait = time.perf_counter() - self._last

    def step_done(self, images: int) -> None:
        self._sync()
        now = time.perf_counter()
        self.intervals.append(now - self._last)
        self.waits.append(self._wait)
        self.images.append(int(images))
        self._last, self._wait = now, 0.0

    @property
    def steady_steps(self) -> int:
        return max(0, len(self.intervals) - self.warmup_steps)

    @property
    def done(self) -> bool:
        if self.steady_steps >= self.max_steps:
            return True
        steady_time = sum(self.intervals[self.warmup_steps:])
        return self.steady_steps >= self.min_steps and steady_time >= self.seconds

    def measurement(self, **detail: Any) -> Measurement:
        if self.steady_steps < 1:
            raise RuntimeError(f"only {len(self.intervals)} training steps ran, fewer than the {self.warmup_steps} "
                               f"warm-up steps plus one measured step; give more --images")
        steady = slice(self.warmup_steps, None)
        seconds = sum(self.intervals[steady])
        return Measurement(sum(self.images[steady]) / seconds, {
            **detail, "steady_steps": self.steady_steps, "steady_images": sum(self.images[steady]),
            "steady_seconds": round(seconds, 3), "warmup_steps": self.warmup_steps,
            "first_step_seconds": round(self.intervals[0], 3),
            "warmup_seconds": round(sum(self.intervals[:self.warmup_steps]), 3),
            "data_wait_fraction": round(sum(self.waits[steady]) / seconds, 4),
            "step_seconds_median": round(sorted(self.intervals[steady])[self.steady_steps // 2], 4)})


def timed(work: Callable[[], Any], images: int, device: torch.device, **detail: Any) -> Measurement:
    """Images/s of one call of ``work`` that handles ``images`` images (GPU work finished inside the time)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return Measurement(images / seconds, {**detail, "images": images, "seconds": round(seconds, 3)})


def with_peak_memory(side: Callable[[], Measurement], device: torch.device) -> Measurement:
    """Run one side of a row and note its peak resident memory (and the GPU's peak allocation on CUDA)."""
    reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    measurement = side()
    if measurement.peak_rss_mb is None:  # a measurement shared with another row keeps its own figure
        measurement.peak_rss_mb, measurement.rss_reset = peak_rss_mb(), reset
        if device.type == "cuda":
            measurement.detail["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return measurement


def once(side: Callable[[], Measurement]) -> Callable[[], Measurement]:
    """A side measured once and shared by several rows (e.g. one plain reference for two osteolib options)."""
    kept: list[Measurement] = []

    def shared() -> Measurement:
        if not kept:
            kept.append(side())
            return kept[0]
        return replace(kept[0], detail={**kept[0].detail, "measured_for_an_earlier_row": True})
    shared.side = side  # type: ignore[attr-defined]  # the work itself, for --profile to run again
    return shared
