"""The training path (osteolib.engine) and its data loading (osteolib.data), on tiny models and images."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from fastai.metrics import accuracy
from torch import nn

import osteolib.engine.precision as precision_module
from osteolib.data import XrayDataset, make_dataloaders, patch_weights, split_targets
from osteolib.engine import (
    BEST,
    CHECKPOINT_LAST,
    FINAL,
    TrainConfig,
    choose_precision,
    fit,
    load_checkpoint,
    load_weights,
    lr_at_step,
    model_loss,
    param_groups,
)
from osteolib.data import crop_policy, finetune_transform

N_IMAGES, SIZE, CROP = 24, 32, 24


@pytest.fixture(scope="module")
def cache():
    """A stand-in for osteolib.data.cache.ImageCache: the attributes training reads, from numpy arrays."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_IMAGES, SIZE, SIZE), dtype=np.uint8)
    regions = np.zeros((N_IMAGES, SIZE, SIZE), dtype=np.uint8)
    regions[::2, 8:20, 10:22] = 1
    # class 1 images are brighter inside the region, so a classifier has something to learn
    images[1::2, 8:20, 10:22] = np.clip(images[1::2, 8:20, 10:22].astype(int) + 90, 0, 255)
    ids = [f"img{i:02d}" for i in range(N_IMAGES)]
    return SimpleNamespace(images=images, regions=regions, has_region=np.arange(N_IMAGES) % 2 == 0,
                           image_ids=ids, index={k: i for i, k in enumerate(ids)}, size=SIZE)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.3), nn.Linear(8, 2))


def _dls(cache, batch_size=4, region_aware=False, crop="center"):
    ids = cache.image_ids
    return make_dataloaders(cache, ids[:16], ids[16:], train_targets=[i % 2 for i in range(16)],
                            valid_targets=[i % 2 for i in range(16, 24)],
                            train_transform=finetune_transform(CROP, crop=crop), region_aware=region_aware,
                            valid_transform=crop_policy("none", CROP), batch_size=batch_size, seed=0)


def _config(**overrides) -> TrainConfig:
    options = dict(epochs=3, batch_size=4, lr=5e-3, warmup_epochs=1, min_lr=1e-4, precision="fp32", seed=0)
    options.update(overrides)
    return TrainConfig(**options)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Interrupted(Exception):
    pass


class _InterruptAt(Callback):
    """Simulates a crash in the middle of an epoch (after that epoch's predecessor was checkpointed)."""

    order = 99

    def __init__(self, epoch: int, batch: int):
        super().__init__()
        self.stop_epoch, self.stop_batch = epoch, batch

    def before_batch(self):
        if self.learn.training and self.learn.epoch == self.stop_epoch and self.learn.iter == self.stop_batch:
            raise _Interrupted("simulated interruption")


# ---------------------------------------------------------------------------------------------- config, schedule


def test_config_lr_rules():
    assert TrainConfig(epochs=2, batch_size=64, base_lr=1.5e-4).peak_lr == pytest.approx(1.5e-4 * 64 / 256)
    assert TrainConfig(epochs=2, batch_size=64, lr=1e-3).peak_lr == 1e-3
    with pytest.raises(ValueError, match="exactly one of lr"):
        TrainConfig(epochs=2, batch_size=8, lr=1e-3, base_lr=1e-4)
    with pytest.raises(ValueError, match="exactly one of lr"):
        TrainConfig(epochs=2, batch_size=8)
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(epochs=2, batch_size=8, lr=1e-3, warmup_epochs=2)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(epochs=2, batch_size=8, lr=1e-3, precision="half")


def test_schedule_warmup_rises_then_cosine_falls_to_min_lr():
    total, warmup, peak, floor = 50, 10, 1e-3, 1e-5
    lrs = [lr_at_step(s, total, warmup, peak, floor) for s in range(total + 1)]
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))  # linear rise
    assert lrs[0] == pytest.approx(peak / warmup) and lrs[warmup - 1] == pytest.approx(peak)
    assert lrs[warmup] == pytest.approx(peak)
    assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # strictly falling cosine
    assert lrs[total] == pytest.approx(floor)
    midpoint = warmup + (total - warmup) // 2
    assert lrs[midpoint] == pytest.approx(floor + (peak - floor) / 2)
    assert lr_at_step(0, 5, 0, peak, floor) == pytest.approx(peak)  # no warmup
    with pytest.raises(ValueError):
        lr_at_step(0, 5, 5, peak)


