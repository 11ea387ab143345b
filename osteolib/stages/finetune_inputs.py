"""What a fine-tuning run establishes before any training: the label-fraction subsample, layer-wise lr decay by
stage, the classifier (built from the scenario's pretraining checkpoint) and every input check.

:func:`check_finetune_inputs` runs all of them and returns :class:`FinetuneInputs`;
:func:`osteolib.stages.finetune.finetune` trains only after it returned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from osteolib import models
from osteolib.data import check_no_leakage, split_targets
from osteolib.runs import Run
from osteolib.stages.finetune_config import SEARCHED, FinetuneConfig, is_number
from osteolib.stages.pretrain import default_patch_size, find_checkpoint
from osteolib.study import PRETRAINING_BACKBONES
from osteolib.utils import size_pair

__all__ = [
    "FinetuneInputs",
    "label_fraction_subset",
    "use_stage_layer_decay",
    "classifier_architecture",
    "check_finetune_inputs",
    "build_model",
]


# --------------------------------------------------------------------------------------------
# Label fraction


def label_fraction_subset(train_rows: pd.DataFrame, fraction: float, seed: int,
                          label_column: str = "label") -> pd.DataFrame:
    """The training rows of a ``fraction`` of the patients, stratified by label, nested and deterministic.

    Patients are grouped by the set of labels their images carry (a patient with images of two classes
    is a stratum of its own); within each stratum they are put in one order drawn from ``seed`` and the
    first ``max(1, round(fraction * n))`` are kept. The order does not depend on ``fraction``, so for one
    seed the 10 % set lies inside the 25 % set, and so on. All images of a chosen patient are kept, so the
    image fraction is close to, not exactly, ``fraction``. Rows keep their manifest order.
    """
    if not (is_number(fraction) and 0 < fraction <= 1):
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction!r}")
    if fraction == 1:
        return train_rows
    missing = [c for c in ("patient_id", label_column) if c not in train_rows.columns]
    if missing:
        raise ValueError(f"a label-fraction subsample is drawn by patient and label: the manifest lacks {missing}")
    patients = train_rows["patient_id"]
    empty = patients.isna() | (patients.astype(str).str.strip() == "")
    if empty.any():
        raise ValueError(f"{int(empty.sum())} train rows have no patient_id (e.g. image_ids "
                         f"{train_rows.loc[empty, 'image_id'].astype(str).tolist()[:5]}); a patient-level "
                         f"subsample needs one per image: fill patient_id (the image_id for unrelated images)")
    patients = patients.astype(str)
    strata = train_rows.groupby(patients)[label_column].agg(lambda labels: "|".join(sorted(set(map(str, labels)))))
    rng = np.random.default_rng(int(seed))
    kept: list[str] = []
    for stratum in sorted(strata.unique()):
        members = sorted(strata.index[strata == stratum])
        order = [members[i] for i in rng.permutation(len(members))]
        count = max(1, int(math.floor(fraction * len(members) + 0.5)))
        kept.extend(order[:count])
    return train_rows[patients.isin(set(kept))]


# --------------------------------------------------------------------------------------------
# Layer-wise lr decay by stage


class _FixedGroups:
    """A ``group_matcher`` that answers the same parameter grouping whatever ``coarse`` timm asks for."""

    def __init__(self, matcher: dict[str, Any]):
        self.matcher = matcher

    def __call__(self, coarse: bool = False) -> dict[str, Any]:
        return self.matcher


# The multi-scale DenseNet's encoder sits under "backbone."; the same per-dense-block grouping as timm's
# coarse DenseNet matcher. Heads, relevance weights and norm5 (block 4's tap) match nothing: timm puts
# unmatched parameters in the top group, with the full learning rate, as it does for a classifier.
_MULTISCALE_DENSENET_GROUPS = {
    "stem": r"^backbone\.features\.(?:conv0|norm0|pool0)",
    "blocks": r"^backbone\.features\.(?:denseblock|transition)(\d+)",
}


def use_stage_layer_decay(model: nn.Module) -> nn.Module:
    """Make timm's layer-wise lr decay (``osteolib.engine.param_groups``) decay by stage; returns ``model``.

    timm's ``param_groups_layer_decay`` asks ``model.group_matcher(coarse=False)``: for a ViT that is one
    group per transformer block (what BEiT/MAE decay by), but for DenseNet121 one per dense *layer*
    (58 of them), which with decay 0.55 would freeze all but the top layers. This pins the model's
    matcher to the coarse grouping -- per dense block (+ its transition) for DenseNet, per stage for
    ResNet / EfficientNet / MobileNet, per block for the ViT (unchanged) -- and gives the multi-scale
    DenseNet the same per-block grouping of its encoder. Set on the instance only.
    """
    if isinstance(model, models.MultiScaleDenseNet):
        model.group_matcher = _FixedGroups(dict(_MULTISCALE_DENSENET_GROUPS))
    elif hasattr(model, "group_matcher"):
        model.group_matcher = _FixedGroups(model.group_matcher(coarse=True))
    else:
        raise TypeError(f"{type(model).__name__} has no group_matcher: layer-wise lr decay cannot tell its layers "
                        f"apart; set layer_decay=None")
    return model


# --------------------------------------------------------------------------------------------
# Input checks and the model


@dataclass
class FinetuneInputs:
    """Everything :func:`check_finetune_inputs` established before any training.

    ``*_ids`` / ``*_targets``: image ids and class indices per split (train after the label fraction);
    ``model``: the freshly initialised (and, for a pretrained scenario, loaded) classifier.
    """

    classes: list[str]
    train_ids: list[str]
    train_targets: list[int]
    val_ids: list[str]
    val_targets: list[int]
    test_ids: list[str]
    test_targets: list[int]
    train_images_before_fraction: int
    rows_outside_splits: int
    checkpoint: Path | None
    architecture: dict[str, Any]  # create_backbone's keyword arguments besides num_classes and img_size
    model: nn.Module
    load_report: Any

    def counts(self) -> dict[str, Any]:
        """Images per split and class, the fraction actually used, and what was left aside."""
        def per_class(targets: list[int]) -> dict[str, int]:
            counted = np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(self.classes))
            return {c: int(n) for c, n in zip(self.classes, counted)}

        return {"train": per_class(self.train_targets), "val": per_class(self.val_targets),
                "test": per_class(self.test_targets),
                "train_images_before_fraction": self.train_images_before_fraction,
                "train_image_fraction": len(self.train_ids) / max(self.train_images_before_fraction, 1),
                "rows_outside_train_val_test": self.rows_outside_splits}


def _pretraining_checkpoint(config: FinetuneConfig, run: Run) -> Path | None:
    if config.init_checkpoint is not None:
        return config.check_init_checkpoint()
    if config.scenario == "random":
        return None
    arch = models.encoder_arch(config.backbone)
    if arch not in PRETRAINING_BACKBONES:
        raise ValueError(f"scenario {config.scenario!r} needs a pretrained {arch} encoder, but the pretraining "
                         f"stage trains only {list(PRETRAINING_BACKBONES)}; fine-tune {config.backbone!r} with "
                         f"scenario='random' or pick one of those backbones")
    try:
        return find_checkpoint(run, config.scenario, arch)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"fine-tuning {config.backbone} from scenario {config.scenario!r}: {err}") from None


def classifier_architecture(config: FinetuneConfig, run: Run) -> tuple[Path | None, dict[str, Any]]:
    """The pretraining checkpoint a run starts from (None for ``random``) and the keyword arguments of
    :func:`~osteolib.models.create_backbone` besides ``num_classes`` and ``img_size`` that its classifier is built
    with: the architecture options the checkpoint was saved with (ViT patch size, depth, ...), so its encoder fits.
    A mismatch with ``config`` raises :class:`~osteolib.models.CheckpointMismatchError` naming the scenario and
    backbone. Fine-tuning records the result in its summary, so :func:`load_finetuned` needs no pretraining files.
    """
    config.validate()
    checkpoint = _pretraining_checkpoint(config, run)
    kwargs: dict[str, Any] = {}
    what = f"scenario {config.scenario!r} for backbone {config.backbone!r}"
    saved = _osteolib_checkpoint(checkpoint, config)
    if saved is not None:
        arch = models.encoder_arch(config.backbone)
        if saved["arch"] != arch:  # before its options are used to build a model they do not belong to
            raise models.CheckpointMismatchError(
                f"{what}: {checkpoint} holds a {saved['arch']} encoder ({saved['kind']} checkpoint), but "
                f"{config.backbone} needs a {arch} one; the file at checkpoints/{config.scenario}/{arch}.pt is "
                f"from another architecture: rerun that pretraining stage for {arch}")
        kwargs = dict((saved.get("config") or {}).get("backbone_kwargs") or {})
        for key in ("num_classes", "drop_path_rate", "drop_rate"):  # fine-tuning choices, not architecture
            kwargs.pop(key, None)
        saved_size = kwargs.pop("img_size", None)
        if config.is_vit and saved_size is not None and \
                size_pair(saved_size, "img_size") != (config.image_size, config.image_size):
            raise models.CheckpointMismatchError(
                f"{what}: {checkpoint} was pretrained at img_size {saved_size}, but image_size={config.image_size}; "
                f"the ViT's position table belongs to one patch grid: fine-tune at image_size={saved_size}")
    if config.is_vit:
        saved_patch = kwargs.pop("patch_size", None)
        if config.patch_size is not None and saved_patch is not None and config.patch_size != saved_patch:
            raise models.CheckpointMismatchError(
                f"{what}: {checkpoint} uses patch_size {saved_patch}, but patch_size={config.patch_size}; "
                f"leave patch_size=None to take the checkpoint's")
        kwargs["patch_size"] = config.patch_size or saved_patch or default_patch_size("vit_small", config.image_size)
        kwargs["drop_path_rate"] = float(config.drop_path)
    return checkpoint, kwargs


def _osteolib_checkpoint(checkpoint: Path | None, config: FinetuneConfig) -> dict[str, Any] | None:
    """The checkpoint's content when it is in osteolib's format (it then records its architecture options); None
    for no checkpoint and for a user's plain weights file (timm state dict, medical MAE), read by load_pretrained."""
    if checkpoint is None:
        return None
    if config.init_checkpoint is None:
        return models.read_checkpoint(checkpoint)
    try:
        return models.read_checkpoint(checkpoint)
    except ValueError:  # not osteolib's format (or unreadable: load_pretrained then says why)
        return None


