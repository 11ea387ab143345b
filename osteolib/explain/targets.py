"""What the maps and metrics of this layer explain: checked image batches, the class explained per image, and
grad-cam's target objects.

Binary models have one logit. Following grad-cam's ``BinaryClassifierOutputTarget``, class 1 means
"evidence for the positive class" (the logit) and class 0 "evidence for the negative class" (minus
the logit); every function of the layer uses that convention, and the default target is the predicted class.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from pytorch_grad_cam.utils.model_targets import (
    BinaryClassifierOutputTarget,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
)
from torch import nn


def as_image_batch(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A non-empty float batch ``(N, C, H, W)`` from a tensor or numpy array; anything else is refused."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor or numpy array (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty batch (N, C, H, W), got shape {tuple(images.shape)}")
    return images.float()


def num_outputs_of(model: nn.Module, example: torch.Tensor) -> int:
    """The model's number of logits: its ``num_classes``, else the width of its output on ``example``."""
    num = getattr(model, "num_classes", None)
    if not isinstance(num, int):
        with torch.no_grad():
            num = int(model(example).shape[-1])
    if num < 1:
        raise ValueError(f"{type(model).__name__} has no classifier (num_classes={num}); explain a fine-tuned model")
    return num


def resolve_targets(
    model: nn.Module,
    images: torch.Tensor,
    targets: int | Sequence[int] | None,
    num_outputs: int,
    batch_size: int,
    logits: torch.Tensor | None = None,
) -> list[int]:
    """One class index per image, checked; None -> the predicted class (logit > 0 for one logit)."""
    n = len(images)
    if targets is None:
        if logits is None:
            device = next(model.parameters()).device
            with torch.no_grad():
                logits = torch.cat([model(images[s:s + batch_size].to(device)) for s in range(0, n, batch_size)])
        if num_outputs == 1:
            return [int(v > 0) for v in logits.reshape(n).tolist()]
        return [int(v) for v in logits.argmax(dim=1).tolist()]
    if isinstance(targets, (int, np.integer)):
        classes = [int(targets)] * n
    else:
        classes = [int(t) for t in (targets.tolist() if hasattr(targets, "tolist") else targets)]
        if len(classes) != n:
            raise ValueError(f"targets has {len(classes)} entries for {n} images; give one per image or one int")
    allowed = 2 if num_outputs == 1 else num_outputs
    bad = [(i, c) for i, c in enumerate(classes) if not 0 <= c < allowed]
    if bad:
        what = "0 (negative) or 1 (positive) for a single-logit model" if num_outputs == 1 else f"0..{num_outputs - 1}"
        raise ValueError(f"targets out of range at (image, class) {bad[:5]}: classes must be {what}")
    return classes


class _BinaryProbabilityTarget:
    """Probability of class 1 (sigmoid of the logit) or class 0 (1 - that) of a single-logit model."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(model_output.reshape(-1)[0])
        return p if self.category == 1 else 1 - p


def output_target(category: int, num_outputs: int, score: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A grad-cam target object: what is explained (logit) or scored (probability) for one image."""
    if num_outputs == 1:
        return BinaryClassifierOutputTarget(category) if score == "logit" else _BinaryProbabilityTarget(category)
    return ClassifierOutputTarget(category) if score == "logit" else ClassifierOutputSoftmaxTarget(category)