def test_param_groups_exclude_norms_biases_and_embeddings():
    class WithTokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.norm = nn.LayerNorm(4)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 2)
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)

    model = WithTokens()
    groups = param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert by_decay[0.05] == ["conv.weight", "head.weight"]
    assert by_decay[0.0] == sorted(["conv.bias", "norm.weight", "norm.bias", "bn.weight", "bn.bias", "head.bias",
                                    "pos_embed", "cls_token"])


def test_layer_decay_groups_from_timm():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                              num_classes=2, in_chans=1)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) >= 4 and scales[-1] == 1.0 and scales[0] == pytest.approx(0.5 ** (len(scales) - 1))
    named = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            name = named[id(p)]
            no_decay = p.ndim <= 1 or name in ("pos_embed", "cls_token")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
            if name.startswith("head."):
                assert group["lr_scale"] == 1.0
            if name == "patch_embed.proj.weight":
                assert group["lr_scale"] == scales[0]


def test_precision_choice(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_supports_bf16", lambda: True)
    choice = choose_precision("cpu")
    assert (choice.name, choice.autocast_dtype, choice.grad_scaler) == ("bf16", torch.bfloat16, False)
    monkeypatch.setattr(precision_module, "cpu_supports_bf16", lambda: False)
    assert choose_precision("cpu").name == "fp32"
    assert choose_precision("cpu", "bf16").name == "bf16"  # an explicit request is honoured (emulated)
    with pytest.raises(ValueError, match="fp16"):
        choose_precision("cpu", "fp16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision("cuda").name == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    fp16 = choose_precision("cuda")
    assert (fp16.name, fp16.autocast_dtype, fp16.grad_scaler, fp16.device_type) == ("fp16", torch.float16, True, "cuda")
    with pytest.raises(ValueError, match="bfloat16"):
        choose_precision("cuda", "bf16")
    assert choose_precision("cuda", "fp32").autocast_dtype is None


def test_channels_last_rules():
    cnn, vit_like = _cnn(), nn.Sequential(nn.Conv2d(1, 4, 8, stride=8), nn.Flatten(), nn.Linear(64, 2))
    bf16 = choose_precision("cpu", "bf16")
    fp32 = choose_precision("cpu", "fp32")
    assert precision_module.use_channels_last(cnn, "auto", bf16) is True
    assert precision_module.use_channels_last(cnn, "auto", fp32) is False
    assert precision_module.use_channels_last(vit_like, "auto", bf16) is False
    assert precision_module.use_channels_last(cnn, True, fp32) is True
    assert precision_module.use_channels_last(cnn, False, bf16) is False


def test_model_loss_mode():
    loss = torch.tensor(2.5)
    assert model_loss((loss, torch.zeros(3), torch.ones(3)), torch.zeros(4)) is not None
    assert float(model_loss((loss, None, None))) == 2.5 and float(model_loss(loss)) == 2.5
    with pytest.raises(TypeError, match="loss_func=None"):
        model_loss(torch.zeros(4, 2))


# ---------------------------------------------------------------------------------------------- data


def test_dataset_items_and_errors(cache):
    ids = cache.image_ids
    plain = XrayDataset(cache, ids[:4], targets=[0, 1, 0, 1])
    x, y = plain[1]
    expected = (torch.from_numpy(cache.images[1]).float() / 255 - 0.5256) / 0.252
    assert x.shape == (1, SIZE, SIZE) and x.dtype == torch.float32 and torch.allclose(x[0], expected)
    assert y.dtype == torch.long and int(y) == 1
    aware = XrayDataset(cache, ids[:4], transform=finetune_transform(CROP), region_aware=True)
    a = aware[(0, 123)]
    b = aware[(0, 123)]
    c = aware[(0, 124)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert a[0].shape == (1, CROP, CROP) and a[1].shape == (1, CROP, CROP) and a[1].dtype == torch.uint8
    assert a[1].sum() > 0  # image 0 has a region
    assert aware[(1, 5)][1].sum() == 0  # image 1 has none: an all-zero mask
    with pytest.raises(KeyError, match="not in the cache"):
        XrayDataset(cache, ["img00", "nope"])
    with pytest.raises(ValueError, match="pair up"):
        XrayDataset(cache, ids[:3], targets=[0, 1])


def test_dataloaders_are_seeded(cache):
    def first_epoch(seed, workers=0):
        dls = make_dataloaders(cache, cache.image_ids[:16], cache.image_ids[16:], batch_size=4, seed=seed,
                               train_transform=finetune_transform(CROP), num_workers=workers)
        return torch.cat([xb for xb, _ in dls.train])

    assert torch.equal(first_epoch(0), first_epoch(0))
    assert not torch.equal(first_epoch(0), first_epoch(1))
    # augmentation is seeded per item, so a worker process produces the very same batches
    assert torch.equal(first_epoch(0), first_epoch(0, workers=1))
    dls = make_dataloaders(cache, cache.image_ids[:18], [], batch_size=4)
    assert dls.summary["train_images_left_out_per_epoch"] == 2 and len(dls.valid) == 0 and len(dls.train) == 4
    with pytest.raises(ValueError, match="train_ids is empty"):
        make_dataloaders(cache, [], cache.image_ids, batch_size=4)


def test_split_targets():
    manifest = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "label": ["low", "normal", "low", "odd"],
                             "split": ["train", "train", "val", "test"]})
    assert split_targets(manifest, "train", ["normal", "low"]) == (["a", "b"], [1, 0])
    with pytest.raises(ValueError, match="outside classes"):
        split_targets(manifest, "test", ["normal", "low"])
    with pytest.raises(ValueError, match="no rows with split == 'val '"):
        split_targets(manifest, "val ", ["normal", "low"])


# ---------------------------------------------------------------------------------------------- fit


def test_fit_writes_checkpoints_history_and_follows_the_schedule(cache, tmp_path):
    cfg = _config(monitor="accuracy")
    result = fit(_cnn(), _dls(cache), cfg, tmp_path / "run", loss_func=nn.CrossEntropyLoss(),
                 metrics=[accuracy], stage="finetune", quiet=True)
    ckpt = load_checkpoint(tmp_path / "run" / CHECKPOINT_LAST)
    assert {"model", "optimizer", "rng", "epoch", "history", "config", "stage", "best", "scaler"} <= ckpt.keys()
    assert ckpt["epoch"] == 3 and ckpt["stage"] == "finetune" and ckpt["config"]["lr"] == 5e-3
    assert {"python", "numpy", "torch", "loaders"} <= ckpt["rng"].keys() and len(ckpt["rng"]["loaders"]) == 2
    assert len(ckpt["optimizer"]["state"]) > 0 and len(ckpt["history"]) == 3
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2]
    for column in ("train_loss", "valid_loss", "accuracy", "lr", "seconds", "train_images_per_s",
                   "data_wait_fraction"):
        assert column in history.columns and history[column].notna().all(), column
    assert ((history["data_wait_fraction"] >= 0) & (history["data_wait_fraction"] < 1)).all()
    assert json.loads((tmp_path / "run" / "history.json").read_text())[0]["epoch"] == 0
    # the learning rate of every step followed warmup + cosine, per parameter group
    steps = 3 * 4
    expected = [lr_at_step(s, steps, 4, 5e-3, 1e-4) for s in range(steps)]
    assert result.learner.recorder.lrs == pytest.approx(expected)
    # weights: final == the trained model, best == the epoch with the highest accuracy
    fresh = load_weights(_cnn(), result.final_path)
    assert _same_weights(fresh, result.model)
    assert result.best_epoch == int(history["accuracy"].idxmax()) and (tmp_path / "run" / BEST).exists()
    assert result.best_value == pytest.approx(history["accuracy"].max())
    assert sorted(g["weight_decay"] for g in result.learner.opt.opt.param_groups) == [0.0, 0.05]
    # the returned Learner predicts without touching the run's files
    stamp = (tmp_path / "run" / CHECKPOINT_LAST).stat().st_mtime_ns
    preds, targets = result.learner.get_preds()
    assert preds.shape == (8, 2) and targets.tolist() == [i % 2 for i in range(16, 24)]
    assert (tmp_path / "run" / CHECKPOINT_LAST).stat().st_mtime_ns == stamp
    assert len(pd.read_csv(tmp_path / "run" / "history.csv")) == 3


