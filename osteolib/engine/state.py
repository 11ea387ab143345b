"""The state of one run on disk: checkpoints (``checkpoint_last.pt``, ``final.pt``, ``best.pt``), history files,
RNG states, and the checks that let a run resume (or refuse to overwrite) an ``out_dir``.

``checkpoint_last.pt`` (every ``checkpoint_every`` epochs and at the end): model, optimizer, scaler, epoch, RNG
states of python/numpy/torch/CUDA and the loader generators, history, best-so-far. ``final.pt`` (final weights and
metadata), ``best.pt`` (the weights of the best epoch by ``monitor``), ``history.csv`` / ``history.json``; all
written atomically. ``best_at_checkpoint.pt``: ``best.pt`` as it was when ``checkpoint_last.pt`` was written (a
hard link), so a resume can put back the best weights of the checkpoint's epochs when a killed run had improved
``best.pt`` after its last checkpoint; removed when the run finishes.

An ``out_dir`` is never trained over silently: a finished or checkpointed run needs ``resume=True``, and a partial
run without a checkpoint (stopped before its first ``checkpoint_every`` epochs, leaving ``best.pt`` / history) is
refused either way, since it can only be restarted over its files.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from fastai.learner import Learner
from torch import nn

from osteolib.engine.config import TrainConfig
from osteolib.engine.precision import PrecisionChoice

__all__ = [
    "CHECKPOINT_LAST",
    "FINAL",
    "BEST",
    "HISTORY_CSV",
    "HISTORY_JSON",
    "CHECKPOINT_FORMAT",
    "RESUME_FREE_FIELDS",
    "atomic_save",
    "atomic_write_text",
    "rng_state",
    "set_rng_state",
    "loader_generator",
    "seed_run",
    "config_record",
    "load_checkpoint",
    "load_weights",
    "check_out_dir",
    "check_resumable",
    "restore_best",
    "RunState",
]

CHECKPOINT_LAST = "checkpoint_last.pt"
FINAL = "final.pt"
BEST = "best.pt"
HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
BEST_AT_CHECKPOINT = "best_at_checkpoint.pt"
# the on-disk format name, written by every checkpoint since the engine was osteolib.train: kept so earlier
# runs' checkpoints load and resume
CHECKPOINT_FORMAT = "osteolib.train/1"

# Config fields that do not change the trained weights: a resumed run may differ in these.
RESUME_FREE_FIELDS = ("checkpoint_every",)


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state(loaders: Sequence[Any]) -> dict:
    """The RNG states of python, numpy, torch, CUDA and the loaders' generators (checkpoint-loadable)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's state holds an ndarray; as a tensor the checkpoint loads with weights_only=True.
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loaders": [loader_generator(dl).get_state() if loader_generator(dl) is not None else None
                    for dl in loaders],
    }


def set_rng_state(state: dict, loaders: Sequence[Any]) -> None:
    """Restores what :func:`rng_state` saved."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for dl, saved in zip(loaders, state["loaders"]):
        generator = loader_generator(dl)
        if generator is not None and saved is not None:
            generator.set_state(saved)


def loader_generator(dl: Any) -> torch.Generator | None:
    generator = getattr(dl, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def seed_run(seed: int, loaders: Sequence[Any]) -> None:
    """A fresh run's RNGs: python/numpy/torch from ``seed``, loader ``i``'s generator from ``seed + i``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    for i, dl in enumerate(loaders):
        generator = loader_generator(dl)
        if generator is not None:
            generator.manual_seed(seed + i)


