"""The study's self-supervised pretraining scenarios, each trained through the one ``fit`` path.

Scenarios (what the fine-tuning stage initialises from):

============================  ===================================================================
``random``                    no pretraining: timm's random initialisation (the baseline)
``chest_mae``                 masked image modelling on the chest X-ray pool (notebook 01)
``chest_mae+target_mae_random``  chest MAE, then masked modelling on the target's training images with
                              random resized crops (notebook 02, ``crop_mode="random"``)
``chest_mae+target_mae_center``  the same with crops centred on the diagnostic region and masking biased
                              toward it (notebook 02, ``crop_mode="center"``)
``chest_mae+rotation``        chest MAE, then 4-way rotation prediction on the target images (notebook 03)
============================  ===================================================================

"Masked image modelling" is the MAE for ViT-small and its SimMIM-style counterpart for DenseNet121
(:mod:`osteolib.models`). Every scenario writes ``<run>/checkpoints/<scenario>/<backbone>.pt`` in the checked
checkpoint format; the target stages read only the target's *training* split (validation for monitoring), never
the test split.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from torch import nn

from osteolib import models
from osteolib.data import make_dataloaders
from osteolib.runs import Run
from osteolib.study import PRETRAINING_BACKBONES, SCENARIOS, WRITTEN_BY
from osteolib.engine import FitResult, TrainConfig, fit
from osteolib.data import Chain, RandomHorizontalFlip, RotationTargets, crop_policy, patch_weights

# the mask ratio of each objective when the notebook leaves it unset: the study's 0.9 for the ViT MAE; SimMIM's
# 0.6 for the CNN, whose receptive fields see through small masked patches less easily
DEFAULT_MASK_RATIO = {"vit_small": 0.9, "densenet121": 0.6}
# the CNN masks on a 16-px grid, not on its 32-px stride (SimMIM's grid at 192 px): at 128 px a 32-px grid leaves
# 4 x 4 patches, too coarse to predict from each other, and the real chest pool's DenseNet learned a template on it
DEFAULT_PATCH = {"vit_small": 16, "densenet121": 16}
# below 128 px the ViT's 16-px patches leave too few tokens (16 at 64 px) to hide 75-90 % of: it takes 8-px patches
SMALL_IMAGE_VIT_PATCH = 8


def default_patch_size(backbone: str, image_size: int | None = None) -> int:
    """The patch (ViT) or masking grid (CNN) a stage takes when none is set: 16, the ViT's 8 below 128 px."""
    if backbone == "vit_small" and image_size is not None and image_size < 128:
        return SMALL_IMAGE_VIT_PATCH
    return DEFAULT_PATCH.get(backbone, 16)


