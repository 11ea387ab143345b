"""The one training path: :func:`fit` trains every stage and backbone through a fastai ``Learner``.

Self-supervised pretraining (MAE-ViT, masked CNN: the model returns ``(loss, pred, mask)`` and
``loss_func`` is left None), rotation prediction and fine-tuning (a classifier and a loss function)
all go through it, so they share the same optimiser recipe, schedule, precision handling,
checkpoints and history files.

Recipe (MAE, He et al. 2022): AdamW (betas 0.9/0.95, decoupled weight decay 0.05, none on norms,
biases, position embeddings and class/mask tokens), per-step linear warmup then cosine decay to
``min_lr``. ``TrainConfig.base_lr`` follows MAE's scaling rule ``lr = base_lr * batch_size / 256``;
``TrainConfig.lr`` sets the peak learning rate directly. Layer-wise lr decay for fine-tuning uses
timm's parameter groups (``layer_decay``); each group's ``lr_scale`` multiplies the schedule.

Precision is chosen automatically (:func:`choose_precision`): CUDA -> AMP (bf16 where supported,
else fp16 with a GradScaler); CPU -> bf16 autocast only on CPUs with native bf16 instructions,
else fp32. Channels-last memory format goes with autocast on CNNs (where it pays off).

Files in ``out_dir``: ``checkpoint_last.pt`` (every ``checkpoint_every`` epochs and at the end:
model, optimizer, scaler, epoch, RNG states of python/numpy/torch/CUDA and the loader generators,
history, best-so-far), ``final.pt`` (final weights and metadata), ``best.pt`` (the weights of the
best epoch by ``monitor``), ``history.csv`` / ``history.json``. ``fit(..., resume=True)`` continues
from ``checkpoint_last.pt`` and reaches bit-identical weights to an uninterrupted run (CPU, same
config and machine). An out_dir holding a finished or partial run is never overwritten silently.

Distributed data parallel: a process started by ``torchrun`` (``WORLD_SIZE`` > 1) trains distributed
through the same ``fit`` (:mod:`osteolib.engine.distributed`: DDP, sharded training data, SyncBatchNorm on
CUDA, rank 0 alone writes; ``config.batch_size`` is per process and ``base_lr`` scales with the global
batch). A single process takes exactly the path it always took. On CUDA with ``deterministic=False``,
cuDNN's autotuner (``cudnn.benchmark``) is switched on for the fit; loaders pin memory and use worker
processes on CUDA (:func:`osteolib.data.make_dataloaders`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback, CancelEpochException, CancelStepException
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper
from fastcore.basics import noop
from torch import nn

from osteolib.engine import distributed
from osteolib.data import patch_weights

__all__ = [
    "TrainConfig",
    "PrecisionChoice",
    "FitResult",
    "cpu_supports_bf16",
    "choose_precision",
    "lr_at_step",
    "param_groups",
    "model_loss",
    "fit",
    "load_checkpoint",
    "load_weights",
    "CHECKPOINT_LAST",
    "FINAL",
    "BEST",
]

log = logging.getLogger(__name__)

CHECKPOINT_LAST = "checkpoint_last.pt"
FINAL = "final.pt"
BEST = "best.pt"
HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
CHECKPOINT_FORMAT = "osteolib.engine/1"

# Parameters that are never weight-decayed whatever their shape (MAE / timm convention): learned
# position embeddings and special tokens are lookup tables, not weights to shrink.
NO_DECAY_NAMES = ("pos_embed", "decoder_pos_embed", "cls_token", "mask_token", "dist_token", "reg_token")

# Config fields that do not change the trained weights: a resumed run may differ in these.
_RESUME_FREE_FIELDS = ("checkpoint_every",)


@dataclass
class TrainConfig:
    """Everything that determines a training run (with the data and the model).

    Set exactly one of ``lr`` (peak learning rate) or ``base_lr`` (MAE scaling: peak lr =
    base_lr * batch_size / 256). ``warmup_epochs`` may be fractional; the schedule is per step.
    ``precision``: "auto" | "bf16" | "fp16" | "fp32"; ``channels_last``: "auto" | True | False.
    ``monitor`` names the history column that selects ``best.pt`` ("valid_loss" or a metric name,
    e.g. "roc_auc_score"); ``monitor_mode`` "auto" minimises names containing "loss", else maximises.
    ``mask_region_bias`` > 0 biases a masking model's masks toward the region (region-aware data).
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
    mask_region_bias: float = 0.0
    monitor: str | None = "valid_loss"
    monitor_mode: str = "auto"
    deterministic: bool = True

    def __post_init__(self) -> None:
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
        if self.mask_region_bias < 0:
            problems.append(f"mask_region_bias must be >= 0 (got {self.mask_region_bias!r})")
        if self.monitor_mode not in ("auto", "min", "max"):
            problems.append(f"monitor_mode must be 'auto', 'min' or 'max' (got {self.monitor_mode!r})")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

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


