"""The reference side of the training rows: a plain model trained by :func:`bench.reference.loop.train` on the
source PNGs through :mod:`bench.reference.images`, timed by the same kind of StepClock as the osteolib side.

The loader gets as many worker processes as osteolib's loaders pick on this device
(:func:`osteolib.data.auto_num_workers`: none on a CPU, where a worker takes a core from the model), so both sides
have the same cores for decoding and for the model.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from osteolib.data import auto_num_workers

from bench.reference.images import png_loader
from bench.reference.loop import train
from bench.timing import Measurement


def measure_plain(model: nn.Module, ctx, transform: Callable, batch_size: int,
                  step_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], peak_lr: float,
                  betas: tuple[float, float], targets: Sequence[int] | None = None, **detail) -> Measurement:
    files = ctx.training_sources().files
    workers = auto_num_workers(ctx.device)
    loader = png_loader(files, list(targets) if targets is not None else [0] * len(files), transform, batch_size,
                        workers, ctx.device)
    clock = ctx.clock()
    train(model, loader, step_loss, clock, ctx.device, peak_lr, betas=betas)
    return clock.measurement(precision="fp32", num_workers=workers, steps_per_epoch=len(loader), betas=list(betas),
                             trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad), **detail)