@dataclass
class PretrainConfig:
    """One pretraining stage: which scenario, backbone and objective, with its recipe."""

    scenario: str
    backbone: str
    image_size: int = 128
    patch_size: int | None = None  # ViT patch / the CNN's masking grid; None: default_patch_size
    mask_ratio: float | None = None  # None: 0.9 for the ViT MAE, 0.6 for the masked CNN
    norm_pix_loss: bool = True
    crop_mode: str = "random"  # "random" | "center" | "none"
    crop_scale: tuple[float, float] = (0.5, 1.0)
    mask_region_bias: float = 0.0  # > 0 with crop_mode "center": mask the diagnostic region more often
    epochs: int = 10
    batch_size: int = 64
    base_lr: float = 1.5e-4  # MAE recipe: peak lr = base_lr * batch_size / 256
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    seed: int = 0
    precision: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)  # model keyword arguments (e.g. decoder_depth)

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS or self.scenario == "random":
            raise ValueError(f"scenario {self.scenario!r} is not a pretraining scenario; choose one of "
                             f"{[s for s in SCENARIOS if s != 'random']}")
        if self.backbone not in PRETRAINING_BACKBONES:
            raise ValueError(f"backbone {self.backbone!r} has no pretraining objective here; choose one of "
                             f"{PRETRAINING_BACKBONES}")
        self.patch_size = self.patch_size or default_patch_size(self.backbone, self.image_size)
        self.mask_ratio = DEFAULT_MASK_RATIO[self.backbone] if self.mask_ratio is None else float(self.mask_ratio)
        self.crop_scale = (float(self.crop_scale[0]), float(self.crop_scale[1]))
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be in [0, epochs={self.epochs}): the warmup "
                             f"has to end before training does (use 0 or a fraction for one-epoch runs)")
        if self.mask_region_bias > 0 and self.crop_mode != "center":
            raise ValueError("mask_region_bias > 0 needs crop_mode='center' (the region-guided policy)")

    @property
    def objective(self) -> str:
        return "rotation" if self.scenario.endswith("rotation") else "masked"

    @property
    def init_scenario(self) -> str | None:
        """The scenario whose checkpoint this stage starts from (None: random initialisation)."""
        return None if self.scenario == "chest_mae" else "chest_mae"

    def train_config(self) -> TrainConfig:
        if self.mask_region_bias < 0:  # checked where the engine's TrainConfig checked it before it moved here
            raise ValueError(f"invalid TrainConfig: mask_region_bias must be >= 0 (got {self.mask_region_bias!r})")
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, base_lr=self.base_lr,
                           warmup_epochs=float(self.warmup_epochs),
                           weight_decay=self.weight_decay, seed=self.seed, precision=self.precision,
                           monitor="valid_loss")

    def fit_settings(self) -> dict[str, Any]:
        """The stage's own options that change the weights beyond :meth:`train_config`: ``fit`` records them in
        its checkpoints and checks them on resume."""
        return {"mask_region_bias": self.mask_region_bias}


class RegionMaskInputs(nn.Module):
    """Adapts region-aware batches ``(image, region)`` to a masking model: with ``bias`` > 0 the region becomes
    ``mask_weights`` (:func:`osteolib.data.patch_weights` on the ``patch_size`` grid), so masks favour the
    diagnostic region; with 0 the model just gets the image. No parameters of its own: checkpoints save the
    wrapped model (``fit(adapt_model=...)``).
    """

    def __init__(self, model: nn.Module, patch_size: int | None, bias: float):
        super().__init__()
        self.model, self.patch_size, self.bias = model, patch_size, float(bias)

    def forward(self, image: torch.Tensor, region: torch.Tensor) -> Any:
        if self.bias > 0:
            return self.model(image, mask_weights=patch_weights(region, self.patch_size, self.bias))
        return self.model(image)


def region_mask_adapter(config: PretrainConfig, region_aware: bool, loss_func: Any = None):
    """``fit``'s ``adapt_model`` for a stage that biases its masks toward the region (None without a bias)."""
    if config.mask_region_bias <= 0:
        return None
    if not region_aware:
        raise ValueError("mask_region_bias > 0 needs region masks in the batches: build the loaders with "
                         "make_dataloaders(..., region_aware=True)")
    if loss_func is not None:
        raise ValueError("mask_region_bias applies to masking models that compute their own loss "
                         "(loss_func=None); set it to 0 for a model trained with a loss_func")
    return lambda model: RegionMaskInputs(model, config.patch_size, config.mask_region_bias)


def checkpoint_path(run: Run, scenario: str, backbone: str) -> Path:
    """Where a scenario's checkpoint lives in a run folder."""
    return run.checkpoints / scenario / f"{backbone}.pt"


def find_checkpoint(run: Run, scenario: str, backbone: str) -> Path:
    """A scenario's checkpoint from this run or its parents; a clear error naming the notebook that writes it."""
    try:
        return run.find(Path("checkpoints") / scenario / f"{backbone}.pt")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no {scenario} checkpoint for {backbone}: it is written by notebook "
                                f"{WRITTEN_BY.get(scenario, '?')}; run that first. ({err})") from None


