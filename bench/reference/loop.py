"""A plain fp32 training loop in the official MAE recipe's shape (``main_pretrain.py`` / ``engine_pretrain.py``):
AdamW with betas (0.9, 0.95) and weight decay 0.05 on everything but norms and biases (timm's
``param_groups_weight_decay``, as the official code), the learning rate set every step on a half-cycle cosine,
``zero_grad`` / ``backward`` / ``step``. No autocast: fp32 throughout.

``clock`` (a :class:`bench.timing.StepClock`) is told when each epoch's loader starts, when each batch is in hand
and when each step ends; the loop stops when it has its figure.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.utils.data import DataLoader


def cosine_lr(step: int, total_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def train(model: nn.Module, loader: DataLoader, step_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
          clock, device: torch.device, peak_lr: float, betas: tuple[float, float] = (0.9, 0.95),
          weight_decay: float = 0.05) -> None:
    """Train ``model`` on ``loader`` until ``clock.done``; ``step_loss(model, images, targets)`` is the loss."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, weight_decay), lr=peak_lr, betas=betas)
    total_steps = clock.warmup_steps + clock.max_steps
    step = 0
    while not clock.done:
        clock.start_epoch()
        for images, targets in loader:
            clock.batch_ready()
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total_steps, peak_lr)
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            loss = step_loss(model, images, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            clock.step_done(len(images))
            if clock.done:
                break
