"""Row 2: masked-image pretraining of DenseNet121 (SimMIM-style, the study's 16-px grid and mask 0.6) through
``fit`` from the cache, vs plain SimMIM on timm's DenseNet121 in an fp32 loop over the PNGs. No goal was set for
this row in issue 22: it is shown, not judged."""
from __future__ import annotations

from osteolib.data import Chain, RandomHorizontalFlip, crop_policy
from osteolib.stages.pretrain import PretrainConfig, build_model

from bench.fit_path import measure_fit
from bench.plain_training import measure_plain
from bench.plan import Plan
from bench.reference.images import mae_transform
from bench.reference.simmim import PlainSimMIM

MASK_RATIO, PATCH = 0.6, 16


def plans(ctx) -> list[Plan]:
    batch = ctx.settings.batch_for(PretrainConfig.batch_size)
    size = ctx.settings.image_size
    config = PretrainConfig(scenario="chest_mae", backbone="densenet121", image_size=size, patch_size=PATCH,
                            mask_ratio=MASK_RATIO, batch_size=batch, epochs=2, warmup_epochs=0)

    def ours():
        cache, ids = ctx.training_cache()
        transform = Chain([crop_policy(config.crop_mode, size, scale=config.crop_scale), RandomHorizontalFlip()])
        return measure_fit(build_model(config), cache, ids, transform, config.train_config(), ctx.clock())

    def theirs():
        return measure_plain(PlainSimMIM(img_size=size, patch_size=PATCH), ctx, mae_transform(size), batch,
                             lambda model, images, _: model(images, mask_ratio=MASK_RATIO),
                             peak_lr=config.base_lr * batch / 256, betas=(0.9, 0.95),
                             path="bench.reference.loop + bench.reference.simmim")

    return [Plan("masked_cnn", f"masked DenseNet121 mask {MASK_RATIO}", "images/s", ours, theirs,
                 ctx.training_settings(batch, mask_ratio=MASK_RATIO, mask_grid=PATCH))]
