"""Backbones by name: the timm factory of the study, and what a built model's architecture and layout are.

Every network of the study is a timm model built by :func:`create_backbone` with a single input
channel and ``pretrained=False`` (the project is offline; ImageNet weights are never fetched).
Pretraining models (the ViT masked autoencoder, the masked CNN, the rotation classifier) wrap or
mirror such a backbone so that their *encoder* parameters carry exactly the backbone's state-dict
names, under a fixed prefix (the table is in :mod:`osteolib.models.checkpoint`; each model registers
its own prefix with :func:`~osteolib.models.registry.register_model`). :func:`encoder_layout` gives a
kind's prefix and its pretraining-only (or head) keys; :func:`model_arch` and :func:`checkpoint_kind`
tell what a built model is.

``"densenet121_multiscale"`` is not a timm architecture but the fine-tuning model
:class:`~osteolib.models.multiscale.MultiScaleDenseNet` (checkpoint kind "multiscale"), a DenseNet121
encoder under ``backbone.`` with per-scale heads. :func:`create_backbone` builds it through the registry
(this module imports no model file); its architecture (``arch``) is ``densenet121``, so every
DenseNet121 pretraining checkpoint (masked CNN, rotation) loads into its encoder, checked like any other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import timm
from torch import nn

from osteolib.models.registry import model_spec
from osteolib.utils import size_pair


@dataclass(frozen=True)
class BackboneSpec:
    """One architecture the study can fine-tune.

    ``head_keys`` are the state-dict prefixes of the classifier head, which is new at fine-tuning
    (and differs between a 4-way rotation head and a 2-class diagnosis head). ``signature`` and
    ``absent`` name keys that only this architecture's state dict holds / lacks, so a plain state
    dict without an ``arch`` field can still be recognised (and a wrong one named in the error).
    """

    name: str
    timm_name: str
    family: str  # "vit" (patch tokens, needs img_size) or "cnn" (any input size, output stride 32)
    head_keys: tuple[str, ...]
    signature: tuple[str, ...]
    absent: tuple[str, ...] = ()
    supports_drop_path: bool = True


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "densenet121",
            "densenet121",
            "cnn",
            head_keys=("classifier.",),
            signature=(
                "features.denseblock3.denselayer24.conv2.weight",
                "features.denseblock4.denselayer16.conv2.weight",
            ),
            absent=("features.denseblock3.denselayer25.conv2.weight", "features.denseblock4.denselayer17.conv2.weight"),
            # timm's DenseNet has no stochastic depth (only dropout): asking for it must not pass silently.
            supports_drop_path=False,
        ),
        BackboneSpec(
            "vit_small",
            "vit_small_patch16_224",  # patch_size and img_size are overridden (kwargs win in timm's factory)
            "vit",
            head_keys=("head.",),
            signature=("cls_token", "pos_embed", "blocks.0.attn.qkv.weight"),
        ),
        BackboneSpec(
            "efficientnetv2_s",
            # timm's efficientnetv2_s is the paper's architecture with symmetric PyTorch padding; the tf_
            # port uses dynamic 'same' padding, slower and only needed to reuse TF weights (never done here).
            "efficientnetv2_s",
            "cnn",
            head_keys=("classifier.",),
            signature=("conv_stem.weight", "bn2.weight", "blocks.5.14.conv_pw.weight"),
            absent=("blocks.5.15.conv_pw.weight", "blocks.6.0.conv_pw.weight"),
        ),
        BackboneSpec(
            "resnet50",
            "resnet50",
            "cnn",
            head_keys=("fc.",),
            signature=("conv1.weight", "layer1.0.conv3.weight", "layer3.5.conv3.weight"),
            absent=("layer3.6.conv3.weight",),
        ),
        BackboneSpec(
            "mobilenetv3",
            "mobilenetv3_large_100",
            "cnn",
            head_keys=("classifier.",),
            signature=("conv_stem.weight", "conv_head.weight", "blocks.6.0.conv.weight"),
            absent=("bn2.weight",),
        ),
    )
}


# Fine-tuning models built around a registered encoder rather than taken from timm: name -> encoder
# architecture (whose pretraining checkpoints they load). Kept out of BACKBONES, which lists the timm
# architectures a checkpoint's "arch" can name (and which infer_arch recognises from plain state dicts).
MULTISCALE_BACKBONES: dict[str, str] = {"densenet121_multiscale": "densenet121"}

# Every name create_backbone accepts.
BACKBONE_NAMES: tuple[str, ...] = tuple(sorted((*BACKBONES, *MULTISCALE_BACKBONES)))


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``; unknown names raise ValueError listing the known ones."""
    if name in MULTISCALE_BACKBONES:
        raise ValueError(f"{name!r} is a multi-scale model around {MULTISCALE_BACKBONES[name]}, not a timm "
                         f"architecture: build it with create_backbone({name!r}, num_classes=...)")
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONE_NAMES)}")
    return BACKBONES[name]


def encoder_arch(name: str) -> str:
    """The architecture whose pretraining checkpoints a model built by ``create_backbone(name)`` loads:
    the name itself for a timm backbone, the encoder's for a multi-scale model."""
    if name in MULTISCALE_BACKBONES:
        return MULTISCALE_BACKBONES[name]
    return backbone_spec(name).name


def checkpoint_kind(model: nn.Module) -> str:
    """The checkpoint layout of a model built here (a ``CHECKPOINT_KINDS`` entry): its ``checkpoint_kind``
    attribute (set on every registered model class by ``register_model``), else "backbone"."""
    model = unwrap_model(model)
    kind = getattr(model, "checkpoint_kind", None)
    if kind is not None:
        return kind
    return "backbone"


