"""The confounder check: does Grad-CAM catch a model that learned a shortcut?

Two small classifiers are trained on the project's synthetic shoulder radiographs through the study's one
fine-tuning path (:func:`osteolib.stages.finetune.finetune`, scenario ``random``): one on data whose only class
signal is the bone (``confounder=0``), one on data where a laterality marker also follows the label in
train and validation (``confounder=1``: every osteoporotic image carries it, no normal one does). On the
test split the marker is present at random, whatever the label (see :mod:`osteolib.data.synthetic`), so a
model that learned the marker is found out there. The check reports, per model, measured from the data:

* validation AUC (where the marker still works) and test AUC (where it does not);
* how much the marker alone moves the model's test probability of the positive class (mean probability on
  test images with the marker minus without: near 0 for a model that ignores it);
* agreement of its Grad-CAM maps with the ground-truth evidence masks on the test images (pointing game,
  energy in region, region AUC), with :func:`osteolib.explain.agreement_table`.

:func:`confounder_verdict` words the outcome from those numbers; nothing is asserted in prose.

Decisions:

* Each model trains into its own sub-run folder ``<run>/checks/confounder/strength<c>/`` with its own
  ``predictions/`` and ``logs/``: :func:`osteolib.stages.finetune.finetuned_runs` of the main run reads only
  ``<run>/logs`` (and its parents'), so these models never mix with the study's grid. A sub-run that
  already finished (its summary exists) is reloaded, not retrained: fine-tuning writes its predictions
  once and refuses to overwrite them.
* The data are generated directly at the training size (no resizing of 256-px pictures), in the synthetic
  data folder keyed by every generator parameter, so the two data sets differ in the marker only (the
  generator draws the marker whether or not it is drawn in, see :mod:`osteolib.data.synthetic`).
* Defaults (difficulty 0.3, 240 patients = 277/36/46 train/val/test images, 128 px, 8 epochs, base_lr 0.02,
  crops of 90-100 % of the area) were chosen by a sweep on one CPU core (2-3.5 minutes per model): the
  earlier 64 px / 120 patients (21 test images, DenseNet's last feature map 2 x 2) was too coarse for a map
  to be inside or outside the bone; at difficulty 0.5 the real-signal model reached only validation AUC
  0.66. Crops of 90-100 % keep the corner marker in nearly every training image (a 50 % crop can cut it out).
  Measured (seed 0): real-signal model validation / test AUC 0.864 / 0.892, marker shift +0.08; confounded
  model 1.000 / 0.354, marker shift +0.95.
* Maps explain each image's *predicted* class (``cam_target``). With the positive class as target the check
  measured the opposite of what it should (energy in region 0.147 real signal vs 0.172 confounded, seed 0):
  a positive-class map is mostly empty where the model calls the image normal, and the confounded model calls
  nearly every marked image positive. With the predicted class: 0.220 vs 0.152, pointing game 0.44 vs 0.06;
  with seed 1 for data and models: 0.297 vs 0.117, pointing game 0.63 vs 0.16 (shortcut shown again: test
  AUC 0.466 vs 0.906, marker shift +0.37).
* RandAugment and layer-wise decay are off: the models start from random weights, and a photometric
  augmentation at this size mostly erases the trabecular texture.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from osteolib import explain
from osteolib.stages import finetune
from osteolib.stages import pretrain
from osteolib.data import synthetic
from osteolib.data import ImageCache
from osteolib.data import read_manifest
from osteolib.runs import Run
from osteolib.utils import end_with_parent

SUBFOLDER = Path("checks") / "confounder"
STRENGTHS = (0.0, 1.0)
MEASURES = ("pointing_game", "energy_in_region", "region_auc")
CAM_TARGETS = ("predicted", "positive")


@dataclass
class ConfounderCheckConfig:
    """Everything the check trains and scores; the defaults are the measured setting of the module docstring.

    ``base_lr`` is scaled by ``batch_size / 256`` inside training (peak lr 2.5e-3 at the defaults).
    ``n_cam_images``: test images explained per model (all if fewer).
    """

    n_patients: int = 240
    difficulty: float = 0.3
    image_size: int = 128
    epochs: int = 8
    batch_size: int = 32
    base_lr: float = 0.02
    warmup_epochs: float = 1.0
    backbone: str = "densenet121"
    seed: int = 0
    data_seed: int = 0
    crop_scale: tuple[float, float] = (0.9, 1.0)  # the fine-tuning crop's area range; large keeps the marker in view
    hflip: bool = True
    cam_method: str = "gradcam"
    # "predicted": explain each image's predicted class (the decision the model made); "positive": always the
    # positive class. The evidence masks mark the bone in both classes, and a positive-class map is mostly
    # empty (ReLU of negative evidence) on an image the model calls normal, so positive-class maps measure
    # largely "how many images were called positive" (measured in the module docstring).
    cam_target: str = "predicted"
    n_cam_images: int = 32
    data_dir: str | None = None  # where the synthetic data sets and caches go; None: the project's data/ folders

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.n_patients, int) and self.n_patients >= 20):
            problems.append(f"n_patients must be an int >= 20 so that every split holds both classes (got {self.n_patients!r})")
        if not (isinstance(self.difficulty, (int, float)) and 0 <= self.difficulty < 1):
            problems.append(f"difficulty must be in [0, 1): 1 means no signal at all (got {self.difficulty!r})")
        if not (isinstance(self.n_cam_images, int) and self.n_cam_images >= 2):
            problems.append(f"n_cam_images must be an int >= 2 (got {self.n_cam_images!r})")
        if self.cam_method not in explain.CAM_METHODS:
            problems.append(f"cam_method {self.cam_method!r} is unknown; choose one of {sorted(explain.CAM_METHODS)}")
        if self.cam_target not in CAM_TARGETS:
            problems.append(f"cam_target must be one of {CAM_TARGETS} (got {self.cam_target!r})")
        if problems:
            raise ValueError("invalid ConfounderCheckConfig: " + "; ".join(problems))
        self.finetune_config(0.0)  # the training fields are validated by FinetuneConfig, before anything runs

    def finetune_config(self, strength: float) -> finetune.FinetuneConfig:
        """The fine-tuning recipe of both models (they differ only in their data)."""
        return finetune.FinetuneConfig(scenario="random", backbone=self.backbone, image_size=self.image_size,
                                       epochs=self.epochs, batch_size=self.batch_size, base_lr=self.base_lr,
                                       warmup_epochs=self.warmup_epochs, layer_decay=None, randaug_magnitude=None,
                                       drop_path=0.0, seed=self.seed, crop_scale=tuple(self.crop_scale),
                                       hflip=self.hflip)

    def data_parameters(self, strength: float) -> dict[str, Any]:
        """The synthetic generator's parameters for confounder strength ``strength``."""
        return dict(n_patients=self.n_patients, seed=self.data_seed, size=self.image_size,
                    difficulty=float(self.difficulty), confounder=float(strength))


