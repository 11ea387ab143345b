"""The checkpoint format, and checked loading of pretrained encoders into any model built here.

Every model keeps its *encoder* under the backbone's own state-dict names, under a fixed prefix that its
kind registers (:func:`~osteolib.models.registry.register_model`); the table lists them:

========== ================ ===================================================================
kind       encoder prefix   pretraining-only keys (dropped when only the encoder is wanted)
========== ================ ===================================================================
mae        ``""``           ``decoder_*`` (embed, blocks, norm, pred, pos_embed), ``mask_token``
masked_cnn ``encoder.``     ``decoder.*`` (1x1 conv + pixel shuffle), ``mask_token``
rotation   ``backbone.``    ``rotation_head.*`` (the 4-way rotation classifier)
multiscale ``backbone.``    ``scale_heads.*``, ``relevance.*`` (the multi-scale DenseNet's heads)
backbone   ``""``           the architecture's classifier head (``classifier.``/``head.``/``fc.``)
========== ================ ===================================================================

``"multiscale"`` is not a pretraining model but the fine-tuning model ``densenet121_multiscale``
(:mod:`osteolib.models.multiscale`): a DenseNet121 encoder under ``backbone.`` with per-scale heads.
Its architecture (``arch``) is therefore ``densenet121``, so every DenseNet121 pretraining checkpoint
(masked CNN, rotation) loads into its encoder, checked like any other.

A checkpoint is a dict saved with ``torch.save``::

    {"arch": backbone name, "kind": "mae" | "masked_cnn" | "rotation" | "multiscale" | "backbone",
     "state_dict": the full model state (encoder + pretraining-only parts, so pretraining can
                   continue from it, e.g. chest MAE -> target MAE),
     "config": the model's constructor arguments plus "backbone_kwargs" (the create_backbone
               arguments that give a matching encoder),
     "meta": free-form facts from the caller (scenario, epochs, data, ...)}

:func:`load_pretrained` moves the encoder of any such checkpoint into any model built here and
refuses (``CheckpointMismatchError``) rather than loading part of it: a missing encoder key, an
unexpected key or a shape mismatch is an error; the fresh classifier head is reported, not an error.

It also reads weights a user brings (a fine-tuning run's ``init_checkpoint``): a timm-format state dict
(``torch.save(model.state_dict())``, e.g. ImageNet weights) or a published medical-MAE checkpoint
(``{"model": state_dict, ...}``, an MAE pretraining state with ``decoder_*`` / ``mask_token`` is read as
kind ``mae``). Files are always read with ``torch.load(weights_only=True)`` (only ``argparse.Namespace``, which
MAE's training script stores as ``args``, is allowed besides tensors and containers). A 3-channel (RGB) stem
is folded to the model's 1 channel by summing its kernels over the input channels (timm's
``adapt_input_conv``), with a note in the :class:`LoadReport`.
"""
from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from osteolib.models.backbones import (
    BACKBONES,
    checkpoint_kind,
    create_backbone,
    encoder_layout,
    infer_arch,
    model_arch,
    unwrap_model,
)
from osteolib.models.registry import CHECKPOINT_KINDS, registered_models
from osteolib.utils import size_pair

# Prefixes that wrappers add without changing the model: DataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into; the message lists what differs and why."""


