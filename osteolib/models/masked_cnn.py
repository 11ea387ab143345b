"""Masked image modelling for CNNs (SimMIM-style, Xie et al. 2022), used for DenseNet121.

The CNN sees the whole image with the hidden patches overwritten by a mask token; a light decoder
(1x1 convolution to ``stride**2`` pixels per feature cell, then pixel shuffle, as SimMIM) predicts
the full image from the last feature map, and only hidden pixels are scored. This gives DenseNet121
the same pretraining scenarios as the ViT's MAE, with the same ``forward`` / ``reconstruct``
signatures, so the training loop and the figures treat both alike.

Design choices (SimMIM rather than SparK): sparse convolutions (SparK) would keep hidden patches
out of the convolutions entirely, but need a re-implemented sparse DenseNet whose weights then have
to be mapped back; SimMIM keeps the encoder *the* timm DenseNet121 (``encoder.`` + its own names),
which is what makes checked loading trivial.

Mask token: the input has one channel, so the token is one learned scalar per input channel
(``mask_token="learned"``, default) rather than SimMIM's learned embedding vector. Zero
(``"zero"``) would be indistinguishable from genuinely black background (air outside the body),
so the network could not tell "hidden" from "empty"; a learned value is free to move where real
radiographs rarely are, and a perfectly flat patch is itself rare in a noisy radiograph.

BatchNorm: during pretraining a large share of every image (default 60 %) is a flat token, so the
batch statistics and the running mean/variance stored in the checkpoint describe masked images,
not real ones. They are kept (not reset) because fine-tuning runs in train mode with batch
statistics and re-estimates the running values within a few dozen steps (momentum 0.1);
``load_pretrained`` records a note saying so. Evaluate a masked-CNN encoder only after fine-tuning
(or after re-estimating the statistics on unmasked images), never straight from pretraining.

Default mask ratio 0.6 with 32-pixel patches (SimMIM's choice at 192 px): a CNN sees the token values
everywhere, so very high ratios leave too little context at this resolution. The pretraining stages
(``osteolib.stages.pretrain``) mask on a 16-pixel grid instead: at 128 px the 32-pixel grid leaves 4 x 4
patches, and on the real chest pool the model learned a template on it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from osteolib.models.backbones import backbone_spec, create_backbone
from osteolib.models.patches import (
    masked_patch_loss,
    num_visible,
    patchify,
    reconstruct_in_eval_mode,
    sample_patch_mask,
    unpatchify,
)
from osteolib.models.registry import register_model
from osteolib.utils import size_pair


@register_model("masked_cnn", encoder_prefix="encoder.", pretraining_keys=("decoder.", "mask_token"))
class MaskedCNN(nn.Module):
    """A ``create_backbone`` CNN with a SimMIM head: ``forward(imgs, ...) -> (loss, pred, mask)``.

    ``pred`` (B, L, p*p*C) holds the predicted pixels of every patch (standardised per patch when
    ``norm_pix_loss``), ``mask`` (B, L) is 1 where a patch was hidden; the loss (``"l1"``, SimMIM's
    choice, or ``"l2"``) covers hidden patches only.
    """

    def __init__(
        self,
        backbone_name: str = "densenet121",
        img_size: int | tuple[int, int] = 128,
        patch_size: int = 32,
        mask_ratio: float = 0.6,
        in_chans: int = 1,
        norm_pix_loss: bool = True,
        loss: str = "l1",
        mask_token: str = "learned",
    ) -> None:
        super().__init__()
        spec = backbone_spec(backbone_name)
        if spec.family != "cnn":
            raise ValueError(
                f"MaskedCNN needs a CNN backbone, {backbone_name!r} is a {spec.family}; use MaskedAutoencoderViT"
            )
        height, width = size_pair(img_size, "img_size")
        if height % patch_size or width % patch_size:
            raise ValueError(f"MaskedCNN: img_size {img_size} is not a multiple of patch_size {patch_size}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"MaskedCNN: mask_ratio must be in (0, 1), got {mask_ratio}")
        if loss not in ("l1", "l2"):
            raise ValueError(f"MaskedCNN: loss must be 'l1' or 'l2', got {loss!r}")
        if mask_token not in ("learned", "zero"):
            raise ValueError(f"MaskedCNN: mask_token must be 'learned' or 'zero', got {mask_token!r}")
        self.config: dict[str, Any] = dict(
            backbone_name=backbone_name, img_size=img_size, patch_size=patch_size, mask_ratio=mask_ratio,
            in_chans=in_chans, norm_pix_loss=norm_pix_loss, loss=loss, mask_token=mask_token,
        )
        self.backbone_name = backbone_name
        self.img_size = (height, width)
        self.patch_size = patch_size
        self.grid_size = (height // patch_size, width // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        num_visible(self.num_patches, mask_ratio)  # refuses a grid too small to hide anything
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.loss_type = loss

        self.encoder = create_backbone(backbone_name, num_classes=0, in_chans=in_chans, img_size=img_size)
        self.stride = int(self.encoder.feature_info[-1]["reduction"])
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"MaskedCNN: img_size {img_size} must be a multiple of {backbone_name}'s output stride {self.stride}"
            )
        token = torch.zeros(1, in_chans, 1, 1)
        if mask_token == "learned":
            self.mask_token = nn.Parameter(token)  # starts at 0 (the mean of standardised inputs)
        else:
            self.register_buffer("mask_token", token, persistent=False)
        self.decoder = nn.Sequential(
            nn.Conv2d(self.encoder.num_features, self.stride * self.stride * in_chans, kernel_size=1),
            nn.PixelShuffle(self.stride),
        )

    def backbone_kwargs(self) -> dict[str, Any]:
        """Arguments for ``create_backbone(backbone_name, ...)`` that give a CNN this encoder loads into."""
        return dict(img_size=self.config["img_size"], in_chans=self.in_chans)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches, self.patch_size, self.grid_size, self.in_chans)

    def mask_image(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace the hidden patches (``mask`` (B, L) == 1) of ``imgs`` by the mask token."""
        pixel_mask = mask.reshape(-1, 1, *self.grid_size).to(imgs.dtype)
        pixel_mask = pixel_mask.repeat_interleave(self.patch_size, dim=2).repeat_interleave(self.patch_size, dim=3)
        return imgs * (1 - pixel_mask) + self.mask_token.to(imgs.dtype) * pixel_mask

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        mask_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pretraining step: ``(loss, pred, mask)``; the loss covers hidden patches only."""
        expected = (self.in_chans, *self.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(
                f"MaskedCNN expects images (B, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(imgs.shape)}"
            )
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1) for a pretraining step, got {ratio}")
        patch_mask = sample_patch_mask(
            imgs.shape[0], self.num_patches, ratio, mask_weights=mask_weights, generator=generator, device=imgs.device
        )
        features = self.encoder.forward_features(self.mask_image(imgs, patch_mask.mask))
        pred = self.patchify(self.decoder(features))
        loss = masked_patch_loss(pred, self.patchify(imgs), patch_mask.mask, self.norm_pix_loss, self.loss_type)
        return loss, pred, patch_mask.mask

    def reconstruct(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        mask_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Figure panels (see ``patches.reconstruction_panels``) plus ``loss``, computed in eval mode."""
        return reconstruct_in_eval_mode(self, imgs, mask_ratio, mask_weights, generator)


class MaskedDenseNet(MaskedCNN):
    """:class:`MaskedCNN` on DenseNet121, the study's CNN (checkpoints record ``MaskedCNN`` arguments)."""

    def __init__(
        self, img_size: int | tuple[int, int] = 128, patch_size: int = 32, mask_ratio: float = 0.6, **kw: Any
    ) -> None:
        super().__init__("densenet121", img_size=img_size, patch_size=patch_size, mask_ratio=mask_ratio, **kw)
