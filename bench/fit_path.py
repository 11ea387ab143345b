"""The osteolib side of the training rows: the real fit path (:func:`osteolib.engine.fit`, the loaders of
:func:`osteolib.data.make_dataloaders` over the ImageCache, the study's transforms and recipe), timed per step by a
callback that stops the fit once the :class:`~bench.timing.StepClock` has its figure.

The fit gets no validation images and no monitor (validation is not training throughput) and writes its
checkpoint files into a temporary folder. ``compile=True`` hands the model to ``torch.compile`` through fit's
``adapt_model`` (the compiled module shares the model's parameters); the first step then holds the compilation,
recorded as ``first_step_seconds``, apart from the steady figure.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
from typing import Any, Callable, Sequence

import torch
from fastai.callback.core import Callback, CancelFitException
from torch import nn

from osteolib.data import make_dataloaders
from osteolib.engine import TrainConfig, fit

from bench.timing import Measurement, StepClock


class ClockCallback(Callback):
    """Feeds fit's training steps to a StepClock and stops the fit when it has its figure."""

    order = 110  # after every callback of the step, the throughput and checkpoint ones included

    def __init__(self, clock: StepClock):
        super().__init__()
        self.clock = clock

    def before_train(self) -> None:
        self.clock.start_epoch()

    def before_batch(self) -> None:
        if self.learn.training:
            self.clock.batch_ready()

    def after_batch(self) -> None:
        if self.learn.training:
            self.clock.step_done(int(self.learn.xb[0].shape[0]))
            if self.clock.done:
                raise CancelFitException()


def measure_fit(model: nn.Module, cache: Any, ids: Sequence[str], train_transform: Callable, config: TrainConfig,
                clock: StepClock, *, loss_func: Callable | None = None, targets: Sequence[int] | None = None,
                compile: bool = False) -> Measurement:
    """Steady training images/s of ``model`` through ``fit`` with ``config`` (its epochs are set here)."""
    dls = make_dataloaders(cache, list(ids), [], train_targets=targets, train_transform=train_transform,
                           batch_size=config.batch_size, seed=config.seed, device=clock.device)
    steps_per_epoch = len(dls.train)
    epochs = math.ceil((clock.warmup_steps + clock.max_steps) / max(steps_per_epoch, 1)) + 1
    config = dataclasses.replace(config, epochs=epochs, warmup_epochs=0.0, checkpoint_every=epochs, monitor=None)
    adapt = torch.compile if compile else None
    try:
        with tempfile.TemporaryDirectory(prefix="osteo-bench-fit-") as out:
            result = fit(model, dls, config, out, loss_func=loss_func, quiet=True, cbs=[ClockCallback(clock)],
                         adapt_model=adapt)
    finally:
        if compile:  # the next row starts without this row's compiled graphs, also after a failed compilation
            torch._dynamo.reset()
    return clock.measurement(path="osteolib.engine.fit", precision=result.precision.name,
                             precision_reason=result.precision.reason, channels_last=bool(result.channels_last),
                             num_workers=dls.summary["num_workers"], steps_per_epoch=steps_per_epoch,
                             deterministic=config.deterministic, torch_compile=compile,
                             trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))
