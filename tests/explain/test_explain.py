"""Saliency maps, multi-scale CAM, agreement with expert regions, randomisation and faithfulness."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from osteolib import explain as E
from osteolib.models import create_backbone
from osteolib.models import MultiScaleDenseNet

IMG = 64


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 1, IMG, IMG, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def densenet_binary() -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("densenet121", num_classes=1, img_size=IMG)


@pytest.fixture(scope="module")
def vit_multiclass() -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("vit_small", num_classes=3, img_size=IMG, patch_size=16)


class TinyCNN(nn.Module):
    """logit = mean(relu(x)) through a conv that copies the image into channel 0: the evidence is the image itself."""

    def __init__(self, num_classes: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, num_classes)
        with torch.no_grad():
            self.conv.weight.zero_(), self.conv.bias.zero_(), self.fc.weight.zero_(), self.fc.bias.zero_()
            self.conv.weight[0, 0, 1, 1] = 1.0
            self.fc.weight[0, 0] = 1.0
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def blob_image(row: int, col: int, size: int = IMG, radius: int = 4) -> torch.Tensor:
    yy, xx = np.mgrid[:size, :size]
    image = 0.01 * np.random.default_rng(row * size + col).random((size, size))
    image[(yy - row) ** 2 + (xx - col) ** 2 <= radius**2] = 1.0
    return torch.from_numpy(image.astype(np.float32))[None, None]


# ---------------------------------------------------------------------------------------------- maps

@pytest.mark.parametrize("method", sorted(E.CAM_METHODS))
@pytest.mark.parametrize("arch", ["densenet121", "vit_small"])
def test_every_method_gives_unit_range_maps(method, arch, images, densenet_binary, vit_multiclass):
    model = densenet_binary if arch == "densenet121" else vit_multiclass
    model.train()
    maps = E.compute_cams(model, images, method, batch_size=2)
    assert maps.shape == (3, IMG, IMG) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert (maps.reshape(3, -1).max(axis=1) > 0.5).all()  # min-max normalised, not blank
    assert model.training  # given back in the mode it came in


def test_vit_patch_tokens_get_gradient_at_the_chosen_layer(vit_multiclass, images):
    """With token pooling the last block's *output* patch tokens get zero gradient; its norm1 input does not."""
    model = vit_multiclass.eval()
    assert model.global_pool == "token"
    (layer,) = E.target_layers(model)
    assert layer is model.blocks[-1].norm1
    grads = {}

    def keep(name):
        def hook(module, inputs, output):  # returns None: a forward hook's return value would replace the output
            output.register_hook(lambda g: grads.__setitem__(name, g))

        return hook

    hooks = [layer.register_forward_hook(keep("norm1")), model.blocks[-1].register_forward_hook(keep("block"))]
    try:
        model(images)[:, 1].sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad()
    assert grads["norm1"][:, 1:].abs().sum() > 0
    assert grads["block"][:, 1:].abs().sum() == 0  # why blocks[-1] itself would give blank maps
    grid = E.vit_reshape_transform(grads["norm1"], (4, 4))
    assert grid.shape == (3, model.embed_dim, 4, 4) and torch.equal(grid[:, :, 0, 1], grads["norm1"][:, 2])
    with pytest.raises(ValueError, match="expected tokens"):
        E.vit_reshape_transform(grads["norm1"], (5, 5))


