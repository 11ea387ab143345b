"""The fastai pieces of the training path: schedule, autocast, throughput and checkpoint callbacks, and the
Learner that resumes its epoch loop where a checkpoint stopped."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from fastai.callback.core import Callback, CancelEpochException, CancelStepException
from fastai.learner import Learner

from osteolib.engine.optim import lr_at_step
from osteolib.engine.precision import PrecisionChoice
from osteolib.engine.state import RunState

__all__ = [
    "WarmupCosineSchedule",
    "AutocastCallback",
    "ThroughputCallback",
    "CheckpointCallback",
    "ResumableLearner",
    "StartCounters",
]


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

    def leave_autocast(self) -> None:
        """Leaves an autocast region entered by ``before_batch`` (safe to call when none is open)."""
        if self._autocast is not None:
            self._autocast.__exit__(None, None, None)
            self._autocast = None

    def after_loss(self) -> None:
        self.leave_autocast()

    def after_cancel_batch(self) -> None:
        self.leave_autocast()

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

    def __init__(self, state: RunState, schedule: WarmupCosineSchedule, throughput: ThroughputCallback):
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
        run.history.append(self._history_row())
        run.update_best(run.history[-1], learn.epoch)
        done = learn.epoch + 1
        if done % run.config.checkpoint_every == 0 or done == run.config.epochs:
            run.save_checkpoint(done)
        run.write_history()

    def _history_row(self) -> dict[str, Any]:
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
        return row


def _plain(value: Any) -> Any:
    if value is None:
        return None
    if torch.is_tensor(value):
        value = value.item()
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    return float(value) if isinstance(value, (int, float)) else value


class ResumableLearner(Learner):
    """fastai's Learner, starting its epoch loop at ``first_epoch`` (fastai's own ``start_epoch``
    runs callbacks for the skipped epochs and restarts its progress counters)."""

    # Not `start_epoch`: fastai's Recorder keeps a timer under that name.
    first_epoch = 0

    def _do_fit(self) -> None:
        for epoch in range(self.first_epoch, self.n_epoch):
            self.epoch = epoch
            self._with_events(self._do_epoch, "epoch", CancelEpochException)


class StartCounters(Callback):
    """Puts fastai's iteration counters where a resumed run is (TrainEvalCallback zeroes them)."""

    order = -5

    def __init__(self, resume_epoch: int, steps_per_epoch: int, epochs: int):
        super().__init__()
        self.resume_epoch, self.steps_per_epoch, self.epochs = resume_epoch, steps_per_epoch, epochs

    def before_fit(self) -> None:
        self.learn.train_iter = self.resume_epoch * self.steps_per_epoch
        self.learn.pct_train = self.resume_epoch / self.epochs