def build_model(config: FinetuneConfig, run: Run, num_classes: int = 2) -> tuple[nn.Module, Any]:
    """The classifier of a run and the :class:`~osteolib.models.LoadReport` of its initialisation (None for
    ``random``), built as :func:`classifier_architecture` says. Layer-wise decay is set to count stages
    (:func:`use_stage_layer_decay`).
    """
    checkpoint, kwargs = classifier_architecture(config, run)
    return _build_classifier(config, checkpoint, kwargs, num_classes)


def _build_classifier(config: FinetuneConfig, checkpoint: Path | None, kwargs: dict[str, Any],
                      num_classes: int) -> tuple[nn.Module, Any]:
    """:func:`build_model` from :func:`classifier_architecture`'s answer (so a caller that keeps it reads the
    checkpoint's options once)."""
    what = f"scenario {config.scenario!r} for backbone {config.backbone!r}"
    # torch seeds its generator randomly at start-up, so an unseeded build gives every process another
    # initialisation (a random-init model, and a pretrained encoder's new head): seed the build itself.
    torch.manual_seed(config.seed)
    model = models.create_backbone(config.backbone, num_classes=num_classes, img_size=config.image_size, **kwargs)
    report = None
    if checkpoint is not None:
        try:
            # a user's weights (e.g. ImageNet at 224 px) may come from another patch grid: resample the ViT's table
            report = models.load_pretrained(model, checkpoint, resize_pos_embed=config.init_checkpoint is not None)
        except models.CheckpointMismatchError as err:
            raise models.CheckpointMismatchError(f"{what}: the checkpoint {checkpoint} does not fit: {err}") from None
    if config.layer_decay not in (None, 1.0):
        use_stage_layer_decay(model)
    return model, report


