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

Layout: :class:`FinetuneConfig` and :func:`run_name` live in :mod:`osteolib.stages.finetune_config`, the input
checks and the model building in :mod:`osteolib.stages.finetune_inputs` (all reachable from here); the grid's
result tables are written by :mod:`osteolib.report.results`.
"""
from __future__ import annotations

import contextlib
import json
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
from osteolib.data import XrayDataset, crop_policy, finetune_transform, make_dataloaders
from osteolib.engine import BEST, PrecisionChoice, fit, load_weights
from osteolib.evaluation import (
    choose_threshold,
    evaluate,
    multiclass_metrics,
    prediction_table,
    write_predictions,
)
from osteolib.runs import Run
# PRECISIONS and THRESHOLD_METHODS are imported so that they stay reachable here, as before the split.
from osteolib.stages.finetune_config import (MONITOR, PRECISIONS, THRESHOLD_METHODS, FinetuneConfig, run_name,
                                             run_name_of)
from osteolib.stages.finetune_inputs import (
    FinetuneInputs,
    build_model,
    check_finetune_inputs,
    classifier_architecture,
    label_fraction_subset,
    use_stage_layer_decay,
)

__all__ = [
    "FinetuneConfig",
    "FinetuneInputs",
    "FinetuneResult",
    "MixupCallback",
    "soft_cross_entropy",
    "auc_metric",
    "run_name",
    "run_name_of",
    "label_fraction_subset",
    "use_stage_layer_decay",
    "classifier_architecture",
    "check_finetune_inputs",
    "build_model",
    "predict_probs",
    "Selected",
    "train_and_select",
    "finetune",
    "finetuned_runs",
    "load_finetuned",
]

# One fixed patient-level split (no cross-validation): every run is fold 0 of the prediction contract.
FOLD = 0


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
    external_metrics: dict[str, Any] | None = None


@dataclass
class Selected:
    """A trained run whose choices are fixed from the validation split alone: the best epoch's weights (loaded into
    ``model``), its validation predictions and the threshold chosen on them. No test image was read to get here."""

    inputs: FinetuneInputs
    model: nn.Module
    fitted: Any  # the engine's fit result (history, best epoch and value, precision)
    val_table: pd.DataFrame
    threshold: float | None
    out_dir: Path
    identifiers: dict[str, Any]


def train_and_select(run: Run, config: FinetuneConfig, manifest: pd.DataFrame, cache: Any, mean: float, std: float,
                     name: str, out_dir: Path, classes: Sequence[str] | None = None, quiet: bool = False,
                     resume: bool = False, splits_used: Sequence[str] = ("train", "val", "test")) -> Selected:
    """Fine-tune ``config`` into ``out_dir`` and fix every choice on validation: the epoch with the best validation
    AUC and the decision threshold on that checkpoint's validation predictions. Reads no test image; with
    ``splits_used=("train", "val")`` (the recipe search) not even the test rows' ids and labels."""
    inputs = check_finetune_inputs(config, run, manifest, classes, splits_used=splits_used)
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
              f"{counts['train_images_before_fraction']} train images), val {counts['val']}"
              + (f", test {counts['test']}" if "test" in splits_used else ", test not read")
              + f"; {counts['rows_outside_train_val_test']} manifest rows outside train/val/test are not used")

    train_transform = finetune_transform(config.image_size, crop="random", scale=config.crop_scale, flip=config.hflip,
                                         magnitude=config.randaug_magnitude)
    dls = make_dataloaders(cache, inputs.train_ids, inputs.val_ids, train_targets=inputs.train_targets,
                           valid_targets=inputs.val_targets, train_transform=train_transform,
                           valid_transform=crop_policy("none", config.image_size), batch_size=config.batch_size,
                           valid_batch_size=2 * config.batch_size, seed=config.seed, mean=mean, std=std)
    callbacks = [MixupCallback(config.mixup, config.cutmix, len(classes))] if config.uses_mixing else []
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
    return Selected(inputs=inputs, model=model, fitted=fitted, val_table=val_table, threshold=threshold,
                    out_dir=out_dir, identifiers=identifiers)