def test_interrupted_then_resumed_equals_uninterrupted(cache, tmp_path):
    cfg = _config()
    full = fit(_cnn(), _dls(cache), cfg, tmp_path / "full", loss_func=nn.CrossEntropyLoss(), quiet=True)
    with pytest.raises(_Interrupted):
        fit(_cnn(), _dls(cache), cfg, tmp_path / "cut", loss_func=nn.CrossEntropyLoss(), quiet=True,
            cbs=[_InterruptAt(epoch=2, batch=1)])
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT_LAST)["epoch"] == 2
    assert not (tmp_path / "cut" / FINAL).exists()
    resumed = fit(_cnn(), _dls(cache), cfg, tmp_path / "cut", loss_func=nn.CrossEntropyLoss(), quiet=True,
                  resume=True)
    assert resumed.resumed_from_epoch == 2
    assert _same_weights(full.model, resumed.model)
    assert resumed.history["train_loss"].tolist() == full.history["train_loss"].tolist()
    assert _same_weights(load_weights(_cnn(), tmp_path / "cut" / FINAL), full.model)
    # resuming a finished run reloads it without training
    again = fit(_cnn(), _dls(cache), cfg, tmp_path / "cut", loss_func=nn.CrossEntropyLoss(), quiet=True, resume=True)
    assert _same_weights(again.model, full.model) and len(again.history) == 3


