"""Layer 3, engine: one training path (``fit``) for every stage, and its distributed (DDP) support.

Modules: :mod:`~osteolib.engine.config` (TrainConfig, FitResult), :mod:`~osteolib.engine.precision`,
:mod:`~osteolib.engine.optim` (parameter groups, schedule), :mod:`~osteolib.engine.callbacks`,
:mod:`~osteolib.engine.state` (checkpoints, resume), :mod:`~osteolib.engine.loop` (``fit``) and
:mod:`~osteolib.engine.distributed`.
"""
from __future__ import annotations

from osteolib.engine import callbacks, config, distributed, loop, optim, precision, state
from osteolib.engine.config import FitResult, TrainConfig
from osteolib.engine.distributed import (
    DistributedContext,
    DistributedDataParallelCallback,
    ShardedSeededSampler,
    all_reduce_sum,
    barrier,
    broadcast_path,
    context,
    convert_sync_batchnorm,
    destroy_process_group,
    init_process_group,
    is_main_process,
    process_seed,
    shard_train_loader,
)
from osteolib.engine.loop import ImageInputs, fit, model_loss
from osteolib.engine.optim import lr_at_step, param_groups
from osteolib.engine.precision import PrecisionChoice, choose_precision, cpu_supports_bf16
from osteolib.engine.state import BEST, CHECKPOINT_LAST, FINAL, load_checkpoint, load_weights

__all__ = [
    "callbacks",
    "config",
    "distributed",
    "loop",
    "optim",
    "precision",
    "state",
    "TrainConfig",
    "PrecisionChoice",
    "FitResult",
    "cpu_supports_bf16",
    "choose_precision",
    "lr_at_step",
    "param_groups",
    "model_loss",
    "ImageInputs",
    "fit",
    "load_checkpoint",
    "load_weights",
    "CHECKPOINT_LAST",
    "FINAL",
    "BEST",
    "DistributedContext",
    "context",
    "is_main_process",
    "init_process_group",
    "ShardedSeededSampler",
    "shard_train_loader",
    "DistributedDataParallelCallback",
    "process_seed",
    "convert_sync_batchnorm",
    "all_reduce_sum",
    "broadcast_path",
    "barrier",
    "destroy_process_group",
]