def create_backbone(
    name: str,
    num_classes: int = 0,
    in_chans: int = 1,
    img_size: int | tuple[int, int] = 128,
    drop_path_rate: float = 0.0,
    **kw: Any,
) -> nn.Module:
    """Build a registered timm backbone, untrained, for ``in_chans``-channel images.

    ``num_classes=0`` gives pooled features (timm's convention). ``img_size`` fixes the ViT's patch
    grid (and is recorded for CNNs, which accept any size). ViT extras such as ``patch_size=8``,
    ``depth`` or ``global_pool`` pass through ``kw`` to timm. The model gets two attributes:
    ``backbone_name`` (the registry name, used by :func:`load_pretrained` to refuse a checkpoint
    of another architecture) and ``backbone_config`` (the arguments, stored in checkpoints).

    ``"densenet121_multiscale"`` builds :class:`~osteolib.models.multiscale.MultiScaleDenseNet`
    (``num_classes`` >= 1; extra ``kw`` such as ``blocks`` or ``drop_rate`` go to it). Its
    architecture for checkpoints is ``densenet121`` and its checkpoint kind "multiscale".
    """
    if kw.pop("pretrained", False):
        raise ValueError(
            f"create_backbone({name!r}, pretrained=True): the project never downloads weights; build the model "
            "untrained and load a project checkpoint with load_pretrained(model, path)"
        )
    if name in MULTISCALE_BACKBONES:
        return _create_multiscale(name, num_classes, in_chans, img_size, drop_path_rate, **kw)
    spec = backbone_spec(name)
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"create_backbone({name!r}): num_classes must be an int >= 0, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"create_backbone({name!r}): in_chans must be an int >= 1, got {in_chans!r}")
    height, width = size_pair(img_size, "img_size")
    if drop_path_rate < 0 or drop_path_rate >= 1:
        raise ValueError(f"create_backbone({name!r}): drop_path_rate must be in [0, 1), got {drop_path_rate}")

    timm_kwargs = dict(kw)
    if drop_path_rate > 0:
        if not spec.supports_drop_path:
            raise ValueError(
                f"create_backbone({name!r}, drop_path_rate={drop_path_rate}): {name} has no stochastic depth in "
                "timm; use drop_rate (dropout before the classifier) or proj_drop_rate instead"
            )
        timm_kwargs["drop_path_rate"] = drop_path_rate
    if spec.family == "vit":
        patch_size = timm_kwargs.setdefault("patch_size", 16)
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"create_backbone({name!r}): img_size {img_size} is not a multiple of patch_size {patch_size}"
            )
        timm_kwargs["img_size"] = (height, width)
    try:
        model = timm.create_model(
            spec.timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **timm_kwargs
        )
    except TypeError as err:  # an option the timm class does not take: name it
        raise ValueError(f"create_backbone({name!r}, {kw}): timm's {spec.timm_name} rejects an option: {err}") from err
    model.backbone_name = name
    model.backbone_config = dict(
        num_classes=num_classes, in_chans=in_chans, img_size=img_size, drop_path_rate=drop_path_rate, **kw
    )
    return model


def _create_multiscale(name: str, num_classes: int, in_chans: int, img_size: int | tuple[int, int],
                       drop_path_rate: float, **kw: Any) -> nn.Module:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"create_backbone({name!r}): num_classes must be an int >= 1 (it is a classifier with "
                         f"one head per scale), got {num_classes!r}; for pooled features use "
                         f"create_backbone({MULTISCALE_BACKBONES[name]!r}, num_classes=0)")
    if drop_path_rate:
        raise ValueError(f"create_backbone({name!r}, drop_path_rate={drop_path_rate}): its DenseNet121 encoder has "
                         "no stochastic depth in timm; use drop_rate (dropout before the scale heads) instead")
    # The multi-scale model registers itself (kind "multiscale"); it is found here, not imported.
    return model_spec("multiscale").cls(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kw)


def infer_arch(state_dict: Mapping[str, Any]) -> str | None:
    """The registered architecture whose signature keys a backbone-named state dict holds, else None."""
    keys = set(state_dict)
    for spec in BACKBONES.values():
        if all(k in keys for k in spec.signature) and not any(k in keys for k in spec.absent):
            return spec.name
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` / ``DataParallel`` wrappers (whose state-dict keys carry a prefix)."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def model_arch(model: nn.Module) -> str:
    """The backbone architecture of a model built here (a backbone or a pretraining model)."""
    model = unwrap_model(model)
    name = getattr(model, "backbone_name", None)
    if name is None:
        prefix, is_extra = encoder_layout(checkpoint_kind(model), None)
        name = infer_arch({k[len(prefix):]: None for k in model.state_dict() if k.startswith(prefix)})
    if name is None:
        raise ValueError(
            f"cannot tell the architecture of {type(model).__name__}: build it with create_backbone() or one of "
            "the osteolib.models pretraining classes"
        )
    return name


def encoder_layout(kind: str, arch: str | None) -> tuple[str, Callable[[str], bool]]:
    """Encoder prefix and the test for pretraining-only (or head) keys of a model of ``kind``.

    A plain backbone ("backbone") has no prefix and its architecture's classifier head as extra keys (none
    when ``arch`` is unknown); a registered kind has the prefix and keys its model registered.
    """
    if kind == "backbone":
        head = backbone_spec(arch).head_keys if arch is not None else ()
        return "", lambda key: key.startswith(head) if head else False
    spec = model_spec(kind)
    return spec.encoder_prefix, lambda key: key.startswith(spec.pretraining_keys)