def test_densenet_gradcam_is_the_class_activation_map(densenet_binary, images):
    """At norm5 (pooled by a GAP + linear head) Grad-CAM equals CAM = relu(sum_k w_k A_k), resized."""
    model = densenet_binary.eval()
    assert E.target_layers(model) == [model.features.norm5]
    maps = E.compute_cams(model, images, "gradcam", targets=1)
    with torch.no_grad():
        features = model.forward_features(images)
        cam = torch.einsum("nkhw,k->nhw", features, model.classifier.weight[0]).clamp(min=0)
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-7)
    expected = F.interpolate(cam[:, None], size=(IMG, IMG), mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(maps, expected.numpy(), atol=1e-4)


def test_targets_binary_and_multiclass(densenet_binary, vit_multiclass, images):
    with torch.no_grad():
        logits = vit_multiclass.eval()(images)
        binary_logit = densenet_binary.eval()(images)[:, 0]
    predicted = logits.argmax(1).tolist()
    default = E.compute_cams(vit_multiclass, images, "gradcam")
    np.testing.assert_allclose(default, E.compute_cams(vit_multiclass, images, "gradcam", targets=predicted), atol=1e-6)
    other = [(c + 1) % 3 for c in predicted]
    assert not np.allclose(default, E.compute_cams(vit_multiclass, images, "gradcam", targets=other), atol=1e-3)

    predicted_binary = (binary_logit > 0).long().tolist()
    default = E.compute_cams(densenet_binary, images, "gradcam")
    np.testing.assert_allclose(default, E.compute_cams(densenet_binary, images, "gradcam", targets=predicted_binary), atol=1e-6)
    positive = E.compute_cams(densenet_binary, images, "gradcam", targets=1)
    negative = E.compute_cams(densenet_binary, images, "gradcam", targets=0)
    assert not np.allclose(positive, negative, atol=1e-3)
    # batching does not change anything
    np.testing.assert_allclose(positive, E.compute_cams(densenet_binary, images, "gradcam", targets=1, batch_size=1), atol=1e-5)

    with pytest.raises(ValueError, match=r"0 \(negative\) or 1 \(positive\)"):
        E.compute_cams(densenet_binary, images, "gradcam", targets=2)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        E.compute_cams(vit_multiclass, images, "gradcam", targets=[0, 1, 3])
    with pytest.raises(ValueError, match="3 images"):
        E.compute_cams(vit_multiclass, images, "gradcam", targets=[0, 1])
    with pytest.raises(ValueError, match="unknown CAM method 'scorecam'"):
        E.compute_cams(vit_multiclass, images, "scorecam")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        E.compute_cams(vit_multiclass, images[0], "gradcam")


def test_target_layers_of_every_backbone():
    expected = {
        "resnet50": lambda m: m.layer4,
        "efficientnetv2_s": lambda m: m.bn2,
        "mobilenetv3": lambda m: m.blocks[-1],
    }
    for arch, layer in expected.items():
        model = create_backbone(arch, num_classes=2, img_size=IMG)
        assert E.target_layers(model) == [layer(model)], arch
    multiscale = MultiScaleDenseNet(num_classes=2, img_size=IMG)
    assert E.target_layers(multiscale) == multiscale.tap_modules()
    with pytest.raises(ValueError, match="pass arch="):
        E.target_layers(TinyCNN())
    with pytest.raises(ValueError, match="no known target layer"):
        E.target_layers(TinyCNN(), arch="alexnet")
    with pytest.raises(ValueError, match="has no classifier"):
        E.compute_cams(create_backbone("resnet50", num_classes=0), torch.rand(1, 1, 32, 32))


def test_cam_points_at_planted_evidence_even_with_frozen_weights():
    model = TinyCNN()
    for p in model.parameters():
        p.requires_grad_(False)
    images = torch.cat([blob_image(12, 40), blob_image(50, 10)])
    maps = E.compute_cams(model, images, "gradcam", layers=[model.act])
    for cam, (row, col) in zip(maps, [(12, 40), (50, 10)]):
        yy, xx = np.mgrid[:IMG, :IMG]
        region = (yy - row) ** 2 + (xx - col) ** 2 <= 4**2  # exactly the planted blob
        assert E.pointing_game(cam, region) == 1.0
        assert E.energy_in_region(cam, region) > 0.5
        assert E.region_auc(cam, region) > 0.95


# -------------------------------------------------------------------------------------- multi-scale

def up2(m: np.ndarray) -> np.ndarray:
    """Bilinear 2x2 -> 4x4 with half-pixel centres, written out: a 1-D pair (a, b) -> (a, .75a+.25b, .25a+.75b, b)."""
    def one(v):
        return np.array([v[0], 0.75 * v[0] + 0.25 * v[1], 0.25 * v[0] + 0.75 * v[1], v[1]])

    rows = np.stack([one(r) for r in m])  # (2, 4)
    return np.stack([one(rows[:, j]) for j in range(4)], axis=1)  # (4, 4)


def test_combine_scale_cams_against_a_hand_computed_case():
    a0 = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]])  # scale 0: 2 channels, 2x2
    a1 = torch.tensor([[[2.0]]])  # scale 1: 1 channel, 1x1
    features = [torch.stack([a0, a0]), torch.stack([a1, a1])]
    w0 = torch.tensor([[1.0, -1.0], [0.5, 2.0]])  # (classes, channels)
    w1 = torch.tensor([[3.0], [-1.0]])
    h = torch.tensor([[0.25, 0.6], [0.75, 0.4]])  # (scales, classes), columns sum to 1
    combined, per_scale = E.combine_scale_cams(features, [w0, w1], h, [0, 1], out_size=(4, 4))

    # class 0: M0 = A0 - A1 = [[1, 1], [2, 4]], M1 = 3 * 2 = 6
    r0 = np.array([[1, 1, 1, 1], [1.25, 1.375, 1.625, 1.75], [1.75, 2.125, 2.875, 3.25], [2, 2.5, 3.5, 4]])
    np.testing.assert_allclose(up2(np.array([[1, 1], [2, 4]])), r0)
    np.testing.assert_allclose(per_scale[0][0].numpy(), r0, atol=1e-6)
    np.testing.assert_allclose(per_scale[1][0].numpy(), np.full((4, 4), 6.0), atol=1e-6)
    np.testing.assert_allclose(combined[0].numpy(), 0.25 * r0 + 0.75 * 6.0, atol=1e-6)
    # class 1: M0 = 0.5 A0 + 2 A1 = [[0.5, 3], [3.5, 2]], M1 = -2
    expected1 = 0.6 * up2(np.array([[0.5, 3.0], [3.5, 2.0]])) + 0.4 * -2.0
    np.testing.assert_allclose(combined[1].numpy(), expected1, atol=1e-6)

    # one logit: class 1 explains it, class 0 explains its negation
    pos, _ = E.combine_scale_cams([f[:1] for f in features], [w0[:1], w1[:1]], h[:, :1], [1], (4, 4), single_logit=True)
    neg, _ = E.combine_scale_cams([f[:1] for f in features], [w0[:1], w1[:1]], h[:, :1], [0], (4, 4), single_logit=True)
    np.testing.assert_allclose(pos[0].numpy(), 0.25 * r0 + 4.5, atol=1e-6)
    np.testing.assert_allclose(neg[0].numpy(), -(0.25 * r0 + 4.5), atol=1e-6)


