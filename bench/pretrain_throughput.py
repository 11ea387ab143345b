"""Training throughput of the pretraining models through the real fit path, fp32 vs bf16.

    .venv/bin/python bench/pretrain_throughput.py [--images 256] [--epochs 2] [--size 128] [--out bench/results]

For the ViT-S MAE (mask 0.9) and the DenseNet121 masked model (mask 0.6) at the given size, trains on cached
synthetic shoulder images through ``osteolib.engine.loop`` (the same loaders, callbacks and checkpointing as the
notebooks) and records images/s and the share of wall time spent waiting for data (from the history the fit path
writes; the first epoch is reported separately because it includes warm-up). Writes one JSON file per invocation,
never overwriting an earlier one, with the machine's state (threads, load average) so numbers can be compared.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from osteolib import models
from osteolib.data import synthetic
from osteolib.data import ImageCache
from osteolib.data import make_dataloaders
from osteolib.data import read_manifest
from osteolib.engine import TrainConfig, cpu_supports_bf16, fit
from osteolib.data import crop_policy


def build_model(name: str, size: int) -> torch.nn.Module:
    if name == "mae_vit_small":
        return models.mae_vit_small(img_size=size, patch_size=16, mask_ratio=0.9)
    return models.MaskedDenseNet(img_size=size, patch_size=32, mask_ratio=0.6)


def measure(name: str, precision: str, cache, ids: list[str], args) -> dict:
    torch.manual_seed(0)
    model = build_model(name, args.size)
    dls = make_dataloaders(cache, ids, ids[: args.batch_size], train_transform=crop_policy("random", args.size),
                           valid_transform=crop_policy("none", args.size), batch_size=args.batch_size, seed=0)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, base_lr=1.5e-4, precision=precision,
                         checkpoint_every=args.epochs)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = fit(model, dls, config, out, quiet=True)
        wall = time.perf_counter() - started
    history = result.history
    steady = history.iloc[1:] if len(history) > 1 else history
    return {
        "model": name, "precision": result.precision.name, "precision_reason": result.precision.reason,
        "channels_last": bool(result.channels_last), "image_size": args.size, "batch_size": args.batch_size,
        "images_per_epoch": len(ids) - len(ids) % args.batch_size, "epochs": args.epochs,
        "first_epoch_images_per_s": float(history["train_images_per_s"].iloc[0]),
        "images_per_s": float(steady["train_images_per_s"].mean()),
        "data_wait_fraction": float(steady["data_wait_fraction"].mean()),
        "wall_seconds": round(wall, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=["mae_vit_small", "masked_densenet121"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    manifest = read_manifest(synthetic.ensure_synthetic("shoulder", n_patients=max(int(args.images / 1.4) + 1, 20)))
    ids = manifest["image_id"].tolist()[: args.images]
    cache = ImageCache.build(manifest[manifest["image_id"].isin(ids)], args.size)
    record = {
        "benchmark": "pretrain_throughput",
        "when": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu_bf16": cpu_supports_bf16(),
                    "cuda": torch.cuda.is_available(), "load_average_at_start": os.getloadavg()},
        "results": [],
    }
    for name in args.models:
        for precision in args.precisions:
            row = measure(name, precision, cache, ids, args)
            record["results"].append(row)
            print(json.dumps(row), flush=True)
    record["load_average_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"pretrain_throughput-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    with open(path, "x") as handle:  # never overwrite an earlier measurement
        json.dump(record, handle, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
