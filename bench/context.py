"""What every row family is handed: the settings, the device, the CPU's goal tier, a temporary folder, and the
shared images (source files and the training cache), made on first use and kept for the suite."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from osteolib.data import ImageCache

from bench.data import Sources, build_cache, source_images
from bench.settings import Settings
from bench.timing import StepClock

TRAINING_IMAGES = 256  # full-suite training set: a few steps per epoch at the study's batch sizes


@dataclass
class Context:
    settings: Settings
    device: torch.device
    tier: str
    scratch: Path
    _sources: dict[int, Sources] = field(default_factory=dict)
    _caches: dict[Any, tuple[ImageCache, list[str]]] = field(default_factory=dict)

    @property
    def threads(self) -> int:
        return self.settings.threads

    def sources(self, count: int) -> Sources:
        if count not in self._sources:
            self._sources[count] = source_images(count, self.scratch / "sources", self.settings.source_size,
                                                 self.threads)
        return self._sources[count]

    def training_sources(self) -> Sources:
        return self.sources(self.settings.images_for(TRAINING_IMAGES))

    def training_cache(self) -> tuple[ImageCache, list[str]]:
        """The ImageCache of the training sources at the working size (built once, untimed)."""
        sources, size = self.training_sources(), self.settings.image_size
        key = (sources.files, size)
        if key not in self._caches:
            self._caches[key] = build_cache(sources.files, size, self.scratch / "training-cache", self.threads)
        return self._caches[key]

    def clock(self) -> StepClock:
        s = self.settings
        return StepClock(s.warmup_steps, s.min_steps, s.max_steps, s.steady_seconds, self.device)

    def training_settings(self, batch_size: int, **extra: Any) -> dict[str, Any]:
        s = self.settings
        return {"image_size": s.image_size, "batch_size": batch_size, "threads": self.threads,
                "device": str(self.device), "training_images": len(self.training_sources().files),
                "images_from": self.training_sources().description, "warmup_steps": s.warmup_steps,
                "steady_seconds_target": s.steady_seconds, **extra}
