"""fit's resume with ``checkpoint_every`` > 1: a fit killed between checkpoints continues from its last one with the
best.pt of that checkpoint, reaching the uninterrupted run's files; a partial run without a checkpoint is refused,
never restarted silently. Tiny CNN on 24 random 32-px images (a few seconds)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.metrics import Metric
from torch import nn

from osteolib.data import crop_policy, finetune_transform, make_dataloaders
from osteolib.engine import BEST, CHECKPOINT_LAST, FINAL, TrainConfig, fit, load_checkpoint
from osteolib.engine.state import BEST_AT_CHECKPOINT

N_IMAGES, SIZE, CROP = 24, 32, 24


@pytest.fixture(scope="module")
def cache():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_IMAGES, SIZE, SIZE), dtype=np.uint8)
    ids = [f"img{i:02d}" for i in range(N_IMAGES)]
    return SimpleNamespace(images=images, regions=np.zeros_like(images), has_region=np.zeros(N_IMAGES, bool),
                           image_ids=ids, index={k: i for i, k in enumerate(ids)}, size=SIZE)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2))


def _dls(cache):
    ids = cache.image_ids
    return make_dataloaders(cache, ids[:16], ids[16:], train_targets=[i % 2 for i in range(16)],
                            valid_targets=[i % 2 for i in range(16, 24)], train_transform=finetune_transform(CROP),
                            valid_transform=crop_policy("none", CROP), batch_size=4, seed=0)


class EpochScore(Metric):
    """A monitor that improves every epoch (its value is the epoch), so best.pt moves on after every epoch."""

    def reset(self):
        self.epoch = None

    def accumulate(self, learn):
        self.epoch = learn.epoch

    @property
    def value(self):
        return float(self.epoch)

    @property
    def name(self):
        return "epoch_score"


class Killed(Exception):
    pass


class KillAt(Callback):
    """A kill at the first training batch of ``epoch`` (the epochs before it are done and their files written)."""

    order = 99

    def __init__(self, epoch: int):
        super().__init__()
        self.kill_epoch = epoch

    def before_batch(self):
        if self.learn.training and self.learn.epoch == self.kill_epoch and self.learn.iter == 0:
            raise Killed(f"killed in epoch {self.kill_epoch}")


def _fit(cache, out_dir, **options):
    config = TrainConfig(epochs=4, batch_size=4, lr=5e-3, warmup_epochs=1, precision="fp32", seed=0,
                         checkpoint_every=2, monitor="epoch_score", monitor_mode="max")
    return fit(_cnn(), _dls(cache), config, out_dir, loss_func=nn.CrossEntropyLoss(), metrics=[EpochScore()],
               quiet=True, **options)


def _weights(path):
    return load_checkpoint(path)["model"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fit_killed_between_checkpoints_resumes_from_the_last_one_with_its_best(cache, tmp_path):
    full = _fit(cache, tmp_path / "full")
    # killed in epoch 3 (0-based): epochs 0-2 done, the checkpoint is from epoch 2 (checkpoint_every=2), and best.pt
    # has moved on to epoch 2 after it
    with pytest.raises(Killed):
        _fit(cache, tmp_path / "cut", cbs=[KillAt(3)])
    cut = tmp_path / "cut"
    assert load_checkpoint(cut / CHECKPOINT_LAST)["epoch"] == 2
    assert load_checkpoint(cut / BEST)["best"]["epoch"] == 2
    assert load_checkpoint(cut / BEST_AT_CHECKPOINT)["best"]["epoch"] == 1
    # a resume killed again right away has put back the checkpoint's best.pt (epoch 1), not kept epoch 2's
    with pytest.raises(Killed):
        _fit(cache, cut, resume=True, cbs=[KillAt(2)])
    assert load_checkpoint(cut / BEST)["best"]["epoch"] == 1
    # resumed to the end: the uninterrupted run's weights, best.pt and history
    resumed = _fit(cache, cut, resume=True)
    assert resumed.resumed_from_epoch == 2
    assert _same(_weights(cut / FINAL), _weights(full.final_path))
    assert _same(_weights(cut / BEST), _weights(tmp_path / "full" / BEST)) and resumed.best_epoch == 3
    assert resumed.history["train_loss"].tolist() == full.history["train_loss"].tolist()
    assert not (cut / BEST_AT_CHECKPOINT).exists() and not (tmp_path / "full" / BEST_AT_CHECKPOINT).exists()


def test_a_partial_run_without_a_checkpoint_is_refused_not_restarted(cache, tmp_path):
    # killed in epoch 1: epoch 0 wrote best.pt and the history, the first checkpoint would have come after epoch 1
    with pytest.raises(Killed):
        _fit(cache, tmp_path / "cut", cbs=[KillAt(1)])
    cut = tmp_path / "cut"
    assert (cut / BEST).exists() and not (cut / CHECKPOINT_LAST).exists()
    stamp = (cut / BEST).stat().st_mtime_ns
    with pytest.raises(FileExistsError, match=r"^cannot resume .*cut: it holds a partial run \(best.pt, history.json, "
                                              r"history.csv, history of 1 epoch\(s\)\) but no checkpoint_last.pt"):
        _fit(cache, cut, resume=True)
    with pytest.raises(FileExistsError, match=r"cut holds a partial run \(best.pt.*\) without checkpoint_last.pt: it "
                                              r"stopped before its first checkpoint and cannot be resumed"):
        _fit(cache, cut)
    assert (cut / BEST).stat().st_mtime_ns == stamp  # untouched
