"""The fine-tuning stage: one (scenario, backbone, seed, label fraction) run, honest selection, saved predictions.

A run initialises a classifier from one pretraining scenario (:data:`osteolib.study.SCENARIOS`),
fine-tunes it on the manifest's *train* split through the one ``fit`` path, keeps the checkpoint of
the epoch with the best *validation* AUC, chooses the decision threshold on the validation predictions
(Youden's J), and only then predicts the *test* split, once. Its per-image predictions (val rows of the
selected checkpoint and the test rows) go to ``<run>/predictions/<name>.csv`` in the prediction-table
contract of :mod:`osteolib.evaluation`; nothing here ever looks at a test score before everything is fixed.

The study's recipe is the default of :class:`FinetuneConfig` (every field is a notebook parameter):
RandAugment magnitude 6, weight decay 0.05, layer-wise lr decay 0.55, base learning rate 6.25e-5 scaled
with the batch size by MAE's rule as :class:`osteolib.engine.TrainConfig` applies it (peak lr = base_lr *
batch_size / 256: 7.8e-6 at batch 32), per-step linear warmup then cosine, drop path 0.1 for the ViT,
RandomResizedCrop with area 0.5-1.0 and horizontal flips; mixup / cutmix available and off.

Decisions worth knowing:

* Binary problems use two logits with softmax cross-entropy, like multi-class ones: one code path, and the
  saved probabilities are softmax outputs whose rows sum to 1 (the prediction-table contract). The
  positive class is ``classes[1]``; by default classes are the sorted label names.
* Layer-wise lr decay counts *stages*: timm's coarse parameter groups (dense block for DenseNet, stage
  for ResNet / EfficientNet / MobileNet; the ViT's coarse groups are its transformer blocks). timm's fine
  groups for DenseNet121 are its 58 dense *layers*: 0.55 ** 59 would leave the stem with an lr scale of
  ~1e-15, i.e. frozen. See :func:`use_stage_layer_decay`.
* ``drop_path`` applies to the ViT only (timm's CNNs here have no stochastic depth).
* ``label_fraction`` < 1 trains on a patient-level, label-stratified, nested subsample of the train split
  (:func:`label_fraction_subset`); validation and test are unchanged.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.metrics import AccumMetric, ActivationType
from sklearn.metrics import roc_auc_score
from torch import nn

from osteolib import models
from osteolib.data import XrayDataset, make_dataloaders, split_targets
from osteolib.evaluation import (
    choose_threshold,
    evaluate,
    evaluate_runs,
    multiclass_metrics,
    prediction_table,
    read_predictions,
    results_table,
    summarise_runs,
    to_latex,
    to_markdown,
    write_predictions,
)
from osteolib.stages.pretrain import find_checkpoint
from osteolib.study import PRETRAINING_BACKBONES, SCENARIOS
from osteolib.runs import Run
from osteolib.engine import BEST, PrecisionChoice, TrainConfig, fit, load_weights
from osteolib.data import crop_policy, finetune_transform

__all__ = [
    "FinetuneConfig",
    "FinetuneInputs",
    "FinetuneResult",
    "MixupCallback",
    "soft_cross_entropy",
    "auc_metric",
    "run_name",
    "label_fraction_subset",
    "use_stage_layer_decay",
    "check_finetune_inputs",
    "build_model",
    "predict_probs",
    "finetune",
    "collect_results",
    "write_results_tables",
    "label_efficiency_table",
    "label_efficiency_figure",
    "BACKBONE_LABELS",
    "SCENARIO_LABELS",
]

# One fixed patient-level split (no cross-validation): every run is fold 0 of the prediction contract.
FOLD = 0
MONITOR = "valid_auc"
THRESHOLD_METHODS = ("youden", "f1")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# Display names for the paper's tables and figures (raw names stay in every CSV).
BACKBONE_LABELS = {"densenet121": "DenseNet121", "densenet121_multiscale": "DenseNet121 multi-scale",
                   "vit_small": "ViT-small", "efficientnetv2_s": "EfficientNetV2-S", "resnet50": "ResNet50",
                   "mobilenetv3": "MobileNetV3"}
SCENARIO_LABELS = {"random": "Random initialisation", "chest_mae": "Chest MAE",
                   "chest_mae+target_mae_random": "Chest MAE + target MAE (random crop)",
                   "chest_mae+target_mae_center": "Chest MAE + target MAE (center crop)",
                   "chest_mae+rotation": "Chest MAE + rotation proxy"}


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Defaults are the study's recipe.

    ``base_lr`` is scaled by ``batch_size / 256`` (MAE's rule, via ``TrainConfig(base_lr=...)``): the
    default 6.25e-5 gives a peak lr of 7.8e-6 at batch 32 and 6.25e-5 at batch 256.
    ``patch_size`` (ViT only): None takes the pretraining checkpoint's, else 16. ``mixup`` / ``cutmix``
    are the Beta-distribution alphas of timm's Mixup (0 = off). ``layer_decay`` None (or 1.0) turns
    layer-wise decay off. ``threshold_method``: how the validation predictions fix the decision threshold.
    """

    scenario: str
    backbone: str
    image_size: int = 128
    patch_size: int | None = None
    epochs: int = 10
    batch_size: int = 32
    base_lr: float = 6.25e-5
    weight_decay: float = 0.05
    layer_decay: float | None = 0.55
    warmup_epochs: float = 1.0
    drop_path: float = 0.1
    randaug_magnitude: int | None = 6
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    mixup: float = 0.0
    cutmix: float = 0.0
    label_fraction: float = 1.0
    seed: int = 0
    precision: str = "auto"
    threshold_method: str = "youden"

    def __post_init__(self) -> None:
        if isinstance(self.crop_scale, (list, tuple)) and all(_is_number(v) for v in self.crop_scale):
            self.crop_scale = tuple(float(v) for v in self.crop_scale)  # type: ignore[assignment]
        if isinstance(self.label_fraction, int) and not isinstance(self.label_fraction, bool):
            self.label_fraction = float(self.label_fraction)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming every bad field (run again by :func:`check_finetune_inputs`)."""
        problems: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        need(self.scenario in SCENARIOS, f"scenario={self.scenario!r} is unknown; choose one of {list(SCENARIOS)}")
        need(self.backbone in models.BACKBONE_NAMES,
             f"backbone={self.backbone!r} is unknown; choose one of {list(models.BACKBONE_NAMES)}")
        need(_is_int(self.image_size) and self.image_size >= 16,
             f"image_size must be an int >= 16 pixels (got {self.image_size!r})")
        need(self.patch_size is None or (_is_int(self.patch_size) and self.patch_size >= 1),
             f"patch_size must be None or an int >= 1 (got {self.patch_size!r})")
        need(_is_int(self.epochs) and self.epochs >= 1, f"epochs must be an int >= 1 (got {self.epochs!r})")
        need(_is_int(self.batch_size) and self.batch_size >= 2,
             f"batch_size must be an int >= 2 (BatchNorm needs two images per batch; got {self.batch_size!r})")
        need(_is_number(self.base_lr) and self.base_lr > 0, f"base_lr must be > 0 (got {self.base_lr!r})")
        need(_is_number(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be >= 0 (got {self.weight_decay!r})")
        need(self.layer_decay is None or (_is_number(self.layer_decay) and 0 < self.layer_decay <= 1),
             f"layer_decay must be in (0, 1] or None (got {self.layer_decay!r})")
        if _is_number(self.warmup_epochs) and _is_int(self.epochs):
            need(0 <= self.warmup_epochs < self.epochs,
                 f"warmup_epochs must be in [0, epochs={self.epochs}) (got {self.warmup_epochs!r}); "
                 f"for a one-epoch run set warmup_epochs=0 or a fraction such as 0.5")
        else:
            problems.append(f"warmup_epochs must be a number (got {self.warmup_epochs!r})")
        need(_is_number(self.drop_path) and 0 <= self.drop_path < 1,
             f"drop_path must be in [0, 1) (got {self.drop_path!r})")
        need(self.randaug_magnitude is None or (_is_int(self.randaug_magnitude) and 0 <= self.randaug_magnitude <= 30),
             f"randaug_magnitude must be None (no RandAugment) or an int in [0, 30] (got {self.randaug_magnitude!r})")
        need(isinstance(self.crop_scale, tuple) and len(self.crop_scale) == 2
             and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
             f"crop_scale must be (min, max) area fractions with 0 < min <= max <= 1 (got {self.crop_scale!r})")
        need(isinstance(self.hflip, bool), f"hflip must be True or False (got {self.hflip!r})")
        for name in ("mixup", "cutmix"):
            value = getattr(self, name)
            need(_is_number(value) and value >= 0, f"{name} must be a Beta alpha >= 0, 0 = off (got {value!r})")
        if self.uses_mixing and _is_int(self.batch_size):
            need(self.batch_size % 2 == 0,
                 f"mixup/cutmix pair each image with the batch reversed and need an even batch_size "
                 f"(got {self.batch_size})")
        need(_is_number(self.label_fraction) and 0 < self.label_fraction <= 1,
             f"label_fraction must be in (0, 1] (got {self.label_fraction!r})")
        need(_is_int(self.seed) and self.seed >= 0, f"seed must be an int >= 0 (got {self.seed!r})")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS} (got {self.precision!r})")
        need(self.threshold_method in THRESHOLD_METHODS,
             f"threshold_method must be one of {THRESHOLD_METHODS} (got {self.threshold_method!r})")
        if problems:
            raise ValueError("invalid FinetuneConfig: " + "; ".join(problems))

    @property
    def uses_mixing(self) -> bool:
        return bool(self.mixup) or bool(self.cutmix)

    @property
    def is_vit(self) -> bool:
        return models.BACKBONES[models.encoder_arch(self.backbone)].family == "vit"

    def train_config(self) -> TrainConfig:
        """The ``fit`` recipe: best checkpoint by validation AUC."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, base_lr=self.base_lr,
                           weight_decay=self.weight_decay, warmup_epochs=float(self.warmup_epochs),
                           layer_decay=None if self.layer_decay in (None, 1.0) else float(self.layer_decay),
                           seed=self.seed, precision=self.precision, monitor=MONITOR, monitor_mode="max")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


