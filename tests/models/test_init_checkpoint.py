"""Weights a user brings (a fine-tuning run's ``init_checkpoint``): timm state dicts and medical-MAE checkpoints,
read with weights_only=True, RGB stems folded to one channel, every difference reported. Nothing is downloaded."""
from __future__ import annotations

import argparse

import pytest
import timm
import torch

from osteolib.models import CheckpointMismatchError, create_backbone, load_pretrained


def _rgb_densenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("densenet121", pretrained=False, in_chans=3, num_classes=1000)


def _rgb_vit_small() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, in_chans=3, num_classes=1000)


def test_a_timm_densenet_state_dict_loads_with_its_stem_folded(tmp_path):
    source = _rgb_densenet()
    path = tmp_path / "imagenet_densenet121.pth"
    torch.save(source.state_dict(), path)
    model = create_backbone("densenet121", num_classes=2, img_size=32)
    report = load_pretrained(model, path)
    rgb = source.state_dict()["features.conv0.weight"]
    assert rgb.shape[1] == 3
    assert torch.equal(model.state_dict()["features.conv0.weight"], rgb.sum(dim=1, keepdim=True))
    assert torch.equal(model.state_dict()["features.denseblock4.denselayer16.conv2.weight"],
                       source.state_dict()["features.denseblock4.denselayer16.conv2.weight"])
    assert report.ok and report.arch == "densenet121"
    assert report.dropped == ["classifier.bias", "classifier.weight"]  # the 1000-class ImageNet head
    assert set(report.new_keys) == {"classifier.weight", "classifier.bias"}
    assert any("features.conv0.weight: 3-channel (RGB) kernels summed" in n for n in report.notes)


def test_a_medical_mae_vit_checkpoint_loads_with_stem_folded_and_grid_resampled(tmp_path):
    source = _rgb_vit_small()
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}  # MAE encoders have no head
    state["mask_token"] = torch.zeros(1, 1, 512)
    state["decoder_embed.weight"] = torch.zeros(512, 384)
    path = tmp_path / "vit-s_CXR_mae.pth"
    # the published layout: {"model": ...} next to training facts, including MAE's argparse.Namespace
    torch.save({"model": state, "epoch": 799, "args": argparse.Namespace(model="mae_vit_small_patch16")}, path)
    model = create_backbone("vit_small", num_classes=2, img_size=64, patch_size=16)
    report = load_pretrained(model, path, resize_pos_embed=True)
    rgb = state["patch_embed.proj.weight"]
    assert torch.equal(model.state_dict()["patch_embed.proj.weight"], rgb.sum(dim=1, keepdim=True))
    assert torch.equal(model.state_dict()["blocks.11.mlp.fc2.weight"], state["blocks.11.mlp.fc2.weight"])
    assert report.kind == "mae" and report.ok
    assert set(report.dropped) == {"mask_token", "decoder_embed.weight"}
    assert any("pos_embed resampled" in n for n in report.notes)
    assert any("unwrapped the 'model' entry" in n for n in report.notes)
    assert any("head." in k for k in report.new_keys)


def test_a_wrong_architecture_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet50.pth"
    torch.save(timm.create_model("resnet50", pretrained=False, in_chans=3).state_dict(), path)
    model = create_backbone("densenet121", num_classes=2, img_size=32)
    before = model.state_dict()["features.conv0.weight"].clone()
    with pytest.raises(CheckpointMismatchError, match=r"resnet50\.pth.*(resnet50|cannot tell).*"):
        load_pretrained(model, path)
    assert torch.equal(model.state_dict()["features.conv0.weight"], before)  # nothing was copied


def test_a_missing_encoder_key_is_listed(tmp_path):
    state = _rgb_densenet().state_dict()
    del state["features.denseblock1.denselayer1.conv1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing: features\.denseblock1\.denselayer1\.conv1\.weight"):
        load_pretrained(create_backbone("densenet121", num_classes=2, img_size=32), tmp_path / "partial.pth")


def test_pickled_code_is_not_run(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match=r"unsafe\.pth cannot be read.*print.*weights_only=True"):
        load_pretrained(create_backbone("densenet121", num_classes=2, img_size=32), tmp_path / "unsafe.pth")


# --- the fine-tuning config's init_checkpoint -----------------------------------------------------------


def test_finetune_starts_from_the_users_checkpoint(tmp_path):
    from osteolib.runs import Run
    from osteolib.stages.finetune_config import FinetuneConfig
    from osteolib.stages.finetune_inputs import build_model

    source = _rgb_densenet()
    torch.save({"model": source.state_dict()}, tmp_path / "own.pth")
    config = FinetuneConfig(scenario="own_checkpoint", backbone="densenet121", image_size=32,
                            init_checkpoint=str(tmp_path / "own.pth"))
    model, report = build_model(config, Run(tmp_path / "run"))
    assert report.ok and report.loaded > 0
    assert torch.equal(model.state_dict()["features.conv0.weight"],
                       source.state_dict()["features.conv0.weight"].sum(dim=1, keepdim=True))


def test_init_checkpoint_and_scenario_go_together(tmp_path):
    from osteolib.runs import Run
    from osteolib.stages.finetune_config import FinetuneConfig
    from osteolib.stages.finetune_inputs import build_model

    with pytest.raises(ValueError, match="scenario='own_checkpoint' needs init_checkpoint"):
        FinetuneConfig(scenario="own_checkpoint", backbone="densenet121")
    with pytest.raises(ValueError, match="init_checkpoint='w.pth' is given with scenario='random'"):
        FinetuneConfig(scenario="random", backbone="densenet121", init_checkpoint="w.pth")
    with pytest.raises(ValueError, match="init_checkpoint must be None or the path"):
        FinetuneConfig(scenario="own_checkpoint", backbone="densenet121", init_checkpoint="  ")
    config = FinetuneConfig(scenario="own_checkpoint", backbone="densenet121", init_checkpoint="nowhere.pth")
    with pytest.raises(FileNotFoundError, match="init_checkpoint='nowhere.pth': no such file"):
        build_model(config, Run(tmp_path / "run"))
