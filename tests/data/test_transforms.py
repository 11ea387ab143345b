"""Crop policies, flips, rotation targets, RandAugment and patch weights (osteolib.data.transforms)."""
from __future__ import annotations

import math

import pytest
import torch

from osteolib.data import (
    CenterRegionCropPolicy,
    CropBox,
    RandomHorizontalFlip,
    RandomResizedCropPolicy,
    ResizePolicy,
    RotationTargets,
    Sample,
    crop_policy,
    finetune_transform,
    patch_weights,
    region_bbox,
)


def _image(height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, height, width), dtype=torch.uint8, generator=generator)


def _region(height: int, width: int, top: int, left: int, h: int, w: int) -> torch.Tensor:
    region = torch.zeros((1, height, width), dtype=torch.uint8)
    region[:, top:top + h, left:left + w] = 1
    return region


def test_random_crop_scale_ratio_and_output_size():
    torch.manual_seed(0)
    policy = RandomResizedCropPolicy(32, scale=(0.5, 1.0))
    areas = []
    for _ in range(300):
        box = policy.sample_box(48, 64)
        assert 0 <= box.top and box.top + box.height <= 48 and 0 <= box.left and box.left + box.width <= 64
        fraction = box.height * box.width / (48 * 64)
        areas.append(fraction)
        # rounding the sides to whole pixels moves the area by at most a few percent
        assert 0.5 - 0.04 <= fraction <= 1.0
        assert 3 / 4 - 0.06 <= box.width / box.height <= 4 / 3 + 0.06
    # the draws spread over the range rather than collapsing to the fallback crop
    assert min(areas) < 0.6 and max(areas) > 0.85
    out = policy(Sample(_image(), _region(48, 64, 10, 10, 8, 8), 1))
    assert out.image.shape == (1, 32, 32) and out.image.dtype == torch.uint8
    assert out.region.shape == (1, 32, 32) and set(out.region.unique().tolist()) <= {0, 1}
    assert out.target == 1


@pytest.mark.parametrize("box", [(5, 6, 10, 12), (0, 0, 6, 6), (40, 50, 8, 14), (2, 3, 44, 58)])
def test_center_crop_contains_the_region(box):
    torch.manual_seed(1)
    policy = CenterRegionCropPolicy(32, scale=(0.5, 1.0), jitter=0.25)
    region = _region(48, 64, *box)
    expected = CropBox(*box)
    assert region_bbox(region) == expected
    for _ in range(100):
        crop = policy.sample_box(48, 64, region)
        assert crop.contains(expected), (crop, expected)
        assert 0 <= crop.top and crop.top + crop.height <= 48 and 0 <= crop.left and crop.left + crop.width <= 64
    out = policy(Sample(_image(), region))
    # the whole region survives the crop (resizing keeps it non-empty and inside the frame)
    assert out.image.shape == (1, 32, 32) and out.region.sum() > 0


def test_center_crop_without_region_is_centred_on_the_image():
    torch.manual_seed(2)
    policy = CenterRegionCropPolicy(24, scale=(0.5, 0.5), ratio=(1.0, 1.0), jitter=0.1)
    for _ in range(50):
        crop = policy.sample_box(40, 40, None)
        centre_y, centre_x = crop.top + crop.height / 2, crop.left + crop.width / 2
        assert abs(centre_y - 20) <= 0.1 * crop.height + 1 and abs(centre_x - 20) <= 0.1 * crop.width + 1
    # an all-zero mask counts as no region
    assert region_bbox(torch.zeros((1, 40, 40), dtype=torch.uint8)) is None


def test_crop_moves_region_with_image():
    # the region marks exactly the bright pixels; after a crop they must still coincide
    image = torch.zeros((1, 64, 64), dtype=torch.uint8)
    image[:, 20:40, 24:44] = 255
    region = (image > 0).to(torch.uint8)
    torch.manual_seed(3)
    for policy in (crop_policy("center", 32, jitter=0.2), crop_policy("random", 32), RandomHorizontalFlip(p=1.0)):
        out = policy(Sample(image, region))
        bright = out.image[0] > 127
        agreement = (bright == (out.region[0] > 0)).float().mean()
        assert agreement > 0.97, policy


def test_crop_policy_factory_and_bad_arguments():
    assert isinstance(crop_policy("random", 16), RandomResizedCropPolicy)
    assert isinstance(crop_policy("center", 16), CenterRegionCropPolicy)
    assert isinstance(crop_policy("none", 16), ResizePolicy)
    with pytest.raises(ValueError, match="unknown crop policy 'zoom'"):
        crop_policy("zoom", 16)
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCropPolicy(16, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="jitter"):
        CenterRegionCropPolicy(16, jitter=0.9)
    resized = crop_policy("none", 16)(Sample(_image(32, 32)))
    assert resized.image.shape == (1, 16, 16)


def test_rotation_targets_rotating_back_recovers_input():
    torch.manual_seed(4)
    image = _image(32, 32)
    region = _region(32, 32, 2, 5, 6, 9)
    rotation = RotationTargets()
    seen = set()
    for _ in range(40):
        out = rotation(Sample(image, region, target=99))
        k = out.target
        seen.add(k)
        assert torch.equal(RotationTargets.rotate(out.image, -k), image)
        assert torch.equal(RotationTargets.rotate(out.region, -k), region)
        if k % 2:
            assert not torch.equal(out.image, image)
    assert seen == {0, 1, 2, 3}
    # k=1 is a counter-clockwise quarter turn: the top row becomes the left column, reversed
    assert torch.equal(RotationTargets.rotate(image, 1)[0, :, 0], image[0, 0, :].flip(0))


def test_finetune_transform_is_seeded_and_keeps_uint8():
    transform = finetune_transform(24, crop="random", magnitude=6)
    sample = Sample(_image(32, 32), _region(32, 32, 4, 4, 8, 8), 1)
    outputs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outputs.append(transform(sample))
    assert torch.equal(outputs[0].image, outputs[1].image) and torch.equal(outputs[0].region, outputs[1].region)
    assert not torch.equal(outputs[0].image, outputs[2].image)
    assert outputs[0].image.dtype == torch.uint8 and outputs[0].image.shape == (1, 24, 24)


def test_patch_weights_concentrate_on_the_region():
    region = torch.zeros((32, 32), dtype=torch.uint8)
    region[0:8, 8:16] = 1  # exactly patch (row 0, col 1) of an 8-pixel grid
    weights = patch_weights(region, patch_size=8, bias=4.0)
    assert weights.shape == (16,)
    assert math.isclose(float(weights.mean()), 1.0, rel_tol=1e-6)
    assert int(weights.argmax()) == 1
    assert float(weights[1]) == pytest.approx(5.0 * float(weights[0]))
    assert torch.allclose(patch_weights(region, 8, 0.0), torch.ones(16))
    batch = torch.stack([region[None], torch.zeros((1, 32, 32), dtype=torch.uint8)])
    batched = patch_weights(batch, 8, 4.0)
    assert batched.shape == (2, 16) and torch.allclose(batched[0], weights) and torch.allclose(batched[1], torch.ones(16))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patch_weights(torch.zeros((30, 30)), 8, 1.0)