def checkpoint_patch_size(checkpoint: str | Path) -> int | None:
    """The patch (ViT) or masking-grid (CNN) size a masked-model checkpoint was trained with (its model config);
    None when unrecorded."""
    recorded = (models.read_checkpoint(checkpoint).get("config") or {}).get("patch_size")
    return int(recorded) if recorded is not None else None


def chest_patch_size(run: Run, backbone: str) -> int:
    """Notebook 01's patch / masking-grid size for ``backbone``, read from its chest-MAE checkpoint: the default of
    the later stages, which must mask on the same grid (and, for the ViT, embed the same patches)."""
    size = checkpoint_patch_size(find_checkpoint(run, "chest_mae", backbone))
    return size if size is not None else DEFAULT_PATCH[backbone]


def build_model(config: PretrainConfig) -> nn.Module:
    """The pretraining model of a stage, freshly initialised from ``config.seed``.

    Seeded here because torch seeds its generator randomly at start-up: without it every process would start
    from another initialisation, and a rerun of the same configuration would not reproduce the run.
    """
    torch.manual_seed(config.seed)
    if config.objective == "rotation":
        kwargs = {"patch_size": config.patch_size} if config.backbone == "vit_small" else {}
        return models.RotationClassifier(config.backbone, img_size=config.image_size, **kwargs)
    if config.backbone == "vit_small":
        return models.mae_vit_small(img_size=config.image_size, patch_size=config.patch_size,
                                    mask_ratio=config.mask_ratio, norm_pix_loss=config.norm_pix_loss, **config.extra)
    return models.MaskedDenseNet(img_size=config.image_size, patch_size=config.patch_size,
                                 mask_ratio=config.mask_ratio, norm_pix_loss=config.norm_pix_loss, **config.extra)


@dataclass
class PretrainResult:
    config: PretrainConfig
    model: nn.Module
    fit: FitResult
    checkpoint: Path
    init_report: Any  # models.LoadReport or None
    template_history: pd.DataFrame | None = None  # template_check per epoch (masked stages given check images)


