"""The model registry: which model class rebuilds a checkpoint of each kind, and where its encoder sits.

timm's pattern: every model file registers its own model with a decorator, ``models/__init__.py``
imports every model file (so ``import osteolib.models`` fills the registry), and the code that needs a
model by kind -- :func:`~osteolib.models.checkpoint.model_from_checkpoint`, the ``create_backbone``
entry of the multi-scale DenseNet, the checkpoint layouts -- looks it up here instead of importing the
model files. This module is private machinery: it imports none of them.

::

    @register_model("rotation", encoder_prefix="backbone.", pretraining_keys=("rotation_head.",))
    class RotationClassifier(nn.Module):
        ...

``kind`` is the value checkpoints record (one of :data:`CHECKPOINT_KINDS` other than ``"backbone"``,
which is the plain timm backbone of ``create_backbone``); ``encoder_prefix`` is where the model keeps
its encoder (whose keys are then the backbone's own names); ``pretraining_keys`` are the key prefixes
that exist only for pretraining (or, for a fine-tuning model around an encoder, its new heads). The
decorator sets the class's ``checkpoint_kind`` attribute, which is how a built model tells its kind.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, TypeVar

# The checkpoint format's kinds: "backbone" is a plain create_backbone model, the others registered models.
CHECKPOINT_KINDS = ("mae", "masked_cnn", "rotation", "multiscale", "backbone")


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: the class that rebuilds a checkpoint of ``kind`` from its recorded config
    (``cls(**config)``), and its encoder layout (prefix, pretraining-only key prefixes)."""

    kind: str
    cls: type
    encoder_prefix: str
    pretraining_keys: tuple[str, ...]


_REGISTRY: dict[str, ModelSpec] = {}

ModelClass = TypeVar("ModelClass", bound=type)


def register_model(
    kind: str, *, encoder_prefix: str, pretraining_keys: tuple[str, ...]
) -> Callable[[ModelClass], ModelClass]:
    """Class decorator: register the model class of checkpoint kind ``kind`` (see the module docstring)."""
    if kind not in CHECKPOINT_KINDS or kind == "backbone":
        raise ValueError(f"register_model: kind must be one of {CHECKPOINT_KINDS[:-1]}, got {kind!r}")

    def register(cls: ModelClass) -> ModelClass:
        known = _REGISTRY.get(kind)
        if known is not None and known.cls is not cls:
            raise ValueError(f"register_model: kind {kind!r} is already registered to {known.cls.__name__}")
        _REGISTRY[kind] = ModelSpec(kind, cls, encoder_prefix, tuple(pretraining_keys))
        cls.checkpoint_kind = kind
        return cls

    return register


def registered_models() -> Mapping[str, ModelSpec]:
    """The registered models by kind (read-only); complete once ``osteolib.models`` is imported."""
    return MappingProxyType(_REGISTRY)


def model_spec(kind: str) -> ModelSpec:
    """The registered model of ``kind``; an unknown kind raises ValueError naming the checkpoint kinds."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {CHECKPOINT_KINDS}")
    return _REGISTRY[kind]
