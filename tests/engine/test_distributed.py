"""Distributed data parallel through osteolib.engine.loop: two real processes on the CPU (gloo backend).

Each test spawns two worker processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so ``fit`` switches to distributed by itself; the workers save what they trained for the test
process to compare. Workers use one thread each (the machine may have a single free core).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from osteolib.engine import ShardedSeededSampler, process_seed
from osteolib.engine import BEST, CHECKPOINT_LAST, FINAL, TrainConfig, fit

SIZE, N_TRAIN, N_VALID = 32, 16, 8
WORLD = 2


def _tiny_cache() -> SimpleNamespace:
    """A stand-in for osteolib.data.cache.ImageCache (as in test_train): class-1 images are brighter in a square."""
    rng = np.random.default_rng(0)
    n = N_TRAIN + N_VALID
    images = rng.integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8)
    images[1::2, 8:20, 10:22] = np.clip(images[1::2, 8:20, 10:22].astype(int) + 90, 0, 255)
    ids = [f"img{i:02d}" for i in range(n)]
    return SimpleNamespace(images=images, regions=None, has_region=np.zeros(n, bool), image_ids=ids,
                           index={k: i for i, k in enumerate(ids)}, size=SIZE)


def _dls(batch_size: int, labelled: bool):
    from osteolib.data import make_dataloaders
    from osteolib.data import crop_policy, finetune_transform

    cache = _tiny_cache()
    ids = cache.image_ids
    targets = [i % 2 for i in range(len(ids))] if labelled else None
    return make_dataloaders(cache, ids[:N_TRAIN], ids[N_TRAIN:],
                            train_targets=targets[:N_TRAIN] if targets else None,
                            valid_targets=targets[N_TRAIN:] if targets else None,
                            train_transform=finetune_transform(SIZE, crop="random", magnitude=None),
                            valid_transform=crop_policy("none", SIZE), batch_size=batch_size, seed=0,
                            num_workers=0, device="cpu")


def _model(kind: str) -> nn.Module:
    from osteolib import models

    torch.manual_seed(0)
    if kind == "mae":
        return models.mae_vit_small(img_size=SIZE, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                    decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mask_ratio=0.75)
    if kind == "cnn":  # a timm CNN with BatchNorm
        return models.create_backbone("mobilenetv3", num_classes=2, img_size=SIZE)
    # a tiny ViT classifier: LayerNorm only, no dropout, so nothing couples or randomises per process
    return models.create_backbone("vit_small", num_classes=2, img_size=SIZE, patch_size=8, embed_dim=64, depth=2,
                                  num_heads=2)


def _config(batch_size: int, epochs: int = 2) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=batch_size, base_lr=0.05, warmup_epochs=0.5, precision="fp32",
                       seed=0, weight_decay=0.05)


def _train(kind: str, batch_size: int, out_dir: Path):
    return fit(_model(kind), _dls(batch_size, labelled=kind != "mae"), _config(batch_size), out_dir,
               loss_func=None if kind == "mae" else nn.CrossEntropyLoss(), stage=kind, quiet=True)


def _worker(rank: int, kind: str, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    # each rank names its own out_dir; fit must use rank 0's for every rank
    result = _train(kind, 4, Path(tmp) / f"out_rank{rank}")
    torch.save({"state": result.model.state_dict(), "history": result.history.to_dict("list"),
                "out_dir": str(result.out_dir), "best_path": str(result.best_path),
                "global_batch_size": result.global_batch_size, "peak_lr": result.peak_lr,
                "world_size": result.world_size, "initialised_after": torch.distributed.is_initialized()},
               Path(tmp) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(kind: str, tmp_path: Path) -> list[dict]:
    mp.start_processes(_worker, args=(kind, _free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"ranks differ in {different[:5]}"


def _assert_distributed_bookkeeping(ranks: list[dict], tmp_path: Path) -> None:
    main_dir = tmp_path / "out_rank0"
    assert [r["out_dir"] for r in ranks] == [str(main_dir)] * WORLD
    assert not (tmp_path / "out_rank1").exists()  # rank 1 wrote nothing of its own
    for name in (FINAL, CHECKPOINT_LAST, BEST, "history.csv"):
        assert (main_dir / name).is_file(), name
    for r in ranks:
        assert r["world_size"] == WORLD and r["global_batch_size"] == 4 * WORLD
        assert r["peak_lr"] == pytest.approx(0.05 * 8 / 256)  # base_lr scaled by the global batch
        assert not r["initialised_after"]  # fit left the process group it joined
    assert ranks[0]["history"]["train_loss"] == ranks[1]["history"]["train_loss"]  # the job's loss, all-reduced
    saved = torch.load(main_dir / FINAL, weights_only=True)
    _assert_same_state(saved["model"], ranks[0]["state"])


# ---------------------------------------------------------------------------------------------- sharding


def test_shards_of_each_global_batch_are_the_single_process_batch():
    from osteolib.data import SeededSampler

    def stream(n, seed=3):
        return list(SeededSampler(n, shuffle=True, generator=torch.Generator().manual_seed(seed)))

    full = stream(11)
    shards = [list(ShardedSeededSampler(SeededSampler(11, True, torch.Generator().manual_seed(3)), 2, r, 2, True))
              for r in range(2)]
    assert [len(s) for s in shards] == [4, 4]  # 2 global batches of 4; the 3 left over are dropped
    for step in range(2):
        union = shards[0][2 * step:2 * step + 2] + shards[1][2 * step:2 * step + 2]
        assert union == full[4 * step:4 * step + 4]  # same items and same augmentation seeds
    padded = [list(ShardedSeededSampler(SeededSampler(5, False, torch.Generator()), 2, r, 2, False)) for r in range(2)]
    # 5 items in order, padded by repeating the start to 2 global batches of 4: [0 1 | 2 3] [4 0 | 1 2]
    assert [[i for i, _ in shard] for shard in padded] == [[0, 1, 4, 0], [2, 3, 1, 2]]
    assert process_seed(0, 0, 1) != process_seed(0, 1, 1) != process_seed(0, 1, 2)


# ---------------------------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_mae_pretraining_on_two_processes_ends_with_identical_weights(tmp_path):
    ranks = _run_two_ranks("mae", tmp_path)
    _assert_same_state(ranks[0]["state"], ranks[1]["state"])
    _assert_distributed_bookkeeping(ranks, tmp_path)
    initial = _model("mae").state_dict()
    assert not torch.equal(initial["blocks.0.attn.qkv.weight"], ranks[0]["state"]["blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_finetuning_a_batchnorm_cnn_on_two_processes_ends_with_identical_weights_and_buffers(tmp_path):
    ranks = _run_two_ranks("cnn", tmp_path)
    _assert_same_state(ranks[0]["state"], ranks[1]["state"])  # running BN statistics included
    _assert_distributed_bookkeeping(ranks, tmp_path)
    assert ranks[0]["best_path"] == ranks[1]["best_path"] == str(tmp_path / "out_rank0" / BEST)


@pytest.mark.slow
def test_two_processes_follow_the_single_process_run_with_the_same_global_batch(tmp_path):
    torch.set_num_threads(1)
    single = _train("vit", 8, tmp_path / "single")
    ranks = _run_two_ranks("vit", tmp_path)
    assert single.global_batch_size == ranks[0]["global_batch_size"] == 8
    assert single.peak_lr == pytest.approx(ranks[0]["peak_lr"])
    # Same images, augmentations, initial weights and lr: only the summation order of the gradient
    # (a mean of two 4-image means, all-reduced, against one 8-image mean) differs, float32 rounding of
    # ~1e-7 relative per step; AdamW carries it a few steps on, far below 1e-4.
    for column in ("train_loss", "valid_loss"):
        np.testing.assert_allclose(ranks[0]["history"][column], single.history[column].tolist(), rtol=1e-4)
    # Weights: within 2e-4 absolute, an eighth of one step at the peak lr (1.6e-3). Not tighter, because a
    # parameter whose true gradient is zero (the attention key bias: softmax ignores a shift shared by all
    # keys) gets pure rounding noise as gradient, and Adam normalises noise into steps of up to lr.
    for name, value in single.model.state_dict().items():
        np.testing.assert_allclose(ranks[0]["state"][name].numpy(), value.numpy(), rtol=1e-3, atol=2e-4,
                                   err_msg=name)
    assert not np.allclose(ranks[0]["state"]["head.weight"].numpy(), _model("vit").state_dict()["head.weight"])