def encoder_state_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The model's encoder weights under backbone names: no prefix, no decoder, mask token or head."""
    model = unwrap_model(model)
    kind = checkpoint_kind(model)
    prefix, is_extra = encoder_layout(kind, model_arch(model))
    return OrderedDict(
        (k[len(prefix):], v) for k, v in model.state_dict().items() if k.startswith(prefix) and not is_extra(k)
    )


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did. ``missing``/``unexpected``/``shape_mismatch`` are empty on success
    (the function raises otherwise); ``dropped`` are the checkpoint's pretraining-only keys, ``new_keys``
    the model's keys that keep their fresh initialisation (its classifier head, a decoder)."""

    source: str
    kind: str
    arch: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    new_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self) -> str:
        lines = [
            f"{self.source}: {self.kind} checkpoint of {self.arch}; loaded {self.loaded} tensors, "
            f"dropped {len(self.dropped)} pretraining-only, {len(self.new_keys)} model keys left as initialised"
            + (f" ({_short(self.new_keys)})" if self.new_keys else "")
        ]
        problems = (("missing", self.missing), ("unexpected", self.unexpected), ("shape mismatch", self.shape_mismatch))
        for label, keys in problems:
            if keys:
                lines.append(f"  {len(keys)} {label}: {_short(keys)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class _Checkpoint:
    kind: str
    arch: str | None
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    source: str
    notes: list[str]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_encoder_checkpoint` (tensors land on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pretraining checkpoints are written by the pretraining stage "
            "(save_encoder_checkpoint into <run>/checkpoints/<scenario>/<backbone>.pt): run it first or fix the path"
        )
    checkpoint = _read_weights_file(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(f"checkpoint {path} is not an osteolib checkpoint (a dict with 'state_dict', 'kind', 'arch')")
    if checkpoint.get("kind") not in CHECKPOINT_KINDS:
        raise ValueError(f"checkpoint {path} has kind {checkpoint.get('kind')!r}; expected one of {CHECKPOINT_KINDS}")
    if checkpoint.get("arch") not in BACKBONES:
        raise ValueError(f"checkpoint {path} has arch {checkpoint.get('arch')!r}; expected one of {sorted(BACKBONES)}")
    return checkpoint


def _read_weights_file(path: Path) -> Any:
    """``torch.load`` without running pickled code (``weights_only=True``), tensors on the CPU."""
    import argparse

    try:
        # MAE's training script saves its argparse.Namespace as "args"; it only holds plain values.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, pickle of arbitrary objects, not a torch file
        reason = str(err)
        if "WeightsUnpickler error:" in reason:  # torch's advice to load unsafely is not repeated here
            reason = reason.split("WeightsUnpickler error:")[1].split("\n")[0].strip()
        raise ValueError(f"checkpoint {path} cannot be read as a torch checkpoint: {reason}; only tensors, "
                         f"containers of them and plain values are read (weights_only=True): re-save the "
                         f"weights with torch.save(model.state_dict(), path)") from err


def save_encoder_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    meta: Mapping[str, Any] | None = None,
    encoder_only: bool = False,
) -> Path:
    """Save ``model`` in the checkpoint format above; returns the path.

    The full state is kept by default so that pretraining can continue from it (chest MAE ->
    target MAE); ``encoder_only=True`` keeps only what fine-tuning needs. The file is written to a
    temporary name and renamed, so an interrupted save never leaves a truncated checkpoint.
    """
    model = unwrap_model(model)
    kind = checkpoint_kind(model)
    arch = model_arch(model)
    if encoder_only:
        prefix, _ = encoder_layout(kind, arch)
        state = {prefix + k: v for k, v in encoder_state_dict(model).items()}
    else:
        state = model.state_dict()
    if kind == "backbone":
        config = dict(getattr(model, "backbone_config", {}))
        config["backbone_kwargs"] = {k: v for k, v in config.items() if k != "num_classes"}
    else:
        config = dict(model.config)
        config["backbone_kwargs"] = model.backbone_kwargs()
    checkpoint = {
        "arch": arch,
        "kind": kind,
        "state_dict": OrderedDict((k, v.detach().cpu()) for k, v in state.items()),
        "config": config,
        "meta": dict(meta or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_pretrained(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    kind: str = "auto",
    *,
    load_head: bool = False,
    resize_pos_embed: bool = False,
) -> LoadReport:
    """Load the encoder of a pretraining checkpoint into ``model``, checked; returns a :class:`LoadReport`.

    ``model`` is a backbone from :func:`create_backbone` (fine-tuning) or a pretraining model
    (e.g. a ``RotationClassifier`` started from a chest-MAE encoder). ``checkpoint`` is a path, a
    checkpoint dict, or a plain state dict (then ``kind`` names its layout, default "backbone", and
    the architecture is recognised from its keys; fastai's ``{"model": ...}`` and ``module.`` /
    ``_orig_mod.`` prefixes are unwrapped, with a note).

    Only the keys documented as pretraining-only (module docstring) are dropped. When the model is
    of the checkpoint's own kind (continuing pretraining) those parts are loaded too, and so is a
    backbone's classifier head with ``load_head=True``; otherwise the model's head / decoder keep
    their initialisation and are listed in ``new_keys``. Anything else that does not match -- another
    architecture, a missing or unexpected encoder key, a shape mismatch -- raises
    :class:`CheckpointMismatchError` before any weight is copied.

    ``resize_pos_embed=True`` lets a ViT position table of another grid size be resampled (timm's
    bicubic ``resample_abs_pos_embed``); by default a grid mismatch is an error, because it usually
    means the fine-tuning image or patch size differs from pretraining by mistake.
    """
    model = unwrap_model(model)  # a compiled or DataParallel model shares its weights with the inner one
    ck = _as_checkpoint(checkpoint, kind)
    target_kind = checkpoint_kind(model)
    target_arch = model_arch(model)
    ck_arch, ck_prefix, ck_encoder, ck_extra, unexpected = _split_checkpoint(ck, target_arch)

    target_prefix, target_is_extra = encoder_layout(target_kind, target_arch)
    target_state = model.state_dict()
    target_extra = [k for k in target_state if target_is_extra(k)]
    target_encoder = {  # backbone name -> the model's own key
        k[len(target_prefix):]: k for k in target_state if k.startswith(target_prefix) and not target_is_extra(k)
    }
    outside = [k for k in target_state if not k.startswith(target_prefix) and not target_is_extra(k)]

    notes = list(ck.notes)
    _adapt_encoder(ck, ck_encoder, model, target_prefix, target_encoder, target_state, resize_pos_embed, notes)
    load_extra = ck.kind == target_kind and (target_kind != "backbone" or load_head)
    to_load, missing, mismatch = _match(ck_encoder, target_encoder, target_state)
    dropped: list[str] = []
    unexpected += [ck_prefix + name for name in ck_encoder if name not in target_encoder]
    if load_extra:
        extra_loaded, extra_missing, extra_mismatch = _match(ck_extra, {k: k for k in target_extra}, target_state)
        to_load.update(extra_loaded)
        missing += extra_missing
        mismatch += extra_mismatch
        unexpected += [k for k in ck_extra if k not in target_extra]
        new_keys = outside
    else:
        dropped = sorted(ck_extra)
        new_keys = sorted(target_extra) + outside

    if ck.kind == "masked_cnn" and target_kind != "masked_cnn" and any("running_mean" in k for k in to_load):
        notes.append(
            "BatchNorm running statistics come from masked inputs; fine-tuning in train mode re-estimates them"
        )
    report = LoadReport(
        source=ck.source, kind=ck.kind, arch=ck_arch, loaded=len(to_load), missing=missing,
        unexpected=unexpected, shape_mismatch=mismatch, dropped=dropped, new_keys=new_keys, notes=notes,
    )
    if not report.ok:
        hint = ""
        if "backbone_kwargs" in ck.config:
            hint = f"; build the model with the checkpoint's backbone_kwargs {ck.config['backbone_kwargs']}"
        raise CheckpointMismatchError(f"checkpoint does not fit the {target_arch} model:\n{report.summary()}{hint}")

    result = model.load_state_dict(to_load, strict=False)
    if result.unexpected_keys or sorted(result.missing_keys) != sorted(missing + new_keys):
        raise RuntimeError(f"load_pretrained bookkeeping disagrees with torch: {result}")  # a bug here, not bad input
    return report


def _split_checkpoint(ck: Any, target_arch: str) -> tuple[str, str, dict, dict, list[str]]:
    """The checkpoint's architecture, encoder prefix, encoder weights (by backbone name), pretraining-only weights
    and unexpected keys; refuses a checkpoint of another architecture than the model's."""
    ck_prefix, ck_is_extra = encoder_layout(ck.kind, ck.arch)
    ck_encoder: dict[str, torch.Tensor] = {}
    ck_extra: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in ck.state_dict.items():
        if ck_is_extra(key):
            ck_extra[key] = value
        elif key.startswith(ck_prefix):
            ck_encoder[key[len(ck_prefix):]] = value
        else:
            unexpected.append(key)

    ck_arch = ck.arch or infer_arch(ck_encoder)
    if ck_arch is None:
        raise CheckpointMismatchError(
            f"checkpoint {ck.source}: cannot tell which architecture its {ck.kind} encoder is "
            f"(keys such as {_short(list(ck_encoder))}); known: {sorted(BACKBONES)}"
        )
    if ck_arch != target_arch:
        raise CheckpointMismatchError(
            f"checkpoint {ck.source} holds a {ck_arch} encoder ({ck.kind} checkpoint), model is {target_arch}: "
            f"load it into create_backbone({ck_arch!r}, ...) or pick the {target_arch} checkpoint"
        )
    if ck.kind == "backbone":  # the head of a plain backbone state dict is only known once the arch is
        ck_prefix, ck_is_extra = encoder_layout("backbone", ck_arch)
        for key in [k for k in ck_encoder if ck_is_extra(k)]:
            ck_extra[key] = ck_encoder.pop(key)
    return ck_arch, ck_prefix, ck_encoder, ck_extra, unexpected


def _adapt_encoder(ck: Any, ck_encoder: dict, model: nn.Module, target_prefix: str, target_encoder: dict,
                   target_state: dict, resize_pos_embed: bool, notes: list[str]) -> None:
    """Renames and reshapes the checkpoint's encoder weights in place where the model asks for it, with a note."""
    # A ViT fine-tuned with global average pooling normalises after pooling (fc_norm) instead of per
    # token (norm); the pretrained final LayerNorm is the natural start for it.
    pools_by_average = "fc_norm.weight" in target_encoder and "norm.weight" not in target_encoder
    if pools_by_average and "norm.weight" in ck_encoder and "fc_norm.weight" not in ck_encoder:
        for suffix in ("weight", "bias"):
            ck_encoder[f"fc_norm.{suffix}"] = ck_encoder.pop(f"norm.{suffix}")
        notes.append("the checkpoint's final norm.* was loaded into fc_norm.* (model pools by averaging)")

    if resize_pos_embed and "pos_embed" in ck_encoder and "pos_embed" in target_encoder:
        old, new = ck_encoder["pos_embed"], target_state[target_encoder["pos_embed"]]
        if old.shape != new.shape and old.shape[-1] == new.shape[-1]:
            from timm.layers import resample_abs_pos_embed

            new_grid = list(model.get_submodule(target_prefix + "patch_embed").grid_size)
            old_grid = _grid_from_config(ck.config)
            ck_encoder["pos_embed"] = resample_abs_pos_embed(
                old, new_size=new_grid, old_size=old_grid, num_prefix_tokens=1
            )
            notes.append(f"pos_embed resampled from {tuple(old.shape)} to {tuple(new.shape)} (bicubic)")

    _fold_rgb_stems(ck_encoder, target_encoder, target_state, notes)


def _match(weights: dict, targets: dict, target_state: dict) -> tuple[dict, list[str], list[str]]:
    """Which of ``weights`` (by name) load into the model's keys ``targets`` (name -> key): (to load, missing keys,
    shape mismatches)."""
    to_load: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    mismatch: list[str] = []
    for name, target_key in targets.items():
        if name not in weights:
            missing.append(target_key)
        elif weights[name].shape != target_state[target_key].shape:
            mismatch.append(_shape_mismatch(target_key, weights[name], target_state[target_key]))
        else:
            to_load[target_key] = weights[name]
    return to_load, missing, mismatch


def _as_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any], kind: str) -> _Checkpoint:
    if kind != "auto" and kind not in CHECKPOINT_KINDS:
        raise ValueError(f"kind must be 'auto' or one of {CHECKPOINT_KINDS}, got {kind!r}")
    notes: list[str] = []
    if isinstance(checkpoint, (str, os.PathLike)):
        source = str(checkpoint)
        checkpoint = _read_any_file(Path(checkpoint))
    else:
        source = "<in-memory checkpoint>"
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a path or a dict, got {type(checkpoint).__name__}")

    if "state_dict" in checkpoint and "kind" in checkpoint:
        ck_kind, arch = checkpoint["kind"], checkpoint.get("arch")
        if ck_kind not in CHECKPOINT_KINDS:
            raise ValueError(f"checkpoint {source} has kind {ck_kind!r}; expected one of {CHECKPOINT_KINDS}")
        if kind not in ("auto", ck_kind):
            raise CheckpointMismatchError(f"checkpoint {source} is a {ck_kind} checkpoint, not {kind!r} as asked")
        state, config = checkpoint["state_dict"], dict(checkpoint.get("config") or {})
    else:
        ck_kind, arch, config, state = ("backbone" if kind == "auto" else kind), None, {}, checkpoint
        if "model" in state and isinstance(state["model"], Mapping):
            state = state["model"]
            notes.append("unwrapped the 'model' entry (fastai / MAE save format)")
        if kind == "auto" and any(k == "mask_token" or k.startswith("decoder_") for k in state):
            ck_kind = "mae"
            notes.append("read as an MAE pretraining state dict (it holds mask_token / decoder_*)")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {source}: the state dict holds non-tensor values; is it a state dict?")
    state = dict(state)
    for wrapper in _WRAPPER_PREFIXES:
        if state and all(k.startswith(wrapper) for k in state):
            state = {k[len(wrapper):]: v for k, v in state.items()}
            notes.append(f"removed the {wrapper!r} prefix every key carried")
    if arch is not None and arch not in BACKBONES:
        raise ValueError(f"checkpoint {source} has arch {arch!r}; expected one of {sorted(BACKBONES)}")
    return _Checkpoint(kind=ck_kind, arch=arch, state_dict=state, config=config, source=source, notes=notes)


def _read_any_file(path: Path) -> Any:
    """An osteolib checkpoint (checked by :func:`read_checkpoint`) or any other weights file, read safely."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: fix the path")
    content = _read_weights_file(path)
    if isinstance(content, Mapping) and "state_dict" in content and "kind" in content:
        return read_checkpoint(path)
    return content


def _fold_rgb_stems(ck_encoder: dict[str, torch.Tensor], target_encoder: Mapping[str, str],
                    target_state: Mapping[str, torch.Tensor], notes: list[str]) -> None:
    """Sum the RGB kernels of a 3-channel stem over the input channels where the model's stem takes 1 channel
    (timm's ``adapt_input_conv``: a grey image fed as R=G=B gives the same response)."""
    from timm.models import adapt_input_conv

    for name, target_key in target_encoder.items():
        stored, wanted = ck_encoder.get(name), target_state[target_key]
        if stored is not None and stored.dim() == 4 and wanted.dim() == 4 and stored.shape[1] == 3 \
                and wanted.shape[1] == 1 and stored.shape[0] == wanted.shape[0] and stored.shape[2:] == wanted.shape[2:]:
            ck_encoder[name] = adapt_input_conv(1, stored)
            notes.append(f"{name}: 3-channel (RGB) kernels summed over the input channels for 1-channel images")


def _shape_mismatch(key: str, stored: torch.Tensor, wanted: torch.Tensor) -> str:
    return f"{key}: checkpoint {tuple(stored.shape)} vs model {tuple(wanted.shape)}"


def _grid_from_config(config: Mapping[str, Any]) -> list[int] | None:
    kwargs = config.get("backbone_kwargs") or {}
    if "img_size" in kwargs and "patch_size" in kwargs:
        height, width = size_pair(kwargs["img_size"], "img_size")
        return [height // kwargs["patch_size"], width // kwargs["patch_size"]]
    return None  # timm then assumes a square grid


def _short(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def model_from_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint was saved from (any kind) and load all of it, checked.

    Used to continue pretraining (chest MAE -> target MAE) and to draw reconstructions from a
    saved pretraining run. A backbone checkpoint comes back with its classifier head; any other kind
    is rebuilt by the model class registered for it (:mod:`osteolib.models.registry`) from its ``config``.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        source, checkpoint = str(checkpoint), read_checkpoint(checkpoint)
    else:
        source = "<in-memory checkpoint>"
    if "kind" not in checkpoint or "config" not in checkpoint:
        raise ValueError(
            f"checkpoint {source} lacks 'kind'/'config'; only save_encoder_checkpoint files can be rebuilt"
        )
    config = {k: v for k, v in checkpoint["config"].items() if k != "backbone_kwargs"}
    if checkpoint["kind"] == "backbone":
        model = create_backbone(checkpoint["arch"], **config)
    else:  # the model class registered for the kind (every model file registers itself)
        model = registered_models()[checkpoint["kind"]].cls(**config)
    load_pretrained(model, checkpoint, load_head=True)
    return model