# --------------------------------------------------------------------------------------------
# Precision


@dataclass(frozen=True)
class PrecisionChoice:
    """How a run computes: ``name`` "bf16" | "fp16" | "fp32", the autocast dtype (None for fp32),
    whether a GradScaler is needed (fp16 only), the device type autocast runs on, and why."""

    name: str
    autocast_dtype: torch.dtype | None
    grad_scaler: bool
    device_type: str
    reason: str


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), so bf16 autocast is fast.

    oneDNN's own check is asked first; /proc/cpuinfo flags are the fallback on builds without it.
    Without native support bf16 is emulated and slower than fp32.
    """
    try:
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return True
    except (AttributeError, RuntimeError):
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def choose_precision(device: torch.device | str, requested: str = "auto") -> PrecisionChoice:
    """The precision for training on ``device``: CUDA -> AMP (bf16 if supported, else fp16 + GradScaler);
    CPU -> bf16 autocast when the CPU has native bf16, else fp32. ``requested`` overrides "auto"
    (an impossible request, e.g. fp16 on the CPU, is an error)."""
    device = torch.device(device)
    if requested not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16', 'fp16' or 'fp32', got {requested!r}")
    if requested == "fp32":
        return PrecisionChoice("fp32", None, False, device.type, "fp32 requested")
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not bf16_ok:
            raise ValueError("precision='bf16' requested but this GPU does not support bfloat16; use 'fp16' or 'auto'")
        if requested == "bf16" or (requested == "auto" and bf16_ok):
            return PrecisionChoice("bf16", torch.bfloat16, False, "cuda", "CUDA AMP with bfloat16")
        return PrecisionChoice("fp16", torch.float16, True, "cuda",
                               "CUDA AMP with float16 and a GradScaler" + ("" if requested == "fp16" else
                                                                           " (GPU lacks bfloat16)"))
    if device.type == "cpu":
        if requested == "fp16":
            raise ValueError("precision='fp16' is for CUDA; on the CPU use 'bf16', 'fp32' or 'auto'")
        native = cpu_supports_bf16()
        if requested == "bf16":
            return PrecisionChoice("bf16", torch.bfloat16, False, "cpu",
                                   "bf16 requested" + ("" if native else " (emulated: this CPU has no native bf16)"))
        if native:
            return PrecisionChoice("bf16", torch.bfloat16, False, "cpu", "CPU has native bf16 (AVX512-BF16/AMX)")
        return PrecisionChoice("fp32", None, False, "cpu", "CPU has no native bf16")
    if requested == "auto":
        return PrecisionChoice("fp32", None, False, device.type, f"no mixed precision on {device.type}")
    raise ValueError(f"precision={requested!r} is not supported on {device.type}; use 'fp32' or 'auto'")


def _is_cnn(model: nn.Module) -> bool:
    # A ViT has a single conv (its patch embedding); channels-last only pays off for real CNNs.
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) >= 2


def _use_channels_last(model: nn.Module, setting: str | bool, precision: PrecisionChoice) -> bool:
    if setting is True or setting is False:
        return bool(setting) and any(isinstance(m, nn.Conv2d) for m in model.modules())
    # Measured: channels-last speeds up bf16 CNN training on CPU and AMP on GPU, but slows plain
    # fp32 on the CPU, so "auto" ties it to autocast.
    return _is_cnn(model) and precision.autocast_dtype is not None


# --------------------------------------------------------------------------------------------
# Optimiser: parameter groups and schedule


def _no_decay_names(model: nn.Module) -> set[str]:
    declared = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    names = set()
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim <= 1 or name.endswith(".bias") or leaf in NO_DECAY_NAMES or name in declared \
                or leaf in declared:
            names.add(name)
    return names


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """AdamW parameter groups: no weight decay on norms, biases, 1-D parameters, position embeddings
    and class/mask tokens (and whatever ``model.no_weight_decay()`` lists).

    With ``layer_decay`` the groups come from timm's ``param_groups_layer_decay`` (each with an
    ``lr_scale`` = layer_decay ** depth-from-top) and the same no-decay names. Frozen parameters
    (requires_grad False) are left out.
    """
    no_decay = _no_decay_names(model)
    if layer_decay is not None:
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=sorted(no_decay),
                                          layer_decay=layer_decay)
        return [{**g, "lr_scale": float(g.get("lr_scale", 1.0))} for g in groups if g["params"]]
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if name in no_decay else decay).append(param)
    groups = [{"params": decay, "weight_decay": float(weight_decay), "lr_scale": 1.0},
              {"params": plain, "weight_decay": 0.0, "lr_scale": 1.0}]
    return [g for g in groups if g["params"]]


def lr_at_step(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup, then cosine to ``min_lr``.

    Warmup rises linearly to ``peak_lr`` at step ``warmup_steps - 1`` (the first step already moves);
    the cosine then falls from ``peak_lr`` and would reach ``min_lr`` at ``total_steps``.
    """
    if total_steps < 1 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def model_loss(output: Any, *targets: Any) -> torch.Tensor:
    """The loss of a model that computes its own: the output itself, or ``output[0]`` of a tuple
    such as MAE's ``(loss, pred, mask)``. Targets are ignored (they are placeholders)."""
    loss = output[0] if isinstance(output, (tuple, list)) else output
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise TypeError("with loss_func=None the model must return its loss (a scalar tensor) or a tuple "
                        f"starting with it; got {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if torch.is_tensor(loss) else ""))
    return loss.reshape(())


def _patch_size(model: nn.Module) -> int:
    for candidate in (getattr(model, "patch_size", None),
                      getattr(getattr(model, "patch_embed", None), "patch_size", None)):
        if candidate is not None:
            size = candidate[0] if isinstance(candidate, (tuple, list)) else candidate
            return int(size)
    raise ValueError(f"mask_region_bias needs the masking grid of {type(model).__name__}, but it has neither "
                     f"'patch_size' nor 'patch_embed.patch_size'; pass patch_size= to fit()")


class _RegionInputs(nn.Module):
    """Adapts region-aware batches ``(image, region)`` to the model's call.

    A masking model (``loss_func`` None, bias > 0) gets ``mask_weights`` from the region; any other
    model just gets the image. No parameters of its own: checkpoints save the wrapped model.
    """

    def __init__(self, model: nn.Module, patch_size: int | None, bias: float):
        super().__init__()
        self.model, self.patch_size, self.bias = model, patch_size, float(bias)

    def forward(self, image: torch.Tensor, region: torch.Tensor) -> Any:
        if self.bias > 0:
            return self.model(image, mask_weights=patch_weights(region, self.patch_size, self.bias))
        return self.model(image)


# --------------------------------------------------------------------------------------------
# Callbacks


class WarmupCosineSchedule(Callback):
    """Sets every group's lr = schedule(step) x group lr_scale before each training step.

    The step is ``epoch * batches_per_epoch + iter``: it needs no state of its own, so a resumed
    run picks the schedule up exactly where it stopped.
    """

    order = 5

    def __init__(self, peak_lr: float, min_lr: float, total_steps: int, warmup_steps: int,
                 steps_per_epoch: int):
        super().__init__()
        self.peak_lr, self.min_lr = peak_lr, min_lr
        self.total_steps, self.warmup_steps, self.steps_per_epoch = total_steps, warmup_steps, steps_per_epoch
        self.current_lr = lr_at_step(0, total_steps, warmup_steps, peak_lr, min_lr)

    def before_batch(self) -> None:
        if not self.learn.training:
            return
        step = self.learn.epoch * self.steps_per_epoch + self.learn.iter
        self.current_lr = lr_at_step(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr)
        for group in self.learn.opt.opt.param_groups:
            group["lr"] = self.current_lr * group.get("lr_scale", 1.0)


class AutocastCallback(Callback):
    """Autocast (bf16/fp16) around forward and loss, channels-last inputs, GradScaler for fp16,
    gradient clipping. fastai's MixedPrecision assumes CUDA; this one follows the model's device."""

    order = 10

    def __init__(self, precision: PrecisionChoice, channels_last: bool, grad_clip: float | None,
                 scaler: torch.amp.GradScaler | None):
        super().__init__()
        self.precision, self.to_channels_last, self.grad_clip, self.scaler = precision, channels_last, grad_clip, scaler
        self._autocast: Any = None

    def before_batch(self) -> None:
        if self.to_channels_last:
            self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last)
                                  if torch.is_tensor(x) and x.dim() == 4 and x.is_floating_point() else x
                                  for x in self.learn.xb)
        if self.precision.autocast_dtype is not None:
            self._autocast = torch.autocast(self.precision.device_type, dtype=self.precision.autocast_dtype)
            self._autocast.__enter__()

    def after_pred(self) -> None:
        # Losses and metrics are computed in float32 whatever the forward ran in.
        self.learn.pred = _to_float(self.learn.pred)

    def _leave_autocast(self) -> None:
        if self._autocast is not None:
            self._autocast.__exit__(None, None, None)
            self._autocast = None

    def after_loss(self) -> None:
        self._leave_autocast()

    def after_cancel_batch(self) -> None:
        self._leave_autocast()

    def before_backward(self) -> None:
        if self.scaler is not None:
            self.learn.loss_grad = self.scaler.scale(self.learn.loss_grad)

    def before_step(self) -> None:
        optimizer = self.learn.opt.opt
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], self.grad_clip)
        if self.scaler is not None:
            # The scaler steps (or skips a step with inf/nan gradients) itself; fastai must not step again.
            self.scaler.step(optimizer)
            self.scaler.update()
            raise CancelStepException()


