"""``osteo predict``: apply a fine-tuned model of a run to new X-rays (the work is in :mod:`osteolib.stages.predict`).

    osteo predict --run runs/<run> [--model NAME] IMAGES_OR_FOLDERS... --out DIR [--no-overlays]

Importing this module must stay cheap: ``osteo --help`` and ``osteo list`` import every command's module to build
the parser, so torch, timm and the stage are imported inside :func:`run` only.
"""
from __future__ import annotations

import argparse
import sys
import time

PREDICTIONS_FILE = "predictions.csv"  # the name osteolib.stages.predict writes (kept equal by a test)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Apply a fine-tuned model of a run to new X-rays: writes DIR/predictions.csv (probability "
                          "per class, the class decided at the run's validation-chosen threshold, model and run, "
                          "one row per file; a file that cannot be read is listed with its reason) and a Grad-CAM "
                          "overlay per image in DIR/overlays/ (the multi-scale CAM for densenet121_multiscale).")
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDER",
                        help="X-ray files (PNG, JPEG, TIFF, DICOM) or folders of them (searched recursively)")
    parser.add_argument("--run", required=True, help="the run folder holding the fine-tuned model (runs/<run>)")
    parser.add_argument("--model", help="which fine-tuned model of the run (default: its only one)")
    parser.add_argument("--out", required=True, help="a new or empty folder for predictions.csv and the overlays")
    parser.add_argument("--no-overlays", action="store_true",
                        help="skip the Grad-CAM overlay images: probabilities only, no backward pass and no "
                             "PNG per image (bench/predict_throughput.py measures the difference)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: the one the run "
                                                       "predicted with, which keeps its exact numbers)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from osteolib.stages import predict  # torch and the models: only when a prediction is really made

    started = time.perf_counter()
    try:
        table = predict.predict_images(args.run, args.model, args.inputs, args.out, overlays=not args.no_overlays,
                                       batch_size=args.batch_size, progress=not args.quiet)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"osteo predict: error: {err}", file=sys.stderr)
        return 1
    ok = int((table["status"] == "ok").sum())
    seconds = time.perf_counter() - started
    print(f"osteo predict: {ok} of {len(table)} images predicted with {table['model'].iloc[0]} in {seconds:.1f} s "
          f"-> {args.out}/{PREDICTIONS_FILE}" + (f"; {len(table) - ok} unreadable (listed there)"
                                                  if ok < len(table) else ""))
    return 0
