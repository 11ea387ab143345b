"""The one training path: :func:`fit` trains every stage and backbone through a fastai ``Learner``.

Self-supervised pretraining (MAE-ViT, masked CNN: the model returns ``(loss, pred, mask)`` and
``loss_func`` is left None), rotation prediction and fine-tuning (a classifier and a loss function)
all go through it, so they share the same optimiser recipe, schedule, precision handling,
checkpoints and history files.

Recipe (MAE, He et al. 2022; :mod:`osteolib.engine.optim`): AdamW (betas 0.9/0.95, decoupled weight decay 0.05,
none on norms, biases, position embeddings and class/mask tokens), per-step linear warmup then cosine decay to
``min_lr``. ``TrainConfig.base_lr`` follows MAE's scaling rule ``lr = base_lr * batch_size / 256``;
``TrainConfig.lr`` sets the peak learning rate directly. Layer-wise lr decay for fine-tuning uses
timm's parameter groups (``layer_decay``); each group's ``lr_scale`` multiplies the schedule.

Precision is chosen automatically (:func:`osteolib.engine.precision.choose_precision`): CUDA -> AMP (bf16 where
supported, else fp16 with a GradScaler); CPU -> bf16 autocast only on CPUs with native bf16 instructions,
else fp32. Channels-last memory format goes with autocast on CNNs (where it pays off).

Files in ``out_dir`` (:mod:`osteolib.engine.state`): ``checkpoint_last.pt`` (every ``checkpoint_every`` epochs and
at the end: model, optimizer, scaler, epoch, RNG states of python/numpy/torch/CUDA and the loader generators,
history, best-so-far), ``final.pt`` (final weights and metadata), ``best.pt`` (the weights of the
best epoch by ``monitor``), ``history.csv`` / ``history.json``. ``fit(..., resume=True)`` continues
from ``checkpoint_last.pt`` and reaches bit-identical weights to an uninterrupted run (CPU, same
config and machine), ``best.pt`` included (put back to the checkpoint's best when a killed run had moved it on:
:func:`~osteolib.engine.state.restore_best`). An out_dir holding a finished or partial run is never overwritten
silently: a partial run without a checkpoint is refused with or without ``resume``.

Distributed data parallel: a process started by ``torchrun`` (``WORLD_SIZE`` > 1) trains distributed
through the same ``fit`` (:mod:`osteolib.engine.distributed`: DDP, sharded training data, SyncBatchNorm on
CUDA, rank 0 alone writes; ``config.batch_size`` is per process and ``base_lr`` scales with the global
batch). A single process takes exactly the path it always took. On CUDA with ``deterministic=False``,
cuDNN's autotuner (``cudnn.benchmark``) is switched on for the fit; loaders pin memory and use worker
processes on CUDA (:func:`osteolib.data.make_dataloaders`).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai.optimizer import OptimWrapper
from fastcore.basics import noop
from torch import nn

from osteolib.engine import distributed
from osteolib.engine.callbacks import (
    AutocastCallback,
    CheckpointCallback,
    ResumableLearner,
    StartCounters,
    ThroughputCallback,
    WarmupCosineSchedule,
)
from osteolib.engine.config import FitResult, TrainConfig
from osteolib.engine.optim import lr_at_step, param_groups
from osteolib.engine.precision import choose_precision, use_channels_last
from osteolib.engine.state import (
    BEST,
    CHECKPOINT_LAST,
    RunState,
    check_out_dir,
    check_resumable,
    restore_best,
    seed_run,
)

__all__ = ["fit", "model_loss", "ImageInputs"]


def model_loss(output: Any, *targets: Any) -> torch.Tensor:
    """The loss of a model that computes its own: the output itself, or ``output[0]`` of a tuple
    such as MAE's ``(loss, pred, mask)``. Targets are ignored (they are placeholders)."""
    loss = output[0] if isinstance(output, (tuple, list)) else output
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise TypeError("with loss_func=None the model must return its loss (a scalar tensor) or a tuple "
                        f"starting with it; got {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if torch.is_tensor(loss) else ""))
    return loss.reshape(())


class ImageInputs(nn.Module):
    """Adapts region-aware batches ``(image, region)`` to a model that takes the image alone.

    No parameters of its own: checkpoints save the wrapped model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, region: torch.Tensor) -> Any:
        return self.model(image)


@dataclass(frozen=True)
class _Steps:
    """The run's size: processes, images per optimiser step, peak lr and its step counts."""

    world_size: int
    global_batch: int
    peak_lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def fit(model: nn.Module, dls: DataLoaders, config: TrainConfig, out_dir: str | os.PathLike,
        loss_func: Callable | None = None, metrics: Any = None, stage: str = "train", *,
        resume: bool = False, quiet: bool = False, cbs: Sequence[Callback] | None = None,
        adapt_model: Callable[[nn.Module], nn.Module] | None = None,
        settings: Mapping[str, Any] | None = None) -> FitResult:
    """Train ``model`` on ``dls`` with ``config``, writing checkpoints and history into ``out_dir``.

    ``loss_func=None``: the model computes its own loss (MAE / masked CNN ``(loss, pred, mask)``);
    otherwise ``loss_func(pred, target)`` (e.g. ``nn.CrossEntropyLoss()``). ``metrics``: fastai
    metrics computed on the validation set each epoch (e.g. ``RocAucBinary()``). ``resume=True``
    continues from ``out_dir/checkpoint_last.pt`` (a finished run is reloaded without training;
    without a checkpoint the run starts fresh). ``stage`` labels the checkpoints ("pretrain",
    "finetune", ...). ``cbs``: extra fastai callbacks. ``quiet`` hides progress bars and the table.

    ``adapt_model(model)`` wraps the (device-placed) model for the Learner's calls, e.g. to turn a batch's extra
    inputs into keyword arguments; the wrapper must add no parameters (parameter groups, checkpoints and the
    returned model are the model itself). Without it, region-aware data (``make_dataloaders(region_aware=True)``,
    batches ``(image, region)``) gives the model the image alone (:class:`ImageInputs`). ``settings``: a stage's
    own options that change the trained weights (JSON values, names other than TrainConfig's): recorded with the
    config in every checkpoint and checked like it on resume.
    The run is a function of (config, data, model init): fit reseeds python/numpy/torch and the
    loaders from ``config.seed``.
    """
    started = time.perf_counter()
    _check_arguments(config, dls, settings)
    ctx, joined_group, dls = _join_process_group(dls)
    steps = _plan_steps(config, dls, ctx)
    settings = dict(settings or {})
    out_dir, checkpoint = _prepare_out_dir(out_dir, resume, config, stage, settings, ctx)
    run = _place_model(model, dls, config, stage, out_dir, settings, ctx)
    model = run.model
    learn = _make_learner(run, dls, steps, loss_func, metrics, adapt_model)
    start_epoch = _start_state(run, dls, checkpoint)
    autocast_cb, training_cbs = _add_callbacks(run, steps, start_epoch, ctx, cbs)
    _announce(run, steps, stage, quiet, ctx, start_epoch if checkpoint is not None else None)
    _train(learn, config, start_epoch, autocast_cb, training_cbs + list(cbs or []))
    final_path = run.save_final()
    run.write_history()
    if ctx is not None:
        # The other ranks may read best.pt / final.pt next: wait until rank 0 has written them.
        distributed.barrier()
        if joined_group:
            distributed.destroy_process_group()
    best_path = out_dir / BEST if run.best["epoch"] is not None else None
    return FitResult(model=model, history=pd.DataFrame(run.history), out_dir=out_dir, final_path=final_path,
                     checkpoint_path=out_dir / CHECKPOINT_LAST, best_path=best_path,
                     best_epoch=run.best["epoch"], best_value=run.best["value"], precision=run.precision,
                     channels_last=run.channels_last,
                     resumed_from_epoch=start_epoch if checkpoint is not None else None,
                     seconds=time.perf_counter() - started, learner=learn, global_batch_size=steps.global_batch,
                     peak_lr=steps.peak_lr, world_size=steps.world_size)


def _check_arguments(config: TrainConfig, dls: DataLoaders, settings: Mapping[str, Any] | None) -> None:
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(dls, DataLoaders) or len(dls.loaders) < 2:
        raise TypeError("dls must be fastai DataLoaders(train, valid); build them with osteolib.data.make_dataloaders")
    clashes = sorted(set(settings or {}) & {f.name for f in dataclasses.fields(TrainConfig)})
    if clashes:
        raise ValueError(f"settings {clashes} are TrainConfig fields: set them in the config")


def _join_process_group(dls: DataLoaders) -> tuple[Any, bool, DataLoaders]:
    """Started by torchrun (WORLD_SIZE > 1): join the process group and train on this rank's shard."""
    ctx = distributed.context()
    joined_group = False
    if ctx is not None:
        joined_group = distributed.init_process_group(ctx)
        dls = distributed.shard_train_loader(dls, ctx)
    return ctx, joined_group, dls


def _plan_steps(config: TrainConfig, dls: DataLoaders, ctx: Any) -> _Steps:
    world_size = ctx.world_size if ctx is not None else 1
    global_batch = config.batch_size * world_size
    peak_lr = config.peak_lr_for(global_batch)
    steps_per_epoch = len(dls.train)
    if steps_per_epoch == 0:
        raise ValueError("the training loader yields no batches (too few images for its batch size with drop_last)")
    loader_batch = getattr(dls.train, "batch_size", None)
    if loader_batch is not None and loader_batch != config.batch_size:
        raise ValueError(f"config.batch_size={config.batch_size} but the training loader makes batches of "
                         f"{loader_batch}; build the loaders with batch_size=config.batch_size (the lr scaling "
                         f"and the recorded recipe depend on it)")
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup of {warmup_steps} steps leaves no room in {total_steps} training steps; "
                         f"lower warmup_epochs")
    return _Steps(world_size, global_batch, peak_lr, steps_per_epoch, total_steps, warmup_steps)