def test_multiscale_cam_decomposes_the_logits(images):
    torch.manual_seed(3)
    model = MultiScaleDenseNet(num_classes=3, img_size=IMG)
    with torch.no_grad():
        model.relevance.logits.copy_(torch.randn(3, 3))
    model.eval()
    with torch.no_grad():
        scales = model.forward_scales(images)
        logits = model(images)
    classes = [2, 0, 1]
    combined, per_scale = E.multiscale_cam(model, images, classes, normalise=False)
    assert combined.shape == (3, IMG, IMG) and len(per_scale) == 3
    rows = torch.arange(3), torch.tensor(classes)
    h = model.relevance_weights().detach()
    biases = [head.bias.detach()[rows[1]] for head in model.scale_heads]
    for b in range(3):  # integer upsampling keeps the mean, so each map's mean + bias is that scale's logit
        np.testing.assert_allclose(per_scale[b].mean(axis=(1, 2)) + biases[b].numpy(), scales.logits[b][rows].numpy(), atol=1e-4)
    bias_part = sum(h[b, rows[1]] * biases[b] for b in range(3)).numpy()
    np.testing.assert_allclose(combined.mean(axis=(1, 2)) + bias_part, logits[rows].numpy(), atol=1e-4)
    np.testing.assert_allclose(combined, sum(h[b, rows[1]].numpy()[:, None, None] * per_scale[b] for b in range(3)), atol=1e-5)

    normalised, per_scale_n = E.multiscale_cam(model, images, classes)
    expected = np.clip(combined, 0, None)
    expected = expected - expected.min(axis=(1, 2), keepdims=True)
    expected = expected / (expected.max(axis=(1, 2), keepdims=True) + 1e-7)
    np.testing.assert_allclose(normalised, expected, atol=1e-5)
    assert all(m.min() >= 0 and m.max() <= 1 for m in per_scale_n)
    batched, per_scale_b = E.multiscale_cam(model, images, classes, batch_size=2)
    np.testing.assert_allclose(batched, normalised, atol=1e-5)
    np.testing.assert_allclose(per_scale_b[1], per_scale_n[1], atol=1e-5)
    default, _ = E.multiscale_cam(model, images)  # predicted classes
    np.testing.assert_allclose(default, E.multiscale_cam(model, images, logits.argmax(1).tolist())[0], atol=1e-6)
    assert E.compute_cams(model, images[:2], "gradcam").shape == (2, IMG, IMG)
    with pytest.raises(TypeError, match="needs a MultiScaleDenseNet"):
        E.multiscale_cam(TinyCNN(), images)