def _to_float(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float(v) for v in value)
    return value


class ThroughputCallback(Callback):
    """Training images/s and the fraction of training wall time spent waiting for the next batch
    (from the end of one batch to the start of the next: loading, collating, moving to the device)."""

    # Last in every event: the wait is measured from the end of one batch's callbacks to the start of
    # the next batch's (fetching, collating and moving the batch happen in between).
    order = 100

    def before_train(self) -> None:
        self.train_start = self.last_batch_end = time.perf_counter()
        self.waited, self.images = 0.0, 0

    def before_batch(self) -> None:
        if self.learn.training:
            self.waited += time.perf_counter() - self.last_batch_end

    def after_batch(self) -> None:
        if self.learn.training:
            self.images += int(self.learn.xb[0].shape[0])
            self.last_batch_end = time.perf_counter()

    def after_train(self) -> None:
        seconds = max(time.perf_counter() - self.train_start, 1e-9)
        self.figures = {"train_images_per_s": self.images / seconds, "data_wait_fraction": self.waited / seconds}


class CheckpointCallback(Callback):
    """Per-epoch history row, ``checkpoint_last.pt`` (every ``checkpoint_every`` epochs and at the last),
    ``best.pt`` when the monitored value improves, ``history.csv``/``history.json``; all atomic."""

    order = 70  # after fastai's Recorder (50), whose valid loss and metrics go into the row

    def __init__(self, state: "_Run", schedule: WarmupCosineSchedule, throughput: ThroughputCallback):
        super().__init__()
        # Not `self.run`: fastai's Callback uses that name for its on/off switch.
        self.state, self.schedule, self.throughput_cb = state, schedule, throughput

    def before_epoch(self) -> None:
        self.epoch_start = time.perf_counter()
        self.loss_sum, self.loss_count = None, 0

    def after_batch(self) -> None:
        if self.learn.training and self.learn.loss is not None:
            n = int(self.learn.xb[0].shape[0])
            # Summed on the loss's device: no host sync per batch.
            batch_sum = self.learn.loss.detach().float().mean() * n
            self.loss_sum = batch_sum if self.loss_sum is None else self.loss_sum + batch_sum
            self.loss_count += n

    def after_epoch(self) -> None:
        run, learn = self.state, self.learn
        names = [n for n in learn.recorder.metric_names[1:] if n != "time"]
        recorded = dict(zip(names, getattr(learn, "final_record", [])))
        loss_sum, loss_count = (float(self.loss_sum) if self.loss_sum is not None else 0.0), self.loss_count
        figures = dict(getattr(self.throughput_cb, "figures", {}))
        if run.distributed is not None:
            # The history reports the whole job: the loss over every process's images, images/s summed.
            from osteolib.engine.distributed import all_reduce_sum

            loss_sum, loss_count, images_per_s = all_reduce_sum(
                [loss_sum, loss_count, figures.get("train_images_per_s", 0.0)])
            figures["train_images_per_s"] = images_per_s
        row: dict[str, Any] = {"epoch": int(learn.epoch),
                               "train_loss": (loss_sum / loss_count) if loss_count else None}
        for name, value in recorded.items():
            if name != "train_loss":
                row[name] = _plain(value)
        row["lr"] = float(self.schedule.current_lr)
        row["seconds"] = time.perf_counter() - self.epoch_start
        row.update(figures)
        run.history.append(row)
        run.update_best(row, learn.epoch)
        done = learn.epoch + 1
        if done % run.config.checkpoint_every == 0 or done == run.config.epochs:
            run.save_checkpoint(done)
        run.write_history()


