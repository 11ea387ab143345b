"""Tests of osteolib.models: backbones, MAE, masked CNN, rotation proxy, checkpoints and checked loading.

Sizes are small (64-pixel images) so the file runs in seconds on a CPU; the real ViT-small and
DenseNet121 key mappings are exercised at full depth.
"""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from osteolib.data import patch_weights

from osteolib.models import (
    BACKBONES,
    CheckpointMismatchError,
    MaskedAutoencoderViT,
    MaskedCNN,
    MaskedDenseNet,
    RotationClassifier,
    create_backbone,
    encoder_state_dict,
    infer_arch,
    load_pretrained,
    mae_vit_small,
    model_from_checkpoint,
    patchify,
    read_checkpoint,
    rotate_batch,
    sample_patch_mask,
    save_encoder_checkpoint,
    sincos_pos_embed_2d,
    unpatchify,
)

IMG = 64
CNN_IMG = 32  # DenseNet121's smallest input (output stride 32): keeps the CNN tests cheap on a CPU


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run this file's tiny tensors on one thread: on a shared 2-core machine, torch's OpenMP threads
    waiting on each other made a 32-px DenseNet step take seconds instead of milliseconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_masked_densenet(**kw) -> MaskedDenseNet:
    """The real DenseNet121 at 32 px, hidden in 16-px patches (4 patches)."""
    return MaskedDenseNet(img_size=CNN_IMG, patch_size=16, **kw)


def vit(**kw) -> torch.nn.Module:
    """A fine-tuning ViT-small at the test image size (depth/patch size set by the test)."""
    return create_backbone("vit_small", img_size=IMG, **kw)


def tiny_mae(**kw) -> MaskedAutoencoderViT:
    """A shallow MAE: the shape logic is the same as ViT-small's, at a fraction of the cost."""
    options = dict(img_size=IMG, patch_size=8, depth=2, decoder_depth=1, decoder_embed_dim=64, decoder_num_heads=4)
    options.update(kw)
    return MaskedAutoencoderViT(**options)


