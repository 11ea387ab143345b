"""PNG files through PIL and torchvision transforms into a torch DataLoader: the plain way to feed a model.

Each item is decoded from its file every time it is drawn (``Image.open(...).convert("L")``), cropped, flipped and,
for fine-tuning, RandAugmented on the PIL image, then made a normalised (1, S, S) float tensor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

MEAN, STD = (0.5,), (0.25,)  # a plain user's normalisation of 8-bit grey X-rays


class PngImages(Dataset):
    def __init__(self, files: Sequence[Path], targets: Sequence[int], transform: Callable):
        self.files, self.targets, self.transform = list(files), list(targets), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[index]) as image:
            image = image.convert("L")
        return self.transform(image), self.targets[index]


def mae_transform(size: int) -> Callable:
    """The official MAE pretraining augmentation (``main_pretrain.py``)."""
    return T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def finetune_transform(size: int) -> Callable:
    """The study's fine-tuning augmentation written with torchvision: crop (area 0.5-1), flip, RandAugment(2, 6)."""
    return T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0)), T.RandomHorizontalFlip(),
                      T.RandAugment(num_ops=2, magnitude=6), T.ToTensor(), T.Normalize(MEAN, STD)])


def png_loader(files: Sequence[Path], targets: Sequence[int], transform: Callable, batch_size: int,
               num_workers: int, device: torch.device) -> DataLoader:
    return DataLoader(PngImages(files, targets, transform), batch_size=batch_size, shuffle=True, drop_last=True,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=num_workers > 0)