def finetune(run: Run, config: FinetuneConfig, manifest: pd.DataFrame, cache: Any, mean: float, std: float,
             classes: Sequence[str] | None = None, quiet: bool = False, resume: bool = False,
             external: tuple[pd.DataFrame, Any] | None = None) -> FinetuneResult:
    """Fine-tune one run, select on validation, predict test once, and write its files into ``run``.

    ``external`` (the external test set's manifest and its image cache, notebook 00's ``external_test``) is
    predicted once too, after selection, at the same validation-chosen threshold; its rows have split "external".
    Files: ``predictions/<name>.csv`` (val rows of the selected checkpoint + test rows [+ external rows]),
    ``logs/<name>-history.csv`` (per epoch), ``logs/<name>-summary.json`` (choices and metrics), and the
    training folder ``checkpoints/finetune/<name>/`` (``best.pt`` = the selected weights). ``classes`` fixes
    the class order (binary: ``classes[1]`` is positive); default sorted label names. ``resume`` continues
    an interrupted training folder. Every input check runs before training (:func:`check_finetune_inputs`).
    A config with ``recipe="searched"`` is resolved first (:func:`osteolib.stages.recipe_search.resolve_recipe`).
    """
    started = time.perf_counter()
    name = run_name(config)
    predictions_path = run.predictions / f"{name}.csv"
    if predictions_path.exists():
        raise FileExistsError(f"{predictions_path} exists: run {name} is already finished in {run.path}; "
                              f"start a new run folder (predictions are written once)")
    if external is not None:
        absent = [i for i in external[0]["image_id"].astype(str) if i not in external[1].index]
        if absent:
            raise KeyError(f"{len(absent)} external test image ids are not in its cache (first: {absent[:5]}); build "
                           f"the cache from the external manifest")
        labels = set(external[0]["label"].astype(str))
        in_splits = manifest["split"].astype(str).isin(("train", "val", "test"))
        known = set(map(str, classes)) if classes is not None else set(manifest.loc[in_splits, "label"].astype(str))
        if labels - known:
            raise ValueError(f"the external test set has label(s) {sorted(labels - known)} outside the classes "
                             f"{sorted(known)}; map them in notebook 00's external_test label_map")
    selected = train_and_select(run, config, manifest, cache, mean, std, name, run.checkpoints / "finetune" / name,
                                classes=classes, quiet=quiet, resume=resume)
    inputs, model, fitted, threshold = selected.inputs, selected.model, selected.fitted, selected.threshold
    classes, identifiers, val_table = inputs.classes, selected.identifiers, selected.val_table

    # Only now is the test split read, once.
    test_probs = predict_probs(model, cache, inputs.test_ids, config.image_size, mean, std,
                               batch_size=2 * config.batch_size, precision=fitted.precision)
    test_labels = [classes[t] for t in inputs.test_targets]
    test_table = prediction_table(inputs.test_ids, test_labels, test_probs, classes, "test", **identifiers)
    tables = [val_table, test_table]
    external_metrics = None
    if external is not None:
        external_manifest, external_cache = external
        external_ids = external_manifest["image_id"].astype(str).tolist()
        external_probs = predict_probs(model, external_cache, external_ids, config.image_size, mean, std,
                                       batch_size=2 * config.batch_size, precision=fitted.precision)
        tables.append(prediction_table(external_ids, external_manifest["label"].astype(str).tolist(), external_probs,
                                       classes, "external", **identifiers))
        external_metrics = evaluate(tables[-1], threshold=threshold)
    write_predictions(pd.concat(tables, ignore_index=True), predictions_path)

    val_metrics = evaluate(val_table, threshold=threshold)
    test_metrics = evaluate(test_table, threshold=threshold)
    logs = run.dir("logs")
    history_path = logs / f"{name}-history.csv"
    fitted.history.to_csv(history_path, index=False)
    result = FinetuneResult(
        name=name, config=config, model=model, history=fitted.history, chosen_epoch=int(fitted.best_epoch),
        valid_auc=float(fitted.best_value), threshold=threshold, val_metrics=val_metrics, test_metrics=test_metrics,
        predictions_path=predictions_path, history_path=history_path, summary_path=logs / f"{name}-summary.json",
        out_dir=selected.out_dir, classes=classes, counts=inputs.counts(), load_report=inputs.load_report,
        precision=fitted.precision.name, train_images_per_s=images_per_s(fitted.history),
        seconds=time.perf_counter() - started, external_metrics=external_metrics)
    write_summary(result, inputs)
    if not quiet:
        at = f" at threshold {threshold:.3f} (val {config.threshold_method})" if threshold is not None else ""
        print(f"[{name}] selected epoch {result.chosen_epoch} (valid AUC {result.valid_auc:.3f}); test AUC "
              f"{test_metrics['auc']:.3f}, accuracy {test_metrics['accuracy']:.3f}{at}; {result.seconds:.0f} s"
              + (f"; external test AUC {external_metrics['auc']:.3f}" if external_metrics else ""))
    return result


def images_per_s(history: pd.DataFrame) -> float | None:
    """The last epoch's training throughput, when the history records it."""
    throughput = history.get("train_images_per_s")
    return float(throughput.iloc[-1]) if throughput is not None and len(throughput) else None


def write_summary(result: FinetuneResult, inputs: FinetuneInputs) -> None:
    """The run's choices and metrics as ``result.summary_path`` (JSON)."""
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(result.config).items()}
    summary = {
        "name": result.name, "config": config, "peak_lr": result.config.train_config().peak_lr,
        "classes": result.classes, "positive_class": result.classes[1] if len(result.classes) == 2 else None,
        "selection": {"monitor": MONITOR, "split": "val", "chosen_epoch": result.chosen_epoch,
                      "valid_auc": result.valid_auc},
        "threshold": {"value": result.threshold, "method": result.config.threshold_method, "split": "val"},
        "val_metrics": result.val_metrics, "test_metrics": result.test_metrics, "counts": result.counts,
        "external_metrics": result.external_metrics,
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
# Finished runs of a run folder


def finetuned_runs(run: Run) -> list[str]:
    """Names of the fine-tuning runs whose summaries this run folder (or its parents) holds, in order."""
    return [p.name[: -len("-summary.json")] for p in run.find_all("logs/*-summary.json")]


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