def pretrain(run: Run, config: PretrainConfig, manifest: pd.DataFrame, cache: Any, mean: float, std: float,
             quiet: bool = False, resume: bool = False, check_images: torch.Tensor | None = None,
             check_every: int = 1) -> PretrainResult:
    """Train one scenario's stage on the manifest's train split (val split for monitoring) and save its checkpoint.

    The stage's training files (per-epoch checkpoints, history) go to ``<run>/checkpoints/<scenario>/<backbone>/``;
    the encoder checkpoint the next stages read to ``<run>/checkpoints/<scenario>/<backbone>.pt``. With
    ``check_images`` (held-out images, normalised as in training: :func:`example_images`) a masked stage runs
    :func:`template_check` after the first, every ``check_every``-th and the last epoch into ``template_check.csv``
    beside the history (:class:`TemplateCheckCallback`).
    """
    target = checkpoint_path(run, config.scenario, config.backbone)
    if target.exists() and not resume:
        raise FileExistsError(f"{target} exists: this run already trained {config.scenario} for {config.backbone}; "
                              f"start a new run (a run never overwrites its outputs) or pass resume=True")
    if check_images is not None and config.objective != "masked":
        raise ValueError(f"check_images: the template check is for masked stages; {config.scenario} trains "
                         f"the rotation proxy (pass check_images=None)")
    if check_images is not None:
        _require_image_pairs(check_images, "check_images")
    init = find_checkpoint(run, config.init_scenario, config.backbone) if config.init_scenario else None
    if init is not None and (config.objective == "masked" or config.backbone == "vit_small"):
        # the ViT's patch embedding must fit; a CNN's masking grid would load silently on another size, and the
        # grid decides whether the model reads the image or learns a template (profiles/real.yaml)
        saved = checkpoint_patch_size(init)
        if saved is not None and saved != config.patch_size:
            raise ValueError(f"{config.scenario} ({config.backbone}): patch_size={config.patch_size}, but its starting "
                             f"checkpoint {init} was trained with patch_size={saved} (notebook 01's); pass "
                             f"patch_size={saved}, or None in notebooks 02 and 03, which reads it from that checkpoint")
    train_ids = manifest.loc[manifest["split"] == "train", "image_id"].tolist()
    valid_ids = manifest.loc[manifest["split"] == "val", "image_id"].tolist()
    if not train_ids:
        raise ValueError("the manifest has no training images (split == 'train'): run the split first")

    model = build_model(config)
    report = models.load_pretrained(model, init) if init is not None else None

    region_aware = config.crop_mode == "center"
    crop = crop_policy(config.crop_mode, config.image_size, scale=config.crop_scale)
    steps = [crop, RandomHorizontalFlip()]
    if config.objective == "rotation":
        steps.append(RotationTargets())
    valid_steps = [crop_policy("none", config.image_size)]
    if config.objective == "rotation":
        valid_steps.append(RotationTargets())
    dls = make_dataloaders(cache, train_ids, valid_ids, train_transform=Chain(steps),
                           valid_transform=Chain(valid_steps), region_aware=region_aware,
                           batch_size=config.batch_size, seed=config.seed, mean=mean, std=std)
    loss_func = nn.CrossEntropyLoss() if config.objective == "rotation" else None
    metrics = None
    if config.objective == "rotation":
        from fastai.metrics import accuracy

        metrics = [accuracy]
    out_dir = target.with_suffix("")
    template_table = out_dir / "template_check.csv"
    checks = []
    if check_images is not None:
        checks.append(TemplateCheckCallback(model, check_images, template_table, every=check_every, seed=config.seed))
    result = fit(model, dls, config.train_config(), out_dir, loss_func=loss_func, metrics=metrics,
                 stage=f"pretrain:{config.scenario}", quiet=quiet, resume=resume, cbs=checks,
                 adapt_model=region_mask_adapter(config, region_aware, loss_func), settings=config.fit_settings())
    models.save_encoder_checkpoint(model, target, meta={"scenario": config.scenario, "config": _plain(config),
                                                        "init": str(init) if init else None,
                                                        "train_images": len(train_ids)})
    template_history = pd.read_csv(template_table) if check_images is not None and template_table.exists() else None
    return PretrainResult(config, model, result, target, report, template_history)