# ---------------------------------------------------------------------------------------- agreement

def box_region(size=10, rows=(1, 5), cols=(2, 6)) -> np.ndarray:
    region = np.zeros((size, size), bool)
    region[rows[0]:rows[1], cols[0]:cols[1]] = True
    return region


def test_pointing_game_hand_cases():
    region = box_region()  # rows 1..4, cols 2..5
    cam = np.zeros((10, 10))
    cam[2, 3] = 1.0
    assert E.pointing_game(cam, region) == 1.0
    cam[2, 3], cam[8, 8] = 0.5, 1.0
    assert E.pointing_game(cam, region) == 0.0
    cam[2, 3] = 1.0  # a tie, one maximum in, one out: the expected hit of a random tie-break
    assert E.pointing_game(cam, region) == 0.5
    flat = np.full((10, 10), 0.3)
    assert E.pointing_game(flat, region) == pytest.approx(region.mean())  # chance level
    near = np.zeros((10, 10))
    near[7, 3] = 1.0  # two rows below the box's last row (4)
    assert E.pointing_game(near, region, tolerance_px=3) == 1.0
    assert E.pointing_game(near, region, tolerance_px=2) == 0.0


def test_energy_iou_dice_auc_hand_cases():
    region = box_region()  # 16 pixels
    cam = np.zeros((10, 10))
    cam[region] = 1.0
    cam[8, 0:4] = 0.5
    assert E.energy_in_region(cam, region) == pytest.approx(16 / 18)
    perfect = region.astype(float)
    assert E.iou_dice(perfect, region, "otsu") == (1.0, 1.0)
    assert E.region_auc(perfect, region) == 1.0
    assert E.region_auc(1 - perfect, region) == 0.0
    assert E.region_auc(np.full((10, 10), 0.2), region) == 0.5
    # 6 "on" pixels, 3 of them in a 4-pixel region: IoU 3/7, Dice 6/10
    small = np.zeros((10, 10), bool)
    small[0, 0:4] = True
    on = np.zeros((10, 10))
    on[0, 0:3], on[5, 5:8] = 1.0, 1.0
    assert E.iou_dice(on, small, 0.5) == (pytest.approx(3 / 7), pytest.approx(0.6))
    assert E.map_threshold(np.arange(100.0).reshape(10, 10), 0.9) == pytest.approx(89.1)
    assert E.map_threshold(np.full((4, 4), 0.7), "otsu") == 0.7
    with pytest.raises(ValueError, match="region is empty"):
        E.energy_in_region(cam, np.zeros((10, 10), bool))
    with pytest.raises(ValueError, match="differs from cam shape"):
        E.region_auc(cam, np.ones((5, 5), bool))
    with pytest.raises(ValueError, match="non-negative map"):
        E.energy_in_region(cam - 1, region)
    with pytest.raises(ValueError, match="quantile"):
        E.map_threshold(cam, 1.5)
    assert math.isnan(E.region_auc(cam, np.ones((10, 10), bool)))


