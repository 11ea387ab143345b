"""The multi-scale DenseNet121: taps, per-scale heads, convex relevance weights, and pretrained encoders."""
from __future__ import annotations

import pytest
import torch

from osteolib.models import create_backbone, save_encoder_checkpoint
from osteolib.models.multiscale import DEFAULT_BLOCKS, MultiScaleDenseNet, multiscale_densenet121

IMG = 64


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 1, IMG, IMG, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model() -> MultiScaleDenseNet:
    torch.manual_seed(0)
    return MultiScaleDenseNet(num_classes=3, img_size=IMG).eval()


def test_forward_and_per_scale_outputs(model, images):
    with torch.no_grad():
        logits = model(images)
        scales = model.forward_scales(images)
    assert logits.shape == (2, 3)
    assert model.blocks == DEFAULT_BLOCKS
    # Block 2, 3, 4 taps: strides 8, 16, 32 with 512, 1024, 1024 channels (BN+ReLU, so non-negative).
    assert [tuple(f.shape) for f in scales.features] == [(2, 512, 8, 8), (2, 1024, 4, 4), (2, 1024, 2, 2)]
    assert all(f.min() >= 0 for f in scales.features)
    for head, feature, scale_logits in zip(model.scale_heads, scales.features, scales.logits):
        assert torch.allclose(scale_logits, head(feature.mean(dim=(2, 3))), atol=1e-6)
    h = model.relevance_weights()
    expected = sum(h[b] * scales.logits[b] for b in range(3))
    assert torch.allclose(logits, expected, atol=1e-6)


def test_taps_are_the_norms_that_consume_each_block(model, images):
    """Block 4's tap is exactly what the plain DenseNet pools (norm5); block 2's is transition2.norm of its output."""
    seen = {}
    hook = model.backbone.features.denseblock2.register_forward_hook(lambda m, i, o: seen.__setitem__("block2", o))
    try:
        with torch.no_grad():
            scales = model.forward_scales(images)
            plain_features = model.backbone.forward_features(images)
            expected_block2 = model.backbone.features.transition2.norm(seen["block2"])
    finally:
        hook.remove()
    assert torch.allclose(scales.features[2], plain_features, atol=1e-5)
    assert torch.allclose(scales.features[0], expected_block2, atol=1e-6)


def test_relevance_weights_are_convex_and_learned(images):
    torch.manual_seed(1)
    model = MultiScaleDenseNet(num_classes=1, img_size=IMG)
    h = model.relevance_weights()
    assert h.shape == (3, 1) and torch.allclose(h, torch.full((3, 1), 1 / 3))
    with torch.no_grad():
        model.relevance.logits.copy_(torch.tensor([[3.0], [-2.0], [0.5]]))
    h = model.relevance_weights()
    assert (h >= 0).all() and torch.allclose(h.sum(dim=0), torch.ones(1))
    assert h.argmax().item() == 0
    model.train()
    model(images).sum().backward()
    assert model.relevance.logits.grad is not None and model.relevance.logits.grad.abs().sum() > 0
    assert all(head.weight.grad.abs().sum() > 0 for head in model.scale_heads)
    assert model.backbone.features.denseblock2.denselayer1.conv1.weight.grad.abs().sum() > 0


def test_subset_of_blocks_and_bad_arguments(images):
    model = MultiScaleDenseNet(num_classes=2, img_size=IMG, blocks=("denseblock3", "denseblock2")).eval()
    assert model.blocks == ("denseblock2", "denseblock3")  # shallow to deep, whatever order was given
    with torch.no_grad():
        scales = model.forward_scales(images)
    assert [tuple(f.shape) for f in scales.features] == [(2, 512, 8, 8), (2, 1024, 4, 4)]
    assert model(images).shape == (2, 2) and model.relevance_weights().shape == (2, 2)
    assert model.tap_modules() == [model.backbone.features.transition2.norm, model.backbone.features.transition3.norm]
    with pytest.raises(ValueError, match="blocks must be a non-empty subset"):
        MultiScaleDenseNet(num_classes=2, blocks=("denseblock5",))
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        MultiScaleDenseNet(num_classes=0)
    with pytest.raises(ValueError, match="expects images"):
        model.forward_scales(images[0])


def test_encoder_has_plain_densenet_names_and_loads_a_pretrained_checkpoint(tmp_path, images):
    torch.manual_seed(2)
    pretrained = create_backbone("densenet121", num_classes=2, img_size=IMG)
    path = save_encoder_checkpoint(pretrained, tmp_path / "densenet121.pt", meta={"scenario": "test"})
    model = multiscale_densenet121(num_classes=1, img_size=IMG)
    plain_keys = set(create_backbone("densenet121", num_classes=0, img_size=IMG).state_dict())
    assert set(model.backbone.state_dict()) == plain_keys
    assert all(k.startswith(("backbone.", "scale_heads.", "relevance.")) for k in model.state_dict())

    report = model.load_pretrained_encoder(path)
    assert report.ok and report.loaded == len(plain_keys)
    assert report.dropped == ["classifier.bias", "classifier.weight"]
    pretrained.eval(), model.eval()
    with torch.no_grad():
        assert torch.allclose(model.forward_scales(images).features[-1], pretrained.forward_features(images), atol=1e-5)
    assert model.backbone_kwargs() == {"in_chans": 1, "img_size": IMG}