def _prepare_out_dir(out_dir: str | os.PathLike, resume: bool, config: TrainConfig, stage: str,
                     settings: dict, ctx: Any) -> tuple[Path, dict | None]:
    """The run's folder (created) and the checkpoint to resume from, if any (checked against the config)."""
    # Every rank reads (resume, best.pt) and rank 0 writes the same folder: rank 0's.
    out_dir = distributed.broadcast_path(out_dir) if ctx is not None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = check_out_dir(out_dir, resume)
    if checkpoint is not None:
        check_resumable(checkpoint, config, stage, out_dir, settings)
        if ctx is None or ctx.is_main:  # the writing process puts back the checkpoint's best.pt
            restore_best(out_dir, checkpoint)
    return out_dir, checkpoint


def _dls_device(dls: DataLoaders) -> torch.device:
    device = getattr(dls, "_device", None)
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _place_model(model: nn.Module, dls: DataLoaders, config: TrainConfig, stage: str, out_dir: Path,
                 settings: dict, ctx: Any) -> RunState:
    """Moves the model to the loaders' device in the run's precision and memory format; the run's state."""
    device = _dls_device(dls)
    precision = choose_precision(device, config.precision)
    channels_last = use_channels_last(model, config.channels_last, precision)
    model.to(device)
    if ctx is not None:
        model = distributed.convert_sync_batchnorm(model, ctx)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type) if precision.grad_scaler else None
    return RunState(model=model, config=config, out_dir=out_dir, stage=stage, precision=precision,
                    channels_last=channels_last, scaler=scaler, distributed=ctx, settings=settings)