def test_determinism_same_seed_same_weights(cache, tmp_path):
    cfg = _config(epochs=2)
    runs = [fit(_cnn(), _dls(cache), cfg, tmp_path / name, loss_func=nn.CrossEntropyLoss(), quiet=True).model
            for name in ("a", "b")]
    assert _same_weights(*runs)
    other = fit(_cnn(), _dls(cache), _config(epochs=2, seed=1), tmp_path / "c", loss_func=nn.CrossEntropyLoss(),
                quiet=True).model
    assert not _same_weights(runs[0], other)


def test_refuses_to_overwrite_and_checks_resume_config(cache, tmp_path):
    cfg = _config(epochs=1, warmup_epochs=0)
    fit(_cnn(), _dls(cache), cfg, tmp_path / "done", loss_func=nn.CrossEntropyLoss(), quiet=True)
    with pytest.raises(FileExistsError, match="resume=True"):
        fit(_cnn(), _dls(cache), cfg, tmp_path / "done", loss_func=nn.CrossEntropyLoss(), quiet=True)
    with pytest.raises(ValueError, match="different config.*lr"):
        fit(_cnn(), _dls(cache), _config(epochs=1, warmup_epochs=0, lr=1e-3), tmp_path / "done",
            loss_func=nn.CrossEntropyLoss(), quiet=True, resume=True)
    with pytest.raises(ValueError, match="batch_size"):
        fit(_cnn(), _dls(cache, batch_size=8), cfg, tmp_path / "other", loss_func=nn.CrossEntropyLoss(), quiet=True)
    with pytest.raises(ValueError, match="monitor"):
        fit(_cnn(), _dls(cache), _config(epochs=1, warmup_epochs=0, monitor="auc"), tmp_path / "other2",
            loss_func=nn.CrossEntropyLoss(), quiet=True)


