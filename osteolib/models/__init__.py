"""Models of the study: timm backbones by name, the pretraining models, and checked weight loading.

- :func:`create_backbone` -- DenseNet121, ViT-small, EfficientNetV2-S, ResNet50, MobileNetV3, single channel, untrained,
  and ``"densenet121_multiscale"`` (:class:`MultiScaleDenseNet`, whose encoder loads DenseNet121 checkpoints).
- :class:`MaskedAutoencoderViT` / :func:`mae_vit_small` -- MAE pretraining of the ViT.
- :class:`MaskedDenseNet` (:class:`MaskedCNN`) -- SimMIM-style masked pretraining of the CNN.
- :class:`RotationClassifier` / :func:`rotate_batch` -- the 4-way rotation proxy.
- :func:`save_encoder_checkpoint`, :func:`read_checkpoint`, :func:`load_pretrained`, :func:`model_from_checkpoint`
  -- the checkpoint format and its checked loading (see ``checkpoint`` for the key conventions).

Layout (timm's pattern): ``registry`` (private machinery: each model's checkpoint kind and encoder layout),
``backbones`` (the timm factory), ``checkpoint`` (the format, checked loading, rebuilding a model by the kind
its checkpoint records), ``patches`` (patch masks, patchify, sin-cos tables, the masked loss, shared by the two
masked models), then one file per model -- ``mae``, ``masked_cnn``, ``rotation``, ``multiscale`` -- each
registering itself with ``@register_model(kind, ...)``. This file imports every model file, so the registry
is complete as soon as ``osteolib.models`` is imported; no other file lists the models.
"""
from __future__ import annotations

from osteolib.models.backbones import (
    BACKBONE_NAMES,
    BACKBONES,
    MULTISCALE_BACKBONES,
    BackboneSpec,
    checkpoint_kind,
    create_backbone,
    encoder_arch,
    infer_arch,
    model_arch,
    unwrap_model,
)
from osteolib.models.checkpoint import (
    CheckpointMismatchError,
    LoadReport,
    encoder_state_dict,
    load_pretrained,
    model_from_checkpoint,
    read_checkpoint,
    save_encoder_checkpoint,
)
from osteolib.models.mae import MaskedAutoencoderViT, mae_vit_small
from osteolib.models.masked_cnn import MaskedCNN, MaskedDenseNet
from osteolib.models.multiscale import MultiScaleDenseNet, multiscale_densenet121
from osteolib.models.patches import PatchMask, patchify, sample_patch_mask, sincos_pos_embed_2d, unpatchify
from osteolib.models.registry import CHECKPOINT_KINDS
from osteolib.models.rotation import RotationClassifier, rotate_batch
from osteolib.utils import eval_mode  # the stages use models.eval_mode

__all__ = [
    "BACKBONE_NAMES",
    "BACKBONES",
    "CHECKPOINT_KINDS",
    "MULTISCALE_BACKBONES",
    "BackboneSpec",
    "CheckpointMismatchError",
    "LoadReport",
    "MaskedAutoencoderViT",
    "MaskedCNN",
    "MaskedDenseNet",
    "MultiScaleDenseNet",
    "PatchMask",
    "RotationClassifier",
    "checkpoint_kind",
    "create_backbone",
    "encoder_arch",
    "encoder_state_dict",
    "eval_mode",
    "infer_arch",
    "load_pretrained",
    "mae_vit_small",
    "model_arch",
    "model_from_checkpoint",
    "multiscale_densenet121",
    "patchify",
    "read_checkpoint",
    "rotate_batch",
    "sample_patch_mask",
    "save_encoder_checkpoint",
    "sincos_pos_embed_2d",
    "unpatchify",
    "unwrap_model",
]