def _make_learner(run: RunState, dls: DataLoaders, steps: _Steps, loss_func: Callable | None, metrics: Any,
                  adapt_model: Callable[[nn.Module], nn.Module] | None) -> ResumableLearner:
    """The Learner with the recipe's AdamW and parameter groups; its optimiser created, the monitor checked."""
    model, config = run.model, run.config
    groups = param_groups(model, config.weight_decay, config.layer_decay)
    if adapt_model is not None:
        learner_model = adapt_model(model)
    else:
        learner_model = ImageInputs(model) if getattr(dls.train.dataset, "region_aware", False) else model
    learn = ResumableLearner(
        dls, learner_model, loss_func=loss_func if loss_func is not None else model_loss,
        opt_func=lambda params, lr: OptimWrapper(params, torch.optim.AdamW, lr=lr, betas=config.betas,
                                                 eps=config.eps, weight_decay=config.weight_decay),
        lr=lr_at_step(0, steps.total_steps, steps.warmup_steps, steps.peak_lr, config.min_lr),
        splitter=lambda _: groups, metrics=metrics, path=run.out_dir, wd=None)
    run.learn = learn
    if config.monitor is not None:
        known = ["train_loss", "valid_loss"] + list(learn.metrics.attrgot("name"))
        if config.monitor not in known:
            raise ValueError(f"config.monitor={config.monitor!r} is not recorded; choose one of {known} or None")
    learn.create_opt()
    return learn


