"""Row 1: MAE pretraining of ViT-S/16 at mask ratios 0.9 (the study's) and 0.75 (the paper's): the study's model
and transforms through ``fit`` from the cache, in the precision ``auto`` picks, vs the official MAE model and recipe
in a plain fp32 loop over the PNGs. With compiling on, a third row trains mask 0.75 through ``fit`` with
``torch.compile`` (its compilation in ``first_step_seconds``) beside the same plain figure.
"""
from __future__ import annotations

from osteolib.data import Chain, RandomHorizontalFlip, crop_policy
from osteolib.stages.pretrain import PretrainConfig, build_model

from bench.fit_path import measure_fit
from bench.goals import goal
from bench.plain_training import measure_plain
from bench.plan import Plan
from bench.reference.images import mae_transform
from bench.reference.mae import PlainMAE
from bench.timing import once

MASK_RATIOS = (0.9, 0.75)
COMPILED_MASK_RATIO = 0.75
PATCH = 16


def _config(ctx, mask_ratio: float, batch: int) -> PretrainConfig:
    return PretrainConfig(scenario="chest_mae", backbone="vit_small", image_size=ctx.settings.image_size,
                          patch_size=PATCH, mask_ratio=mask_ratio, batch_size=batch, epochs=2, warmup_epochs=0)


def _ours(ctx, mask_ratio: float, batch: int, compile: bool = False):
    def side():
        config = _config(ctx, mask_ratio, batch)
        cache, ids = ctx.training_cache()
        transform = Chain([crop_policy(config.crop_mode, config.image_size, scale=config.crop_scale),
                           RandomHorizontalFlip()])
        return measure_fit(build_model(config), cache, ids, transform, config.train_config(), ctx.clock(),
                           compile=compile)
    return side


def _theirs(ctx, mask_ratio: float, batch: int):
    def side():
        size = ctx.settings.image_size
        return measure_plain(PlainMAE(img_size=size, patch_size=PATCH), ctx, mae_transform(size), batch,
                             lambda model, images, _: model(images, mask_ratio=mask_ratio)[0],
                             peak_lr=_config(ctx, mask_ratio, batch).base_lr * batch / 256, betas=(0.9, 0.95),
                             path="bench.reference.loop + bench.reference.mae (official MAE shape)")
    return once(side)


def plans(ctx) -> list[Plan]:
    batch = ctx.settings.batch_for(PretrainConfig.batch_size)
    out, references = [], {}
    for mask_ratio in MASK_RATIOS:
        references[mask_ratio] = _theirs(ctx, mask_ratio, batch)
        out.append(Plan("mae", f"MAE ViT-S/16 mask {mask_ratio}", "images/s", _ours(ctx, mask_ratio, batch),
                        references[mask_ratio], ctx.training_settings(batch, mask_ratio=mask_ratio),
                        goal=goal("mae", ctx.tier)))
    if ctx.settings.use_compile:
        out.append(Plan("mae", f"MAE ViT-S/16 mask {COMPILED_MASK_RATIO} + torch.compile", "images/s",
                        _ours(ctx, COMPILED_MASK_RATIO, batch, compile=True), references[COMPILED_MASK_RATIO],
                        ctx.training_settings(batch, mask_ratio=COMPILED_MASK_RATIO, torch_compile=True),
                        goal=goal("mae", ctx.tier),
                        goal_note="reference: the plain uncompiled loop of the row above (measured once)"))
    return out
