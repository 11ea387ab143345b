"""The ``osteo`` command: execute the numbered notebooks of a profile with papermill into a new run folder.

    osteo run --profile smoke                 # the whole sequence on the synthetic default data
    osteo run --profile real --data-root ../shared/data
    osteo run --profile smoke --from 02_shoulder_mae      # a new run that reuses the earlier stages of the last run
    osteo run --profile smoke --only 00_data_audit
    osteo list                                # profiles and their executions

Each executed notebook (with its outputs) lands in ``<run>/notebooks/``; a failure stops the sequence with a message
naming the notebook and the cell, and everything produced before it stays in the run folder.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import runs
from .config import (NOTEBOOKS_DIR, Execution, Profile, ProfileError, check_profile, load_profile,
                     parameters_for)

KERNEL_NAME = "osteolib"


def _results_tables(run: runs.Run) -> None:
    from .finetune import write_results_tables

    for name, path in write_results_tables(run).items():
        print(f"osteo: {name}: {path}", flush=True)


# Collection steps a profile step may name with `after:`; each runs once all of the step's executions succeeded.
AFTER_STEP = {"results_tables": _results_tables}


class RunFailed(RuntimeError):
    """A notebook of the sequence failed; the message names the notebook, the cell and the run folder."""


def select(profile: Profile, only: Sequence[str] | None = None, start: str | None = None) -> list[Execution]:
    """The executions to run: all, ``--only`` some notebooks, or ``--from`` one notebook onwards."""
    executions = profile.executions()
    names = profile.notebooks

    def match(prefix: str) -> str:
        hits = [n for n in names if n == prefix or n.startswith(prefix)]
        if len(hits) != 1:
            raise ProfileError(f"{prefix!r} matches {hits or 'no'} notebook(s) of profile {profile.name}: "
                               f"choose one of {names}")
        return hits[0]

    if only:
        wanted = {match(o) for o in only}
        executions = [e for e in executions if e.notebook in wanted]
    if start:
        first = names.index(match(start))
        executions = [e for e in executions if names.index(e.notebook) >= first]
    return executions


def check_kernel() -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        raise RuntimeError(
            f"the Jupyter kernel {KERNEL_NAME!r} is not installed; register this environment's interpreter with\n"
            f"  {sys.executable} -m ipykernel install --sys-prefix --name {KERNEL_NAME}\n(scripts/install.sh does it)"
        ) from None
    interpreter = Path(spec.argv[0])
    if interpreter.is_absolute() and interpreter.resolve() != Path(sys.executable).resolve():
        logging.getLogger(__name__).warning("kernel %r runs %s, not this interpreter %s", KERNEL_NAME, interpreter,
                                            sys.executable)


def execute(execution: Execution, run: runs.Run, log_output: bool = True) -> Path:
    """Execute one notebook into the run folder; raise :class:`RunFailed` naming the cell on failure."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output = run.dir("notebooks") / f"{execution.name}.ipynb"
    if output.exists():
        raise RunFailed(f"{output} exists already: a run never overwrites its outputs (duplicate step name?)")
    parameters = {**parameters_for(execution), "run_dir": str(run.path)}
    try:
        papermill.execute_notebook(str(execution.source), str(output), parameters=parameters,
                                   kernel_name=KERNEL_NAME, log_output=log_output, progress_bar=not log_output,
                                   cwd=str(NOTEBOOKS_DIR))
    except PapermillExecutionError as err:
        raise RunFailed(
            f"notebook {execution.name} failed in cell {err.cell_index} (execution count {err.exec_count}): "
            f"{err.ename}: {err.evalue}\n  the executed copy with its outputs is kept at {output}\n"
            f"  everything written before the failure stays in {run.path}"
        ) from err
    return output