def run_name(config: FinetuneConfig) -> str:
    """The run's name, used for its prediction file, history and training folder."""
    return f"{config.scenario}-{config.backbone}-seed{config.seed}-frac{float(config.label_fraction)}"


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
    if not (_is_number(fraction) and 0 < fraction <= 1):
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
# Loss, metric, mixup


def soft_cross_entropy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class-index targets and for soft (N, C) targets (mixup/cutmix batches).

    Validation batches are never mixed, so one loss serves training and validation.
    """
    if target.is_floating_point() and target.dim() == 2:
        return torch.sum(-target * F.log_softmax(pred, dim=-1), dim=-1).mean()
    return F.cross_entropy(pred, target)


class MixupCallback(Callback):
    """timm's Mixup/CutMix on training batches only (``before_batch``); validation batches stay as they are.

    Targets become soft (N, C) rows, which :func:`soft_cross_entropy` handles. Mixing draws from numpy's
    global generator, which ``fit`` seeds and checkpoints, so runs stay reproducible and resumable.
    """

    order = 8  # after the lr schedule (5), before autocast / channels-last conversion (10)

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int):
        super().__init__()
        from timm.data import Mixup

        # No label smoothing: the study's recipe has none, and timm's default (0.1) would add it silently.
        self.mixer = Mixup(mixup_alpha=float(mixup_alpha), cutmix_alpha=float(cutmix_alpha), label_smoothing=0.0,
                           num_classes=int(num_classes))

    def before_batch(self) -> None:
        if not self.learn.training:
            return
        images, targets = self.learn.xb[0], self.learn.yb[0]
        if len(images) % 2:
            raise ValueError(f"mixup/cutmix got a batch of {len(images)} images; it needs an even batch size")
        images, soft = self.mixer(images, targets)
        self.learn.xb = (images, *self.learn.xb[1:])
        self.learn.yb = (soft,)


def _auc_of(targets: np.ndarray, probs: np.ndarray) -> float:
    if probs.shape[1] == 2:
        return float(roc_auc_score(targets, probs[:, 1]))
    # The same macro one-vs-rest AUC as the reported metrics, so selection and evaluation agree.
    return float(multiclass_metrics(targets, probs, [str(i) for i in range(probs.shape[1])])["auc"])


def auc_metric() -> AccumMetric:
    """The validation AUC per epoch, named ``valid_auc``: softmax outputs, AUC of the positive class for
    binary problems, macro one-vs-rest AUC for more classes (as :func:`osteolib.evaluation.evaluate`)."""
    return AccumMetric(_auc_of, dim_argmax=-1, activation=ActivationType.Softmax, flatten=False, to_np=True,
                       invert_arg=True, name=MONITOR)


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
    if checkpoint is not None:
        saved = models.read_checkpoint(checkpoint)
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
                models.backbones.size_pair(saved_size, "img_size") != (config.image_size, config.image_size):
            raise models.CheckpointMismatchError(
                f"{what}: {checkpoint} was pretrained at img_size {saved_size}, but image_size={config.image_size}; "
                f"the ViT's position table belongs to one patch grid: fine-tune at image_size={saved_size}")
    if config.is_vit:
        saved_patch = kwargs.pop("patch_size", None)
        if config.patch_size is not None and saved_patch is not None and config.patch_size != saved_patch:
            raise models.CheckpointMismatchError(
                f"{what}: {checkpoint} uses patch_size {saved_patch}, but patch_size={config.patch_size}; "
                f"leave patch_size=None to take the checkpoint's")
        kwargs["patch_size"] = config.patch_size or saved_patch or 16
        kwargs["drop_path_rate"] = float(config.drop_path)
    return checkpoint, kwargs


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
            report = models.load_pretrained(model, checkpoint)
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
                          classes: Sequence[str] | None = None) -> FinetuneInputs:
    """Every check of a run, before any loader is built or any step trained; returns what they established.

    The config is valid; the manifest has the columns, splits and labels needed; every split (train after
    ``label_fraction``, val, test) holds at least two classes (else AUC is undefined); the scenario's
    checkpoint exists (``random`` needs none) and loads into the model without a missing or foreign key.
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
    classes = _resolve_classes(manifest, classes)
    splits = {}
    for split in ("train", "val", "test"):
        splits[split] = split_targets(manifest, split, classes)
    rows_outside = int((~manifest["split"].astype(str).isin(("train", "val", "test"))).sum())

    all_train = manifest[manifest["split"].astype(str) == "train"]
    chosen = label_fraction_subset(all_train, config.label_fraction, config.seed)
    keep = set(chosen["image_id"].astype(str))
    train_pairs = [(i, t) for i, t in zip(*splits["train"]) if i in keep]
    train_ids, train_targets = [i for i, _ in train_pairs], [t for _, t in train_pairs]
    splits["train"] = (train_ids, train_targets)

    for split, (ids, targets) in splits.items():
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


