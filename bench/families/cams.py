"""Row 4: Grad-CAM, HiResCAM and LayerCAM on DenseNet121 and ViT-S/16: osteolib's batched path
(:func:`osteolib.explain.compute_cams`, its default batch of 16) vs pytorch-grad-cam called one image at a time.

Both sides explain the same untrained model (its weights do not change the work) at the layer the study uses for
it (DenseNet121: ``features.norm5``; ViT-S: ``blocks[-1].norm1`` with the tokens reshaped to the patch grid), for
each image's predicted class, in fp32. Each side is warmed up on two images before it is timed.
"""
from __future__ import annotations

import torch

from osteolib.data import XrayDataset, crop_policy
from osteolib.explain import compute_cams
from osteolib.models import create_backbone

from bench.goals import goal
from bench.plan import Plan
from bench.reference.gradcam import cams_one_at_a_time, vit_reshape_transform
from bench.timing import timed

ARCHITECTURES = ("densenet121", "vit_small")
METHODS = ("gradcam", "hirescam", "layercam")
FULL_IMAGES, QUICK_IMAGES = 32, 4
BATCH = 16  # compute_cams' default


def _model(arch: str, size: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"patch_size": 16} if arch == "vit_small" else {}
    return create_backbone(arch, num_classes=2, img_size=size, **extra).to(device).eval()


def _reference_layers(model: torch.nn.Module, arch: str, size: int):
    if arch == "vit_small":
        return [model.blocks[-1].norm1], vit_reshape_transform(size // 16, size // 16)
    return [model.features.norm5], None


def plans(ctx) -> list[Plan]:
    settings, device, size = ctx.settings, ctx.device, ctx.settings.image_size
    cache, ids = ctx.training_cache()
    count = min(settings.images or (QUICK_IMAGES if settings.quick else FULL_IMAGES), len(ids))
    dataset = XrayDataset(cache, ids[:count], transform=crop_policy("none", size))
    images = torch.stack([dataset[i][0] for i in range(count)])
    batch = min(BATCH, count)
    plans_out = []
    for arch in ARCHITECTURES:
        model = _model(arch, size, device)
        layers, reshape = _reference_layers(model, arch, size)
        for method in METHODS:
            def ours(model=model, method=method):
                compute_cams(model, images[:2], method, batch_size=batch)
                return timed(lambda: compute_cams(model, images, method, batch_size=batch), count, device,
                             path="osteolib.explain.compute_cams", batch_size=batch)

            def theirs(model=model, method=method, layers=layers, reshape=reshape):
                cams_one_at_a_time(model, images[:2], method, layers, reshape)
                return timed(lambda: cams_one_at_a_time(model, images, method, layers, reshape), count, device,
                             path="pytorch_grad_cam, one image per call", batch_size=1)

            plans_out.append(Plan("cams", f"{method} {arch}", "images/s", ours, theirs,
                                  settings={"images": count, "image_size": size, "architecture": arch,
                                            "method": method, "threads": ctx.threads, "device": str(device),
                                            "precision": "fp32", "images_from": ctx.training_sources().description},
                                  goal=goal("cams", ctx.tier)))
    return plans_out
