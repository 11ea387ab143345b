"""Row 3: fine-tuning DenseNet121 and ViT-S/16 with the study's augmentation (crop of area 0.5-1, flip,
RandAugment(2, 6)) and recipe (:class:`~osteolib.stages.finetune_config.FinetuneConfig`'s defaults: layer decay,
drop path for the ViT, the soft cross-entropy) through ``fit`` reading the cache, in the precision ``auto`` picks,
vs a plain timm model in an fp32 loop reading the PNGs with torchvision transforms. Labels alternate 0/1 (they do
not change the work). With compiling on, ViT-S is also trained through ``fit`` with ``torch.compile``.
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from osteolib.data import finetune_transform
from osteolib.models import create_backbone
from osteolib.stages.finetune import soft_cross_entropy
from osteolib.stages.finetune_config import FinetuneConfig
from osteolib.stages.finetune_inputs import use_stage_layer_decay

from bench.fit_path import measure_fit
from bench.goals import goal
from bench.plain_training import measure_plain
from bench.plan import Plan
from bench.reference.images import finetune_transform as plain_finetune_transform
from bench.timing import once

BACKBONES = ("densenet121", "vit_small")
COMPILED_BACKBONE = "vit_small"
TIMM_NAMES = {"densenet121": "densenet121", "vit_small": "vit_small_patch16_224"}
PATCH = 16


def finetune_config(ctx, backbone: str, batch: int, precision: str = "auto") -> FinetuneConfig:
    return FinetuneConfig(scenario="random", backbone=backbone, image_size=ctx.settings.image_size, patch_size=PATCH
                          if backbone == "vit_small" else None, batch_size=batch, epochs=2, warmup_epochs=0,
                          precision=precision)


def osteolib_classifier(config: FinetuneConfig) -> torch.nn.Module:
    """The classifier the fine-tuning stage builds for a random start (seeded, stage-wise layer decay)."""
    torch.manual_seed(config.seed)
    extra = {"patch_size": config.patch_size, "drop_path_rate": config.drop_path} if config.is_vit else {}
    model = create_backbone(config.backbone, num_classes=2, img_size=config.image_size, **extra)
    return use_stage_layer_decay(model) if config.layer_decay not in (None, 1.0) else model


def measure_osteolib(ctx, config: FinetuneConfig, compile: bool = False):
    cache, ids = ctx.training_cache()
    transform = finetune_transform(config.image_size, crop="random", scale=config.crop_scale, flip=config.hflip,
                                   magnitude=config.randaug_magnitude)
    return measure_fit(osteolib_classifier(config), cache, ids, transform, config.train_config(), ctx.clock(),
                       loss_func=soft_cross_entropy, targets=[i % 2 for i in range(len(ids))], compile=compile)


def _theirs(ctx, backbone: str, batch: int):
    def side():
        config = finetune_config(ctx, backbone, batch)
        torch.manual_seed(0)
        extra = ({"img_size": config.image_size, "patch_size": PATCH, "drop_path_rate": config.drop_path}
                 if backbone == "vit_small" else {})
        model = timm.create_model(TIMM_NAMES[backbone], pretrained=False, num_classes=2, in_chans=1, **extra)
        files = ctx.training_sources().files
        return measure_plain(model, ctx, plain_finetune_transform(config.image_size), batch,
                             lambda m, images, targets: F.cross_entropy(m(images), targets),
                             peak_lr=config.base_lr * batch / 256, betas=(0.9, 0.999),
                             targets=[i % 2 for i in range(len(files))],
                             path=f"bench.reference.loop + timm.create_model({TIMM_NAMES[backbone]!r})")
    return once(side)


def plans(ctx) -> list[Plan]:
    batch = ctx.settings.batch_for(FinetuneConfig.batch_size)
    out, references = [], {}
    for backbone in BACKBONES:
        references[backbone] = _theirs(ctx, backbone, batch)
        out.append(Plan("finetune", f"fine-tune {backbone}", "images/s",
                        lambda b=backbone: measure_osteolib(ctx, finetune_config(ctx, b, batch)),
                        references[backbone], ctx.training_settings(batch, backbone=backbone),
                        goal=goal("finetune", ctx.tier)))
    if ctx.settings.use_compile:
        out.append(Plan("finetune", f"fine-tune {COMPILED_BACKBONE} + torch.compile", "images/s",
                        lambda: measure_osteolib(ctx, finetune_config(ctx, COMPILED_BACKBONE, batch), compile=True),
                        references[COMPILED_BACKBONE],
                        ctx.training_settings(batch, backbone=COMPILED_BACKBONE, torch_compile=True),
                        goal=goal("finetune", ctx.tier),
                        goal_note="reference: the plain uncompiled loop of the row above (measured once)"))
    return out