@dataclass
class ConfounderModel:
    """One trained model of the check, with what is needed to explain it."""

    strength: float
    name: str
    run: Run
    model: Any = field(repr=False)
    manifest: pd.DataFrame = field(repr=False)
    cache: ImageCache = field(repr=False)
    mean: float
    std: float
    classes: list[str]
    summary: dict[str, Any] = field(repr=False)


@dataclass
class ConfounderCheckResult:
    """The per-model table (one row per confounder strength), the per-image agreement rows and the models."""

    table: pd.DataFrame
    agreement: pd.DataFrame
    models: list[ConfounderModel] = field(repr=False)
    config: ConfounderCheckConfig

    def verdict(self) -> str:
        return confounder_verdict(self.table)


def sub_run(run: Run, strength: float) -> Run:
    """The sub-run folder of one confounder strength (outside the main run's logs/ and predictions/)."""
    return Run(run.path / SUBFOLDER / f"strength{float(strength):g}")


def summary_path(run: Run, config: ConfounderCheckConfig, strength: float) -> Path:
    """The fine-tuning summary of the model of ``strength``: there once that model is trained."""
    return sub_run(run, strength).path / "logs" / f"{finetune.run_name(config.finetune_config(strength))}-summary.json"


def train_or_load(run: Run, config: ConfounderCheckConfig, strength: float, quiet: bool = True) -> ConfounderModel:
    """Generate (or reuse) the data of ``strength`` and fine-tune its model, or reload it if already trained."""
    data_root = Path(config.data_dir) if config.data_dir is not None else None
    manifest = read_manifest(synthetic.ensure_synthetic("shoulder", root=data_root, workers=1,
                                                        **config.data_parameters(strength)))
    cache = ImageCache.build(manifest, config.image_size, progress=False, workers=1,
                             root=None if data_root is None else data_root / "cache")
    train_ids = manifest.loc[manifest["split"] == "train", "image_id"].tolist()
    mean, std = cache.pixel_stats(train_ids)
    fine_config = config.finetune_config(strength)
    name = finetune.run_name(fine_config)
    folder = sub_run(run, strength)
    summary_file = summary_path(run, config, strength)
    if not summary_file.is_file():
        finetune.finetune(folder, fine_config, manifest, cache, mean, std, quiet=quiet)
    summary = json.loads(summary_file.read_text())
    if summary["config"].get("epochs") != config.epochs or summary["config"].get("base_lr") != config.base_lr:
        raise FileExistsError(f"{folder.path} holds a model trained with another recipe ({summary['config']}); "
                              f"use a new run folder for a changed ConfounderCheckConfig")
    model, _, classes = finetune.load_finetuned(folder, name)
    return ConfounderModel(strength=float(strength), name=name, run=folder, model=model, manifest=manifest,
                           cache=cache, mean=float(mean), std=float(std), classes=classes, summary=summary)