def _start_state(run: RunState, dls: DataLoaders, checkpoint: dict | None) -> int:
    """Seeds a fresh run, or restores a checkpoint's weights, optimiser and RNGs; the epoch to start at."""
    if checkpoint is None:
        seed_run(run.config.seed, dls.loaders)
        start_epoch = 0
    else:
        start_epoch = run.restore(checkpoint, dls.loaders)
    run.learn.first_epoch = start_epoch
    return start_epoch


def _add_callbacks(run: RunState, steps: _Steps, start_epoch: int, ctx: Any,
                   cbs: Sequence[Callback] | None) -> tuple[AutocastCallback, list[Callback]]:
    """Adds the training callbacks (and the caller's ``cbs``); the autocast callback and the training ones."""
    config, learn = run.config, run.learn
    schedule = WarmupCosineSchedule(steps.peak_lr, config.min_lr, steps.total_steps, steps.warmup_steps,
                                    steps.steps_per_epoch)
    autocast_cb = AutocastCallback(run.precision, run.channels_last, config.grad_clip, run.scaler)
    throughput = ThroughputCallback()
    training_cbs = [StartCounters(start_epoch, steps.steps_per_epoch, config.epochs), schedule, autocast_cb,
                    throughput, CheckpointCallback(run, schedule, throughput)]
    if ctx is not None:
        training_cbs.append(distributed.DistributedDataParallelCallback(ctx, config.seed))
    learn.add_cbs(training_cbs)
    if cbs:
        learn.add_cbs(list(cbs))
    return autocast_cb, training_cbs


def _announce(run: RunState, steps: _Steps, stage: str, quiet: bool, ctx: Any, resumed_after: int | None) -> None:
    """Hides progress bars and the table (quiet, or not the writing process), or prints the run's recipe."""
    learn, config = run.learn, run.config
    if quiet or not run.writes:
        learn.remove_cbs(learn._grab_cbs(ProgressCallback))
        learn.logger = noop
        return
    scale = (f"; {steps.world_size} processes ({ctx.backend}) x batch {config.batch_size} = global batch "
             f"{steps.global_batch}" if ctx is not None else "")
    device = _dls_device(learn.dls)
    print(f"[{stage}] precision {run.precision.name} ({run.precision.reason}); channels_last={run.channels_last}; "
          f"device {device}; {steps.steps_per_epoch} steps/epoch; peak lr {steps.peak_lr:.3g}{scale}"
          + (f"; resuming after epoch {resumed_after}" if resumed_after is not None else ""))


def _train(learn: ResumableLearner, config: TrainConfig, start_epoch: int, autocast_cb: AutocastCallback,
           added_cbs: list[Callback]) -> None:
    """Runs the epochs left under the run's determinism switches, restoring them (and the Learner) after."""
    device = _dls_device(learn.dls)
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if config.deterministic:
        # Global switches, restored below; warn_only because a few ops have no deterministic kernel.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif device.type == "cuda":
        # Fixed input sizes: let cuDNN pick the fastest convolution algorithms (restored below).
        torch.backends.cudnn.benchmark = True
    try:
        if start_epoch < config.epochs:
            learn.fit(config.epochs)
    finally:
        # An interruption inside a forward pass would otherwise leave autocast on for the process.
        autocast_cb.leave_autocast()
        # The returned Learner is for prediction (get_preds/validate run epoch events): without the
        # training callbacks, which would otherwise append history rows and rewrite checkpoints.
        learn.remove_cbs(added_cbs)
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]
