"""The model registry: importing osteolib.models registers every model, and the machinery imports no model file."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from torch import nn

from osteolib import models
from osteolib.models.registry import CHECKPOINT_KINDS, model_spec, register_model, registered_models

MODELS = Path(models.__file__).parent
MODEL_FILES = {"mae", "masked_cnn", "rotation", "multiscale"}


def test_every_checkpoint_kind_but_backbone_is_registered_by_its_class():
    assert set(registered_models()) == set(CHECKPOINT_KINDS) - {"backbone"}
    classes = {"mae": models.MaskedAutoencoderViT, "masked_cnn": models.MaskedCNN,
               "rotation": models.RotationClassifier, "multiscale": models.MultiScaleDenseNet}
    for kind, cls in classes.items():
        assert model_spec(kind).cls is cls
        assert cls.checkpoint_kind == kind
    assert models.MaskedDenseNet.checkpoint_kind == "masked_cnn"  # inherited: checkpoints record MaskedCNN


def test_registered_layouts_are_the_documented_ones():
    layouts = {kind: (spec.encoder_prefix, spec.pretraining_keys) for kind, spec in registered_models().items()}
    assert layouts == {
        "mae": ("", ("decoder_", "mask_token")),
        "masked_cnn": ("encoder.", ("decoder.", "mask_token")),
        "rotation": ("backbone.", ("rotation_head.",)),
        "multiscale": ("backbone.", ("scale_heads.", "relevance.")),
    }


def test_register_model_refuses_an_unknown_kind_and_a_second_class():
    with pytest.raises(ValueError, match="kind must be one of"):
        register_model("simclr", encoder_prefix="backbone.", pretraining_keys=("projector.",))
    with pytest.raises(ValueError, match="kind must be one of"):
        register_model("backbone", encoder_prefix="", pretraining_keys=())

    class Other(nn.Module):
        pass

    with pytest.raises(ValueError, match="already registered to RotationClassifier"):
        register_model("rotation", encoder_prefix="backbone.", pretraining_keys=("rotation_head.",))(Other)
    assert model_spec("rotation").cls is models.RotationClassifier
    with pytest.raises(ValueError, match="unknown checkpoint kind 'simclr'"):
        model_spec("simclr")


@pytest.mark.parametrize("machinery", ["registry", "backbones", "checkpoint", "patches"])
def test_machinery_imports_no_model_file(machinery):
    tree = ast.parse((MODELS / f"{machinery}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("osteolib.models"):
            imported.add(node.module.rsplit(".", 1)[-1])
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {alias.name.rsplit(".", 1)[-1] for alias in node.names if alias.name.startswith("osteolib")}
    assert not imported & MODEL_FILES, f"models/{machinery}.py imports {sorted(imported & MODEL_FILES)}"


def test_create_backbone_finds_the_multiscale_model_through_the_registry():
    model = models.create_backbone("densenet121_multiscale", num_classes=2, img_size=32)
    assert type(model) is models.MultiScaleDenseNet
    assert models.checkpoint_kind(model) == "multiscale" and models.model_arch(model) == "densenet121"
