"""What determines a training run (:class:`TrainConfig`, with its range checks) and what :func:`fit` returns
(:class:`FitResult`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from fastai.learner import Learner
from torch import nn

from osteolib.engine.precision import PrecisionChoice

__all__ = ["TrainConfig", "FitResult"]


@dataclass
class TrainConfig:
    """Everything that determines a training run (with the data and the model).

    Set exactly one of ``lr`` (peak learning rate) or ``base_lr`` (MAE scaling: peak lr =
    base_lr * batch_size / 256). ``warmup_epochs`` may be fractional; the schedule is per step.
    ``precision``: "auto" | "bf16" | "fp16" | "fp32"; ``channels_last``: "auto" | True | False.
    ``monitor`` names the history column that selects ``best.pt`` ("valid_loss" or a metric name,
    e.g. "roc_auc_score"); ``monitor_mode`` "auto" minimises names containing "loss", else maximises.
    """

    epochs: int
    batch_size: int
    lr: float | None = None
    base_lr: float | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    seed: int = 0
    precision: str = "auto"
    channels_last: str | bool = "auto"
    grad_clip: float | None = None
    checkpoint_every: int = 1
    layer_decay: float | None = None
    monitor: str | None = "valid_loss"
    monitor_mode: str = "auto"
    deterministic: bool = True

    def __post_init__(self) -> None:
        problems = self._schedule_problems()
        problems += self._option_problems()
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def _schedule_problems(self) -> list[str]:
        """Epochs, batch size, learning rates, betas (normalised to floats here) and warmup."""
        problems = []
        if not isinstance(self.epochs, int) or self.epochs < 1:
            problems.append(f"epochs must be an int >= 1 (got {self.epochs!r})")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch_size must be an int >= 1 (got {self.batch_size!r})")
        if (self.lr is None) == (self.base_lr is None):
            problems.append(f"set exactly one of lr (peak) or base_lr (scaled by batch_size/256); "
                            f"got lr={self.lr!r}, base_lr={self.base_lr!r}")
        elif (self.lr if self.lr is not None else self.base_lr) <= 0:
            problems.append("the learning rate must be > 0")
        elif not problems and not 0.0 <= self.min_lr <= self.peak_lr:
            problems.append(f"min_lr must be in [0, peak lr {self.peak_lr:.3g}] (got {self.min_lr!r})")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0 (got {self.weight_decay!r})")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"betas must lie in [0, 1) (got {self.betas!r})")
        if isinstance(self.epochs, int) and not 0.0 <= self.warmup_epochs < max(self.epochs, 1):
            problems.append(f"warmup_epochs must be in [0, epochs={self.epochs}) (got {self.warmup_epochs!r})")
        return problems

    def _option_problems(self) -> list[str]:
        """Precision, memory format, clipping, checkpointing, layer decay and the monitor."""
        problems = []
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            problems.append(f"precision must be 'auto', 'bf16', 'fp16' or 'fp32' (got {self.precision!r})")
        if self.channels_last not in ("auto", True, False):
            problems.append(f"channels_last must be 'auto', True or False (got {self.channels_last!r})")
        if self.grad_clip is not None and self.grad_clip <= 0:
            problems.append(f"grad_clip must be > 0 or None (got {self.grad_clip!r})")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be an int >= 1 (got {self.checkpoint_every!r})")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            problems.append(f"layer_decay must be in (0, 1] or None (got {self.layer_decay!r})")
        if self.monitor_mode not in ("auto", "min", "max"):
            problems.append(f"monitor_mode must be 'auto', 'min' or 'max' (got {self.monitor_mode!r})")
        return problems

    @property
    def peak_lr(self) -> float:
        """The learning rate at the end of warmup (MAE scaling applied to ``base_lr``)."""
        return self.peak_lr_for(self.batch_size)

    def peak_lr_for(self, global_batch_size: int) -> float:
        """The peak lr when ``global_batch_size`` images make one optimiser step (distributed: batch_size x
        processes): ``base_lr`` is scaled by it (MAE's rule); an explicit ``lr`` is used as given."""
        return float(self.lr) if self.lr is not None else float(self.base_lr) * global_batch_size / 256.0

    @property
    def minimise(self) -> bool:
        if self.monitor_mode != "auto":
            return self.monitor_mode == "min"
        return self.monitor is not None and "loss" in self.monitor


@dataclass
class FitResult:
    """What :func:`fit` produced. ``learner`` is the fastai Learner (e.g. for ``get_preds``)."""

    model: nn.Module
    history: pd.DataFrame
    out_dir: Path
    final_path: Path
    checkpoint_path: Path
    best_path: Path | None
    best_epoch: int | None
    best_value: float | None
    precision: PrecisionChoice
    channels_last: bool
    resumed_from_epoch: int | None
    seconds: float
    learner: Learner = field(repr=False)
    # images per optimiser step over all processes, the peak lr used, and the number of processes
    global_batch_size: int = 0
    peak_lr: float = 0.0
    world_size: int = 1