# --------------------------------------------------------------------------------------------
# Prediction


@torch.no_grad()
def predict_probs(model: nn.Module, cache: Any, image_ids: Sequence[str], image_size: int, mean: float, std: float,
                  batch_size: int = 64, precision: PrecisionChoice | None = None) -> np.ndarray:
    """Softmax probabilities (N, C) of whole images (resized to ``image_size``, no augmentation), in the
    order of ``image_ids``; under ``precision``'s autocast when it has one (as in training)."""
    dataset = XrayDataset(cache, image_ids, transform=crop_policy("none", image_size), mean=mean, std=std)
    device = next(model.parameters()).device
    autocast = (torch.autocast(precision.device_type, dtype=precision.autocast_dtype)
                if precision is not None and precision.autocast_dtype is not None else contextlib.nullcontext())
    outputs = []
    with models.eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            batch = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
            with autocast:
                logits = model(batch.to(device))
            outputs.append(torch.softmax(logits.float(), dim=-1).cpu())
    return torch.cat(outputs).numpy().astype(np.float64)


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class FinetuneResult:
    """What one fine-tuning run produced. ``chosen_epoch`` (0-based) and ``valid_auc`` come from the
    validation split only; ``threshold`` (binary problems; None otherwise) was chosen on the validation
    predictions of that checkpoint; ``test_metrics`` were computed once, afterwards, at that threshold."""

    name: str
    config: FinetuneConfig
    model: nn.Module = field(repr=False)
    history: pd.DataFrame = field(repr=False)
    chosen_epoch: int
    valid_auc: float
    threshold: float | None
    val_metrics: dict[str, Any] = field(repr=False)
    test_metrics: dict[str, Any] = field(repr=False)
    predictions_path: Path
    history_path: Path
    summary_path: Path
    out_dir: Path
    classes: list[str]
    counts: dict[str, Any] = field(repr=False)
    load_report: Any = field(repr=False)
    precision: str = "fp32"
    train_images_per_s: float | None = None
    seconds: float = 0.0


