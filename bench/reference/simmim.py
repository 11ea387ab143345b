"""SimMIM (Xie et al. 2022) on timm's DenseNet121, written plainly: hidden patches of the input are replaced by a
learned mask value, the network's last feature map goes through a 1x1 convolution and a pixel shuffle back to the
image, and an L1 loss scores the hidden pixels only (the official ``simmim.py``'s shape, one input channel).
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn


class PlainSimMIM(nn.Module):
    def __init__(self, img_size: int = 128, patch_size: int = 16, in_chans: int = 1):
        super().__init__()
        self.encoder = timm.create_model("densenet121", pretrained=False, num_classes=0, in_chans=in_chans)
        self.stride = 32
        self.grid = img_size // patch_size
        self.patch_size = patch_size
        self.mask_token = nn.Parameter(torch.zeros(1, in_chans, 1, 1))
        self.decoder = nn.Sequential(nn.Conv2d(self.encoder.num_features, self.stride ** 2 * in_chans, 1),
                                     nn.PixelShuffle(self.stride))

    def forward(self, x: torch.Tensor, mask_ratio: float = 0.6) -> torch.Tensor:
        n = x.shape[0]
        patches = self.grid * self.grid
        hidden = torch.argsort(torch.rand(n, patches, device=x.device), dim=1)[:, :int(round(patches * mask_ratio))]
        mask = torch.zeros(n, patches, device=x.device).scatter_(1, hidden, 1.0).reshape(n, 1, self.grid, self.grid)
        mask = mask.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3)
        z = self.encoder.forward_features(x * (1 - mask) + self.mask_token * mask)
        reconstruction = self.decoder(z)
        loss = F.l1_loss(reconstruction, x, reduction="none")
        return (loss * mask).sum() / (mask.sum() + 1e-5) / x.shape[1]