def marker_shift(predictions: pd.DataFrame, manifest: pd.DataFrame, positive: str) -> float:
    """Mean test probability of ``positive`` on images with the marker minus on images without it."""
    test = predictions[predictions["split"] == "test"].merge(manifest[["image_id", "marker"]], on="image_id")
    marked = test["marker"].astype(bool)
    if marked.all() or not marked.any():
        return math.nan
    column = f"prob_{positive}"
    return float(test.loc[marked, column].mean() - test.loc[~marked, column].mean())


def cam_targets(item: ConfounderModel, config: ConfounderCheckConfig, n: int) -> list[int] | None:
    """The CAM targets of ``n`` images: None (each image's predicted class) or the positive class for all."""
    return None if config.cam_target == "predicted" else [len(item.classes) - 1] * n


def explained_test_images(item: ConfounderModel, config: ConfounderCheckConfig) -> tuple[list[str], Any, np.ndarray]:
    """The test images the check explains (the first ``n_cam_images`` with an evidence mask): their ids, the
    normalised images ``(N, 1, H, W)`` and the masks ``(N, H, W)`` as booleans."""
    test = item.manifest[item.manifest["split"] == "test"]
    ids = [i for i in test["image_id"] if item.cache.has_region[item.cache.index[i]]][:config.n_cam_images]
    images, regions = pretrain.example_images(item.cache, ids, item.mean, item.std, with_regions=True)
    return ids, images, regions[:, 0].numpy() > 0


def score_model(item: ConfounderModel, config: ConfounderCheckConfig) -> tuple[dict[str, Any], pd.DataFrame]:
    """One row of the check's table and the per-image agreement of its maps on the test images."""
    from osteolib.evaluation import read_predictions

    predictions = read_predictions(item.run.predictions / f"{item.name}.csv")
    positive = item.classes[-1]
    ids, images, regions = explained_test_images(item, config)
    cams = explain.compute_cams(item.model, images, config.cam_method, targets=cam_targets(item, config, len(ids)))
    agreement = explain.agreement_table(cams, regions, [True] * len(ids), ids,
                                        confounder=item.strength, method=config.cam_method)
    row: dict[str, Any] = {
        "confounder": item.strength,
        "val_auc": float(item.summary["val_metrics"]["auc"]),
        "test_auc": float(item.summary["test_metrics"]["auc"]),
        "marker_shift": marker_shift(predictions, item.manifest, positive),
        "n_train": int(sum(item.summary["counts"]["train"].values())),
        "n_test": int(sum(item.summary["counts"]["test"].values())),
        "n_explained": len(ids),
        "chosen_epoch": int(item.summary["selection"]["chosen_epoch"]),
        "train_seconds": float(item.summary["seconds"]),
    }
    for measure in MEASURES:
        row[f"{measure}_mean"] = float(agreement[measure].mean())
    row["region_fraction_mean"] = float(agreement["region_fraction"].mean())
    return row, agreement


def untrained(run: Run, config: ConfounderCheckConfig) -> list[float]:
    """The confounder strengths whose model has no finished sub-run yet."""
    return [s for s in STRENGTHS if not summary_path(run, config, s).is_file()]


# this process's workers by sub-run folder, and its torch threads before start_training lowered them: a notebook
# cell run twice joins the training it started instead of starting a second worker on the same folder
_WORKERS: dict[str, tuple[Any, Path]] = {}
_THREADS_BEFORE: list[int] = []