def finetune(run: Run, config: FinetuneConfig, manifest: pd.DataFrame, cache: Any, mean: float, std: float,
             classes: Sequence[str] | None = None, quiet: bool = False, resume: bool = False) -> FinetuneResult:
    """Fine-tune one run, select on validation, predict test once, and write its files into ``run``.

    Files: ``predictions/<name>.csv`` (val rows of the selected checkpoint + test rows),
    ``logs/<name>-history.csv`` (per epoch), ``logs/<name>-summary.json`` (choices and metrics), and the
    training folder ``checkpoints/finetune/<name>/`` (``best.pt`` = the selected weights). ``classes`` fixes
    the class order (binary: ``classes[1]`` is positive); default sorted label names. ``resume`` continues
    an interrupted training folder. Every input check runs before training (:func:`check_finetune_inputs`).
    """
    started = time.perf_counter()
    name = run_name(config)
    predictions_path = run.predictions / f"{name}.csv"
    if predictions_path.exists():
        raise FileExistsError(f"{predictions_path} exists: run {name} is already finished in {run.path}; "
                              f"start a new run folder (predictions are written once)")
    inputs = check_finetune_inputs(config, run, manifest, classes)
    absent = [i for i in inputs.test_ids + inputs.val_ids if i not in cache.index]
    if absent:
        raise KeyError(f"{len(absent)} val/test image ids are not in the cache (first: {absent[:5]}); build the cache "
                       f"from the same manifest")
    model, classes = inputs.model, inputs.classes
    if not quiet:
        if inputs.load_report is not None:
            print(inputs.load_report.summary())
        counts = inputs.counts()
        print(f"[{name}] train {counts['train']} ({counts['train_image_fraction']:.1%} of "
              f"{counts['train_images_before_fraction']} train images), val {counts['val']}, test {counts['test']}; "
              f"{counts['rows_outside_train_val_test']} manifest rows outside train/val/test are not used")

    train_transform = finetune_transform(config.image_size, crop="random", scale=config.crop_scale, flip=config.hflip,
                                         magnitude=config.randaug_magnitude)
    dls = make_dataloaders(cache, inputs.train_ids, inputs.val_ids, train_targets=inputs.train_targets,
                           valid_targets=inputs.val_targets, train_transform=train_transform,
                           valid_transform=crop_policy("none", config.image_size), batch_size=config.batch_size,
                           valid_batch_size=2 * config.batch_size, seed=config.seed, mean=mean, std=std)
    callbacks = [MixupCallback(config.mixup, config.cutmix, len(classes))] if config.uses_mixing else []
    out_dir = run.checkpoints / "finetune" / name
    fitted = fit(model, dls, config.train_config(), out_dir, loss_func=soft_cross_entropy, metrics=[auc_metric()],
                 stage="finetune", resume=resume, quiet=quiet, cbs=callbacks)
    if fitted.best_path is None:
        raise RuntimeError(f"[{name}] no epoch produced a validation AUC (history in {out_dir}); nothing can be "
                           f"selected. Check the loss for NaN (lower base_lr) and that val holds two classes")

    # Selection is fixed here, from the validation split only: the best epoch's weights ...
    load_weights(model, fitted.best_path)
    val_probs = predict_probs(model, cache, inputs.val_ids, config.image_size, mean, std,
                              batch_size=2 * config.batch_size, precision=fitted.precision)
    identifiers = dict(scenario=config.scenario, backbone=config.backbone, seed=config.seed, fold=FOLD,
                       label_fraction=float(config.label_fraction))
    val_labels = [classes[t] for t in inputs.val_targets]
    val_table = prediction_table(inputs.val_ids, val_labels, val_probs, classes, "val", **identifiers)
    # ... and the decision threshold, on those validation predictions.
    threshold = None
    if len(classes) == 2:
        threshold = choose_threshold(np.asarray(inputs.val_targets), val_probs[:, 1], method=config.threshold_method)

    # Only now is the test split read, once.
    test_probs = predict_probs(model, cache, inputs.test_ids, config.image_size, mean, std,
                               batch_size=2 * config.batch_size, precision=fitted.precision)
    test_labels = [classes[t] for t in inputs.test_targets]
    test_table = prediction_table(inputs.test_ids, test_labels, test_probs, classes, "test", **identifiers)
    write_predictions(pd.concat([val_table, test_table], ignore_index=True), predictions_path)

    val_metrics = evaluate(val_table, threshold=threshold)
    test_metrics = evaluate(test_table, threshold=threshold)
    logs = run.dir("logs")
    history_path = logs / f"{name}-history.csv"
    fitted.history.to_csv(history_path, index=False)
    throughput = fitted.history.get("train_images_per_s")
    images_per_s = float(throughput.iloc[-1]) if throughput is not None and len(throughput) else None
    result = FinetuneResult(
        name=name, config=config, model=model, history=fitted.history, chosen_epoch=int(fitted.best_epoch),
        valid_auc=float(fitted.best_value), threshold=threshold, val_metrics=val_metrics, test_metrics=test_metrics,
        predictions_path=predictions_path, history_path=history_path, summary_path=logs / f"{name}-summary.json",
        out_dir=out_dir, classes=classes, counts=inputs.counts(), load_report=inputs.load_report,
        precision=fitted.precision.name, train_images_per_s=images_per_s, seconds=time.perf_counter() - started)
    _write_summary(result, inputs)
    if not quiet:
        at = f" at threshold {threshold:.3f} (val {config.threshold_method})" if threshold is not None else ""
        print(f"[{name}] selected epoch {result.chosen_epoch} (valid AUC {result.valid_auc:.3f}); test AUC "
              f"{test_metrics['auc']:.3f}, accuracy {test_metrics['accuracy']:.3f}{at}; {result.seconds:.0f} s")
    return result


