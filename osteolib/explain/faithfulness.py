"""Faithfulness of maps to the model: grad-cam's ROAD metrics (remove and impute the most / least relevant
pixels) or its CAM-multiplication confidence change (:func:`faithfulness`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.metrics.road import (
    ROADCombined,
    ROADLeastRelevantFirstAverage,
    ROADMostRelevantFirstAverage,
)
from torch import nn

from osteolib.explain.targets import as_image_batch, num_outputs_of, output_target, resolve_targets
from osteolib.utils import eval_mode

DEFAULT_ROAD_PERCENTILES: tuple[int, ...] = (20, 40, 60, 80)
FAITHFULNESS_METHODS = ("road", "road_morf", "road_lerf", "cam_mult")


def faithfulness(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    cams: np.ndarray,
    targets: int | Sequence[int] | None = None,
    method: str = "road",
    *,
    percentiles: Sequence[int] = DEFAULT_ROAD_PERCENTILES,
    score: str = "probability",
    seed: int = 0,
    batch_size: int = 16,
) -> np.ndarray:
    """Per-image faithfulness of maps to the model, with grad-cam's perturbation metrics: ``(N,)``.

    Scores are changes of the target's ``score`` ("probability": softmax / sigmoid of the target
    class, default, comparable across models; or "logit") when pixels are removed and filled in by
    ROAD's noisy linear imputation (which avoids the out-of-distribution artefacts of blacking out):

    - ``"road"``: (LeRF - MoRF) / 2 averaged over ``percentiles`` (grad-cam's ROADCombined). Higher is
      more faithful: removing what the map calls most relevant hurts the prediction more than removing
      the least relevant. Around 0 = no better than a random map; negative = anti-faithful.
    - ``"road_morf"``: change when the most relevant pixels are removed (deletion); lower (more
      negative) is more faithful. ``"road_lerf"``: change when the least relevant are removed; closer
      to 0 / higher is more faithful.
    - ``"cam_mult"``: change when the image is multiplied by the map (grad-cam's
      CamMultImageConfidenceChange); higher = the map keeps the evidence.

    ROAD at percentile p removes the top (100 - p) % (MoRF) or bottom (100 - p) % (LeRF) of the map.
    The imputation noise is drawn from a generator seeded with ``seed`` (the global RNG is restored).
    """
    if method not in FAITHFULNESS_METHODS:
        raise ValueError(f"faithfulness method must be one of {FAITHFULNESS_METHODS}, got {method!r}")
    if score not in ("probability", "logit"):
        raise ValueError(f"score must be 'probability' or 'logit', got {score!r}")
    if not percentiles or any(not 0 < p < 100 for p in percentiles):
        raise ValueError(f"percentiles must be a non-empty list of values in (0, 100), got {list(percentiles)}")
    images = as_image_batch(images)
    cams = np.asarray(cams, dtype=np.float32)
    if cams.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"cams must be (N, H, W) = {(images.shape[0], *images.shape[-2:])} to match the images, got {cams.shape}")
    if not np.isfinite(cams).all():
        raise ValueError("cams contain non-finite values")
    metric = {
        "road": lambda: ROADCombined(percentiles=list(percentiles)),
        "road_morf": lambda: ROADMostRelevantFirstAverage(percentiles=list(percentiles)),
        "road_lerf": lambda: ROADLeastRelevantFirstAverage(percentiles=list(percentiles)),
        "cam_mult": CamMultImageConfidenceChange,
    }[method]()
    device = next(model.parameters()).device
    scores: list[np.ndarray] = []
    with eval_mode(model):
        num_outputs = num_outputs_of(model, images[:1].to(device))
        classes = resolve_targets(model, images, targets, num_outputs, batch_size)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size].to(device)
                chunk_targets = [output_target(c, num_outputs, score) for c in classes[start:start + batch_size]]
                result = np.asarray(metric(chunk, cams[start:start + batch_size], chunk_targets, model), dtype=np.float64)
                scores.append(result.reshape(len(chunk), -1)[:, 0])
    return np.concatenate(scores)