def test_agreement_table_counts_images_without_regions():
    region = box_region()
    perfect = region.astype(np.float32)
    cams = np.stack([perfect, 1 - perfect, perfect, perfect])
    regions = np.stack([region, region, np.zeros_like(region), np.zeros_like(region)]).astype(np.uint8)
    table = E.agreement_table(cams, regions, [True, True, False, True], ["a", "b", "c", "d"],
                              method="gradcam", fold=[0, 0, 1, 1])
    assert list(table["image_id"]) == ["a", "b", "c", "d"] and len(table) == 4
    assert table.loc[0, "pointing_game"] == 1 and table.loc[0, "region_auc"] == 1 and table.loc[0, "iou_otsu"] == 1
    assert table.loc[1, "region_auc"] == 0 and table.loc[1, "pointing_game"] == 0
    assert table.loc[2, "note"] == "no expert region" and not table.loc[2, "has_region"]
    assert table.loc[3, "note"] == "expert region is empty on this grid" and table.loc[3, "has_region"]
    assert table.loc[[2, 3], ["pointing_game", "energy_in_region", "iou_q80", "dice_q90"]].isna().all().all()
    assert set(table["method"]) == {"gradcam"} and list(table["fold"]) == [0, 0, 1, 1]
    assert {"iou_q50", "dice_q50", "threshold_otsu", "region_fraction"} <= set(table.columns)

    summary = E.agreement_summary(table)
    row = summary.iloc[0]
    assert (row.n_images, row.n_with_region, row.n_without_region, row.n_empty_region, row.n_scored) == (4, 3, 1, 1, 2)
    assert row.pointing_game_mean == 0.5 and row.region_auc_mean == 0.5
    by_fold = E.agreement_summary(table, by=["fold"]).set_index("fold")
    assert by_fold.loc[1, "n_scored"] == 0 and math.isnan(by_fold.loc[1, "region_auc_mean"])

    with pytest.raises(ValueError, match="same N images"):
        E.agreement_table(cams[:3], regions, [True] * 4, list("abcd"))
    with pytest.raises(ValueError, match="repeat"):
        E.agreement_table(cams, regions, [True] * 4, list("abca"))
    with pytest.raises(ValueError, match="identifier 'fold' has 2 values"):
        E.agreement_table(cams, regions, [True] * 4, list("abcd"), fold=[0, 1])
    with pytest.raises(ValueError, match="image 'a'.*non-negative"):
        E.agreement_table(cams - 2, regions, [True] * 4, list("abcd"))
    with pytest.raises(ValueError, match="lacks columns"):
        E.agreement_summary(pd.DataFrame({"x": [1]}))


# ----------------------------------------------------------------------------------- randomisation

def test_randomise_parameters_cascades_from_the_top():
    torch.manual_seed(4)
    model = create_backbone("vit_small", num_classes=2, img_size=32, patch_size=16, depth=2)
    with torch.no_grad():  # "train" it: every parameter away from its initial value
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    units = E.cascade_units(model)
    assert units[:4] == ["head", "norm", "blocks.1", "blocks.0"] and units[-1] == "(cls_token,pos_embed)"
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def changed(randomised):
        return {k for k, v in randomised.state_dict().items() if not torch.equal(v, before[k])}

    top = E.randomise_parameters(model, "cascading", layers=1, seed=0)
    assert changed(top) == {"head.weight", "head.bias"} and top.randomised_units == ["head"]
    three = changed(E.randomise_parameters(model, "cascading", layers=3, seed=0))
    assert {k.split(".")[0] for k in three} == {"head", "norm", "blocks"}
    assert all(k.startswith("blocks.1.") for k in three if k.startswith("blocks"))
    assert len([k for k in three if k.startswith("blocks.1.")]) == len([k for k in before if k.startswith("blocks.1.")])
    by_name = E.randomise_parameters(model, "cascading", layers="blocks", seed=0)
    assert by_name.randomised_units == ["head", "norm", "blocks.1", "blocks.0"]
    full = E.randomise_parameters(model, "full", seed=0)
    assert changed(full) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is untouched
    again = E.randomise_parameters(model, "full", seed=0)
    other = E.randomise_parameters(model, "full", seed=1)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(full.blocks[0].attn.qkv.weight, other.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="no unit 'decoder'"):
        E.randomise_parameters(model, "cascading", layers="decoder")
    with pytest.raises(ValueError, match="int in 1.."):
        E.randomise_parameters(model, "cascading", layers=0)
    with pytest.raises(ValueError, match="leave layers=None"):
        E.randomise_parameters(model, "full", layers=2)
    with pytest.raises(ValueError, match="'cascading' or 'full'"):
        E.randomise_parameters(model, "independent")