class Training:
    """The check's models training in worker processes (:func:`start_training`); :meth:`wait` for them."""

    def __init__(self, workers: list[tuple[Any, Path]], threads: int) -> None:
        self.workers, self.threads = workers, threads

    def wait(self) -> None:
        """Block until every model is trained and give this process its threads back; a failed worker is
        reported with the end of its log."""
        import torch

        try:
            failed = [(log, w.wait()) for w, log in self.workers]
            failed = [(log, code) for log, code in failed if code != 0]
            if failed:
                raise RuntimeError("the confounder check's training failed: " + "; ".join(
                    f"exit status {code}, log {log}:\n{log.read_text()[-3000:]}" for log, code in failed))
        finally:
            for worker, _ in self.workers:
                if worker.poll() is None:
                    worker.kill()
            torch.set_num_threads(self.threads)
            _THREADS_BEFORE.clear()


def start_training(run: Run, config: ConfounderCheckConfig) -> Training | None:
    """Start training the models not trained yet, each in its own worker process with one thread, and return at
    once; meanwhile this process keeps what is left of its threads (at least one). None where that does not pay:
    fewer than two threads, a GPU, or every model trained already. A worker's output goes to
    ``<run>/checks/confounder/strength<c>.log``.

    Why: on a CPU a DenseNet's training gains less than 2x from a second thread (measured on two cores: 19.5
    images/s with one thread, 30 with two), and the rest of notebook 05 (statistics, bootstraps, figures) is
    mostly one thread; run side by side, the two models and the notebook keep both cores busy. A model's numbers
    depend on its seed and its thread count; its summary records ``torch_threads``. The workers are plain
    ``python -m`` processes, not multiprocessing's, so a caller's script needs no ``__main__`` guard.
    """
    import os
    import subprocess
    import sys

    import torch

    threads = _THREADS_BEFORE[0] if _THREADS_BEFORE else torch.get_num_threads()
    todo = untrained(run, config)
    keys = {s: str(sub_run(run, s).path.resolve()) for s in todo}
    running = any(k in _WORKERS and _WORKERS[k][0].poll() is None for k in keys.values())
    if not todo or torch.cuda.is_available() or (threads < 2 and not running):
        return None
    folder = run.path / SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    workers = []
    for strength in todo:
        key = keys[strength]
        if key not in _WORKERS or _WORKERS[key][0].poll() is not None:
            log = folder / f"strength{float(strength):g}.log"
            with open(log, "w") as out:
                _WORKERS[key] = (subprocess.Popen(
                    [sys.executable, "-m", "osteolib.stages.confounder_check", str(run.path),
                     json.dumps(asdict(config)), repr(float(strength))],
                    env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=end_with_parent), log)
        workers.append(_WORKERS[key])
    if not _THREADS_BEFORE:
        _THREADS_BEFORE.append(threads)
    torch.set_num_threads(max(1, threads - len(todo)))
    return Training(workers, threads)


def run_confounder_check(run: Run, config: ConfounderCheckConfig | None = None, quiet: bool = True,
                         training: Training | None = None, side_by_side: bool = True) -> ConfounderCheckResult:
    """Train (or reload) the real-signal and the shortcut model and score both (see the module docstring).

    ``training``: what :func:`start_training` started earlier, waited for here; else, with ``side_by_side``, the
    models not trained yet train at the same time in worker processes where that pays (:func:`start_training`).
    """
    config = config or ConfounderCheckConfig()
    if not isinstance(config, ConfounderCheckConfig):
        raise TypeError(f"config must be a ConfounderCheckConfig, got {type(config).__name__}")
    if training is None and side_by_side:
        training = start_training(run, config)
    if training is not None:
        training.wait()
    rows, tables, trained = [], [], []
    for strength in STRENGTHS:
        item = train_or_load(run, config, strength, quiet=quiet)
        row, agreement = score_model(item, config)
        rows.append(row)
        tables.append(agreement)
        trained.append(item)
    table = pd.DataFrame(rows)
    (run.path / SUBFOLDER / "config.json").write_text(json.dumps(asdict(config), indent=1))
    return ConfounderCheckResult(table=table, agreement=pd.concat(tables, ignore_index=True), models=trained,
                                 config=config)


