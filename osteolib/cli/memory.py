"""Peak resident memory of what an execution starts: its notebook kernel (and, with ``--jobs``, the child that runs it).

A thread polls the process tree under a root process and keeps each descendant's high-water mark (``VmHWM`` in
``/proc/<pid>/status``, the kernel's own peak since the process started), so a spike between two polls is not missed
as long as the process is still alive at the next poll. Where ``/proc`` has no ``VmHWM`` (not Linux) the current
resident size is sampled instead and a short spike can be missed.
"""
from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

import psutil


def high_water_mb(process: psutil.Process) -> float | None:
    """The process's peak resident memory so far in MiB (``VmHWM``), else its current resident size."""
    try:
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    try:
        return process.memory_info().rss / 2**20
    except (psutil.Error, OSError):
        return None


class PeakMemory:
    """``with PeakMemory(pid) as peak: ...`` then ``peak.mb``: the largest peak resident memory of any process that
    ran under ``pid`` during the block (not ``pid`` itself, nor processes already running when the block began)."""

    def __init__(self, root: int, interval: float = 0.5):
        self.root, self.interval = root, interval
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name=f"peak-memory-{root}", daemon=True)
        self._before: set[int] = set()

    def _descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.root).children(recursive=True)
        except psutil.Error:
            return []

    def sample(self) -> None:
        for process in self._descendants():
            if process.pid in self._before:
                continue
            mb = high_water_mb(process)
            if mb is not None:
                self.peaks[process.pid] = max(mb, self.peaks.get(process.pid, 0.0))

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self._before = {p.pid for p in self._descendants()}
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float | None:
        """Peak resident memory (MiB) of the largest process seen, or None where none was seen."""
        return round(max(self.peaks.values()), 1) if self.peaks else None