def images(batch: int = 2, size: int = IMG, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


def as_checkpoint(model: torch.nn.Module, tmp_path, name: str) -> str:
    return str(save_encoder_checkpoint(model, tmp_path / f"{name}.pt", meta={"test": name}))


# --- position table, patches, masks -------------------------------------------------------------------


def test_sincos_table_is_fixed_relative_and_has_a_zero_class_row():
    table = sincos_pos_embed_2d(64, (4, 6))
    assert table.shape == (1 + 24, 64) and table.dtype == np.float32
    assert np.all(table[0] == 0)
    patches = table[1:]
    assert np.allclose((patches**2).sum(axis=1), 64 / 2, atol=1e-4)  # one sin/cos pair per frequency
    assert len({row.tobytes() for row in patches}) == 24  # every position distinct
    grid = patches.reshape(4, 6, 64)
    # Dot products depend only on the offset between two positions, not on where they are.
    assert np.isclose(grid[0, 0] @ grid[1, 2], grid[2, 3] @ grid[3, 5], atol=1e-4)
    assert np.isclose(grid[0, 0] @ grid[0, 1], grid[3, 4] @ grid[3, 5], atol=1e-4)
    assert not np.isclose(grid[0, 0] @ grid[0, 1], grid[0, 0] @ grid[0, 3], atol=1e-3)
    assert sincos_pos_embed_2d(64, 4, cls_token=False).shape == (16, 64)
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_pos_embed_2d(30, 4)


def test_patchify_unpatchify_are_inverse_and_row_major():
    imgs = torch.rand(2, 3, 16, 24)
    patches = patchify(imgs, 8)
    assert patches.shape == (2, 6, 8 * 8 * 3)
    assert torch.equal(unpatchify(patches, 8, (2, 3), channels=3), imgs)
    # Patch 1 is the top row's second block; inside a patch pixels run (row, col, channel).
    assert torch.equal(patches[0, 1].reshape(8, 8, 3), imgs[0, :, :8, 8:16].permute(1, 2, 0))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patchify(torch.rand(1, 1, 10, 16), 8)
    with pytest.raises(ValueError, match="do not fit"):
        unpatchify(patches, 8, (3, 3), channels=3)


def test_patch_mask_honours_ratio_and_generator():
    pm = sample_patch_mask(3, 64, 0.75, generator=torch.Generator().manual_seed(1))
    assert pm.mask.shape == (3, 64) and torch.all(pm.mask.sum(1) == 48)
    assert pm.ids_keep.shape == (3, 16)
    assert torch.all(pm.mask.gather(1, pm.ids_keep) == 0)  # the kept ones are exactly the visible ones
    again = sample_patch_mask(3, 64, 0.75, generator=torch.Generator().manual_seed(1))
    other = sample_patch_mask(3, 64, 0.75, generator=torch.Generator().manual_seed(2))
    assert torch.equal(pm.mask, again.mask) and not torch.equal(pm.mask, other.mask)
    # Uniform weights are the same draw as no weights (Gumbel noise is monotone in the uniform noise).
    weighted = sample_patch_mask(3, 64, 0.75, mask_weights=torch.ones(64), generator=torch.Generator().manual_seed(1))
    assert torch.equal(weighted.mask, pm.mask)
    with pytest.raises(ValueError, match="mask_ratio"):
        sample_patch_mask(1, 16, 1.0)


def test_mask_weights_concentrate_masking_on_the_region():
    region = torch.zeros(1, 32, 32)
    region[:, 8:24, 8:24] = 1.0  # the central 4 of 16 patches of 8 px
    # the weights the fit path feeds the masking models (osteolib.data.transforms.patch_weights): 1 + bias x coverage
    weights = patch_weights(region, 8, bias=10.0)[None].expand(400, -1)
    grid = weights[0].reshape(4, 4)
    assert torch.allclose(grid[1:3, 1:3] / grid[0, 0], torch.full((2, 2), 11.0))
    pm = sample_patch_mask(400, 16, 0.5, mask_weights=weights, generator=torch.Generator().manual_seed(0))
    inside = weights[0] > 1
    hidden_inside = pm.mask[:, inside].mean().item()
    hidden_outside = pm.mask[:, ~inside].mean().item()
    assert hidden_inside > 0.95 and hidden_outside < 0.4, (hidden_inside, hidden_outside)
    # Zero weights are hidden last: 8 patches with weight, ratio 0.5 of 16 -> exactly those 8.
    only_left = torch.tensor([1.0, 1.0, 0.0, 0.0] * 4)
    pm = sample_patch_mask(50, 16, 0.5, mask_weights=only_left, generator=torch.Generator().manual_seed(0))
    assert torch.all(pm.mask == only_left)
    with pytest.raises(ValueError, match="non-negative"):
        sample_patch_mask(1, 16, 0.5, mask_weights=-torch.ones(16))
    with pytest.raises(ValueError, match="one weight per patch"):
        sample_patch_mask(2, 16, 0.5, mask_weights=torch.ones(3, 16))


# --- MAE ------------------------------------------------------------------------------------------


def test_mae_forward_shapes_and_default_mask_ratio():
    model = tiny_mae()
    loss, pred, mask = model(images(), generator=torch.Generator().manual_seed(0))
    assert pred.shape == (2, 64, 64) and mask.shape == (2, 64)
    assert torch.all(mask.sum(1) == 64 - 6)  # default 0.9: round(6.4) = 6 patches visible
    assert loss.ndim == 0 and torch.isfinite(loss)
    _, _, mask = model(images(), mask_ratio=0.5)
    assert torch.all(mask.sum(1) == 32)
    with pytest.raises(ValueError, match=r"expects images \(B, 1, 64, 64\)"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        MaskedAutoencoderViT(img_size=60, patch_size=16)


def test_mae_encoder_sees_only_visible_tokens():
    model = tiny_mae()
    seen: list[int] = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    model(images(), mask_ratio=0.75)
    assert seen == [1 + 16]  # the class token and the 16 visible patches of 64
    decoder_seen: list[int] = []
    model.decoder_blocks[0].register_forward_pre_hook(lambda module, args: decoder_seen.append(args[0].shape[1]))
    model(images(), mask_ratio=0.75)
    assert decoder_seen == [1 + 64]  # the decoder fills in every patch


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_loss_ignores_visible_patches(norm_pix_loss):
    model = tiny_mae(norm_pix_loss=norm_pix_loss)
    loss, pred, mask = model(images(), mask_ratio=0.75)
    pred.retain_grad()
    loss.backward()
    grad_per_patch = pred.grad.abs().sum(-1)
    assert torch.all(grad_per_patch[mask == 0] == 0)
    assert torch.all(grad_per_patch[mask == 1] > 0)


def stripe_images(n: int, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """Sine gratings of random frequency, phase and direction: any visible patch tells what every hidden one holds,
    and no position-dependent template can (the phase is uniform at every pixel)."""
    frequency, phase, angle = (torch.rand(3, n, 1, generator=generator) * torch.tensor([[[0.5]], [[6.28]], [[3.14]]])
                               + torch.tensor([[[0.3]], [[0.0]], [[0.0]]]))
    rows, cols = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    along = cols.flatten()[None] * torch.cos(angle) + rows.flatten()[None] * torch.sin(angle)
    return torch.sin(along * frequency + phase).reshape(n, 1, size, size)


@pytest.mark.slow
def test_mae_learns_to_read_the_visible_patches():
    """The MAE's wiring end to end (masking, shuffling, unshuffling, position tables, loss): on gratings the hidden
    patches can only be predicted from the visible ones, so a trained model's predictions must fit the image's own
    hidden patches and not another image's. A decoder that put tokens back at the wrong positions, or an encoder
    that never reached the decoder, leaves ``own`` at ~0 -- as on the real chest pool, where a badly set recipe
    learnt only a template. ~7 s on one core."""
    from osteolib.stages import pretrain

    torch.manual_seed(0)
    model = MaskedAutoencoderViT(img_size=32, patch_size=8, mask_ratio=0.75, embed_dim=64, depth=2, num_heads=4,
                                 decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)
    held_out = stripe_images(16, torch.Generator().manual_seed(1))
    before = pretrain.template_check(model, held_out)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    for _ in range(500):
        loss, _, _ = model(stripe_images(32, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = pretrain.template_check(model, held_out)
    assert before["own"] < 0.05  # untrained: nothing read yet
    assert after["own"] > 0.25 and after["own"] - after["other"] > 0.25, after
    assert after["between_predictions"] < 0.5  # different images get different predictions


def test_eval_mode_restores_each_models_own_mode_even_when_the_block_raises():
    from osteolib.utils import eval_mode

    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Dropout(0.5))
    model.train()
    with eval_mode(model) as inside:
        assert inside is model and not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training  # a model in eval mode stays there


def test_mae_reconstruct_pastes_visible_patches_and_restores_mode():
    model = tiny_mae()
    model.train()
    x = images()
    panels = model.reconstruct(x, mask_ratio=0.75, generator=torch.Generator().manual_seed(3))
    assert model.training
    assert set(panels) == {"original", "masked", "reconstruction", "pasted", "prediction", "mask", "loss"}
    for name in ("original", "masked", "reconstruction", "pasted", "prediction", "mask"):
        assert panels[name].shape == (2, 1, IMG, IMG)
    visible = panels["mask"] == 0
    assert torch.equal(panels["pasted"][visible], x[visible])
    assert torch.all(panels["masked"][~visible] == 0)
    assert panels["mask"].mean().item() == pytest.approx(0.75)
    assert not torch.equal(panels["pasted"][~visible], x[~visible])

    # the model's own prediction takes nothing from the hidden original (the pasted display borrows its
    # per-patch mean and std): brightening the hidden patches changes the display, not the prediction
    assert model.norm_pix_loss and torch.all(panels["prediction"][visible] == 0)
    brighter = x + 3.0 * panels["mask"]
    again = model.reconstruct(brighter, mask_ratio=0.75, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again["mask"], panels["mask"])
    assert torch.allclose(again["prediction"], panels["prediction"], atol=1e-5)
    assert not torch.allclose(again["pasted"][~visible], panels["pasted"][~visible])


def test_mae_runs_under_bf16_autocast_with_a_float32_loss():
    model = tiny_mae()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask = model(images())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.patch_embed.proj.weight.grad is not None


def test_full_size_mae_encoder_loads_into_vit_small_and_computes_the_same(tmp_path):
    mae = mae_vit_small(img_size=IMG, patch_size=16)
    vit = create_backbone("vit_small", num_classes=2, img_size=IMG)
    report = load_pretrained(vit, as_checkpoint(mae, tmp_path, "mae"))
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatch == []
    assert report.loaded == len(encoder_state_dict(vit)) == 150
    assert report.new_keys == ["head.bias", "head.weight"]
    assert all(k.startswith(("decoder_", "mask_token")) for k in report.dropped) and len(report.dropped) > 0
    # Same weights, same function: the MAE encoder on all patches equals the timm ViT's features.
    mae.eval(), vit.eval()
    x = images()
    latent, patch_mask = mae.forward_encoder(x, mask_ratio=0.0, generator=torch.Generator().manual_seed(0))
    in_order = latent[:, 1:].gather(1, patch_mask.ids_restore[..., None].expand(-1, -1, latent.shape[-1]))
    features = vit.forward_features(x)
    assert torch.allclose(features[:, 0], latent[:, 0], atol=1e-4)
    assert torch.allclose(features[:, 1:], in_order, atol=1e-4)


# --- masked CNN -----------------------------------------------------------------------------------


def test_masked_densenet_forward_loss_and_load(tmp_path):
    assert MaskedDenseNet().config["mask_ratio"] == 0.6 and MaskedDenseNet().patch_size == 32  # the stated defaults
    model = small_masked_densenet()
    x = images(size=CNN_IMG)
    loss, pred, mask = model(x, generator=torch.Generator().manual_seed(0))
    assert pred.shape == (2, 4, 16 * 16) and mask.shape == (2, 4)
    assert torch.all(mask.sum(1) == 2)  # 0.6 of 4 patches: round(1.6) = 2 visible
    pred.retain_grad()
    loss.backward()
    grad_per_patch = pred.grad.abs().sum(-1)
    assert torch.all(grad_per_patch[mask == 0] == 0) and torch.all(grad_per_patch[mask == 1] > 0)
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    # The encoder input has the hidden patches replaced by the token, the visible ones untouched.
    with torch.no_grad():
        model.mask_token.fill_(0.25)
    masked = model.mask_image(x, mask)
    hidden = model.unpatchify(mask[..., None].expand(-1, -1, 16 * 16)) == 1
    assert torch.all(masked[hidden] == 0.25) and torch.equal(masked[~hidden], x[~hidden])

    densenet = create_backbone("densenet121", num_classes=2, img_size=CNN_IMG)
    report = load_pretrained(densenet, as_checkpoint(model, tmp_path, "simmim"))
    assert report.missing == [] and report.loaded == len(encoder_state_dict(densenet))
    assert report.new_keys == ["classifier.bias", "classifier.weight"]
    assert sorted(report.dropped) == ["decoder.0.bias", "decoder.0.weight", "mask_token"]
    assert any("BatchNorm" in note for note in report.notes)
    model.eval(), densenet.eval()
    with torch.no_grad():
        assert torch.allclose(model.encoder.forward_features(x), densenet.forward_features(x), atol=1e-5)


def test_masked_densenet_reconstruct_keeps_batchnorm_statistics_and_accepts_channels_last():
    model = small_masked_densenet().train()
    x = images(size=CNN_IMG)
    before = model.encoder.features.norm0.running_mean.clone()
    panels = model.reconstruct(x, generator=torch.Generator().manual_seed(0))
    assert model.training and torch.equal(model.encoder.features.norm0.running_mean, before)
    assert panels["pasted"].shape == (2, 1, CNN_IMG, CNN_IMG)
    visible = panels["mask"] == 0
    assert torch.equal(panels["pasted"][visible], x[visible])
    model = model.to(memory_format=torch.channels_last)
    fast = model.reconstruct(x.to(memory_format=torch.channels_last), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(panels["loss"], fast["loss"], atol=1e-4)
    with pytest.raises(ValueError, match="cannot mask 1 patch"):
        MaskedDenseNet(img_size=CNN_IMG, patch_size=32)


# --- rotation proxy -------------------------------------------------------------------------------


def test_rotate_batch_targets_match_the_rotation():
    x = images(batch=12)
    rotated, targets = rotate_batch(x, torch.Generator().manual_seed(0))
    assert targets.shape == (12,) and set(targets.tolist()) <= {0, 1, 2, 3} and len(set(targets.tolist())) > 1
    for image, turned, k in zip(x, rotated, targets.tolist()):
        assert torch.equal(turned, torch.rot90(image, k, dims=(-2, -1)))
    again, same_targets = rotate_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(same_targets, targets)
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.rand(2, 1, 32, 48))


# --- every scenario, both backbones: pretrain -> continue -> rotation -> fine-tuning model ----------


@pytest.mark.parametrize("arch", ["vit_small", "densenet121"])
def test_every_scenario_checkpoint_loads_into_the_finetuning_model(arch, tmp_path):
    chest = tiny_mae() if arch == "vit_small" else small_masked_densenet()
    with torch.no_grad():
        next(chest.parameters()).add_(1.0)  # make the trained weights recognisable
    chest_path = as_checkpoint(chest, tmp_path, "chest")
    assert read_checkpoint(chest_path)["meta"] == {"test": "chest"}

    # Scenarios 2/3: pretraining continues on target images from the full chest checkpoint (decoder included).
    target = model_from_checkpoint(chest_path)
    assert isinstance(target, MaskedAutoencoderViT if arch == "vit_small" else MaskedCNN)
    for key, value in chest.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    target_path = as_checkpoint(target, tmp_path, "target")

    # Scenario 4: rotation from the chest initialisation.
    rotation = RotationClassifier(arch, **read_checkpoint(chest_path)["config"]["backbone_kwargs"])
    report = load_pretrained(rotation, chest_path)
    assert report.missing == [] and report.new_keys == ["rotation_head.bias", "rotation_head.weight"]
    rotation_path = as_checkpoint(rotation, tmp_path, "rotation")

    first_key, first_value = next(iter(encoder_state_dict(chest).items()))
    for path in (chest_path, target_path, rotation_path):
        backbone_kwargs = read_checkpoint(path)["config"]["backbone_kwargs"]
        model = create_backbone(arch, num_classes=2, **backbone_kwargs)
        report = load_pretrained(model, path)
        assert report.missing == [] and report.unexpected == [] and report.shape_mismatch == [], path
        assert report.loaded == len(encoder_state_dict(model))
        assert set(report.new_keys) == {f"{BACKBONES[arch].head_keys[0]}weight", f"{BACKBONES[arch].head_keys[0]}bias"}
        assert torch.equal(model.state_dict()[first_key], first_value)


# --- refusals -------------------------------------------------------------------------------------


def test_cross_architecture_load_names_both_architectures(tmp_path):
    densenet_path = as_checkpoint(small_masked_densenet(), tmp_path, "simmim")
    with pytest.raises(CheckpointMismatchError, match="holds a densenet121 encoder.*model is vit_small"):
        load_pretrained(vit(depth=1), densenet_path)
    plain_state = create_backbone("mobilenetv3").state_dict()  # a plain state dict: the arch is recognised
    with pytest.raises(CheckpointMismatchError, match="holds a mobilenetv3 encoder.*model is densenet121"):
        load_pretrained(create_backbone("densenet121"), plain_state)


def test_missing_unexpected_and_shape_mismatched_keys_are_refused(tmp_path):
    mae = tiny_mae(depth=2)
    with pytest.raises(CheckpointMismatchError, match=r"missing: blocks\.2\."):
        load_pretrained(vit(patch_size=8, depth=3), as_checkpoint(mae, tmp_path, "d2"))
    deeper = as_checkpoint(tiny_mae(depth=3), tmp_path, "d3")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected: blocks\.2\."):
        load_pretrained(vit(patch_size=8, depth=2), deeper)
    patch_mismatch = r"patch_embed\.proj\.weight: checkpoint \(384, 1, 8, 8\) vs model \(384, 1, 16, 16\)"
    with pytest.raises(CheckpointMismatchError, match=patch_mismatch):
        load_pretrained(vit(patch_size=16, depth=2), as_checkpoint(mae, tmp_path, "p8"))
    # A different grid (fine-tuning at 128 px after pretraining at 64 px) is an error unless resampling is asked for.
    vit128 = create_backbone("vit_small", img_size=128, patch_size=8, depth=2)
    with pytest.raises(CheckpointMismatchError, match="pos_embed"):
        load_pretrained(vit128, as_checkpoint(mae, tmp_path, "p8"))
    report = load_pretrained(vit128, tmp_path / "p8.pt", resize_pos_embed=True)
    assert report.missing == [] and any("resampled" in note for note in report.notes)
    assert vit128.pos_embed.shape == (1, 1 + 256, 384)
    with pytest.raises(CheckpointMismatchError, match="not 'rotation'"):
        load_pretrained(vit(patch_size=8, depth=2), tmp_path / "d2.pt", kind="rotation")


def test_a_checkpoint_key_outside_the_documented_layout_is_unexpected(tmp_path):
    mae = tiny_mae()
    checkpoint = read_checkpoint(as_checkpoint(mae, tmp_path, "mae"))
    checkpoint["state_dict"]["projector.weight"] = torch.zeros(3)  # neither encoder nor documented pretraining-only
    with pytest.raises(CheckpointMismatchError, match="unexpected: projector.weight"):
        load_pretrained(vit(patch_size=8, depth=2), checkpoint)


def test_read_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt.*pretraining stage"):
        read_checkpoint(tmp_path / "nowhere.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt is not an osteolib checkpoint"):
        read_checkpoint(tmp_path / "other.pt")


# --- backbones --------------------------------------------------------------------------------------


def test_unknown_backbone_and_forbidden_options_raise():
    with pytest.raises(ValueError, match="unknown backbone 'vit_huge'.*densenet121.*vit_small"):
        create_backbone("vit_huge")
    with pytest.raises(ValueError, match="never downloads"):
        create_backbone("resnet50", pretrained=True)
    with pytest.raises(ValueError, match="no stochastic depth"):
        create_backbone("densenet121", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        create_backbone("vit_small", img_size=100)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_offline_single_channel_with_right_logits(name, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("create_backbone tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = create_backbone(name, num_classes=3, img_size=CNN_IMG, **({"depth": 2} if name == "vit_small" else {}))
    model.eval()
    with torch.no_grad():
        assert model(images(size=CNN_IMG)).shape == (2, 3)
    first_weight = next(v for k, v in model.state_dict().items() if k.endswith("weight") and v.dim() == 4)
    assert first_weight.shape[1] == 1  # the stem takes one channel
    assert infer_arch(model.state_dict()) == name
    assert model.pretrained_cfg["classifier"] + "." in BACKBONES[name].head_keys
    assert not any(k.startswith(BACKBONES[name].head_keys) for k in encoder_state_dict(model))
    features = create_backbone(name, num_classes=0, img_size=CNN_IMG, **({"depth": 2} if name == "vit_small" else {}))
    assert not any(k.startswith(BACKBONES[name].head_keys) for k in features.state_dict())


def test_vit_patch8_and_avg_pool_variants_load(tmp_path):
    mae = tiny_mae(patch_size=8)
    vit = create_backbone("vit_small", num_classes=2, img_size=IMG, patch_size=8, depth=2, global_pool="avg")
    assert vit.patch_embed.grid_size == (8, 8)
    report = load_pretrained(vit, as_checkpoint(mae, tmp_path, "mae"))
    assert any("fc_norm" in note for note in report.notes)
    assert torch.equal(vit.fc_norm.weight, mae.norm.weight)


def test_backbone_checkpoints_head_handling_and_wrapped_state_dicts(tmp_path):
    trained = create_backbone("mobilenetv3", num_classes=2)
    path = as_checkpoint(trained, tmp_path, "finetuned")
    fresh = create_backbone("mobilenetv3", num_classes=2)
    report = load_pretrained(fresh, path)
    assert report.dropped == ["classifier.bias", "classifier.weight"]
    assert not torch.equal(fresh.classifier.weight, trained.classifier.weight)
    load_pretrained(fresh, path, load_head=True)
    assert torch.equal(fresh.classifier.weight, trained.classifier.weight)
    head_mismatch = r"classifier\.weight: checkpoint \(2, 1280\) vs model \(3, 1280\)"
    with pytest.raises(CheckpointMismatchError, match=head_mismatch):
        load_pretrained(create_backbone("mobilenetv3", num_classes=3), path, load_head=True)
    rebuilt = model_from_checkpoint(path)
    assert torch.equal(rebuilt.classifier.weight, trained.classifier.weight) and rebuilt.backbone_name == "mobilenetv3"
    # fastai's {"model": ...} and DataParallel's "module." prefix are unwrapped, with notes.
    wrapped = {"model": {f"module.{k}": v for k, v in trained.state_dict().items()}}
    report = load_pretrained(create_backbone("mobilenetv3", num_classes=2), wrapped)
    assert report.missing == [] and len(report.notes) == 2
    # A torch.compile'd model (keys prefixed "_orig_mod.") loads into the model it wraps.
    target = create_backbone("mobilenetv3", num_classes=2)
    load_pretrained(torch.compile(target), path, load_head=True)
    assert torch.equal(target.classifier.weight, trained.classifier.weight)
