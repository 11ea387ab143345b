"""The configuration of one fine-tuning run: :class:`FinetuneConfig` with its range checks, and the run's name.

The defaults are the study's recipe (see :mod:`osteolib.stages.finetune`). :func:`is_int` and :func:`is_number`
are the field checks, shared with the label-fraction subsample (:mod:`osteolib.stages.finetune_inputs`).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from osteolib import models
from osteolib.engine import TrainConfig
from osteolib.study import FINETUNE_SCENARIOS, OWN_CHECKPOINT

__all__ = ["FinetuneConfig", "run_name", "MONITOR", "THRESHOLD_METHODS", "PRECISIONS", "RECIPE_FIELDS", "SEARCHED"]

MONITOR = "valid_auc"
# the training settings a recipe fixes (what the recipe search varies and hands on); not the data, model or seed
RECIPE_FIELDS = ("epochs", "batch_size", "base_lr", "weight_decay", "layer_decay", "warmup_epochs", "drop_path",
                 "randaug_magnitude", "crop_scale", "hflip", "mixup", "cutmix")
SEARCHED = "searched"  # recipe=SEARCHED: the recipe search's choice for the run's scenario and backbone
THRESHOLD_METHODS = ("youden", "f1")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Defaults are the study's recipe.

    ``base_lr`` is scaled by ``batch_size / 256`` (MAE's rule, via ``TrainConfig(base_lr=...)``): the
    default 6.25e-5 gives a peak lr of 7.8e-6 at batch 32 and 6.25e-5 at batch 256.
    ``patch_size`` (ViT only): None takes the pretraining checkpoint's, else 16 (8 below 128 px). ``mixup`` / ``cutmix``
    are the Beta-distribution alphas of timm's Mixup (0 = off). ``layer_decay`` None (or 1.0) turns
    layer-wise decay off. ``threshold_method``: how the validation predictions fix the decision threshold.
    ``init_checkpoint``: a weights file the user brings (timm state dict, medical-MAE ``{"model": ...}`` or an
    osteolib checkpoint), used with ``scenario="own_checkpoint"`` and only with it; its existence is checked when
    the run starts (:meth:`check_init_checkpoint`), not on construction, so a finished run stays loadable after
    the file moved. ``recipe``: a name for the training settings (the fields of :data:`RECIPE_FIELDS`); the recipe
    search (notebook 04a) tells its candidates apart by it, and ``"searched"`` asks for the settings that search
    chose on validation for this scenario and backbone (:func:`osteolib.stages.recipe_search.resolve_recipe`).
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
    init_checkpoint: str | None = None
    recipe: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.crop_scale, (list, tuple)) and all(is_number(v) for v in self.crop_scale):
            self.crop_scale = tuple(float(v) for v in self.crop_scale)  # type: ignore[assignment]
        if isinstance(self.label_fraction, int) and not isinstance(self.label_fraction, bool):
            self.label_fraction = float(self.label_fraction)
        if isinstance(self.init_checkpoint, os.PathLike):
            self.init_checkpoint = os.fspath(self.init_checkpoint)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming every bad field (run again by :func:`check_finetune_inputs`)."""
        problems: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        need(self.scenario in FINETUNE_SCENARIOS,
             f"scenario={self.scenario!r} is unknown; choose one of {list(FINETUNE_SCENARIOS)}")
        problems.extend(self._init_checkpoint_problems())
        need(self.backbone in models.BACKBONE_NAMES,
             f"backbone={self.backbone!r} is unknown; choose one of {list(models.BACKBONE_NAMES)}")
        need(is_int(self.image_size) and self.image_size >= 16,
             f"image_size must be an int >= 16 pixels (got {self.image_size!r})")
        need(self.patch_size is None or (is_int(self.patch_size) and self.patch_size >= 1),
             f"patch_size must be None or an int >= 1 (got {self.patch_size!r})")
        need(is_int(self.epochs) and self.epochs >= 1, f"epochs must be an int >= 1 (got {self.epochs!r})")
        need(is_int(self.batch_size) and self.batch_size >= 2,
             f"batch_size must be an int >= 2 (BatchNorm needs two images per batch; got {self.batch_size!r})")
        need(is_number(self.base_lr) and self.base_lr > 0, f"base_lr must be > 0 (got {self.base_lr!r})")
        need(is_number(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be >= 0 (got {self.weight_decay!r})")
        need(self.layer_decay is None or (is_number(self.layer_decay) and 0 < self.layer_decay <= 1),
             f"layer_decay must be in (0, 1] or None (got {self.layer_decay!r})")
        if is_number(self.warmup_epochs) and is_int(self.epochs):
            need(0 <= self.warmup_epochs < self.epochs,
                 f"warmup_epochs must be in [0, epochs={self.epochs}) (got {self.warmup_epochs!r}); "
                 f"for a one-epoch run set warmup_epochs=0 or a fraction such as 0.5")
        else:
            problems.append(f"warmup_epochs must be a number (got {self.warmup_epochs!r})")
        need(is_number(self.drop_path) and 0 <= self.drop_path < 1,
             f"drop_path must be in [0, 1) (got {self.drop_path!r})")
        need(self.randaug_magnitude is None or (is_int(self.randaug_magnitude) and 0 <= self.randaug_magnitude <= 30),
             f"randaug_magnitude must be None (no RandAugment) or an int in [0, 30] (got {self.randaug_magnitude!r})")
        need(isinstance(self.crop_scale, tuple) and len(self.crop_scale) == 2
             and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
             f"crop_scale must be (min, max) area fractions with 0 < min <= max <= 1 (got {self.crop_scale!r})")
        need(isinstance(self.hflip, bool), f"hflip must be True or False (got {self.hflip!r})")
        for name in ("mixup", "cutmix"):
            value = getattr(self, name)
            need(is_number(value) and value >= 0, f"{name} must be a Beta alpha >= 0, 0 = off (got {value!r})")
        if self.uses_mixing and is_int(self.batch_size):
            need(self.batch_size % 2 == 0,
                 f"mixup/cutmix pair each image with the batch reversed and need an even batch_size "
                 f"(got {self.batch_size})")
        need(is_number(self.label_fraction) and 0 < self.label_fraction <= 1,
             f"label_fraction must be in (0, 1] (got {self.label_fraction!r})")
        need(is_int(self.seed) and self.seed >= 0, f"seed must be an int >= 0 (got {self.seed!r})")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS} (got {self.precision!r})")
        need(self.threshold_method in THRESHOLD_METHODS,
             f"threshold_method must be one of {THRESHOLD_METHODS} (got {self.threshold_method!r})")
        need(self.recipe is None or (isinstance(self.recipe, str) and re.fullmatch(r"[A-Za-z0-9_.+]+", self.recipe)),
             f"recipe must be None or a name of letters, digits and _ . + (it goes into file names; got "
             f"{self.recipe!r})")
        if problems:
            raise ValueError("invalid FinetuneConfig: " + "; ".join(problems))

    def _init_checkpoint_problems(self) -> list[str]:
        path = self.init_checkpoint
        if path is not None and (not isinstance(path, str) or not path.strip()):
            return [f"init_checkpoint must be None or the path of a weights file (got {path!r})"]
        if self.scenario == OWN_CHECKPOINT and path is None:
            return [f"scenario={OWN_CHECKPOINT!r} needs init_checkpoint=<path of the weights file to start from>"]
        if path is not None and self.scenario != OWN_CHECKPOINT:
            return [f"init_checkpoint={path!r} is given with scenario={self.scenario!r}: a run starts from one "
                    f"initialisation; set scenario={OWN_CHECKPOINT!r} to start from this file, or drop init_checkpoint"]
        return []

    def check_init_checkpoint(self) -> Path | None:
        """The ``init_checkpoint`` file (None when not set); FileNotFoundError naming it when it is not there."""
        if self.init_checkpoint is None:
            return None
        path = Path(self.init_checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"init_checkpoint={self.init_checkpoint!r}: no such file (resolved to "
                                    f"{path.resolve()}); give the path of the weights file to start from")
        return path

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


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (Python or numpy), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


def run_name(config: FinetuneConfig) -> str:
    """The run's name, used for its prediction file, history and training folder."""
    return run_name_of(config.scenario, config.backbone, config.seed, config.label_fraction)


def run_name_of(scenario: str, backbone: str, seed: int, label_fraction: float = 1.0) -> str:
    """:func:`run_name` from the identifiers a prediction table or ``tables/selection.csv`` holds."""
    return f"{scenario}-{backbone}-seed{int(seed)}-frac{float(label_fraction)}"