def _plain(value: Any) -> Any:
    if value is None:
        return None
    if torch.is_tensor(value):
        value = value.item()
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    return float(value) if isinstance(value, (int, float)) else value


class _ResumableLearner(Learner):
    """fastai's Learner, starting its epoch loop at ``first_epoch`` (fastai's own ``start_epoch``
    runs callbacks for the skipped epochs and restarts its progress counters)."""

    # Not `start_epoch`: fastai's Recorder keeps a timer under that name.
    first_epoch = 0

    def _do_fit(self) -> None:
        for epoch in range(self.first_epoch, self.n_epoch):
            self.epoch = epoch
            self._with_events(self._do_epoch, "epoch", CancelEpochException)


class _StartCounters(Callback):
    """Puts fastai's iteration counters where a resumed run is (TrainEvalCallback zeroes them)."""

    order = -5

    def __init__(self, resume_epoch: int, steps_per_epoch: int, epochs: int):
        super().__init__()
        self.resume_epoch, self.steps_per_epoch, self.epochs = resume_epoch, steps_per_epoch, epochs

    def before_fit(self) -> None:
        self.learn.train_iter = self.resume_epoch * self.steps_per_epoch
        self.learn.pct_train = self.resume_epoch / self.epochs


# --------------------------------------------------------------------------------------------
# Run state, checkpoints


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state(loaders: Sequence[Any]) -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's state holds an ndarray; as a tensor the checkpoint loads with weights_only=True.
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loaders": [_loader_generator(dl).get_state() if _loader_generator(dl) is not None else None
                    for dl in loaders],
    }


