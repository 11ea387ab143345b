"""``osteo bench``: every osteolib throughput figure beside a plain reference measured in the same process (issue
22) -- the repository's ``bench`` package (``python -m bench``), run in this process with the same options.

The suite lives in the repository beside the package, not inside it (its plain references must not be osteolib,
and it writes to ``bench/results/``), so an installation without the repository has no ``osteo bench``: the
command then says where it looked and stops.

    osteo bench                          # the whole suite (under 15 minutes on a 2-core CPU)
    osteo bench --only cache cams        # some row families
    osteo bench --quick --out /tmp/b     # tiny sizes, for a test of the suite itself
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from osteolib.paths import REPO_ROOT

__all__ = ["add_arguments", "run", "BENCH_DIR", "bench_cli"]

BENCH_DIR = REPO_ROOT / "bench"


def bench_cli() -> ModuleType | None:
    """The repository's ``bench.cli`` module, or None where the bench folder is missing.

    Imported from ``BENCH_DIR`` by location, so neither ``sys.path`` changes nor another module named ``bench``
    can be picked up instead.
    """
    init = BENCH_DIR / "__init__.py"
    if not init.is_file():
        return None
    loaded = sys.modules.get("bench")
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() != init.resolve():
            raise ImportError(f"another module named 'bench' is already imported ({loaded!r}); osteo bench needs "
                              f"the repository's {BENCH_DIR}")
    else:
        spec = importlib.util.spec_from_file_location("bench", init, submodule_search_locations=[str(BENCH_DIR)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = package
        spec.loader.exec_module(package)
    return importlib.import_module("bench.cli")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli = bench_cli()
    if cli is None:
        parser.description = (f"unavailable here: the benchmark suite is the repository's bench/ folder, not found "
                              f"at {BENCH_DIR}")
        return
    parser.description = "osteolib figures beside plain references, measured in one process"
    cli.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cli = bench_cli()
    if cli is None:
        print(f"osteo: error: osteo bench runs the repository's benchmark suite, but {BENCH_DIR} does not exist "
              f"(an installed osteolib without its repository); clone the repository and run `osteo bench` or "
              f"`python -m bench` from it", file=sys.stderr)
        return 2
    try:
        settings = cli.settings_from(args, argv=sys.argv[1:])
    except ValueError as err:
        print(f"osteo bench: error: {err}", file=sys.stderr)
        return 2
    from bench.suite import run as run_suite

    return run_suite(settings)