def test_cascade_units_of_the_densenets(densenet_binary):
    units = E.cascade_units(densenet_binary)
    assert units[:3] == ["classifier", "features.norm5", "features.denseblock4.denselayer16"]
    assert units[-1] == "features.conv0"
    multiscale = MultiScaleDenseNet(num_classes=2, img_size=IMG)
    assert E.cascade_units(multiscale)[:5] == ["relevance", "scale_heads.2", "scale_heads.1", "scale_heads.0",
                                               "backbone.features.norm5"]
    randomised = E.randomise_parameters(multiscale, layers="scale_heads", seed=0)
    assert not torch.equal(randomised.scale_heads[0].weight, multiscale.scale_heads[0].weight)
    assert torch.equal(randomised.backbone.features.norm5.weight, multiscale.backbone.features.norm5.weight)
    assert randomised.tap_modules()[-1] is randomised.backbone.features.norm5  # the copy taps its own layers


def test_randomised_model_maps_differ_and_similarity_measures():
    model = TinyCNN()
    images = torch.cat([blob_image(12, 40), blob_image(50, 10)])
    maps = E.compute_cams(model, images, "gradcam", layers=[model.act])
    randomised = E.randomise_parameters(model, "full", seed=0)
    random_maps = E.compute_cams(randomised, images, "gradcam", layers=[randomised.act])
    same = E.map_similarity(maps, maps)
    assert np.allclose(same["spearman"], 1) and np.allclose(same["ssim"], 1)
    different = E.map_similarity(maps, random_maps)
    assert (different["ssim"] < 0.9).all()
    noise = np.random.default_rng(0).random((2, 32, 32))
    assert np.abs(E.map_similarity(noise, np.random.default_rng(1).random((2, 32, 32)))["spearman"]).max() < 0.1
    assert math.isnan(E.map_similarity(np.zeros((1, 8, 8)), noise[:1, :8, :8])["spearman"][0])


# ------------------------------------------------------------------------------------- faithfulness

class WindowScore(nn.Module):
    """A planted classifier: its logit is the mean brightness inside a fixed window (the only evidence)."""

    def __init__(self, window: tuple[slice, slice], num_classes: int = 1) -> None:
        super().__init__()
        self.window = window
        self.scale = nn.Parameter(torch.tensor(8.0))
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.scale * (x[:, 0, self.window[0], self.window[1]].mean(dim=(1, 2)) - 0.5)
        return score[:, None] if self.num_classes == 1 else torch.stack([-score, score], dim=1)


@pytest.mark.parametrize("num_classes", [1, 2])
def test_road_prefers_the_map_of_the_true_evidence(num_classes):
    window = (slice(20, 44), slice(20, 44))  # 24x24 = 14 % of the image: kept whole by LeRF at every percentile
    model = WindowScore(window, num_classes)
    rng = np.random.default_rng(0)
    images = torch.from_numpy((0.1 + 0.05 * rng.random((2, 1, IMG, IMG))).astype(np.float32))
    images[:, :, window[0], window[1]] = 0.9
    yy, xx = np.mgrid[:IMG, :IMG]
    true_map = np.exp(-((yy - 31.5) ** 2 + (xx - 31.5) ** 2) / (2 * 10.0**2))
    true_maps = np.stack([true_map, true_map]).astype(np.float32)
    random_maps = rng.random((2, IMG, IMG)).astype(np.float32)

    good = E.faithfulness(model, images, true_maps, targets=1)
    chance = E.faithfulness(model, images, random_maps, targets=1)
    inverted = E.faithfulness(model, images, 1 - true_maps, targets=1)
    assert good.shape == (2,)
    assert (good > 0.3).all() and (np.abs(chance) < 0.15).all() and (inverted < -0.3).all()
    assert (E.faithfulness(model, images, true_maps, targets=1, method="road_lerf") > -0.01).all()
    assert (E.faithfulness(model, images, true_maps, targets=1, method="road_morf") < -0.5).all()
    np.testing.assert_allclose(good, E.faithfulness(model, images, true_maps, targets=1), atol=1e-6)  # seeded
    kept = E.faithfulness(model, images, true_maps, targets=1, method="cam_mult")
    assert (kept > E.faithfulness(model, images, random_maps, targets=1, method="cam_mult")).all()
    logit_scale = E.faithfulness(model, images, true_maps, score="logit")  # predicted class = 1 here
    assert (logit_scale > 1).all()