def _resolve_classes(manifest: pd.DataFrame, classes: Sequence[str] | None) -> list[str]:
    if classes is None:
        used = manifest[manifest["split"].astype(str).isin(("train", "val", "test"))]
        classes = sorted(set(used["label"].astype(str)))
    classes = [str(c) for c in classes]
    if len(classes) < 2 or len(set(classes)) != len(classes) or any(not c.strip() for c in classes):
        raise ValueError(f"classes must be at least two distinct non-empty names, got {classes}; a classifier "
                         f"needs two labels in the manifest's train/val/test rows")
    return classes


def check_finetune_inputs(config: FinetuneConfig, run: Run, manifest: pd.DataFrame,
                          classes: Sequence[str] | None = None,
                          splits_used: Sequence[str] = ("train", "val", "test")) -> FinetuneInputs:
    """Every check of a run, before any loader is built or any step trained; returns what they established.

    The config is valid; the manifest has the columns, splits and labels needed; every split (train after
    ``label_fraction``, val, test) holds at least two classes (else AUC is undefined); the scenario's
    checkpoint exists (``random`` needs none) and loads into the model without a missing or foreign key.
    ``splits_used=("train", "val")`` (the recipe search) leaves the test rows unread: no test id or label is taken.
    """
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(manifest, pd.DataFrame):
        raise TypeError(f"manifest must be a pandas DataFrame, got {type(manifest).__name__}")
    missing = [c for c in ("image_id", "label", "patient_id", "split") if c not in manifest.columns]
    if missing:
        raise ValueError(f"the manifest lacks column(s) {missing}; build it with osteolib.data.manifest and split it first")
    repeated = manifest["image_id"][manifest["image_id"].astype(str).duplicated()].astype(str).unique().tolist()
    if repeated:
        raise ValueError(f"the manifest repeats image_id(s) {repeated[:5]}: ids must be unique")
    check_no_leakage(manifest, check_content=False)  # a patient in two splits is scored as unseen: never train on it
    unknown = sorted(set(splits_used) - {"train", "val", "test"})
    if unknown or not {"train", "val"} <= set(splits_used):
        raise ValueError(f"splits_used={list(splits_used)}: a run trains on train and selects on val; test is optional")
    if config.recipe == SEARCHED:
        raise ValueError(f"recipe={SEARCHED!r} is a request, not settings: resolve it first with "
                         f"osteolib.stages.recipe_search.resolve_recipe(config, run)")
    rows_outside = int((~manifest["split"].astype(str).isin(("train", "val", "test"))).sum())
    if "test" not in splits_used:
        manifest = manifest[manifest["split"].astype(str) != "test"]
    classes = _resolve_classes(manifest, classes)
    splits = {}
    for split in splits_used:
        splits[split] = split_targets(manifest, split, classes)
    splits.setdefault("test", ([], []))

    all_train = manifest[manifest["split"].astype(str) == "train"]
    chosen = label_fraction_subset(all_train, config.label_fraction, config.seed)
    keep = set(chosen["image_id"].astype(str))
    train_pairs = [(i, t) for i, t in zip(*splits["train"]) if i in keep]
    train_ids, train_targets = [i for i, _ in train_pairs], [t for _, t in train_pairs]
    splits["train"] = (train_ids, train_targets)

    for split, (ids, targets) in splits.items():
        if split not in splits_used:
            continue
        present = sorted(set(targets))
        if len(present) < 2:
            extra = f" after label_fraction={config.label_fraction}" if split == "train" and \
                config.label_fraction < 1 else ""
            raise ValueError(f"AUC undefined: the {split} split{extra} holds only class {classes[present[0]]!r} "
                             f"({len(ids)} images); use a patient-level split stratified by label so that every "
                             f"split holds every class")
    if len(train_ids) < 2:
        raise ValueError(f"the train split holds {len(train_ids)} image(s) after label_fraction="
                         f"{config.label_fraction}; training needs at least two")
    if config.uses_mixing and len(train_ids) < config.batch_size:
        raise ValueError(f"mixup/cutmix need full, even batches: {len(train_ids)} training images are fewer than "
                         f"batch_size={config.batch_size}; lower batch_size or turn mixing off")

    # a missing or unfitting checkpoint is named before any model is built
    checkpoint, architecture = classifier_architecture(config, run)
    model, report = _build_classifier(config, checkpoint, architecture, num_classes=len(classes))
    return FinetuneInputs(classes=classes, train_ids=train_ids, train_targets=train_targets,
                          val_ids=splits["val"][0], val_targets=splits["val"][1],
                          test_ids=splits["test"][0], test_targets=splits["test"][1],
                          train_images_before_fraction=len(all_train), rows_outside_splits=rows_outside,
                          checkpoint=checkpoint, architecture=architecture, model=model, load_report=report)
