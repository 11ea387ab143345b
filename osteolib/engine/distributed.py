"""Distributed data-parallel training for :func:`osteolib.engine.loop`, switched on by ``torchrun``.

One switch: a process started by ``torchrun`` (``WORLD_SIZE`` > 1 in its environment) trains distributed;
any other process trains exactly as before (nothing here runs). In a distributed ``fit``:

* the process group is initialised from torchrun's environment (``env://``): **nccl** on CUDA (each process
  on GPU ``LOCAL_RANK``), **gloo** on the CPU;
* the model is wrapped in torch's ``DistributedDataParallel`` by a fastai callback
  (:class:`DistributedDataParallelCallback`), so gradients are averaged across processes inside
  ``backward``; on CUDA, BatchNorm layers become ``SyncBatchNorm`` (batch statistics over the global batch).
  On the CPU torch's SyncBatchNorm does not run (it raises for CPU tensors), so BatchNorm stays per process
  there, and DDP broadcasts rank 0's running statistics each step so every rank keeps the same buffers;
* ``TrainConfig.batch_size`` is the batch **per process** (MAE's convention): the global batch is
  ``batch_size x world_size`` and ``base_lr`` is scaled by the *global* batch (peak lr = base_lr x global / 256);
  an explicit ``lr`` is used as given. Both are reported in ``FitResult`` and printed;
* each process reads its shard of the training data (:class:`ShardedSeededSampler`): every rank draws the
  same seeded order and per-item augmentation seeds (the loader generators are seeded identically), and rank
  ``r`` takes positions ``[r*b, (r+1)*b)`` of each global batch of ``b x world_size`` items. The union of the
  ranks' batches is therefore exactly the batch a single process with ``batch_size = b x world_size`` sees,
  with the same augmentations, so a distributed run follows the single-process run with the same global batch
  (up to the summation order of the gradient all-reduce) wherever the model has no batch-coupled layer that
  stays per process (CPU BatchNorm) and no per-process randomness (MAE masks, dropout);
* per-process randomness (MAE masks, dropout, drop path) is reseeded at every epoch from
  (seed, rank, epoch), as MAE seeds each GPU with ``seed + rank``: ranks draw different masks, and a resumed
  distributed run continues exactly (the loader generators come from the checkpoint, the process streams
  from the epoch);
* validation runs on the whole validation set in every process (identical models give identical metrics,
  and a metric such as ROC-AUC needs all predictions, not a mean of shards); the training loss of the
  history is the mean over all processes' images;
* only rank 0 writes (checkpoints, ``best.pt``, history) and prints; every rank uses rank 0's ``out_dir``
  (broadcast), so all ranks resume from the same checkpoint and read the same ``best.pt`` after a barrier.
  Multi-machine runs therefore need the run folder on a shared file system.

Why not fastai's ``Learner.to_distributed`` / ``distrib_ctx``: in fastai 2.8 they are built on HuggingFace
``accelerate`` (not a dependency here), and fastai's ``DistributedDL`` broadcasts the sample order through
CUDA tensors (nccl only) and re-creates loaders as fastai ``TfmdDL`` — it cannot wrap osteolib's seeded
loaders, whose generator state is what makes resume exact. So the engine is the one both of those use
underneath, torch's DDP, attached through a fastai callback; fastai's ``rank_distrib`` / ``num_distrib``
read the environment.

The torchrun entry point that runs one stage this way is :mod:`osteolib.cli.stage`.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.torch_core import num_distrib, rank_distrib
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
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


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a torchrun job: its rank, its rank on this machine, the job size,
    the communication backend (nccl on CUDA, gloo on the CPU) and the device it trains on."""

    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def global_batch(self, batch_size: int) -> int:
        return int(batch_size) * self.world_size


def context() -> DistributedContext | None:
    """The torchrun job this process belongs to, or None for a plain single process (``WORLD_SIZE`` <= 1)."""
    world_size = num_distrib()
    if world_size <= 1:
        return None
    rank = rank_distrib()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world_size}: start the job with torchrun")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                               f"use --nproc_per_node <= {torch.cuda.device_count()}")
        return DistributedContext(rank, local_rank, world_size, "nccl", f"cuda:{local_rank}")
    return DistributedContext(rank, local_rank, world_size, "gloo", "cpu")


def is_main_process() -> bool:
    """True in a single process and in rank 0 of a distributed job: the process that writes files."""
    return rank_distrib() == 0 or num_distrib() <= 1


def init_process_group(ctx: DistributedContext) -> bool:
    """Join torchrun's process group (``env://``) unless already joined; returns whether it joined now."""
    if ctx.device.startswith("cuda"):
        torch.cuda.set_device(ctx.local_rank)
    if dist.is_initialized():
        if dist.get_world_size() != ctx.world_size:
            raise RuntimeError(f"a process group of size {dist.get_world_size()} is initialised, but WORLD_SIZE is "
                               f"{ctx.world_size}")
        return False
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={ctx.world_size} but {name} is not set: start distributed training "
                               f"with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)")
    dist.init_process_group(ctx.backend, init_method="env://", rank=ctx.rank, world_size=ctx.world_size)
    return True


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """The sums over all processes of a few numbers (float64 on the process group's device)."""
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def broadcast_path(path: str | os.PathLike) -> Path:
    """Rank 0's ``path`` in every process (the folder all ranks read and rank 0 writes)."""
    holder = [str(path)]
    dist.broadcast_object_list(holder, src=0)
    return Path(holder[0])


