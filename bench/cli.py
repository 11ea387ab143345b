"""``python -m bench`` / ``osteo bench``: the arguments, checked before any work starts (no torch import here)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from bench.settings import FAMILIES, SIZE_MULTIPLE, Settings

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    rows = ", ".join(f"{name} ({what})" for name, what in FAMILIES.items())
    parser.add_argument("--only", nargs="+", metavar="ROW", help=f"run only these row families: {rows}")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes for tests (16 images, 32 px, a couple of steps); the results say quick")
    parser.add_argument("--threads", type=int, help=f"torch threads for both sides (default: all {_cores()} cores)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for <YYYYmmdd-HHMMSS>.json and .md "
                                                                "(default: bench/results)")
    parser.add_argument("--images", type=int, help="images per measurement for every family (default: 256 for "
                                                   "training, 32 for CAMs, 1000 for the cache, 64 for predict)")
    parser.add_argument("--size", type=int, help=f"working size in px, a multiple of {SIZE_MULTIPLE} (default 128)")
    parser.add_argument("--seconds", type=float, help="steady-state seconds per training measurement (default 12)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="add the torch.compile rows (default: on, off with --quick)")
    parser.add_argument("--profile", action="store_true",
                        help="after each row's timed runs, run both sides once more under torch.profiler and cProfile "
                             "and add where their time goes to the results (the figures themselves are unprofiled)")
    parser.add_argument("--predict-run", help="run folder with a fine-tuned model for the predict rows (default: "
                                              "make a tiny one first)")


def settings_from(args: argparse.Namespace, argv: Sequence[str] = ()) -> Settings:
    """The Settings of these arguments; a bad value raises ValueError naming its option."""
    if args.only:
        unknown = [name for name in args.only if name not in FAMILIES]
        if unknown:
            raise ValueError(f"--only: unknown row famil{'y' if len(unknown) == 1 else 'ies'} "
                             f"{', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.images is not None and args.images < 2:
        raise ValueError(f"--images must be at least 2 (a training batch needs two images), got {args.images}")
    if args.size is not None and (args.size < SIZE_MULTIPLE or args.size % SIZE_MULTIPLE):
        raise ValueError(f"--size must be a positive multiple of {SIZE_MULTIPLE} (DenseNet121's stride and the "
                         f"16-px patch grid), got {args.size}")
    if args.seconds is not None and args.seconds < 0:
        raise ValueError(f"--seconds must be >= 0, got {args.seconds}")
    if args.predict_run is not None and not Path(args.predict_run).is_dir():
        raise ValueError(f"--predict-run {args.predict_run}: no such folder")
    families = tuple(name for name in FAMILIES if name in args.only) if args.only else tuple(FAMILIES)
    return Settings(families=families, quick=args.quick, threads=args.threads or _cores(), out=Path(args.out),
                    images=args.images, size=args.size, seconds=args.seconds, compile=args.compile,
                    predict_run=args.predict_run, profile=args.profile,
                    argv=tuple(argv))


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description="osteolib figures beside plain references, measured "
                                                            "in one process (issue 22)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args, argv)
    except ValueError as err:
        parser.error(str(err))
    from bench.suite import run  # torch and osteolib load only once the arguments are known to be good

    return run(settings)
