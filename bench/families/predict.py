"""Row 6: predicting from files with ``osteo predict`` (CSV only; CSV and Grad-CAM overlays) vs the bare model
forward at the same batch size and precision, the logic of ``bench/predict_throughput.py`` (whose functions are
used here, so both stay one implementation).

The run is ``--predict-run`` or a tiny one made first through the runner (notebooks 00 and 04: synthetic
shoulders, DenseNet121 at the suite's size, one epoch; its accuracy does not matter). The inputs are synthetic
shoulder PNGs of 256 px. Each command is the whole user-facing path: decoding, a temporary cache, the model, the
CSV (and overlays), run in-process ``repeats`` times after one warm-up command; the median counts. The reference is
the model alone on the same images already decoded, normalised and in memory.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
from pathlib import Path

from osteolib.data import read_manifest
from osteolib.data.synthetic.datasets import write_shoulder_dataset
from osteolib.runs import open_run
from osteolib.stages import predict

from bench.goals import goal
from bench.plan import Plan
from bench.predict_throughput import make_tiny_run, time_bare_forward, time_command
from bench.timing import Measurement, once

FULL_IMAGES, QUICK_IMAGES = 64, 8
SOURCE_SIZE = 256


def _checked(call, *args):
    """The old script's helpers end the process on failure; here a failure is the row's error."""
    try:
        return call(*args)
    except SystemExit as stop:
        raise RuntimeError(f"{call.__name__}: {stop}") from None


@contextlib.contextmanager
def _kernel_threads(threads: int):
    """The tiny run's notebook kernels use the suite's thread count (they inherit the environment, not this process's
    ``torch.set_num_threads``; more threads than free cores slow a busy machine's kernels many times over)."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: str(threads) for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _inputs(count: int, folder: Path) -> list[str]:
    patients = -(-count * 10 // 14) + 2  # a synthetic patient has one or two views, about 1.4 on average
    manifest = read_manifest(write_shoulder_dataset(folder, n_patients=patients, seed=1, size=SOURCE_SIZE, workers=1))
    return [str(p) for p in manifest["path"]][:count]


def plans(ctx) -> list[Plan]:
    settings = ctx.settings
    count = settings.images or (QUICK_IMAGES if settings.quick else FULL_IMAGES)
    repeats = 1 if settings.quick else 3
    scratch = ctx.scratch / "predict"
    scratch.mkdir(parents=True, exist_ok=True)
    if settings.predict_run:
        run = Path(settings.predict_run)
    else:
        (scratch / "run").mkdir(exist_ok=True)
        with _kernel_threads(ctx.threads):
            run = make_tiny_run("densenet121", settings.image_size, scratch / "run")
    model = predict.choose_model(open_run(run), None)
    files = _inputs(count, scratch / "images")
    _checked(time_command, run, model, files, scratch / "warm-up", True, None)  # lazy imports, first kernels

    def command(overlays: bool):
        def side() -> Measurement:
            # a new folder per call: `osteo predict` never writes over earlier predictions, and --profile calls again
            calls = scratch / f"{'overlays' if overlays else 'csv'}-calls"
            calls.mkdir(exist_ok=True)
            folder = Path(tempfile.mkdtemp(dir=calls))
            seconds = [_checked(time_command, run, model, files, folder / str(k), overlays, None)
                       for k in range(repeats)]
            return Measurement(count / statistics.median(seconds),
                               {"path": "osteo predict (in-process)", "seconds": seconds, "overlays": overlays})
        return side

    def bare() -> Measurement:
        seconds, placed = _checked(time_bare_forward, run, model, files, None, repeats, scratch)
        detail = {"path": "model forward on in-memory batches", **placed, "seconds": seconds["bare_forward"]}
        if "bare_forward_fp32" in seconds:
            detail["fp32_images_per_s"] = count / statistics.median(seconds["bare_forward_fp32"])
        return Measurement(count / statistics.median(seconds["bare_forward"]), detail)

    reference = once(bare)
    common = {"images": count, "repeats": repeats, "inputs": f"synthetic shoulder PNGs, {SOURCE_SIZE} px",
              "run": str(run), "model": model, "tiny_run_made_here": not settings.predict_run,
              "threads": ctx.threads, "device": str(ctx.device)}
    return [Plan("predict", "predict from files: CSV only", "images/s", command(False), reference, common,
                 goal=goal("predict_csv", ctx.tier)),
            Plan("predict", "predict from files: CSV + overlays", "images/s", command(True), reference, common)]
