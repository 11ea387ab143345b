"""The machine a figure was measured on, how busy it was while it was measured, and the peak memory of a measurement.

A figure taken while other work shares the cores is slower by an amount nobody can undo afterwards, so every row
records the load around it: the 1-minute load average before and after, and the CPU time that *other* processes
used during it (``/proc/stat``'s busy time of the whole machine minus this process's own and its waited-for
children's). A row is ``busy`` when the load average exceeded the threads it used by more than
:data:`LOAD_MARGIN`, or other processes used more than :data:`OTHER_CPU_LIMIT` of a core; busy rows are kept and
marked, never reported as clean.

Peak memory: Linux lets a process reset its resident-memory high-water mark (``/proc/self/clear_refs``, "5"), after
which ``ru_maxrss`` is the peak of what ran since; where that is not possible the figure is the process's peak so
far, and the row says so (``rss_reset: false``).
"""
from __future__ import annotations

import os
import platform
import resource
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from osteolib.engine import cpu_supports_bf16
from osteolib.utils import cpu_has_bf16_flags, cpu_model

LOAD_MARGIN = 0.5  # load average above the threads in use by more than this: someone else ran too
OTHER_CPU_LIMIT = 0.10  # cores' worth of CPU time used by other processes during a row
# /proc/stat's "cpu" line: user nice system idle iowait irq softirq steal (guest time is already inside user)
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


def usable_cores() -> int:
    """The cores this process may run on (its affinity; all of the machine's where that cannot be asked)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(threads: int, device: torch.device) -> dict[str, Any]:
    info = {
        "cpu_model": cpu_model(), "cpu_bf16_flags": cpu_has_bf16_flags(), "cpu_supports_bf16": cpu_supports_bf16(),
        "cpu_count": os.cpu_count(), "cpus_usable": usable_cores(), "threads": threads,
        "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
        "torchvision": _version("torchvision"), "timm": _version("timm"), "grad_cam": _version("grad-cam"),
        "fastai": _version("fastai"), "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_bf16"] = torch.cuda.is_bf16_supported()
    return info


def _system_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot, or None without /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return sum(int(fields[i]) for i in _BUSY_FIELDS if i < len(fields)) / ticks


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _load1() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


class LoadWatch:
    """``with LoadWatch(threads) as watch: ...`` then ``watch.record()``: the load around the block."""

    def __init__(self, threads: int):
        self.threads = threads

    def __enter__(self) -> "LoadWatch":
        self.load_before = _load1()
        self.wall = time.perf_counter()
        self.system = _system_busy_seconds()
        self.own = _own_cpu_seconds()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.wall
        system = _system_busy_seconds()
        self.other_cores = None
        if system is not None and self.system is not None and self.wall > 0:
            other = (system - self.system) - (_own_cpu_seconds() - self.own)
            self.other_cores = max(0.0, other) / self.wall
        self.load_after = _load1()

    def record(self) -> dict[str, Any]:
        loads = [v for v in (self.load_before, self.load_after) if v is not None]
        reasons = []
        if loads and max(loads) > self.threads + LOAD_MARGIN:
            reasons.append(f"1-min load average {max(loads):.2f} > {self.threads} threads + {LOAD_MARGIN}")
        if self.other_cores is not None and self.other_cores > OTHER_CPU_LIMIT:
            reasons.append(f"other processes used {self.other_cores:.2f} cores (> {OTHER_CPU_LIMIT})")
        return {"load1_before": self.load_before, "load1_after": self.load_after,
                "other_processes_cores": None if self.other_cores is None else round(self.other_cores, 3),
                "wall_seconds": round(self.wall, 2), "busy": bool(reasons), "busy_reasons": reasons}


def reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark; False where the system does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """ru_maxrss in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)
