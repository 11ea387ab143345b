"""Augmentations for training: crop policies, flips, rotation targets, fine-tuning RandAugment.

Every transform takes and returns a :class:`Sample` (the image, its expert/evidence region mask if
any, and the target), so geometric steps move the region together with the image and a
self-supervised step (rotation prediction) can set the target. Images are uint8 tensors (C,H,W)
throughout (RandAugment works on uint8; normalisation to float happens once, in the dataset).

Randomness comes only from torch's global generator. The dataset (``osteolib.data``) seeds it per
item inside ``torch.random.fork_rng``, so an item's augmentation is a pure function of
(run seed, epoch, item) whatever the number of loader workers, and resuming a run replays it.

Crop policies (the second stage of the study):

* ``"random"``: :class:`RandomResizedCropPolicy`, area scale 0.5-1.0 as in the study;
* ``"center"``: :class:`CenterRegionCropPolicy`, crops centred on the region's bounding box (the
  image centre when the image has no region) that always contain the whole box;
* ``"none"``: :class:`ResizePolicy`, the whole image resized.

:func:`patch_weights` turns the cropped region into per-patch weights so a masking model can bias
its masks toward the region.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

__all__ = [
    "Sample",
    "CropBox",
    "Chain",
    "RandomResizedCropPolicy",
    "CenterRegionCropPolicy",
    "ResizePolicy",
    "RandomHorizontalFlip",
    "RotationTargets",
    "RandAugmentImage",
    "crop_policy",
    "finetune_transform",
    "region_bbox",
    "patch_weights",
    "CROP_POLICIES",
]

CROP_POLICIES = ("random", "center", "none")


@dataclass
class Sample:
    """One training item on its way through the transforms.

    ``image``: uint8 (C,H,W); ``region``: uint8 (1,H,W) 0/1 mask on the same grid, or None when the
    image has no expert region; ``target``: class index (or whatever the task predicts).
    """

    image: torch.Tensor
    region: torch.Tensor | None = None
    target: Any = 0


@dataclass(frozen=True)
class CropBox:
    """A crop window in pixel coordinates of the image it was sampled for."""

    top: int
    left: int
    height: int
    width: int

    def contains(self, other: "CropBox") -> bool:
        return (self.top <= other.top and self.left <= other.left
                and other.top + other.height <= self.top + self.height
                and other.left + other.width <= self.left + self.width)


Transform = Callable[[Sample], Sample]


class Chain:
    """Apply transforms one after the other (a Compose for :class:`Sample`)."""

    def __init__(self, steps: Sequence[Transform]):
        self.steps = list(steps)

    def __call__(self, sample: Sample) -> Sample:
        for step in self.steps:
            sample = step(sample)
        return sample

    def __repr__(self) -> str:
        return f"Chain({self.steps!r})"


def _check_size(size: int) -> int:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"crop size must be a positive int (pixels), got {size!r}")
    return size


def _check_range(name: str, values: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    a, b = float(values[0]), float(values[1])
    if not (low < a <= b <= high):
        raise ValueError(f"{name} must be (min, max) with {low} < min <= max <= {high}, got {values!r}")
    return a, b


def _crop_and_resize(sample: Sample, box: CropBox, size: int) -> Sample:
    image = TF.resized_crop(sample.image, box.top, box.left, box.height, box.width, [size, size],
                            interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    region = sample.region
    if region is not None:
        # Nearest keeps the mask binary; a region must stay a set of pixels, not a blur.
        region = TF.resized_crop(region, box.top, box.left, box.height, box.width, [size, size],
                                 interpolation=T.InterpolationMode.NEAREST_EXACT)
    return replace(sample, image=image, region=region)


def _sample_area_and_ratio(height: int, width: int, scale: tuple[float, float],
                           ratio: tuple[float, float]) -> tuple[int, int]:
    """A (crop height, crop width) with area fraction ~ U(scale) and log-uniform aspect ratio."""
    area = height * width * float(torch.empty(()).uniform_(scale[0], scale[1]))
    log_r = torch.empty(()).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = float(torch.exp(log_r))  # width / height
    crop_w = int(round(math.sqrt(area * aspect)))
    crop_h = int(round(math.sqrt(area / aspect)))
    return crop_h, crop_w


class RandomResizedCropPolicy:
    """Random crop covering ``scale`` of the image area (aspect ratio in ``ratio``), resized to ``size``.

    The study's policy: scale (0.5, 1.0). Draws that do not fit inside the image are retried (ten
    times) before falling back to the largest centred crop with a clamped aspect ratio.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size = _check_size(size)
        self.scale = _check_range("scale", scale, 0.0, 1.0)
        self.ratio = _check_range("ratio", ratio, 0.0, math.inf)

    def sample_box(self, height: int, width: int) -> CropBox:
        for _ in range(10):
            crop_h, crop_w = _sample_area_and_ratio(height, width, self.scale, self.ratio)
            if 0 < crop_h <= height and 0 < crop_w <= width:
                top = int(torch.randint(0, height - crop_h + 1, ()))
                left = int(torch.randint(0, width - crop_w + 1, ()))
                return CropBox(top, left, crop_h, crop_w)
        # Fallback: the whole image, trimmed to the nearest allowed aspect ratio.
        aspect = width / height
        if aspect < self.ratio[0]:
            crop_w, crop_h = width, int(round(width / self.ratio[0]))
        elif aspect > self.ratio[1]:
            crop_h, crop_w = height, int(round(height * self.ratio[1]))
        else:
            crop_h, crop_w = height, width
        return CropBox((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w)

    def __call__(self, sample: Sample) -> Sample:
        _, height, width = sample.image.shape
        return _crop_and_resize(sample, self.sample_box(height, width), self.size)

    def __repr__(self) -> str:
        return f"RandomResizedCropPolicy(size={self.size}, scale={self.scale}, ratio={self.ratio})"


def region_bbox(region: torch.Tensor | None) -> CropBox | None:
    """Bounding box of the nonzero pixels of a (1,H,W) or (H,W) mask; None when empty or absent."""
    if region is None:
        return None
    mask = region.reshape(region.shape[-2], region.shape[-1]) > 0
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1
    return CropBox(top, left, bottom - top, right - left)


class CenterRegionCropPolicy:
    """Crops centred on the image's region (its bounding box), or on the image centre without one.

    The crop area is drawn like the random policy (``scale``, ``ratio``) but grown where needed so the
    whole region box fits; its centre is the box centre shifted by up to ``jitter`` x crop size, then
    clamped so the box stays inside the crop. With no region the crop is centred on the image centre
    (± jitter): the study's "center" policy.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), jitter: float = 0.1):
        self.size = _check_size(size)
        self.scale = _check_range("scale", scale, 0.0, 1.0)
        self.ratio = _check_range("ratio", ratio, 0.0, math.inf)
        if not 0.0 <= jitter <= 0.5:
            raise ValueError(f"jitter is a fraction of the crop size in [0, 0.5], got {jitter!r}")
        self.jitter = float(jitter)

    def sample_box(self, height: int, width: int, region: torch.Tensor | None = None) -> CropBox:
        target = region_bbox(region)
        if target is None:
            target = CropBox(height // 2, width // 2, 1, 1) if height > 1 and width > 1 else CropBox(0, 0, 1, 1)
        crop_h, crop_w = _sample_area_and_ratio(height, width, self.scale, self.ratio)
        crop_h = min(height, max(crop_h, target.height, 1))
        crop_w = min(width, max(crop_w, target.width, 1))
        shift = torch.empty(2).uniform_(-self.jitter, self.jitter)
        centre_y = target.top + target.height / 2 + float(shift[0]) * crop_h
        centre_x = target.left + target.width / 2 + float(shift[1]) * crop_w
        top = _clamp(int(round(centre_y - crop_h / 2)),
                     max(0, target.top + target.height - crop_h), min(target.top, height - crop_h))
        left = _clamp(int(round(centre_x - crop_w / 2)),
                      max(0, target.left + target.width - crop_w), min(target.left, width - crop_w))
        return CropBox(top, left, crop_h, crop_w)

    def __call__(self, sample: Sample) -> Sample:
        _, height, width = sample.image.shape
        return _crop_and_resize(sample, self.sample_box(height, width, sample.region), self.size)

    def __repr__(self) -> str:
        return (f"CenterRegionCropPolicy(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"jitter={self.jitter})")


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


class ResizePolicy:
    """No crop: the whole image resized to ``size`` (a no-op when it already has that size)."""

    def __init__(self, size: int):
        self.size = _check_size(size)

    def __call__(self, sample: Sample) -> Sample:
        _, height, width = sample.image.shape
        if height == self.size and width == self.size:
            return sample
        return _crop_and_resize(sample, CropBox(0, 0, height, width), self.size)

    def __repr__(self) -> str:
        return f"ResizePolicy(size={self.size})"


class RandomHorizontalFlip:
    """Mirror image and region left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(())) >= self.p:
            return sample
        region = None if sample.region is None else sample.region.flip(-1)
        return replace(sample, image=sample.image.flip(-1), region=region)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RotationTargets:
    """Self-supervised rotation prediction: rotate by k x 90 degrees (k uniform in 0..3), target = k.

    Rotation is counter-clockwise in the image plane (``torch.rot90`` over the last two axes);
    :meth:`rotate` with ``-k`` undoes it. The region rotates with the image.
    """

    n_classes = 4

    @staticmethod
    def rotate(image: torch.Tensor, k: int) -> torch.Tensor:
        return torch.rot90(image, k=int(k), dims=(-2, -1))

    def __call__(self, sample: Sample) -> Sample:
        k = int(torch.randint(0, 4, ()))
        region = None if sample.region is None else self.rotate(sample.region, k)
        return replace(sample, image=self.rotate(sample.image, k), region=region, target=k)

    def __repr__(self) -> str:
        return "RotationTargets()"