def run_profile(profile: Profile | str, only: Sequence[str] | None = None, start: str | None = None,
                parent: str | Path | None = None, overrides: dict[str, Any] | None = None,
                runs_dir: str | Path | None = None, log_output: bool = True) -> runs.Run:
    """Execute a profile's notebooks into a new run folder and return it."""
    profile = load_profile(profile) if isinstance(profile, (str, Path)) else profile
    if overrides:
        profile.parameters.update(overrides)
    check_profile(profile)
    unknown = [s.after for s in profile.steps if s.after and s.after not in AFTER_STEP]
    if unknown:
        raise ProfileError(f"profile {profile.source}: unknown `after` step(s) {unknown}; known: {sorted(AFTER_STEP)}")
    check_kernel()
    executions = select(profile, only, start)
    if not executions:
        raise ProfileError(f"nothing to run in profile {profile.name} with only={only} from={start}")
    partial = bool(only or start)
    if parent is None and executions[0].notebook != profile.notebooks[0]:
        # the skipped earlier stages' outputs come from the latest run of this profile
        parent = latest_run(profile.name, runs_dir)
    run = runs.new_run(profile.name, root=runs_dir, parent=parent, profile_file=str(profile.source),
                       parameters=profile.parameters, partial=partial, status="running")
    print(f"osteo: run folder {run.path}" + (f" (earlier stages from {parent})" if parent else ""), flush=True)
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i, execution in enumerate(executions, 1):
        print(f"osteo: [{i}/{len(executions)}] {execution.name} ...", flush=True)
        t0 = time.perf_counter()
        record = {"name": execution.name, "notebook": execution.notebook, "parameters": execution.parameters}
        try:
            execute(execution, run, log_output=log_output)
        except BaseException as err:
            record.update(status="failed", seconds=round(time.perf_counter() - t0, 1), error=str(err))
            records.append(record)
            run.update_info(executions=records, status="failed", seconds=round(time.perf_counter() - started, 1))
            raise
        record.update(status="ok", seconds=round(time.perf_counter() - t0, 1))
        records.append(record)
        run.update_info(executions=records)
        print(f"osteo: [{i}/{len(executions)}] {execution.name} done in {record['seconds']:.0f} s", flush=True)
        last_of_step = i == len(executions) or executions[i].notebook != execution.notebook
        after = next((s.after for s in profile.steps if s.notebook == execution.notebook), None)
        if last_of_step and after:
            AFTER_STEP[after](run)
    run.update_info(executions=records, status="complete", seconds=round(time.perf_counter() - started, 1))
    print(f"osteo: complete in {time.perf_counter() - started:.0f} s -> {run.path}", flush=True)
    return run


def latest_run(profile: str, runs_dir: str | Path | None = None) -> Path:
    root = Path(runs_dir) if runs_dir else runs.runs_root()
    candidates = sorted(p for p in root.glob(f"*-{profile}*") if (p / "run.json").is_file()) if root.is_dir() else []
    if not candidates:
        raise ProfileError(f"--from/--only need the outputs of earlier stages, but there is no earlier run of profile "
                           f"{profile!r} under {root}: run the whole profile first, or pass --parent RUN_FOLDER")
    return candidates[-1]


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ProfileError(f"--set expects NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="osteo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="execute a profile's notebooks into a new run folder")
    run_p.add_argument("--profile", "-p", default="smoke", help="profile name (profiles/<name>.yaml) or a .yaml path")
    run_p.add_argument("--only", nargs="+", help="run only these notebooks (name or number prefix, e.g. 00)")
    run_p.add_argument("--from", dest="start", help="run from this notebook onwards (name or number prefix)")
    run_p.add_argument("--parent", help="run folder whose outputs the skipped stages come from (default: latest)")
    run_p.add_argument("--data-root", help="folder of the real data sets (sets the profile's data_root)")
    run_p.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                       help="override a shared profile parameter (YAML value)")
    run_p.add_argument("--runs-dir", help="where run folders go (default: runs/ in the repository)")
    run_p.add_argument("--quiet", action="store_true", help="show a progress bar instead of the cells' output")
    list_p = sub.add_parser("list", help="list the profiles and their executions")
    list_p.add_argument("--profile", "-p")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.command == "list":
            from .config import PROFILES_DIR

            names = [args.profile] if args.profile else sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
            for name in names:
                profile = load_profile(name)
                print(f"{profile.name}: {profile.description}")
                for execution in profile.executions():
                    print(f"  {execution.name}")
            return 0
        overrides = _parse_overrides(args.set)
        if args.data_root:
            overrides["data_root"] = str(Path(args.data_root).resolve())
        run_profile(args.profile, only=args.only, start=args.start, parent=args.parent, overrides=overrides,
                    runs_dir=args.runs_dir, log_output=not args.quiet)
    except (ProfileError, RunFailed, RuntimeError, FileNotFoundError) as err:
        print(f"osteo: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