def config_record(config: TrainConfig, settings: Mapping[str, Any] | None = None) -> dict:
    """The config as checkpoints record it (JSON values): the TrainConfig fields, then ``settings`` (a stage's
    own options that change the weights, passed to ``fit``)."""
    return json.loads(json.dumps({**asdict(config), **dict(settings or {})}))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by :func:`fit` (``checkpoint_last.pt``, ``final.pt`` or ``best.pt``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which and why
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an osteolib training checkpoint (format {CHECKPOINT_FORMAT})")
    return data


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load the model weights of a :func:`fit` checkpoint into ``model`` (returned)."""
    model.load_state_dict(load_checkpoint(path)["model"], strict=strict)
    return model


def check_out_dir(out_dir: Path, resume: bool) -> dict | None:
    """The checkpoint to resume from (or None), after refusing to overwrite an existing run, finished or partial."""
    final, last = out_dir / FINAL, out_dir / CHECKPOINT_LAST
    leftovers = _partial_files(out_dir)
    if not resume:
        for existing in (final, last):
            if existing.exists():
                raise FileExistsError(
                    f"{existing} already exists: {out_dir} holds a {'finished' if existing == final else 'partial'} "
                    f"run. Choose a new out_dir, or pass resume=True to continue (or reload) that run.")
        if leftovers:
            raise FileExistsError(
                f"{out_dir} holds a partial run ({leftovers}) without {CHECKPOINT_LAST}: it stopped before its first "
                f"checkpoint and cannot be resumed, and training here would overwrite it. Choose a new out_dir, or "
                f"remove those files to train from the start.")
        return None
    if last.exists():
        return load_checkpoint(last)
    if final.exists():
        raise FileExistsError(f"{final} exists but {last} does not, so the run cannot be resumed; "
                              f"choose a new out_dir")
    if leftovers:
        raise FileExistsError(
            f"cannot resume {out_dir}: it holds a partial run ({leftovers}) but no {CHECKPOINT_LAST} (it stopped "
            f"before its first checkpoint; checkpoints come every checkpoint_every epochs), so resume=True would "
            f"restart it from scratch over its best.pt. Remove those files to train from the start, or choose a new "
            f"out_dir.")
    return None


def _partial_files(out_dir: Path) -> str:
    """What a run that wrote no checkpoint yet leaves: best.pt, its copy, the history files ('' when none)."""
    names = [name for name in (BEST, BEST_AT_CHECKPOINT, HISTORY_JSON, HISTORY_CSV) if (out_dir / name).exists()]
    if not names:
        return ""
    epochs = ""
    try:
        epochs = f", history of {len(json.loads((out_dir / HISTORY_JSON).read_text()))} epoch(s)"
    except (OSError, ValueError, TypeError):
        pass
    return ", ".join(names) + epochs


def restore_best(out_dir: Path, checkpoint: dict) -> None:
    """Make ``best.pt`` the best of the epochs ``checkpoint`` holds before a resume continues from it.

    A run killed after ``best.pt`` improved but before its next checkpoint (``checkpoint_every`` > 1, or a kill
    between the two writes) has ``best.pt`` from an epoch the resume will train again; the checkpoint's own best
    is put back from ``best_at_checkpoint.pt`` (or ``best.pt`` is removed when the checkpoint had no best yet).
    """
    wanted = (checkpoint.get("best") or {}).get("epoch")
    best, copy = out_dir / BEST, out_dir / BEST_AT_CHECKPOINT
    if _best_epoch(best) == wanted:
        return
    if wanted is None:
        best.unlink(missing_ok=True)
        return
    if _best_epoch(copy) != wanted:
        raise ValueError(f"cannot resume {out_dir}: {BEST} holds the best of epoch {_best_epoch(best)!r}, written "
                         f"after the checkpoint, whose best was epoch {wanted}, and {BEST_AT_CHECKPOINT} does not hold "
                         f"that epoch's weights; continuing would leave the wrong best.pt. Start the run in a new "
                         f"out_dir.")
    _link_or_copy(copy, best)


def _best_epoch(path: Path) -> Any:
    """The best epoch a best.pt-like file holds (None: no such file)."""
    if not path.exists():
        return None
    try:
        return (load_checkpoint(path).get("best") or {}).get("epoch")
    except ValueError:
        return "unreadable"


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes ``source``'s content atomically (a hard link where the file system allows, else a copy)."""
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def check_resumable(checkpoint: dict, config: TrainConfig, stage: str, out_dir: Path,
                    settings: Mapping[str, Any] | None = None) -> None:
    """Refuses a checkpoint made with another config (or settings) or by another stage."""
    saved = checkpoint.get("config", {})
    current = config_record(config, settings)
    differing = [f"{name}: checkpoint {saved.get(name)!r} vs now {current[name]!r}"
                 for name in current if name not in RESUME_FREE_FIELDS and saved.get(name) != current[name]]
    if differing:
        raise ValueError(f"cannot resume {out_dir / CHECKPOINT_LAST}: it was made with a different config "
                         f"({'; '.join(differing)}); use the same config or a new out_dir")
    if checkpoint.get("stage") != stage:
        raise ValueError(f"cannot resume {out_dir / CHECKPOINT_LAST}: it belongs to stage "
                         f"{checkpoint.get('stage')!r}, not {stage!r}")


@dataclass
class RunState:
    """The mutable state of one fit: what checkpoints and history files are made of."""

    model: nn.Module
    config: TrainConfig
    out_dir: Path
    stage: str
    precision: PrecisionChoice
    channels_last: bool
    learn: Learner | None = None
    scaler: torch.amp.GradScaler | None = None
    history: list[dict] = field(default_factory=list)
    # Distributed: the torchrun job (None for a single process); only its rank 0 writes files.
    distributed: Any = None
    best: dict = field(default_factory=lambda: {"monitor": None, "value": None, "epoch": None})
    # a stage's own settings recorded with the config (fit's ``settings``)
    settings: dict = field(default_factory=dict)

    def restore(self, checkpoint: dict, loaders: Sequence[Any]) -> int:
        """Loads a ``checkpoint_last.pt`` into the model, optimiser, scaler, RNGs (python, numpy, torch, CUDA and
        ``loaders``') and history; returns the number of epochs it had done."""
        self.model.load_state_dict(checkpoint["model"])
        self.learn.opt.opt.load_state_dict(checkpoint["optimizer"])
        if self.scaler is not None and checkpoint.get("scaler") is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"], loaders)
        self.history = list(checkpoint["history"])
        self.best = dict(checkpoint["best"])
        return int(checkpoint["epoch"])

    def update_best(self, row: dict, epoch: int) -> None:
        monitor = self.config.monitor
        value = row.get(monitor) if monitor else None
        if value is None or not isinstance(value, float) or math.isnan(value):
            return
        previous = self.best["value"]
        better = previous is None or (value < previous if self.config.minimise else value > previous)
        if better:
            self.best = {"monitor": monitor, "value": value, "epoch": int(epoch)}
            if self.writes:
                atomic_save(self._weights_record(epoch + 1), self.out_dir / BEST)

    @property
    def writes(self) -> bool:
        return self.distributed is None or self.distributed.is_main

    def _weights_record(self, epochs_done: int) -> dict:
        return {"format": CHECKPOINT_FORMAT, "kind": "weights", "stage": self.stage, "epoch": int(epochs_done),
                "model": self.model.state_dict(), "config": config_record(self.config, self.settings),
                "precision": self.precision.name, "channels_last": self.channels_last,
                "history": list(self.history), "best": dict(self.best)}

    def save_checkpoint(self, epochs_done: int) -> None:
        if not self.writes:
            return
        record = self._weights_record(epochs_done)
        record.update(kind="checkpoint", optimizer=self.learn.opt.opt.state_dict(),
                      scaler=self.scaler.state_dict() if self.scaler is not None else None,
                      rng=rng_state(self.learn.dls.loaders))
        atomic_save(record, self.out_dir / CHECKPOINT_LAST)
        # best.pt as this checkpoint knows it: a resume from here puts it back if best.pt moves on before the next
        if (self.out_dir / BEST).exists():
            _link_or_copy(self.out_dir / BEST, self.out_dir / BEST_AT_CHECKPOINT)
        else:
            (self.out_dir / BEST_AT_CHECKPOINT).unlink(missing_ok=True)

    def save_final(self) -> Path:
        if not self.writes:
            return self.out_dir / FINAL
        atomic_save(self._weights_record(self.config.epochs), self.out_dir / FINAL)
        # finished: the last checkpoint and best.pt agree, the copy kept for a resume is not needed any more
        (self.out_dir / BEST_AT_CHECKPOINT).unlink(missing_ok=True)
        return self.out_dir / FINAL

    def write_history(self) -> None:
        if not self.writes:
            return
        atomic_write_text(json.dumps(self.history, indent=1), self.out_dir / HISTORY_JSON)
        atomic_write_text(pd.DataFrame(self.history).to_csv(index=False), self.out_dir / HISTORY_CSV)