def test_faithfulness_rejects_bad_input():
    model = WindowScore((slice(0, 8), slice(0, 8)))
    images = torch.rand(2, 1, 16, 16)
    with pytest.raises(ValueError, match="must be one of"):
        E.faithfulness(model, images, np.zeros((2, 16, 16)), method="deletion")
    with pytest.raises(ValueError, match=r"cams must be \(N, H, W\)"):
        E.faithfulness(model, images, np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="percentiles"):
        E.faithfulness(model, images, np.zeros((2, 16, 16)), percentiles=[0, 50])


def test_overlay_draws_image_map_region_and_boxes():
    import matplotlib.pyplot as plt

    region = box_region(size=32, rows=(4, 12), cols=(6, 20))
    ax = E.overlay(np.random.default_rng(0).random((32, 32)), np.random.default_rng(1).random((8, 8)), region=region,
                   boxes=[{"x": 6, "y": 4, "w": 14, "h": 8, "label": "Pneumonia"}], title="gradcam")
    assert len(ax.images) == 2 and ax.images[1].get_array().shape == (32, 32)
    assert len(ax.patches) == 1 and ax.texts[0].get_text() == "Pneumonia"
    assert len(ax.collections) >= 1  # the region's contour
    plt.close(ax.figure)


# ------------------------------------------------------------------------- the checks of notebook 05

def blob_batch() -> tuple[torch.Tensor, np.ndarray]:
    images = torch.cat([blob_image(12, 40), blob_image(50, 10), blob_image(30, 30)])
    yy, xx = np.mgrid[:IMG, :IMG]
    regions = np.stack([(yy - r) ** 2 + (xx - c) ** 2 <= 16 for r, c in [(12, 40), (50, 10), (30, 30)]])
    return images, regions


def test_randomisation_check_steps_maps_and_similarity():
    model = TinyCNN()
    images, regions = blob_batch()
    result = E.randomisation_check(model, images, regions, targets=1, steps=[1, 2], layers=lambda m: [m.act])
    table = result.table
    assert list(table["units_randomised"]) == [0, 1, 2] and result.maps.shape == (3, 3, IMG, IMG)
    assert table["down_to"].tolist()[1:] == ["fc", "conv"]
    assert table["spearman_median"].iloc[0] == pytest.approx(1.0) and table["ssim_median"].iloc[0] == pytest.approx(1.0)
    # the trained model's map is the blob itself: it agrees with the region almost perfectly
    assert table["region_auc_mean"].iloc[0] > 0.95 and table["pointing_game_mean"].iloc[0] == 1.0
    assert not np.allclose(result.maps[2], result.maps[0])
    assert (result.similarity.groupby("step").size() == 3).all() and table["flat_maps"].iloc[0] == 0
    assert torch.equal(model.conv.weight[0, 0, 1, 1], torch.tensor(1.0))  # the model itself is untouched
    with pytest.raises(ValueError, match="steps must be unit counts"):
        E.randomisation_check(model, images, regions, steps=[5], layers=lambda m: [m.act])
    with pytest.raises(ValueError, match="empty"):
        E.randomisation_check(model, images, np.zeros_like(regions), layers=lambda m: [m.act])


def test_cascade_steps_are_log_spaced_over_the_units(densenet_binary):
    steps = E.cascade_steps(densenet_binary, 5)
    assert steps[0] == 1 and steps[-1] == len(E.cascade_units(densenet_binary)) and steps == sorted(set(steps))