def test_channels_last_and_bf16_autocast_on_cnn(cache, tmp_path):
    cfg = _config(epochs=1, warmup_epochs=0, precision="bf16", channels_last=True, grad_clip=1.0)
    result = fit(_cnn(), _dls(cache), cfg, tmp_path / "cl", loss_func=nn.CrossEntropyLoss(), quiet=True)
    assert result.channels_last and result.precision.name == "bf16"
    conv = result.model[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.dtype == torch.float32
    assert torch.is_autocast_enabled("cpu") is False  # autocast does not leak out of fit
    assert np.isfinite(result.history["train_loss"]).all()


class _TinyMaskedModel(nn.Module):
    """A masking model that computes its own loss, as the MAE does: (loss, pred, mask)."""

    patch_size = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encode = nn.Conv2d(1, 8, 8, stride=8)
        self.decode = nn.Linear(8, 64)
        self.seen_weights: list[torch.Tensor] = []

    def forward(self, imgs, mask_ratio=None, mask_weights=None):
        batch, _, height, width = imgs.shape
        n = (height // 8) * (width // 8)
        weights = torch.ones(batch, n) if mask_weights is None else mask_weights
        self.seen_weights.append(weights.detach())
        hidden = torch.multinomial(weights, n // 2)  # global RNG: must be replayed on resume
        mask = torch.zeros(batch, n).scatter_(1, hidden, 1.0)
        tokens = self.encode(imgs).flatten(2).transpose(1, 2)
        pred = self.decode(tokens)
        target = imgs.unfold(2, 8, 8).unfold(3, 8, 8).reshape(batch, n, 64)
        loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        return loss, pred, mask


class _RegionWeights(nn.Module):
    """A stage's input adapter (as pretraining's): the batch's region becomes the model's mask_weights."""

    def __init__(self, model, bias):
        super().__init__()
        self.model, self.bias = model, bias

    def forward(self, image, region):
        return self.model(image, mask_weights=patch_weights(region, 8, self.bias))


def _region_weights(bias):
    return lambda model: _RegionWeights(model, bias)


def test_self_supervised_region_biased_resume(cache, tmp_path):
    cfg = _config(lr=1e-3, monitor="valid_loss")
    biased = dict(adapt_model=_region_weights(3.0), settings={"mask_region_bias": 3.0})

    def loaders():
        return _dls(cache, region_aware=True, crop="center")

    full = fit(_TinyMaskedModel(), loaders(), cfg, tmp_path / "full", stage="pretrain", quiet=True, **biased)
    weights = torch.cat(full.model.seen_weights)
    assert weights.max() > 1.5 and torch.allclose(weights.mean(1), torch.ones(len(weights)))  # biased, mean 1
    with pytest.raises(_Interrupted):
        fit(_TinyMaskedModel(), loaders(), cfg, tmp_path / "cut", stage="pretrain", quiet=True,
            cbs=[_InterruptAt(epoch=1, batch=2)], **biased)
    with pytest.raises(ValueError, match="stage"):
        fit(_TinyMaskedModel(), loaders(), cfg, tmp_path / "cut", stage="finetune", quiet=True, resume=True, **biased)
    # the settings are part of the recorded config: another bias does not resume the run
    with pytest.raises(ValueError, match="mask_region_bias"):
        fit(_TinyMaskedModel(), loaders(), cfg, tmp_path / "cut", stage="pretrain", quiet=True, resume=True,
            adapt_model=_region_weights(1.0), settings={"mask_region_bias": 1.0})
    resumed = fit(_TinyMaskedModel(), loaders(), cfg, tmp_path / "cut", stage="pretrain", quiet=True, resume=True,
                  **biased)
    assert _same_weights(full.model, resumed.model)
    assert load_checkpoint(tmp_path / "cut" / FINAL)["config"]["mask_region_bias"] == 3.0
    with pytest.raises(ValueError, match="TrainConfig fields"):
        fit(_TinyMaskedModel(), loaders(), cfg, tmp_path / "clash", quiet=True, settings={"seed": 1})
    # region-aware data without an adapter: the model gets the image alone
    plain = fit(_TinyMaskedModel(), loaders(), cfg, tmp_path / "plain", quiet=True)
    assert torch.equal(torch.cat(plain.model.seen_weights), torch.ones_like(torch.cat(plain.model.seen_weights)))


def test_real_mae_through_fit(cache, tmp_path):
    models = pytest.importorskip("osteolib.models")
    cfg = _config(epochs=2, base_lr=1.5e-4 * 64, lr=None, precision="auto")
    biased = dict(adapt_model=lambda model: _RegionWeights(model, 2.0), settings={"mask_region_bias": 2.0})

    def mae():
        torch.manual_seed(0)
        return models.MaskedAutoencoderViT(img_size=CROP, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                           decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                           mask_ratio=0.75)

    full = fit(mae(), _dls(cache, region_aware=True), cfg, tmp_path / "full", stage="pretrain", quiet=True, **biased)
    assert np.isfinite(full.history["train_loss"]).all() and full.history["valid_loss"].notna().all()
    with pytest.raises(_Interrupted):
        fit(mae(), _dls(cache, region_aware=True), cfg, tmp_path / "cut", stage="pretrain", quiet=True,
            cbs=[_InterruptAt(epoch=1, batch=0)], **biased)
    resumed = fit(mae(), _dls(cache, region_aware=True), cfg, tmp_path / "cut", stage="pretrain", quiet=True,
                  resume=True, **biased)
    assert _same_weights(full.model, resumed.model)


def test_the_checkpoint_format_name_stays_what_earlier_runs_wrote():
    """Every checkpoint on disk says format "osteolib.train/1" (the engine's name when it was written); renaming it
    would make earlier runs' models fail to load (this happened once in the layout move)."""
    from osteolib.engine import state

    assert state.CHECKPOINT_FORMAT == "osteolib.train/1"