def _set_rng_state(state: dict, loaders: Sequence[Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for dl, saved in zip(loaders, state["loaders"]):
        generator = _loader_generator(dl)
        if generator is not None and saved is not None:
            generator.set_state(saved)


def _loader_generator(dl: Any) -> torch.Generator | None:
    generator = getattr(dl, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def _config_record(config: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by :func:`fit` (``checkpoint_last.pt``, ``final.pt`` or ``best.pt``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which and why
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an osteolib training checkpoint (format {CHECKPOINT_FORMAT})")
    return data


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load the model weights of a :func:`fit` checkpoint into ``model`` (returned)."""
    model.load_state_dict(load_checkpoint(path)["model"], strict=strict)
    return model


@dataclass
class _Run:
    """The mutable state of one fit: what checkpoints and history files are made of."""

    model: nn.Module
    config: TrainConfig
    out_dir: Path
    stage: str
    precision: PrecisionChoice
    channels_last: bool
    learn: Learner | None = None
    scaler: torch.amp.GradScaler | None = None
    history: list[dict] = field(default_factory=list)
    # Distributed: the torchrun job (None for a single process); only its rank 0 writes files.
    distributed: Any = None
    best: dict = field(default_factory=lambda: {"monitor": None, "value": None, "epoch": None})

    def update_best(self, row: dict, epoch: int) -> None:
        monitor = self.config.monitor
        value = row.get(monitor) if monitor else None
        if value is None or not isinstance(value, float) or math.isnan(value):
            return
        previous = self.best["value"]
        better = previous is None or (value < previous if self.config.minimise else value > previous)
        if better:
            self.best = {"monitor": monitor, "value": value, "epoch": int(epoch)}
            if self.writes:
                _atomic_save(self._weights_record(epoch + 1), self.out_dir / BEST)

    @property
    def writes(self) -> bool:
        return self.distributed is None or self.distributed.is_main

    def _weights_record(self, epochs_done: int) -> dict:
        return {"format": CHECKPOINT_FORMAT, "kind": "weights", "stage": self.stage, "epoch": int(epochs_done),
                "model": self.model.state_dict(), "config": _config_record(self.config),
                "precision": self.precision.name, "channels_last": self.channels_last,
                "history": list(self.history), "best": dict(self.best)}

    def save_checkpoint(self, epochs_done: int) -> None:
        if not self.writes:
            return
        record = self._weights_record(epochs_done)
        record.update(kind="checkpoint", optimizer=self.learn.opt.opt.state_dict(),
                      scaler=self.scaler.state_dict() if self.scaler is not None else None,
                      rng=_rng_state(self.learn.dls.loaders))
        _atomic_save(record, self.out_dir / CHECKPOINT_LAST)

    def save_final(self) -> Path:
        if not self.writes:
            return self.out_dir / FINAL
        _atomic_save(self._weights_record(self.config.epochs), self.out_dir / FINAL)
        return self.out_dir / FINAL

    def write_history(self) -> None:
        if not self.writes:
            return
        _atomic_write_text(json.dumps(self.history, indent=1), self.out_dir / HISTORY_JSON)
        _atomic_write_text(pd.DataFrame(self.history).to_csv(index=False), self.out_dir / HISTORY_CSV)


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


# --------------------------------------------------------------------------------------------
# fit


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _dls_device(dls: DataLoaders) -> torch.device:
    device = getattr(dls, "_device", None)
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _check_out_dir(out_dir: Path, resume: bool) -> dict | None:
    """The checkpoint to resume from (or None), after refusing to overwrite an existing run."""
    final, last = out_dir / FINAL, out_dir / CHECKPOINT_LAST
    if not resume:
        for existing in (final, last):
            if existing.exists():
                raise FileExistsError(
                    f"{existing} already exists: {out_dir} holds a {'finished' if existing == final else 'partial'} "
                    f"run. Choose a new out_dir, or pass resume=True to continue (or reload) that run.")
        return None
    if last.exists():
        return load_checkpoint(last)
    if final.exists():
        raise FileExistsError(f"{final} exists but {last} does not, so the run cannot be resumed; "
                              f"choose a new out_dir")
    return None


def fit(model: nn.Module, dls: DataLoaders, config: TrainConfig, out_dir: str | os.PathLike,
        loss_func: Callable | None = None, metrics: Any = None, stage: str = "train", *,
        resume: bool = False, quiet: bool = False, cbs: Sequence[Callback] | None = None,
        patch_size: int | None = None) -> FitResult:
    """Train ``model`` on ``dls`` with ``config``, writing checkpoints and history into ``out_dir``.

    ``loss_func=None``: the model computes its own loss (MAE / masked CNN ``(loss, pred, mask)``);
    otherwise ``loss_func(pred, target)`` (e.g. ``nn.CrossEntropyLoss()``). ``metrics``: fastai
    metrics computed on the validation set each epoch (e.g. ``RocAucBinary()``). ``resume=True``
    continues from ``out_dir/checkpoint_last.pt`` (a finished run is reloaded without training;
    without a checkpoint the run starts fresh). ``stage`` labels the checkpoints ("pretrain",
    "finetune", ...). ``cbs``: extra fastai callbacks. ``quiet`` hides progress bars and the table.

    Region-aware data (``make_dataloaders(region_aware=True)``) feeds ``(image, region)``; with
    ``config.mask_region_bias > 0`` and a masking model, the region becomes ``mask_weights``
    (:func:`osteolib.data.transforms.patch_weights`, grid from ``patch_size`` or the model).
    The run is a function of (config, data, model init): fit reseeds python/numpy/torch and the
    loaders from ``config.seed``.
    """
    started = time.perf_counter()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(dls, DataLoaders) or len(dls.loaders) < 2:
        raise TypeError("dls must be fastai DataLoaders(train, valid); build them with osteolib.data.make_dataloaders")
    # Started by torchrun (WORLD_SIZE > 1): join the process group and train on this rank's shard.
    ctx = distributed.context()
    joined_group = False
    if ctx is not None:
        joined_group = distributed.init_process_group(ctx)
        dls = distributed.shard_train_loader(dls, ctx)
    world_size = ctx.world_size if ctx is not None else 1
    global_batch = config.batch_size * world_size
    peak_lr = config.peak_lr_for(global_batch)
    steps_per_epoch = len(dls.train)
    if steps_per_epoch == 0:
        raise ValueError("the training loader yields no batches (too few images for its batch size with drop_last)")
    loader_batch = getattr(dls.train, "batch_size", None)
    if loader_batch is not None and loader_batch != config.batch_size:
        raise ValueError(f"config.batch_size={config.batch_size} but the training loader makes batches of "
                         f"{loader_batch}; build the loaders with batch_size=config.batch_size (the lr scaling "
                         f"and the recorded recipe depend on it)")
    region_aware = bool(getattr(dls.train.dataset, "region_aware", False))
    if config.mask_region_bias > 0 and not region_aware:
        raise ValueError("config.mask_region_bias > 0 needs region masks in the batches: build the loaders with "
                         "make_dataloaders(..., region_aware=True)")
    if config.mask_region_bias > 0 and loss_func is not None:
        raise ValueError("config.mask_region_bias applies to masking models that compute their own loss "
                         "(loss_func=None); set it to 0 for a model trained with a loss_func")
    if config.mask_region_bias > 0 and patch_size is None:
        patch_size = _patch_size(model)
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup of {warmup_steps} steps leaves no room in {total_steps} training steps; "
                         f"lower warmup_epochs")

    # Every rank reads (resume, best.pt) and rank 0 writes the same folder: rank 0's.
    out_dir = distributed.broadcast_path(out_dir) if ctx is not None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = _check_out_dir(out_dir, resume)
    if checkpoint is not None:
        _check_resumable(checkpoint, config, stage, out_dir)

    device = _dls_device(dls)
    precision = choose_precision(device, config.precision)
    channels_last = _use_channels_last(model, config.channels_last, precision)
    model.to(device)
    if ctx is not None:
        model = distributed.convert_sync_batchnorm(model, ctx)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type) if precision.grad_scaler else None
    run = _Run(model=model, config=config, out_dir=out_dir, stage=stage, precision=precision,
               channels_last=channels_last, scaler=scaler, distributed=ctx)

    groups = param_groups(model, config.weight_decay, config.layer_decay)
    learner_model = _RegionInputs(model, patch_size, config.mask_region_bias) if region_aware else model
    learn = _ResumableLearner(
        dls, learner_model, loss_func=loss_func if loss_func is not None else model_loss,
        opt_func=lambda params, lr: OptimWrapper(params, torch.optim.AdamW, lr=lr, betas=config.betas,
                                                 eps=config.eps, weight_decay=config.weight_decay),
        lr=lr_at_step(0, total_steps, warmup_steps, peak_lr, config.min_lr),
        splitter=lambda _: groups, metrics=metrics, path=out_dir, wd=None)
    run.learn = learn
    if config.monitor is not None:
        known = ["train_loss", "valid_loss"] + list(learn.metrics.attrgot("name"))
        if config.monitor not in known:
            raise ValueError(f"config.monitor={config.monitor!r} is not recorded; choose one of {known} or None")
    learn.create_opt()

    start_epoch = 0
    if checkpoint is None:
        _seed_everything(config.seed)
        for i, dl in enumerate(dls.loaders):
            generator = _loader_generator(dl)
            if generator is not None:
                generator.manual_seed(config.seed + i)
    else:
        model.load_state_dict(checkpoint["model"])
        learn.opt.opt.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and checkpoint.get("scaler") is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        _set_rng_state(checkpoint["rng"], dls.loaders)
        run.history = list(checkpoint["history"])
        run.best = dict(checkpoint["best"])
        start_epoch = int(checkpoint["epoch"])
    learn.first_epoch = start_epoch

    schedule = WarmupCosineSchedule(peak_lr, config.min_lr, total_steps, warmup_steps, steps_per_epoch)
    autocast_cb = AutocastCallback(precision, channels_last, config.grad_clip, scaler)
    throughput = ThroughputCallback()
    training_cbs = [_StartCounters(start_epoch, steps_per_epoch, config.epochs), schedule, autocast_cb, throughput,
                    CheckpointCallback(run, schedule, throughput)]
    if ctx is not None:
        training_cbs.append(distributed.DistributedDataParallelCallback(ctx, config.seed))
    learn.add_cbs(training_cbs)
    if cbs:
        learn.add_cbs(list(cbs))
    if quiet or not run.writes:
        learn.remove_cbs(learn._grab_cbs(ProgressCallback))
        learn.logger = noop
    else:
        scale = (f"; {world_size} processes ({ctx.backend}) x batch {config.batch_size} = global batch "
                 f"{global_batch}" if ctx is not None else "")
        print(f"[{stage}] precision {precision.name} ({precision.reason}); channels_last={channels_last}; "
              f"device {device}; {steps_per_epoch} steps/epoch; peak lr {peak_lr:.3g}{scale}"
              + (f"; resuming after epoch {start_epoch}" if checkpoint is not None else ""))

    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if config.deterministic:
        # Global switches, restored below; warn_only because a few ops have no deterministic kernel.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif device.type == "cuda":
        # Fixed input sizes: let cuDNN pick the fastest convolution algorithms (restored below).
        torch.backends.cudnn.benchmark = True
    try:
        if start_epoch < config.epochs:
            learn.fit(config.epochs)
    finally:
        # An interruption inside a forward pass would otherwise leave autocast on for the process.
        autocast_cb._leave_autocast()
        # The returned Learner is for prediction (get_preds/validate run epoch events): without the
        # training callbacks, which would otherwise append history rows and rewrite checkpoints.
        learn.remove_cbs(training_cbs + list(cbs or []))
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]
    final_path = run.save_final()
    run.write_history()
    if ctx is not None:
        # The other ranks may read best.pt / final.pt next: wait until rank 0 has written them.
        distributed.barrier()
        if joined_group:
            distributed.destroy_process_group()
    best_path = out_dir / BEST if run.best["epoch"] is not None else None
    return FitResult(model=model, history=pd.DataFrame(run.history), out_dir=out_dir, final_path=final_path,
                     checkpoint_path=out_dir / CHECKPOINT_LAST, best_path=best_path,
                     best_epoch=run.best["epoch"], best_value=run.best["value"], precision=precision,
                     channels_last=channels_last, resumed_from_epoch=start_epoch if checkpoint is not None else None,
                     seconds=time.perf_counter() - started, learner=learn, global_batch_size=global_batch,
                     peak_lr=peak_lr, world_size=world_size)


def _check_resumable(checkpoint: dict, config: TrainConfig, stage: str, out_dir: Path) -> None:
    saved = checkpoint.get("config", {})
    current = _config_record(config)
    differing = [f"{name}: checkpoint {saved.get(name)!r} vs now {current[name]!r}"
                 for name in current if name not in _RESUME_FREE_FIELDS and saved.get(name) != current[name]]
    if differing:
        raise ValueError(f"cannot resume {out_dir / CHECKPOINT_LAST}: it was made with a different config "
                         f"({'; '.join(differing)}); use the same config or a new out_dir")
    if checkpoint.get("stage") != stage:
        raise ValueError(f"cannot resume {out_dir / CHECKPOINT_LAST}: it belongs to stage "
                         f"{checkpoint.get('stage')!r}, not {stage!r}")
