"""pytorch-grad-cam as its tutorials use it: one CAM object, then one call per image (``targets=None``: the
predicted class), with the ViT tutorial's ``reshape_transform`` for token outputs."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, HiResCAM, LayerCAM
from torch import nn

METHODS = {"gradcam": GradCAM, "hirescam": HiResCAM, "layercam": LayerCAM}


def vit_reshape_transform(height: int, width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The tutorial's: drop the class token, tokens to a (N, D, h, w) map."""
    def reshape(tensor: torch.Tensor) -> torch.Tensor:
        result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)
    return reshape


def cams_one_at_a_time(model: nn.Module, images: torch.Tensor, method: str, target_layers: Sequence[nn.Module],
                       reshape_transform: Callable | None = None) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    maps = []
    with METHODS[method](model=model, target_layers=list(target_layers), reshape_transform=reshape_transform) as cam:
        for image in images:
            maps.append(cam(input_tensor=image[None].to(device), targets=None))
    return np.concatenate(maps)
