"""Rotation prediction (Gidaris et al. 2018) as a pretraining proxy: which of 0/90/180/270 degrees?

Radiographs are acquired in a canonical orientation (patient upright, apex up), so the rotation of
a target image is well defined and recognising it needs anatomy, not just texture. The study runs
it on target images starting from a chest-pretrained encoder (MAE for the ViT, masked CNN for
DenseNet121): build a :class:`RotationClassifier`, ``load_pretrained`` the chest checkpoint into it
(the encoder goes into ``backbone``), train it, save it; its ``backbone.*`` weights then load into
the fine-tuning model and the 4-way ``rotation_head`` is dropped.

The rotations are made here, on the batch (:func:`rotate_batch`), rather than by the data
pipeline: the targets must match the rotation exactly, and keeping both in one function (with a
``torch.Generator`` for reproducibility) leaves the data loader identical for every scenario.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from osteolib.models.backbones import create_backbone
from osteolib.models.registry import register_model

NUM_ROTATIONS = 4  # k * 90 degrees, k = 0..3


def rotate_batch(imgs: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each image of (B, C, H, W) by a random multiple of 90 degrees (counter-clockwise).

    Returns ``(rotated, targets)`` with ``targets[i] = k`` for a rotation of ``k * 90`` degrees.
    Images must be square so that every rotation keeps the batch shape.
    """
    if imgs.dim() != 4 or imgs.shape[-1] != imgs.shape[-2]:
        raise ValueError(f"rotate_batch needs square images (B, C, S, S), got {tuple(imgs.shape)}")
    noise_device = generator.device if generator is not None else imgs.device
    targets = torch.randint(0, NUM_ROTATIONS, (imgs.shape[0],), generator=generator, device=noise_device)
    targets = targets.to(imgs.device)
    rotated = torch.empty_like(imgs)
    for k in range(NUM_ROTATIONS):
        chosen = targets == k
        if chosen.any():
            rotated[chosen] = torch.rot90(imgs[chosen], k, dims=(-2, -1))
    return rotated, targets


@register_model("rotation", encoder_prefix="backbone.", pretraining_keys=("rotation_head.",))
class RotationClassifier(nn.Module):
    """A ``create_backbone`` encoder (``backbone``) with a 4-way linear ``rotation_head``.

    ``forward(x) -> logits (B, 4)``; :meth:`pretext_loss` rotates a batch and scores it in one step.
    """

    def __init__(
        self, backbone_name: str, img_size: int | tuple[int, int] = 128, in_chans: int = 1, **backbone_kwargs: Any
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(
            backbone_name=backbone_name, img_size=img_size, in_chans=in_chans, **backbone_kwargs
        )
        self.backbone_name = backbone_name
        self.backbone = create_backbone(
            backbone_name, num_classes=0, in_chans=in_chans, img_size=img_size, **backbone_kwargs
        )
        features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.rotation_head = nn.Linear(features, NUM_ROTATIONS)

    def backbone_kwargs(self) -> dict[str, Any]:
        """Arguments for ``create_backbone(backbone_name, ...)`` that give a model this encoder loads into."""
        return {k: v for k, v in self.config.items() if k != "backbone_name"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation_head(self.backbone(x))

    def pretext_loss(
        self, imgs: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotate ``imgs`` at random and classify them: ``(cross-entropy loss, logits, targets)``."""
        rotated, targets = rotate_batch(imgs, generator)
        logits = self(rotated)
        return F.cross_entropy(logits.float(), targets), logits, targets