def confounder_verdict(table: pd.DataFrame, auc_margin: float = 0.1, min_marker_shift: float = 0.1) -> str:
    """A sentence on the check's outcome, built from the numbers of :func:`run_confounder_check`'s table.

    The shortcut is *shown* when the confounded model's test AUC is at least ``auc_margin`` below its
    validation AUC and below the real-signal model's test AUC *and* the marker raises its test probability of
    the positive class by at least ``min_marker_shift`` (without that, a drop on a small test split may be
    noise rather than the marker); Grad-CAM *catches* it when the confounded
    model's maps put less energy in the evidence region than the real-signal model's.
    """
    needed = ["confounder", "val_auc", "test_auc", "marker_shift", "energy_in_region_mean", "pointing_game_mean"]
    missing = [c for c in needed if c not in table.columns]
    if missing or set(table["confounder"]) != set(STRENGTHS):
        raise ValueError(f"confounder_verdict needs run_confounder_check's table (one row per strength {STRENGTHS}); "
                         f"missing columns {missing}")
    real = table[table["confounder"] == 0.0].iloc[0]
    short = table[table["confounder"] == 1.0].iloc[0]
    learnt = real["test_auc"] >= 0.5 + auc_margin
    dropped = short["val_auc"] - short["test_auc"] >= auc_margin and short["test_auc"] < real["test_auc"]
    uses_marker = short["marker_shift"] >= min_marker_shift
    shortcut = dropped and uses_marker
    caught = short["energy_in_region_mean"] < real["energy_in_region_mean"]
    parts = [
        f"The real-signal model reached validation AUC {real['val_auc']:.3f} and test AUC {real['test_auc']:.3f}"
        + ("" if learnt else f" (less than {0.5 + auc_margin:.2f}: the bone signal was not learnt in this budget)") + ".",
        f"The marker-confounded model reached validation AUC {short['val_auc']:.3f} but test AUC "
        f"{short['test_auc']:.3f}; the marker alone moves its test probability by {short['marker_shift']:+.3f} "
        f"(real-signal model: {real['marker_shift']:+.3f}).",
        "The shortcut is " + ("shown" if shortcut else "not shown") + f" (criterion: a drop of at least {auc_margin:.2f} "
        f"from validation to test AUC, a test AUC below the real-signal model's, and a marker shift of at least "
        f"+{min_marker_shift:.2f}; here the AUC criterion is {'met' if dropped else 'not met'} and the marker "
        f"shift criterion {'met' if uses_marker else 'not met'}).",
        f"Energy of the Grad-CAM maps in the evidence region: {short['energy_in_region_mean']:.3f} (confounded) vs "
        f"{real['energy_in_region_mean']:.3f} (real signal); pointing-game hit rate {short['pointing_game_mean']:.3f} "
        f"vs {real['pointing_game_mean']:.3f}: the maps " + ("do" if caught else "do not")
        + " point away from the bone for the confounded model.",
    ]
    return " ".join(parts)


def confounder_figure(result: ConfounderCheckResult, n_images: int = 4):
    """Grad-CAM of both models on test images (half with the marker where possible), evidence mask outlined.

    Each panel names the image's true label, whether it carries the marker and the model's probability of the
    positive class; the map explains the class of ``result.config.cam_target`` (by default the predicted one).
    """
    import matplotlib.pyplot as plt

    from osteolib.evaluation import read_predictions

    fig, axes = plt.subplots(len(result.models), n_images, figsize=(2.2 * n_images, 2.9 * len(result.models)),
                             squeeze=False)
    for r, item in enumerate(result.models):
        explained = result.agreement.loc[result.agreement["confounder"] == item.strength, "image_id"].tolist()
        by_id = item.manifest.set_index("image_id")
        has_marker = by_id.loc[explained, "marker"].astype(bool)
        # half with the marker, half without: the marker is what a shortcut model would look at
        with_marker = [i for i in explained if has_marker[i]][:n_images // 2]
        ids = with_marker + [i for i in explained if not has_marker[i]][:n_images - len(with_marker)]
        images, regions = pretrain.example_images(item.cache, ids, item.mean, item.std, with_regions=True)
        cams = explain.compute_cams(item.model, images, result.config.cam_method,
                                    targets=cam_targets(item, result.config, len(ids)))
        positive = item.classes[-1]
        probability = read_predictions(item.run.predictions / f"{item.name}.csv").set_index("image_id")[f"prob_{positive}"]
        for c, image_id in enumerate(ids):
            explain.overlay(images[c, 0].numpy(), cams[c], region=regions[c, 0].numpy() > 0, ax=axes[r, c],
                            title=(("real signal" if item.strength == 0 else "marker shortcut") if c == 0 else "")
                            + f"\n{by_id.at[image_id, 'label']}, {'marker' if has_marker[image_id] else 'no marker'}\n"
                            f"p({positive}) = {probability[image_id]:.2f}")
        for c in range(len(ids), n_images):
            axes[r, c].set_axis_off()
    fig.tight_layout()
    return fig


if __name__ == "__main__":  # a worker of start_training: RUN_DIR CONFIG_JSON STRENGTH
    import sys

    import torch

    torch.set_num_threads(1)
    train_or_load(Run(Path(sys.argv[1])), ConfounderCheckConfig(**json.loads(sys.argv[2])), float(sys.argv[3]))