def _write_summary(result: FinetuneResult, inputs: FinetuneInputs) -> None:
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(result.config).items()}
    summary = {
        "name": result.name, "config": config, "peak_lr": result.config.train_config().peak_lr,
        "classes": result.classes, "positive_class": result.classes[1] if len(result.classes) == 2 else None,
        "selection": {"monitor": MONITOR, "split": "val", "chosen_epoch": result.chosen_epoch,
                      "valid_auc": result.valid_auc},
        "threshold": {"value": result.threshold, "method": result.config.threshold_method, "split": "val"},
        "val_metrics": result.val_metrics, "test_metrics": result.test_metrics, "counts": result.counts,
        "init_checkpoint": str(inputs.checkpoint) if inputs.checkpoint else None,
        "architecture": inputs.architecture,
        "init_report": result.load_report.summary() if result.load_report is not None else None,
        "drop_path_applied": result.config.drop_path if result.config.is_vit else 0.0,
        "precision": result.precision, "train_images_per_s": result.train_images_per_s,
        # CPU results are bit-reproducible for a fixed seed *and* thread count (reductions split by thread)
        "torch_threads": torch.get_num_threads(),
        "seconds": result.seconds, "predictions": str(result.predictions_path),
        "training_folder": str(result.out_dir),
    }
    result.summary_path.write_text(json.dumps(summary, indent=1, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


# --------------------------------------------------------------------------------------------
# Results of a run folder


def collect_results(run: Run) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-run test metrics and their summary (mean ± std over seeds) from this run's prediction files.

    Each run's threshold is chosen on its own validation rows (:func:`osteolib.evaluation.evaluate_runs`);
    the summary groups by backbone, scenario and label fraction.
    """
    predictions = read_predictions(run.predictions)
    metrics = evaluate_runs(predictions)
    per_run = metrics[metrics["split"] == "test"].reset_index(drop=True)
    by = [c for c in ("backbone", "scenario", "label_fraction") if c in per_run.columns]
    summary = summarise_runs(per_run, by=by)
    order = _display_order(summary)
    return per_run, summary.iloc[order].reset_index(drop=True)


def _display_order(summary: pd.DataFrame) -> list[int]:
    backbones = list(BACKBONE_LABELS)
    scenarios = list(SCENARIOS)

    def key(i: int) -> tuple:
        row = summary.iloc[i]
        backbone, scenario = str(row["backbone"]), str(row["scenario"])
        fraction = float(row["label_fraction"]) if "label_fraction" in summary.columns else 1.0
        return (backbones.index(backbone) if backbone in backbones else len(backbones), backbone,
                scenarios.index(scenario) if scenario in scenarios else len(scenarios), scenario, fraction)

    return sorted(range(len(summary)), key=key)


def _with_labels(summary: pd.DataFrame) -> pd.DataFrame:
    labelled = summary.copy()
    labelled["backbone"] = [BACKBONE_LABELS.get(str(b), str(b)) for b in labelled["backbone"]]
    labelled["scenario"] = [SCENARIO_LABELS.get(str(s), str(s)) for s in labelled["scenario"]]
    return labelled


def write_results_tables(run: Run) -> dict[str, Path]:
    """Write the run's result tables (and the label-efficiency figure when it has several label fractions).

    ``tables/results_runs.csv`` (test metrics of every run), ``tables/results_summary.csv``,
    ``tables/table1.csv|md|tex`` (the study's Table 1: model, learning method, ACC and AUC as mean ± std over
    seeds, at the largest label fraction present), and with several fractions
    ``tables/label_efficiency.csv|md|tex`` (test AUC per fraction) and ``figures/label_efficiency.png|pdf``.
    Returns the paths by name.
    """
    from osteolib.plotting import save_figure

    per_run, summary = collect_results(run)
    tables = run.tables
    paths: dict[str, Path] = {}
    runs_out = per_run.copy()
    for column in runs_out.columns:
        if runs_out[column].map(lambda v: isinstance(v, (list, dict))).any():
            runs_out[column] = runs_out[column].map(json.dumps)
    paths["results_runs"] = tables / "results_runs.csv"
    runs_out.to_csv(paths["results_runs"], index=False)
    paths["results_summary"] = tables / "results_summary.csv"
    summary.to_csv(paths["results_summary"], index=False)

    fractions = sorted(summary["label_fraction"].unique()) if "label_fraction" in summary.columns else [1.0]
    full = summary[summary["label_fraction"] == fractions[-1]] if "label_fraction" in summary.columns else summary
    table1 = results_table(_with_labels(full))
    paths["table1"] = tables / "table1.csv"
    table1.to_csv(paths["table1"], index=False)
    paths["table1_md"] = tables / "table1.md"
    to_markdown(table1, paths["table1_md"])
    paths["table1_tex"] = tables / "table1.tex"
    caption = "Test accuracy and AUC, mean ± standard deviation over seeds"
    if len(fractions) > 1:
        caption += f" ({fractions[-1]:.0%} of the training labels)"
    to_latex(table1, paths["table1_tex"], caption=caption, label="tab:results")

    if len(fractions) > 1:
        efficiency = label_efficiency_table(summary)
        paths["label_efficiency"] = tables / "label_efficiency.csv"
        efficiency.to_csv(paths["label_efficiency"], index=False)
        paths["label_efficiency_md"] = tables / "label_efficiency.md"
        to_markdown(efficiency, paths["label_efficiency_md"])
        paths["label_efficiency_tex"] = tables / "label_efficiency.tex"
        to_latex(efficiency, paths["label_efficiency_tex"], caption="Test AUC by share of training labels",
                 label="tab:label-efficiency")
        import matplotlib.pyplot as plt

        figure = label_efficiency_figure(summary)
        for path in save_figure(figure, run.figures, "label_efficiency"):
            paths[f"label_efficiency_{path.suffix[1:]}"] = path
        plt.close(figure)
    return paths


def label_efficiency_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Test AUC ("mean ± std") per model and learning method (rows) and label fraction (columns)."""
    from osteolib.evaluation import format_mean_std

    fractions = sorted(summary["label_fraction"].unique())
    rows = []
    for (backbone, scenario), group in summary.groupby(["backbone", "scenario"], sort=False):
        row = {"Model": BACKBONE_LABELS.get(backbone, backbone), "Learning method": SCENARIO_LABELS.get(scenario, scenario)}
        for fraction in fractions:
            match = group[group["label_fraction"] == fraction]
            row[f"{fraction:.0%} labels"] = ("n/a" if match.empty else
                                             format_mean_std(match["auc_mean"].iloc[0], match["auc_std"].iloc[0],
                                                             int(match["auc_n"].iloc[0])))
        rows.append(row)
    return pd.DataFrame(rows)


def label_efficiency_figure(summary: pd.DataFrame):
    """Test AUC against the share of training labels: one panel per backbone, one line per scenario,
    error bars = standard deviation over seeds (none where a point has a single seed)."""
    import matplotlib.pyplot as plt

    needed = [c for c in ("backbone", "scenario", "label_fraction", "auc_mean", "auc_std") if c not in summary.columns]
    if needed:
        raise ValueError(f"the summary lacks {needed}; build it with collect_results(run)")
    backbones = list(dict.fromkeys(summary["backbone"]))
    fractions = sorted(summary["label_fraction"].unique())
    fig, axes = plt.subplots(1, len(backbones), figsize=(4.2 * len(backbones), 3.4), squeeze=False, sharey=True)
    for ax, backbone in zip(axes[0], backbones):
        rows = summary[summary["backbone"] == backbone]
        for scenario, group in rows.groupby("scenario", sort=False):
            group = group.sort_values("label_fraction")
            ax.errorbar(group["label_fraction"], group["auc_mean"], yerr=group["auc_std"].fillna(0.0), marker="o",
                        capsize=3, linewidth=1.2, markersize=4, label=SCENARIO_LABELS.get(scenario, scenario))
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([f"{f:.0%}" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("share of training labels")
        ax.set_title(BACKBONE_LABELS.get(backbone, backbone), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test AUC (mean ± std over seeds)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def finetuned_runs(run: Run) -> list[str]:
    """Names of the fine-tuning runs whose summaries this run folder (or its parents) holds, in order."""
    names: list[str] = []
    current: Run | None = run
    while current is not None:
        logs = current.path / "logs"
        found = sorted(p.name[: -len("-summary.json")] for p in logs.glob("*-summary.json")) if logs.is_dir() else []
        names += [n for n in found if n not in names]
        current = current.parent
    return names


def load_finetuned(run: Run, name: str) -> tuple[nn.Module, FinetuneConfig, list[str]]:
    """The selected (best validation AUC) model of fine-tuning run ``name``, in eval mode, with its config.

    Built from the architecture its summary records, so the pretraining checkpoint it started from need not be
    in ``run``'s folders (cells gathered from runs with different parents). Summaries written before that record
    existed take it from the pretraining checkpoint when it is found, else the default architecture; the weights
    load strictly, so a wrong guess is an error, not a silently different model.
    """
    summary_path = run.find(Path("logs") / f"{name}-summary.json")
    summary = json.loads(summary_path.read_text())
    fields = dict(summary["config"])
    fields["crop_scale"] = tuple(fields["crop_scale"])
    config = FinetuneConfig(**fields)
    architecture = summary.get("architecture")
    if architecture is None:
        try:
            architecture = classifier_architecture(config, run)[1]
        except FileNotFoundError:
            architecture = {"patch_size": config.patch_size or 16} if config.is_vit else {}
    model = models.create_backbone(config.backbone, num_classes=len(summary["classes"]), img_size=config.image_size,
                                   **architecture)
    weights = run.find(Path("checkpoints") / "finetune" / name / BEST)
    try:
        load_weights(model, weights)
    except RuntimeError as err:
        raise models.CheckpointMismatchError(f"{weights} does not fit the architecture {architecture} of "
                                             f"{config.backbone} taken for {summary_path}: {err}") from None
    return model.eval(), config, list(summary["classes"])