def convert_sync_batchnorm(model: nn.Module, ctx: DistributedContext) -> nn.Module:
    """BatchNorm -> SyncBatchNorm on CUDA (the same parameters and buffers, so optimiser groups stay valid).

    On the CPU the model is returned unchanged: torch's SyncBatchNorm refuses CPU tensors.
    """
    if not ctx.device.startswith("cuda"):
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# --------------------------------------------------------------------------------------------
# Data sharding


class ShardedSeededSampler(torch.utils.data.Sampler):
    """Rank ``rank``'s share of a :class:`osteolib.data.SeededSampler`'s ``(index, item_seed)`` stream.

    The wrapped sampler draws the whole epoch's order and seeds from its generator (identically on every
    rank); this sampler cuts it into global batches of ``batch_size x world_size`` and yields positions
    ``[rank*batch_size, (rank+1)*batch_size)`` of each. With ``drop_last`` the incomplete last global
    batch is dropped (every rank takes the same number of steps); without it the stream is padded by
    repeating its start to a whole global batch, as torch's DistributedSampler does.
    """

    def __init__(self, base: torch.utils.data.Sampler, batch_size: int, rank: int, world_size: int,
                 drop_last: bool):
        self.base, self.batch_size, self.rank, self.world_size = base, int(batch_size), int(rank), int(world_size)
        self.drop_last = bool(drop_last)
        self.generator = getattr(base, "generator", None)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _global_batches(self, n_items: int) -> int:
        full, rest = divmod(n_items, self.global_batch)
        return full if self.drop_last or rest == 0 else full + 1

    def __len__(self) -> int:
        return self._global_batches(len(self.base)) * self.batch_size

    def __iter__(self) -> Iterator[Any]:
        stream = list(iter(self.base))
        needed = self._global_batches(len(stream)) * self.global_batch
        if needed > len(stream) and stream:
            stream = (stream * (needed // len(stream) + 1))[:needed]
        stream = stream[:needed]
        mine = []
        for start in range(0, needed, self.global_batch):
            offset = start + self.rank * self.batch_size
            mine.extend(stream[offset:offset + self.batch_size])
        return iter(mine)


def shard_train_loader(dls: DataLoaders, ctx: DistributedContext) -> DataLoaders:
    """New DataLoaders whose training loader yields this rank's shard (validation stays whole).

    The sharded loader shares the original loader's generator object, so seeding and checkpointing it
    (``osteolib.engine``) act on the same stream.
    """
    from osteolib.data.loaders import SeededLoader, worker_init

    train = dls.train
    if not isinstance(train, SeededLoader):
        raise TypeError(f"distributed training shards osteolib's SeededLoader (osteolib.data.make_dataloaders); "
                        f"got a {type(train).__name__}")
    sampler = ShardedSeededSampler(train.sampler, train.batch_size, ctx.rank, ctx.world_size, train.drop_last)
    if len(sampler) == 0:
        raise ValueError(f"{len(train.dataset)} training images make no global batch of "
                         f"{sampler.global_batch} ({train.batch_size} per process x {ctx.world_size} processes); "
                         f"lower batch_size or use fewer processes")
    sharded = SeededLoader(train.dataset, batch_size=train.batch_size, sampler=sampler, drop_last=train.drop_last,
                           num_workers=train.num_workers, pin_memory=train.pin_memory,
                           worker_init_fn=worker_init if train.num_workers > 0 else None,
                           generator=train.generator, persistent_workers=False)
    sharded.device = getattr(train, "device", None)
    out = DataLoaders(sharded, *dls.loaders[1:], device=getattr(dls, "_device", None))
    out.summary = dict(getattr(dls, "summary", {}), world_size=ctx.world_size, rank=ctx.rank,
                       global_batch_size=sampler.global_batch, train_batches=len(sharded))
    return out


# --------------------------------------------------------------------------------------------
# The fastai callback


def process_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of rank ``rank``'s own random stream (masks, dropout) in ``epoch``."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(epoch)]).generate_state(1, dtype=np.uint32)[0])


class DistributedDataParallelCallback(Callback):
    """Wraps the Learner's model in ``DistributedDataParallel`` for the fit and unwraps it afterwards;
    reseeds the process's random streams from (seed, rank, epoch) before each epoch."""

    order = -4  # before the schedule and autocast callbacks, after fastai's TrainEvalCallback (-10)

    def __init__(self, ctx: DistributedContext, seed: int):
        super().__init__()
        self.ctx, self.seed = ctx, int(seed)
        self.module: nn.Module | None = None

    def before_fit(self) -> None:
        self.module = self.learn.model
        device_ids = [self.ctx.local_rank] if self.ctx.device.startswith("cuda") else None
        # broadcast_buffers (default): BatchNorm running statistics follow rank 0, so all ranks stay equal.
        self.learn.model = DistributedDataParallel(self.module, device_ids=device_ids)

    def before_epoch(self) -> None:
        seed = process_seed(self.seed, self.ctx.rank, self.learn.epoch)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def after_fit(self) -> None:
        if self.module is not None:
            self.learn.model = self.module
