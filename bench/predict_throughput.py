"""Throughput of ``osteo predict`` in images/s, with and without Grad-CAM overlays, against the bare model forward.

    .venv/bin/python bench/predict_throughput.py [--run runs/<run> [--model NAME]] [--images 64] [--repeats 3]
                                                 [--source-size 256] [--batch-size B] [--out bench/results]

Without ``--run`` the script first makes a tiny run of its own (notebooks 00 and 04 through the runner: synthetic
shoulders, ``--backbone`` at ``--size`` px, one epoch; its accuracy is irrelevant, only its architecture and size
count), in a temporary folder unless ``--keep-run DIR``.

``--images`` synthetic shoulder PNGs of ``--source-size`` px (or the files of ``--images-dir``) are predicted by
the command as a user runs it (``osteolib.cli.osteo.main(["predict", ...])``: decoding, resizing, the model, the
CSV, and the overlays unless ``--no-overlays``), ``--repeats`` times each, after one warm-up command (lazy imports,
the first oneDNN kernels). Each command pays its fixed costs (loading the checkpoint, a temporary image cache), so
images/s grows with ``--images``. The plain reference in the same invocation is the bare model forward on the same
batches (same batch size, device, autocast precision and memory format, already-normalised tensors in memory,
``torch.no_grad``): what the model alone costs, without I/O, CSV or overlays; when the run predicts under bf16
autocast, the bare forward in fp32 too (what the precision costs or saves on this CPU). Also recorded: one cold
command in a new process (interpreter start and imports included), as a user meets it. Writes one JSON file per
invocation (never overwriting one), with the CPU model, core and thread counts and the load average before and
after, since the numbers are only comparable on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from osteolib.cli.osteo import main as osteo_main, run_profile
from osteolib.data import ImageCache, XrayDataset, crop_policy, read_audit, read_manifest
from osteolib.data.synthetic.datasets import write_shoulder_dataset
from osteolib.runs import open_run
from osteolib.stages import predict
from osteolib.utils import cpu_model

TINY_RUN_PROFILE = """\
name: bench_predict
description: a tiny run made by bench/predict_throughput.py (its model's quality does not matter)
parameters: {{data_root: null, image_size: {size}, seed: 0}}
steps:
  - notebook: 00_data_audit
    parameters:
      dataset: synthetic_shoulder
      dataset_options: {{n_patients: 40, difficulty: 0.2, confounder: 0.0, size: {size}}}
      split_seed: 0
      # the copy detector pairs synthetic look-alikes rendered at 128 px (20 matching keypoints, measured
      # 2026-12-06); this run only has to give a model to time, so its split is not policed
      near_duplicates: ignore
  - notebook: 04_finetune
    parameters: {{scenario: random, backbone: {backbone}, epochs: 1, batch_size: 16, warmup_epochs: 0,
                 base_lr: 0.02, layer_decay: null, randaug_magnitude: null{patch}}}
"""


def make_tiny_run(backbone: str, size: int, root: Path) -> Path:
    patch = ", patch_size: 8" if backbone == "vit_small" else ""
    (root / "bench_predict.yaml").write_text(TINY_RUN_PROFILE.format(size=size, backbone=backbone, patch=patch))
    print(f"bench: making a tiny {backbone} run at {size} px (notebooks 00 and 04) ...", flush=True)
    return run_profile(str(root / "bench_predict.yaml"), runs_dir=root / "runs", log_output=False).path


def input_images(args: argparse.Namespace, scratch: Path) -> list[str]:
    if args.images_dir:
        files = [str(p) for p in predict.expand_inputs([args.images_dir])][: args.images]
    else:  # a synthetic patient has one or two views, about 1.4 on average
        patients = -(-args.images * 10 // 14) + 2
        manifest = read_manifest(write_shoulder_dataset(scratch / "images", n_patients=patients, seed=1,
                                                        size=args.source_size, workers=1))
        files = [str(p) for p in manifest["path"]][: args.images]
    if len(files) < args.images:
        raise SystemExit(f"bench: only {len(files)} images in {args.images_dir or 'the synthetic set'}, "
                         f"--images {args.images} asked; give a smaller --images or more files")
    return files


def time_command(run: Path, model: str, files: list[str], out: Path, overlays: bool, batch_size: int | None) -> float:
    """Wall seconds of one in-process ``osteo predict`` (a fresh --out folder each time)."""
    argv = ["predict", "--run", str(run), "--model", model, *files, "--out", str(out), "--quiet"]
    argv += [] if overlays else ["--no-overlays"]
    argv += ["--batch-size", str(batch_size)] if batch_size else []
    started = time.perf_counter()
    code = osteo_main(argv)
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"bench: osteo predict failed (exit {code}); its message is above")
    table = pd.read_csv(out / predict.PREDICTIONS_FILE)
    if not (table["status"] == "ok").all():
        raise SystemExit(f"bench: some images were unreadable, see {out / predict.PREDICTIONS_FILE}")
    return seconds


def time_cold_command(run: Path, model: str, files: list[str], out: Path) -> float:
    """Wall seconds of ``osteo predict --no-overlays`` in a new Python process, as a user starts it."""
    command = [sys.executable, "-m", "osteolib.cli.osteo", "predict", "--run", str(run), "--model", model, *files,
               "--out", str(out), "--no-overlays", "--quiet"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def time_bare_forward(run: Path, model_name: str, files: list[str], batch_size: int | None, repeats: int,
                      scratch: Path) -> tuple[dict[str, list[float]], dict]:
    """Seconds per pass over all images of the model forward alone, placed exactly as predict places it (in the
    run's precision), and, when that is not fp32, the same forward in fp32 (which 04's numbers do not allow, but
    which shows what the autocast precision costs or saves on this machine)."""
    run_folder = open_run(run)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, config, _, _, precision = predict._prepare_model(run_folder, model_name, device)
    normalisation = read_audit(run_folder.find("data/audit.json"))["normalisation"]
    manifest = pd.DataFrame({"image_id": [f"{i:06d}" for i in range(len(files))], "path": files})
    cache = ImageCache.build(manifest, config.image_size, root=scratch / "reference-cache", progress=False)
    dataset = XrayDataset(cache, manifest["image_id"].tolist(), transform=crop_policy("none", config.image_size),
                          mean=normalisation["mean"], std=normalisation["std"])
    batch_size = batch_size or 2 * config.batch_size  # predict's default
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(device)
    batches = list(torch.split(images, batch_size))
    def one_pass(autocast_dtype: torch.dtype | None) -> float:
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        started = time.perf_counter()
        with torch.no_grad(), autocast:
            for batch in batches:
                model(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    seconds = {}
    for name, dtype in [("bare_forward", precision.autocast_dtype)] + \
            ([("bare_forward_fp32", None)] if precision.autocast_dtype is not None else []):
        one_pass(dtype), one_pass(dtype)  # warm-up: oneDNN settles on its kernels over the first passes per shape
        seconds[name] = [one_pass(dtype) for _ in range(repeats)]
    settings = {"batch_size": batch_size, "precision": precision.name, "device": str(device),
                "image_size": config.image_size, "backbone": config.backbone}
    return seconds, settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a run folder with a fine-tuned model (default: make a tiny one first)")
    parser.add_argument("--model", help="which fine-tuned model of --run (default: its only one)")
    parser.add_argument("--backbone", default="densenet121",
                        help="backbone of the tiny run made without --run (densenet121 | densenet121_multiscale | "
                             "vit_small ...)")
    parser.add_argument("--size", type=int, default=64, help="image size of the tiny run made without --run")
    parser.add_argument("--keep-run", help="make the tiny run under this folder and keep it (reuse it with --run)")
    parser.add_argument("--images", type=int, default=64, help="images per timed command")
    parser.add_argument("--images-dir", help="predict these files instead of synthetic shoulders")
    parser.add_argument("--source-size", type=int, default=256, help="pixel size of the synthetic input files")
    parser.add_argument("--batch-size", type=int, help="default: the run's own prediction batch size")
    parser.add_argument("--repeats", type=int, default=3, help="timed commands per setting (median reported)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold command in a new process")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be at least 1")

    load_at_start = os.getloadavg()
    busy = load_at_start[0] > 0.5 * (os.cpu_count() or 1)
    if busy:  # the numbers are still written, flagged: the spread between repeats shows how much load moved them
        print(f"bench: warning: load average {load_at_start[0]:.1f} on {os.cpu_count()} CPUs before starting; "
              f"other work will slow and scatter these timings", flush=True)
    with tempfile.TemporaryDirectory(prefix="osteo-bench-predict-") as scratch_name:
        scratch = Path(scratch_name)
        if args.run:
            run = Path(args.run)
        else:
            root = Path(args.keep_run) if args.keep_run else scratch / "run"
            root.mkdir(parents=True, exist_ok=True)
            run = make_tiny_run(args.backbone, args.size, root)
        model = predict.choose_model(open_run(run), args.model)
        files = input_images(args, scratch)
        print(f"bench: {len(files)} images, run {run}, model {model}", flush=True)

        # warm-up on the same files, so the timed commands meet batch shapes oneDNN has seen
        time_command(run, model, files, scratch / "warm-up", True, args.batch_size)
        seconds: dict[str, list[float]] = {"with_overlays": [], "without_overlays": []}
        for k in range(args.repeats):  # interleaved, so a change of machine load hits both settings alike
            for setting, overlays in (("with_overlays", True), ("without_overlays", False)):
                seconds[setting].append(time_command(run, model, files, scratch / f"{setting}-{k}", overlays,
                                                     args.batch_size))
        bare, bare_settings = time_bare_forward(run, model, files, args.batch_size, args.repeats, scratch)
        seconds.update(bare)
        cold = None if args.no_cold else time_cold_command(run, model, files, scratch / "cold")

    def rate(values: list[float]) -> float:
        return len(files) / statistics.median(values)

    results = {name: {"images_per_s": rate(values), "median_seconds": statistics.median(values),
                      "seconds": values} for name, values in seconds.items()}
    results["overlay_seconds_per_image"] = (statistics.median(seconds["with_overlays"])
                                            - statistics.median(seconds["without_overlays"])) / len(files)
    if cold is not None:
        results["cold_command_without_overlays"] = {"seconds": cold, "images_per_s": len(files) / cold}
    record = {
        "benchmark": "predict_throughput",
        "when": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                    "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available(), "load_average_at_start": load_at_start},
        "settings": {"run": str(run), "model": model, "images": len(files), "repeats": args.repeats,
                     "inputs": args.images_dir or f"synthetic shoulder PNGs, {args.source_size} px",
                     "tiny_run_made_here": not args.run, **bare_settings},
        "results": results,
        "machine_busy_at_start": busy,
        "load_average_at_end": os.getloadavg(),
    }
    print(json.dumps(results, indent=2), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"predict_throughput-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    with open(path, "x") as handle:  # never overwrite an earlier measurement
        json.dump(record, handle, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