def reconstruction_figure(model: nn.Module, images: torch.Tensor, mean: float, std: float, seed: int = 0,
                          mask_weights: torch.Tensor | None = None):
    """Rows of original / masked / reconstruction / the model's own prediction for a few images.

    With per-patch normalised targets the model predicts each hidden patch's structure, not its brightness: the
    reconstruction column borrows each hidden patch's true mean and std (the MAE paper's display), so its coarse
    shading is not the model's; the last column shows the prediction alone (standardised values, hidden patches).
    """
    import matplotlib.pyplot as plt

    generator = torch.Generator().manual_seed(seed)
    panels = model.reconstruct(images, mask_weights=mask_weights, generator=generator)
    normalised = bool(getattr(model, "norm_pix_loss", False))
    titles = ("original", "masked (model input)",
              "reconstruction\n(hidden patches' true mean/std)" if normalised else "reconstruction",
              "model's prediction alone\n(per-patch standardised)" if normalised else "model's prediction alone")
    keys = ("original", "masked", "pasted", "prediction")
    n = images.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(8.0, 2.0 * n), squeeze=False)
    for i in range(n):
        for j, key in enumerate(keys):
            values = panels[key][i, 0].float()
            if key == "prediction" and normalised:
                axes[i, j].imshow(values.numpy(), cmap="gray", vmin=-2.5, vmax=2.5)
            else:
                axes[i, j].imshow((values * std + mean).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_axis_off()
            if i == 0:
                axes[i, j].set_title(titles[j], fontsize=8)
    fig.tight_layout()
    return fig


def template_check(model: nn.Module, images: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Does a masked-image model reconstruct *the image*, or a template that is the same for every image?

    Every image gets the same mask, so the hidden positions agree, and on the hidden patches (standardised per
    patch when the model's targets are) the mean Pearson correlations are compared: ``own`` (prediction with its
    own image's patches), ``other`` (with another image's), ``between_predictions`` (two images' predictions) and
    ``template`` (the mean prediction over all images with each image). A model that uses the image has ``own``
    clearly above ``other``; ``own`` close to ``other``, high ``between_predictions`` and ``template`` >= ``own``
    mean it predicts a position-dependent template. A low loss alone cannot tell these apart, and a reconstruction
    figure that borrows each hidden patch's brightness hides it (found on the real chest MAE: see profiles/real.yaml).
    """
    _require_image_pairs(images, "template_check's images")
    device = next(model.parameters(), torch.empty(0)).device
    predictions, targets = [], []
    with models.eval_mode(model), torch.no_grad():
        for image in images:
            image = image[None].float().to(device)
            _, pred, mask = model(image, generator=torch.Generator().manual_seed(seed))
            target = models.mae.patchify(image, model.patch_size)
            if getattr(model, "norm_pix_loss", False):
                target = models.mae.normalise_patches(target)[0]
            hidden = mask[0].bool()
            predictions.append(pred[0][hidden].float().flatten().cpu().numpy())
            targets.append(target[0][hidden].flatten().cpu().numpy())
    pred, target = np.stack(predictions), np.stack(targets)
    n = len(pred)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]

    def r(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a, b)[0, 1])

    template = pred.mean(axis=0)
    return {
        "own": float(np.mean([r(pred[i], target[i]) for i in range(n)])),
        "other": float(np.mean([r(pred[i], target[j]) for i, j in pairs])),
        "between_predictions": float(np.mean([r(pred[i], pred[j]) for i, j in pairs])),
        "template": float(np.mean([r(template, target[i]) for i in range(n)])),
        "images": n,
    }


def _require_image_pairs(images: torch.Tensor, what: str) -> None:
    if images.dim() != 4 or images.shape[0] < 2:
        raise ValueError(f"{what} must be a batch (N >= 2, C, H, W) of images, got {tuple(images.shape)}: the "
                         f"template check compares images with each other")


class TemplateCheckCallback(Callback):
    """Runs :func:`template_check` on fixed held-out images after the first, every ``every``-th and the last epoch
    of a masked stage.

    The loss alone cannot say when (or whether) a masked model stops predicting a position template and starts
    reading the image: on the real chest pool (ViT-S/16, 128 px) the template phase lasted a whole 40-epoch run at
    mask 0.9 and ended around epoch 7 at mask 0.75, while the loss fell in both. Rows (epoch, own, other,
    between_predictions, template) are rewritten to ``path`` (CSV) after each check, so an interrupted run keeps
    them and a resumed one continues the table.
    """

    order = 80  # after the checkpoint callback: a slow check never delays the epoch's checkpoint

    def __init__(self, model: nn.Module, images: torch.Tensor, path: str | Path, every: int = 1, seed: int = 0):
        super().__init__()
        if every < 1:
            raise ValueError(f"TemplateCheckCallback: every must be >= 1 epoch, got {every}")
        # The masked model itself, not learn.model: fit may wrap it (region masks, DDP), and the wrappers do
        # not take the check's fixed-mask generator.
        self.model, self.images, self.path, self.every, self.seed = model, images, Path(path), every, seed
        self.rows: list[dict[str, float]] = []

    def before_fit(self) -> None:
        # A resumed run starts from the table its interrupted part wrote; rows of epochs it will redo are dropped.
        start = int(getattr(self.learn, "first_epoch", 0))
        if self.path.exists():
            self.rows = [row for row in pd.read_csv(self.path).to_dict("records") if row["epoch"] < start]

    def after_epoch(self) -> None:
        epoch = int(self.learn.epoch)
        last = epoch + 1 == self.learn.n_epoch
        if (epoch + 1) % self.every and not last and epoch > 0:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return  # every process holds the same weights: one writes the table
        self.rows = [row for row in self.rows if row["epoch"] < epoch]
        self.rows.append({"epoch": epoch, **template_check(self.model, self.images, seed=self.seed)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        self.table.to_csv(temporary, index=False)
        temporary.replace(self.path)

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


@dataclass
class MemorisationResult:
    """What :func:`memorisation_check` found: the template check on the memorised images and on as many held-out
    images, before and after (held-out ``own`` does not rise: memorising is not learning)."""

    model: nn.Module
    image_ids: list[str]
    held_out_ids: list[str]
    before: dict[str, float]
    after: dict[str, float]
    held_out_before: dict[str, float]
    held_out_after: dict[str, float]
    fit: FitResult

    def table(self) -> pd.DataFrame:
        rows = {"memorised images, before": self.before, "memorised images, after": self.after,
                "held-out images, before": self.held_out_before, "held-out images, after": self.held_out_after}
        return pd.DataFrame.from_dict(rows, orient="index")


def memorisation_check(run: Run, stage: PretrainResult, manifest: pd.DataFrame, cache: Any, mean: float,
                       std: float, n_images: int = 16, steps: int = 400, steps_per_epoch: int = 25,
                       base_lr: float = 6e-3, quiet: bool = True) -> MemorisationResult:
    """Can the trained masked model draw the detail of a hidden patch at all, given it knows the image?

    Held-out reconstructions that show edges but not the single ribs could mean a model or display that cannot
    render fine detail, or a model that cannot yet *predict* it from the visible patches. To tell these apart, a
    copy of the stage's model (encoder and decoder) is trained ``steps`` more steps on ``n_images`` training images
    only -- whole images, no crops or flips, each shown ``steps_per_epoch`` times an epoch in batches of
    ``n_images``, new masks every time -- and the template check (:func:`template_check`) is run on them and on as
    many held-out images, before and after. A model that memorises them draws their ribs in hidden patches (see
    the figures); the held-out ``own`` does not rise.
    The stage's own model is not changed. Writes ``<run>/checkpoints/<scenario>/<backbone>_memorisation/``.
    """
    config = stage.config
    if config.objective != "masked":
        raise ValueError(f"memorisation_check: {config.scenario} trains the rotation proxy; it needs a masked stage")
    if steps < 1 or steps_per_epoch < 1 or steps % steps_per_epoch:
        raise ValueError(f"memorisation_check: steps ({steps}) must be a positive multiple of steps_per_epoch "
                         f"({steps_per_epoch})")
    train_ids = manifest.loc[manifest["split"] == "train", "image_id"].tolist()
    held_out = manifest.loc[manifest["split"] == "val", "image_id"].tolist()
    if len(train_ids) < n_images or len(held_out) < 2 or n_images < 2:
        raise ValueError(f"memorisation_check: n_images={n_images} needs at least that many training images (the "
                         f"manifest has {len(train_ids)}) and 2 held-out images ({len(held_out)}); n_images >= 2")
    out_dir = checkpoint_path(run, config.scenario, config.backbone).with_name(f"{config.backbone}_memorisation")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists: this run already ran the memorisation check; start a new run")
    image_ids, held_out = train_ids[:n_images], held_out[:n_images]
    images, held_out_images = example_images(cache, image_ids, mean, std), example_images(cache, held_out, mean, std)
    model = copy.deepcopy(models.unwrap_model(stage.model))

    def check(batch: torch.Tensor) -> dict[str, float]:
        return template_check(model, batch, seed=config.seed)

    before, held_out_before = check(images), check(held_out_images)
    memorise = replace(config, crop_mode="none", epochs=steps // steps_per_epoch, batch_size=n_images,
                       base_lr=base_lr, warmup_epochs=1.0, mask_region_bias=0.0)
    whole = Chain([crop_policy("none", config.image_size)])
    dls = make_dataloaders(cache, image_ids * steps_per_epoch, held_out, train_transform=whole,
                           valid_transform=whole, batch_size=n_images, seed=config.seed, mean=mean, std=std)
    result = fit(model, dls, memorise.train_config(), out_dir, stage=f"memorisation:{config.scenario}", quiet=quiet,
                 settings=memorise.fit_settings())
    return MemorisationResult(model, image_ids, held_out, before, check(images), held_out_before,
                              check(held_out_images), result)


def template_check_figure(table: pd.DataFrame, title: str = ""):
    """``own`` and ``other`` (and the mean prediction's fit) per epoch: the gap is what the model reads."""
    lines = {"own": "own image", "other": "another image", "template": "mean prediction (template)"}
    return _per_epoch_figure(table, lines, "correlation with hidden patches", title)


def loss_curve_figure(history: pd.DataFrame, title: str = ""):
    """Training and validation loss per epoch."""
    return _per_epoch_figure(history, {"train_loss": "train loss", "valid_loss": "valid loss"}, "loss", title)


def _per_epoch_figure(table: pd.DataFrame, lines: dict[str, str], ylabel: str, title: str):
    """One line per column of ``table`` named in ``lines`` (column -> legend label) that the table has, by epoch."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3))
    for column, label in lines.items():
        if column in table:
            ax.plot(table["epoch"], table[column], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@torch.no_grad()
def rotation_accuracy(model: nn.Module, cache: Any, image_ids: list[str], mean: float, std: float,
                      batch_size: int = 64) -> pd.DataFrame:
    """Validation accuracy per rotation class: every image is shown at 0, 90, 180 and 270 degrees."""
    device = next(model.parameters()).device
    correct = np.zeros(4)
    confusion = np.zeros((4, 4), dtype=int)
    with models.eval_mode(model):
        for start in range(0, len(image_ids), batch_size):
            batch = example_images(cache, image_ids[start:start + batch_size], mean, std).to(device)
            for k in range(4):
                predicted = model(RotationTargets.rotate(batch, k)).float().argmax(dim=1).cpu().numpy()
                correct[k] += (predicted == k).sum()
                np.add.at(confusion[k], predicted, 1)
    table = pd.DataFrame({"rotation": [f"{90 * k}°" for k in range(4)], "images": len(image_ids),
                          "accuracy": correct / max(len(image_ids), 1)})
    for j in range(4):
        table[f"predicted {90 * j}°"] = confusion[:, j]
    return table


def _plain(config: PretrainConfig) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}


def example_images(cache: Any, image_ids: list[str], mean: float, std: float,
                   with_regions: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A batch (N,1,S,S) of whole cached images, normalised as in training (and their region masks)."""
    from osteolib.data import XrayDataset

    dataset = XrayDataset(cache, image_ids, region_aware=True, mean=mean, std=std)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item[0] for item in items])
    if not with_regions:
        return images
    return images, torch.stack([item[1] for item in items])


def crop_examples_figure(cache: Any, image_ids: list[str], size: int, crops: int = 3, seed: int = 0,
                         scale: tuple[float, float] = (0.5, 1.0)):
    """Each image (with its region outlined), then ``crops`` random-policy and ``crops`` center-policy crops."""
    import matplotlib.pyplot as plt

    from osteolib.data import XrayDataset

    dataset = XrayDataset(cache, image_ids)
    policies = {"random": crop_policy("random", size, scale=scale), "center": crop_policy("center", size, scale=scale)}
    columns = 1 + 2 * crops
    fig, axes = plt.subplots(len(image_ids), columns, figsize=(1.5 * columns, 1.6 * len(image_ids)), squeeze=False)
    generator_seed = seed
    for r in range(len(image_ids)):
        sample = dataset.sample(r)
        panels = [("whole image", sample)]
        for name, policy in policies.items():
            for c in range(crops):
                generator_seed += 1
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(generator_seed)
                    panels.append((f"{name} crop", policy(sample)))
        for c, (title, item) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(item.image[0].numpy(), cmap="gray", vmin=0, vmax=255)
            if item.region is not None and item.region.any():
                ax.contour(item.region[0].numpy() > 0, levels=[0.5], colors=["cyan"], linewidths=0.7)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return fig