class RandAugmentImage:
    """torchvision's RandAugment on the image only (uint8), for fine-tuning (the study: magnitude 6).

    The region is left as is: photometric ops do not move it, and the geometric ones are small;
    regions matter at explanation time, which uses no augmentation.
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 6):
        self.num_ops, self.magnitude = int(num_ops), int(magnitude)
        self._op = T.RandAugment(num_ops=self.num_ops, magnitude=self.magnitude)

    def __call__(self, sample: Sample) -> Sample:
        if sample.image.dtype != torch.uint8:
            raise TypeError(f"RandAugmentImage needs a uint8 image, got {sample.image.dtype}")
        return replace(sample, image=self._op(sample.image))

    def __repr__(self) -> str:
        return f"RandAugmentImage(num_ops={self.num_ops}, magnitude={self.magnitude})"


def crop_policy(name: str, size: int, scale: tuple[float, float] = (0.5, 1.0), **kwargs: Any) -> Transform:
    """The crop policy called ``name``: "random" | "center" | "none" (extra kwargs go to its class)."""
    if name == "random":
        return RandomResizedCropPolicy(size, scale=scale, **kwargs)
    if name == "center":
        return CenterRegionCropPolicy(size, scale=scale, **kwargs)
    if name == "none":
        return ResizePolicy(size)
    raise ValueError(f"unknown crop policy {name!r}; choose one of {CROP_POLICIES}")


def finetune_transform(size: int, crop: str = "random", scale: tuple[float, float] = (0.5, 1.0),
                       flip: bool = True, magnitude: int | None = 6, num_ops: int = 2) -> Chain:
    """The study's fine-tuning augmentation: crop policy (scale 0.5-1.0), flip, RandAugment(magnitude 6).

    ``magnitude=None`` leaves RandAugment out.
    """
    steps: list[Transform] = [crop_policy(crop, size, scale=scale)]
    if flip:
        steps.append(RandomHorizontalFlip())
    if magnitude is not None:
        steps.append(RandAugmentImage(num_ops=num_ops, magnitude=magnitude))
    return Chain(steps)


def patch_weights(region: torch.Tensor, patch_size: int, bias: float) -> torch.Tensor:
    """Per-patch masking weights that favour patches covering the region.

    ``region``: (H,W), (1,H,W) -> (L,) or (N,1,H,W) -> (N,L), with L = (H/p)*(W/p) patches in
    row-major order (the ViT patch order). Weight = 1 + bias x (fraction of the patch inside the
    region), rescaled to mean 1 per image, so ``bias=0`` (or an empty region) gives uniform weights
    and a larger bias concentrates masking on the region.
    """
    if bias < 0:
        raise ValueError(f"region masking bias must be >= 0, got {bias!r}")
    if region.dim() == 2:
        batch, squeeze = region[None, None], True
    elif region.dim() == 3:
        batch, squeeze = region[None], True
    elif region.dim() == 4:
        batch, squeeze = region, False
    else:
        raise ValueError(f"region must be (H,W), (1,H,W) or (N,1,H,W), got shape {tuple(region.shape)}")
    height, width = batch.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"region size {height}x{width} is not a multiple of patch_size={patch_size}")
    coverage = F.avg_pool2d((batch > 0).float(), kernel_size=patch_size, stride=patch_size)
    weights = 1.0 + float(bias) * coverage.flatten(1)
    weights = weights / weights.mean(dim=1, keepdim=True)
    return weights[0] if squeeze else weights