def test_randomisation_verdict_follows_the_numbers():
    def table(spearman, auc_after):
        return pd.DataFrame({"units_randomised": [0, 10], "spearman_median": [1.0, spearman], "ssim_median": [1.0, 0.2],
                             "region_auc_mean": [0.8, auc_after], "flat_maps": [0, 0]})

    assert "check passed" in E.randomisation_verdict(table(0.1, 0.5))
    flat = E.randomisation_verdict(table(math.nan, 0.5).assign(flat_maps=[0, 3]))
    assert "check passed" in flat and "flat" in flat  # blank maps have changed completely
    assert "did not pass" in E.randomisation_verdict(table(0.9, 0.5))  # maps survive randomisation
    assert "did not pass" in E.randomisation_verdict(table(0.1, 0.9))  # agreement does not drop
    chance = E.randomisation_verdict(table(math.nan, 0.5).assign(flat_maps=[0, 3], region_auc_mean=[0.5, 0.5]))
    assert "uninformative" in chance and "passed" not in chance and "lose all structure" in chance
    assert "nan" not in chance
    with pytest.raises(ValueError, match="randomisation_check's table"):
        E.randomisation_verdict(table(0.1, 0.5).iloc[1:])


def test_faithfulness_table_ranks_the_true_map_above_random():
    model = TinyCNN()
    with torch.no_grad():
        model.fc.weight[0, 0] = 300.0  # the blob moves the probability: logit about 3.7 with it, 0.2 without
    images, _ = blob_batch()
    table = E.faithfulness_table(model, images, ["gradcam"], targets=1, layers=[model.act], backbone="tiny")
    assert set(table["method"]) == {"gradcam", "random map"} and len(table) == 6 and (table["backbone"] == "tiny").all()
    means = table.groupby("method")["road"].mean()
    assert means["gradcam"] > means["random map"] + 0.05
    fig = E.faithfulness_figure(table)
    assert len(fig.axes[0].patches) == 2
    with pytest.raises(ValueError, match="unknown CAM method"):
        E.faithfulness_table(model, images, ["saliency"])


def agreement_rows(shift: float, n: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.6, n)  # how easy each image is, shared by both scenarios
    rows = []
    for scenario, delta in (("random", 0.0), ("chest_mae", shift)):
        for i in range(n):
            rows.append({"image_id": f"img{i}", "has_region": True, "note": "", "scenario": scenario,
                         "backbone": "densenet121", "method": "gradcam",
                         "energy_in_region": base[i] + delta + 0.01 * rng.standard_normal(),
                         "pointing_game": float(i % 2), "iou_otsu": 0.3})
    return pd.DataFrame(rows)


def test_agreement_ci_intervals_cover_the_mean():
    table = agreement_rows(0.2)
    ci = E.agreement_ci(table, n_boot=500)
    assert len(ci) == 2 * 3 and (ci["n"] == 12).all()
    assert ((ci["ci_low"] <= ci["mean"]) & (ci["mean"] <= ci["ci_high"])).all()
    hit = ci[(ci["measure"] == "pointing_game") & (ci["scenario"] == "random")].iloc[0]
    assert hit["mean"] == pytest.approx(0.5) and hit["ci_high"] - hit["ci_low"] > 0.2
    constant = ci[ci["measure"] == "iou_otsu"]
    assert (constant["ci_low"] == constant["ci_high"]).all()
    single = E.agreement_ci(table.iloc[[0]], n_boot=500)
    assert single["ci_low"].isna().all() and single["n"].eq(1).all()
    wide = E.agreement_ci_wide(ci)
    assert len(wide) == 2 and wide["energy_in_region"].str.match(r"0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]").all()
    with pytest.raises(ValueError, match="lacks columns"):
        E.agreement_ci(table.drop(columns="note"))


def test_compare_agreement_finds_a_real_shift_and_holm_corrects():
    result = E.compare_agreement(agreement_rows(0.2), measures=("energy_in_region", "iou_otsu"))
    energy = result[result["measure"] == "energy_in_region"].iloc[0]
    assert energy["estimate"] == pytest.approx(0.2, abs=0.02) and bool(energy["significant"])
    assert energy["p_holm"] >= energy["p_value"]
    constant = result[result["measure"] == "iou_otsu"].iloc[0]
    assert constant["note"] and np.isnan(constant["p_holm"])  # a constant measure cannot be modelled: kept, noted
    assert (result["family_size"] == 1).all()
    null = E.compare_agreement(agreement_rows(0.0, seed=1), measures=("energy_in_region",))
    assert not null["significant"].any()
    with pytest.raises(ValueError, match="two scenarios"):
        E.compare_agreement(agreement_rows(0.2).query("scenario == 'random'"))
