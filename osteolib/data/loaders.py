"""Training data: a torch Dataset over the image cache and deterministic fastai DataLoaders.

Training reads the cache's memory-mapped uint8 arrays (no image decoding per step), applies the
:mod:`osteolib.data.transforms` policy, and normalises to float once: ``(x/255 - mean) / std``.

Determinism: the sampler hands each item a seed drawn from the loader's seeded generator, and the
dataset runs the transforms under ``torch.manual_seed(seed)`` inside ``fork_rng``. So the
augmentation of an item depends only on (loader seed, epoch, position), not on the number of
worker processes, and never disturbs the training process's own random stream (MAE masks,
dropout). Saving and restoring the loader generator (``osteolib.engine`` does, in its checkpoints)
replays the data order and augmentations exactly.

The cache is duck-typed: any object with ``images`` (N,S,S) uint8, ``regions`` (N,S,S) uint8 0/1
(or None), ``has_region`` (N,) bool, ``image_ids``, ``index`` (image_id -> row) and ``size``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from fastai.data.core import DataLoaders
from torch.utils.data import DataLoader, Dataset, Sampler

from osteolib.data.transforms import Sample
from osteolib.utils import usable_cores

__all__ = [
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "XrayDataset",
    "SeededSampler",
    "SeededLoader",
    "make_dataloaders",
    "auto_num_workers",
    "split_targets",
]

log = logging.getLogger(__name__)

# The study's normalisation of 8-bit X-rays scaled to [0,1]; the data audit notebook measures the
# values of the data actually used and passes them in.
DEFAULT_MEAN = 0.5256
DEFAULT_STD = 0.252


class XrayDataset(Dataset):
    """Items from an image cache: ``(image, target)`` or, with ``region_aware``, ``(image, region, target)``.

    ``image``: float32 (1,S',S') normalised; ``region``: uint8 (1,S',S') 0/1 (all zero for images
    without an expert region); ``target``: int64 scalar (0 when ``targets`` is None, as in
    self-supervised pretraining, unless the transform sets it, as :class:`RotationTargets` does).

    Index with an int (augmentation from the global torch generator) or with ``(index, seed)`` as
    :class:`SeededSampler` does (augmentation seeded per item).
    """

    def __init__(self, cache: Any, image_ids: Sequence[str], targets: Sequence[int] | None = None,
                 transform: Callable[[Sample], Sample] | None = None, region_aware: bool = False,
                 mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD):
        for attribute in ("images", "index"):
            if not hasattr(cache, attribute):
                raise TypeError(f"cache object {type(cache).__name__} has no '{attribute}'; pass an "
                                f"osteolib.data.cache.ImageCache (or an object with images/regions/has_region/index)")
        image_ids = [str(i) for i in image_ids]
        missing = [i for i in image_ids if i not in cache.index]
        if missing:
            raise KeyError(f"{len(missing)} of {len(image_ids)} image ids are not in the cache "
                           f"(first: {missing[:5]}); rebuild the cache from the same manifest")
        if targets is not None and len(targets) != len(image_ids):
            raise ValueError(f"targets has {len(targets)} entries for {len(image_ids)} image ids; "
                             f"they must pair up one to one")
        if std <= 0:
            raise ValueError(f"normalisation std must be > 0, got {std!r}")
        self.cache = cache
        self.image_ids = image_ids
        self.rows = np.array([cache.index[i] for i in image_ids], dtype=np.int64)
        self.targets = None if targets is None else [int(t) for t in targets]
        self.transform = transform
        self.region_aware = bool(region_aware)
        self.mean, self.std = float(mean), float(std)
        regions = getattr(cache, "regions", None)
        has_region = getattr(cache, "has_region", None)
        self._regions = regions
        self._has_region = (np.zeros(len(cache.images), dtype=bool) if regions is None or has_region is None
                            else np.asarray(has_region, dtype=bool))

    def __len__(self) -> int:
        return len(self.image_ids)

    def sample(self, index: int) -> Sample:
        """The untransformed item as a :class:`Sample` (uint8 image and region, target)."""
        row = int(self.rows[index])
        # np.array copies out of the memory map: torch wants writable memory it owns.
        image = torch.from_numpy(np.array(self.cache.images[row], dtype=np.uint8))[None]
        region = None
        if self._has_region[row]:
            region = torch.from_numpy(np.array(self._regions[row], dtype=np.uint8))[None]
        target = 0 if self.targets is None else self.targets[index]
        return Sample(image=image, region=region, target=target)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample = self.sample(int(index))
        if self.transform is not None:
            if seed is None:
                sample = self.transform(sample)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(seed))
                    sample = self.transform(sample)
        image = sample.image
        pixels = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        pixels = pixels.sub_(self.mean).div_(self.std)
        target = torch.as_tensor(sample.target, dtype=torch.long)
        if not self.region_aware:
            return pixels, target
        region = sample.region
        if region is None:
            region = torch.zeros((1, *pixels.shape[-2:]), dtype=torch.uint8)
        return pixels, region.to(torch.uint8), target

    def __repr__(self) -> str:
        return (f"XrayDataset({len(self)} images, transform={self.transform!r}, "
                f"region_aware={self.region_aware})")


class SeededSampler(Sampler):
    """Yields ``(index, item_seed)``: a (shuffled) order and one augmentation seed per item.

    Both come from ``generator``, so the generator's state fixes an epoch's order and augmentations.
    """

    def __init__(self, n_items: int, shuffle: bool, generator: torch.Generator):
        self.n_items, self.shuffle, self.generator = int(n_items), bool(shuffle), generator

    def __len__(self) -> int:
        return self.n_items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.n_items, generator=self.generator)
        else:
            order = torch.arange(self.n_items)
        seeds = torch.randint(0, 2**62, (self.n_items,), generator=self.generator)
        return iter(zip(order.tolist(), seeds.tolist()))


class SeededLoader(DataLoader):
    """A torch DataLoader that fastai can place on a device and ``osteolib.engine`` can reseed.

    ``to(device)`` only records the device (fastai's Learner moves each batch to the model's
    device); ``reseed`` restarts the order/augmentation stream; the generator state is what a
    checkpoint saves.
    """

    device: torch.device | None = None

    def to(self, device: torch.device | str) -> "SeededLoader":
        self.device = torch.device(device)
        return self

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def new(self, shuffle: bool = False, drop_last: bool = False, **_: Any) -> "SeededLoader":
        """A copy over the same dataset in order, for prediction (fastai's ``Learner.get_preds`` asks
        for one); seeded like this loader was, so its items are the same on every call."""
        return _loader(self.dataset, self.batch_size, shuffle, drop_last, self.generator.initial_seed(),
                       self.num_workers, self.pin_memory)


def worker_init(worker_id: int) -> None:
    # One thread per worker: on a 2-core machine several intra-op threads per worker would fight
    # the training process for the cores.
    torch.set_num_threads(1)


def auto_num_workers(device: torch.device | str | None = None) -> int:
    """Loader worker processes for this machine: 0 on a CPU-trained run, up to 8 feeding a GPU.

    Reading the cache is a memory copy and the transforms are a few tensor ops (RandAugment at
    224 px: ~650 items/s on one core), so on a CPU run a worker mostly takes a core from the model:
    on the 2-core development machine (ResNet-18, 128 px, bf16, RandAugment) one worker trained at
    37 img/s against 58 img/s with none (10 vs 12 img/s in a second, busier measurement). A GPU
    leaves the CPU cores free for loading and augmentation. The history's ``data_wait_fraction``
    shows when a run is starved for data.
    """
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type != "cuda":
        return 0
    # The cores this process may use (a pinned `osteo run --jobs` child has its share), split between the
    # training processes torchrun started on this machine.
    cores = usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, cores - 1))


def _loader(dataset: XrayDataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
            num_workers: int, pin_memory: bool) -> SeededLoader:
    generator = torch.Generator().manual_seed(int(seed))
    return SeededLoader(dataset, batch_size=batch_size,
                        sampler=SeededSampler(len(dataset), shuffle=shuffle, generator=generator),
                        drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory,
                        worker_init_fn=worker_init if num_workers > 0 else None,
                        generator=generator, persistent_workers=False)


def make_dataloaders(cache: Any, train_ids: Sequence[str], valid_ids: Sequence[str], *,
                     train_targets: Sequence[int] | None = None, valid_targets: Sequence[int] | None = None,
                     train_transform: Callable[[Sample], Sample] | None = None,
                     valid_transform: Callable[[Sample], Sample] | None = None,
                     region_aware: bool = False, batch_size: int = 64, valid_batch_size: int | None = None,
                     seed: int = 0, num_workers: int | None = None, device: torch.device | str | None = None,
                     mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD,
                     drop_last: bool | None = None) -> DataLoaders:
    """fastai ``DataLoaders`` (train, valid) over the cache, deterministic for a given ``seed``.

    The training loader shuffles; it drops the last incomplete batch by default (``drop_last=None``)
    when there is at least one full batch, so BatchNorm never sees a batch of one; the dropped
    images change every epoch, and the count is logged. ``valid_ids`` may be empty (pretraining on
    everything). ``num_workers=None`` picks :func:`auto_num_workers`; pin_memory is on for CUDA.
    ``dls.summary`` holds the sizes and choices made.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if len(train_ids) == 0:
        raise ValueError("train_ids is empty: there is nothing to train on (check the manifest's split column)")
    target_device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    workers = auto_num_workers(target_device) if num_workers is None else int(num_workers)
    if workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
    pin = target_device.type == "cuda"
    train_ds = XrayDataset(cache, train_ids, train_targets, train_transform, region_aware, mean, std)
    valid_ds = XrayDataset(cache, valid_ids, valid_targets, valid_transform, region_aware, mean, std)
    drop = (len(train_ds) >= batch_size) if drop_last is None else bool(drop_last)
    if drop and len(train_ds) < batch_size:
        raise ValueError(f"drop_last with {len(train_ds)} training images and batch_size={batch_size} "
                         f"leaves no batch; lower batch_size or pass drop_last=False")
    dropped_per_epoch = len(train_ds) % batch_size if drop else 0
    train_dl = _loader(train_ds, batch_size, True, drop, seed, workers, pin)
    valid_dl = _loader(valid_ds, valid_batch_size or batch_size, False, False, seed + 1, workers, pin)
    dls = DataLoaders(train_dl, valid_dl, device=target_device)
    dls.summary = {"train_images": len(train_ds), "valid_images": len(valid_ds), "batch_size": batch_size,
                   "train_batches": len(train_dl), "valid_batches": len(valid_dl),
                   "train_images_left_out_per_epoch": dropped_per_epoch, "num_workers": workers,
                   "pin_memory": pin, "device": str(target_device), "region_aware": bool(region_aware),
                   "mean": float(mean), "std": float(std), "seed": int(seed)}
    if dropped_per_epoch:
        log.info("training loader: %d of %d images fall outside full batches each epoch (a different "
                 "%d every epoch, reshuffled)", dropped_per_epoch, len(train_ds), dropped_per_epoch)
    return dls


def split_targets(manifest: pd.DataFrame, split: str, classes: Sequence[str],
                  label_column: str = "label") -> tuple[list[str], list[int]]:
    """Image ids of one split and their class indices in ``classes`` (order = manifest order)."""
    for column in ("image_id", "split", label_column):
        if column not in manifest.columns:
            raise KeyError(f"manifest has no '{column}' column (it has {list(manifest.columns)})")
    rows = manifest[manifest["split"].astype(str) == split]
    if rows.empty:
        present = sorted(manifest["split"].astype(str).unique())
        raise ValueError(f"manifest has no rows with split == {split!r} (splits present: {present}); "
                         f"run the split step first")
    lookup = {name: i for i, name in enumerate(classes)}
    unknown = rows[~rows[label_column].astype(str).isin(lookup)]
    if not unknown.empty:
        raise ValueError(f"{len(unknown)} '{split}' rows have a {label_column!r} outside classes {list(classes)} "
                         f"(first image_ids: {unknown['image_id'].astype(str).tolist()[:5]})")
    ids = rows["image_id"].astype(str).tolist()
    return ids, [lookup[str(v)] for v in rows[label_column]]
