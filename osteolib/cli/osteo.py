"""The ``osteo`` command: execute the numbered notebooks of a profile with papermill into a new run folder.

    osteo run --profile smoke                 # the whole sequence on the synthetic default data
    osteo run --profile real --data-root ../shared/data
    osteo run --profile smoke --from 02_shoulder_mae      # a new run that reuses the earlier stages of the last run
    osteo run --profile smoke --only 00_data_audit
    osteo run --profile smoke --jobs 2        # the grid cells of each step two at a time
    osteo run --profile real --only 04 --cell 3 --parent runs/<run>   # exactly one grid cell (Slurm arrays)
    osteo collect --profile real runs/cells/*   # the cells' run folders gathered into one, tables written
    osteo list                                # profiles and their executions

Each executed notebook (with its outputs) lands in ``<run>/notebooks/``; a failure stops the sequence with a message
naming the notebook and the cell, and everything produced before it stays in the run folder.

Parallel grid cells (``--jobs N``): the executions of one step (its variants x grid) are independent, so N of them
run at a time; steps still run in order and a step's ``after`` collection runs once all its cells are done. Each
job is a child process (``python -m osteolib.cli.osteo`` executing one notebook; its kernel inherits the pinning)
pinned to its share of this process's cores (``sched_setaffinity``, with ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``
= cores per job) and, when GPUs exist, to one GPU (``CUDA_VISIBLE_DEVICES``; at most one job per GPU). A job's
cell output goes to ``<run>/logs/<execution>.log``. When a cell fails, the running cells finish, no new one
starts, and the error names every failed notebook with its kept executed copy. ``--jobs 1`` (the default) is
the sequential loop, unchanged. A cell's numbers depend on its seed and on its thread count (CPU reductions are
split by thread): ``--jobs 2`` on two cores reproduces ``--jobs 1`` on one core bit for bit.

Scheduler arrays: ``--cell K`` runs one cell into its own run folder; ``osteo collect`` gathers such folders into
one (:func:`osteolib.runs.gather_runs`) and runs the step's ``after`` collection.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from osteolib import runs
from osteolib.cli.profiles import (NOTEBOOKS_DIR, Execution, Profile, ProfileError, check_profile, load_profile,
                     parameters_for)

KERNEL_NAME = "osteolib"


def _results_tables(run: runs.Run) -> None:
    from osteolib.report import write_results_tables

    for name, path in write_results_tables(run).items():
        print(f"osteo: {name}: {path}", flush=True)


# Collection steps a profile step may name with `after:`; each runs once all of the step's executions succeeded.
AFTER_STEP = {"results_tables": _results_tables}


class RunFailed(RuntimeError):
    """A notebook of the sequence failed; the message names the notebook, the cell and the run folder."""


def select(profile: Profile, only: Sequence[str] | None = None, start: str | None = None,
           cell: int | None = None) -> list[Execution]:
    """The executions to run: all, ``--only`` some notebooks, or ``--from`` one notebook onwards; ``cell`` K
    then keeps only the K-th (0-based) of them (one grid cell, e.g. one task of a Slurm array)."""
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
    if cell is not None:
        if not 0 <= cell < len(executions):
            raise ProfileError(f"--cell {cell} is out of range: the selection holds {len(executions)} execution(s) "
                               f"(0..{len(executions) - 1}); `osteo list --profile {profile.name}` prints them")
        executions = [executions[cell]]
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


@dataclass(frozen=True)
class Slot:
    """What one parallel job may use: CPU cores (its affinity) and at most one GPU (None: no GPU)."""

    cores: tuple[int, ...]
    gpu: int | None = None

    def environment(self) -> dict[str, str]:
        threads = str(len(self.cores))
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu)
        return env


def plan_slots(jobs: int, cores: Sequence[int] | None = None, gpus: int | None = None) -> list[Slot]:
    """Split this process's cores (``sched_getaffinity``) into ``jobs`` equal, disjoint shares, each with its own
    GPU when GPUs exist. ``cores``/``gpus`` default to this machine's."""
    if not isinstance(jobs, int) or jobs < 1:
        raise ProfileError(f"--jobs must be an int >= 1 (got {jobs!r})")
    cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if jobs > len(cores):
        raise ProfileError(f"--jobs {jobs} but this process may use {len(cores)} core(s) {cores}: at most one job "
                           f"per core")
    if gpus and jobs > gpus:
        raise ProfileError(f"--jobs {jobs} but {gpus} GPU(s) are visible: one job per GPU, so use --jobs <= {gpus}")
    per_job = len(cores) // jobs
    return [Slot(tuple(cores[k * per_job:(k + 1) * per_job]), k if gpus else None) for k in range(jobs)]


def execute_pinned(execution: Execution, run: runs.Run, slot: Slot) -> Path:
    """Execute one notebook in a child process pinned to ``slot``; its cell output goes to ``<run>/logs/``."""
    log_path = run.dir("logs") / f"{execution.name}.log"
    command = [sys.executable, "-m", "osteolib.cli.osteo", "execute-one", "--run-dir", str(run.path),
               "--execution", json.dumps({"notebook": execution.notebook, "name": execution.name,
                                          "parameters": execution.parameters})]
    env = {**os.environ, **slot.environment()}
    with open(log_path, "w") as log:
        # The affinity is set in the child before it starts Python; the notebook kernel inherits it.
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=lambda: os.sched_setaffinity(0, slot.cores))
    if done.returncode != 0:
        error_path = log_path.with_suffix(".error")
        reason = error_path.read_text() if error_path.is_file() else \
            f"notebook {execution.name} failed (exit status {done.returncode})"
        raise RunFailed(f"{reason}\n  its log: {log_path}")
    return run.path / "notebooks" / f"{execution.name}.ipynb"


def run_cells(executions: Sequence[Execution], slots: Sequence[Slot],
              execute_cell: Callable[[Execution, Slot], Any],
              on_done: Callable[[Execution, dict[str, Any]], None] = lambda e, r: None) -> list[dict[str, Any]]:
    """Run independent executions ``len(slots)`` at a time, each on a free slot; records in the given order.

    ``on_done(execution, record)`` is called (in this thread) as each finishes. After a failure no new execution
    starts; the running ones finish; then :class:`RunFailed` names every failure.
    """
    records: dict[int, dict[str, Any]] = {}
    free = list(slots)
    pending = list(enumerate(executions))
    running: dict[Future, tuple[int, Execution, Slot, float]] = {}
    failures: list[str] = []
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        while pending or running:
            while pending and free and not failures:
                index, execution = pending.pop(0)
                slot = free.pop(0)
                running[pool.submit(execute_cell, execution, slot)] = (index, execution, slot, time.perf_counter())
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                index, execution, slot, t0 = running.pop(future)
                free.append(slot)
                record = {"name": execution.name, "notebook": execution.notebook, "parameters": execution.parameters,
                          "seconds": round(time.perf_counter() - t0, 1), "cores": list(slot.cores), "gpu": slot.gpu}
                error = future.exception()
                if error is None:
                    record["status"] = "ok"
                else:
                    record.update(status="failed", error=str(error))
                    failures.append(str(error))
                records[index] = record
                on_done(execution, record)
    ordered = [records[i] for i in sorted(records)]
    if failures:
        raise RunFailed("\n".join(failures))
    return ordered


def _steps_of(executions: Sequence[Execution]) -> list[list[Execution]]:
    """Consecutive executions of the same notebook: one step's cells."""
    groups: list[list[Execution]] = []
    for execution in executions:
        if groups and groups[-1][0].notebook == execution.notebook:
            groups[-1].append(execution)
        else:
            groups.append([execution])
    return groups


def run_profile(profile: Profile | str, only: Sequence[str] | None = None, start: str | None = None,
                parent: str | Path | None = None, overrides: dict[str, Any] | None = None,
                runs_dir: str | Path | None = None, log_output: bool = True, jobs: int = 1,
                cell: int | None = None) -> runs.Run:
    """Execute a profile's notebooks into a new run folder and return it.

    ``jobs`` > 1 runs each step's cells that many at a time (pinned child processes, see the module docstring);
    ``cell`` K runs only the K-th selected execution (its step's ``after`` collection is left out: it needs all
    cells)."""
    profile = load_profile(profile) if isinstance(profile, (str, Path)) else profile
    if overrides:
        profile.parameters.update(overrides)
    check_profile(profile)
    unknown = [s.after for s in profile.steps if s.after and s.after not in AFTER_STEP]
    if unknown:
        raise ProfileError(f"profile {profile.source}: unknown `after` step(s) {unknown}; known: {sorted(AFTER_STEP)}")
    slots = plan_slots(jobs) if jobs != 1 else None
    check_kernel()
    executions = select(profile, only, start, cell)
    if not executions:
        raise ProfileError(f"nothing to run in profile {profile.name} with only={only} from={start}")
    partial = bool(only or start or cell is not None)
    if parent is None and executions[0].notebook != profile.notebooks[0]:
        # the skipped earlier stages' outputs come from the latest run of this profile
        parent = latest_run(profile.name, runs_dir)
    extra = {"cell": cell} if cell is not None else {}
    run = runs.new_run(profile.name, root=runs_dir, parent=parent, profile_file=str(profile.source),
                       parameters=profile.parameters, partial=partial, status="running", **extra)
    print(f"osteo: run folder {run.path}" + (f" (earlier stages from {parent})" if parent else ""), flush=True)
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    if slots is not None:
        _run_steps_parallel(profile, executions, run, slots, records, started, run_after=cell is None)
        return run
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
        if last_of_step and after and cell is None:
            AFTER_STEP[after](run)
    run.update_info(executions=records, status="complete", seconds=round(time.perf_counter() - started, 1))
    print(f"osteo: complete in {time.perf_counter() - started:.0f} s -> {run.path}", flush=True)
    return run


def _run_steps_parallel(profile: Profile, executions: list[Execution], run: runs.Run, slots: list[Slot],
                        records: list[dict[str, Any]], started: float, run_after: bool = True) -> None:
    """The ``--jobs N`` loop: steps in order, each step's cells N at a time, then its ``after`` collection."""
    print(f"osteo: {len(slots)} jobs at a time: " + "; ".join(
        f"cores {list(s.cores)}" + (f", GPU {s.gpu}" if s.gpu is not None else "") for s in slots), flush=True)
    total, done = len(executions), 0

    def finished(execution: Execution, record: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        records.append(record)
        run.update_info(executions=records)
        print(f"osteo: [{done}/{total}] {execution.name} {'done' if record['status'] == 'ok' else 'FAILED'} in "
              f"{record['seconds']:.0f} s", flush=True)

    for cells in _steps_of(executions):
        print(f"osteo: {cells[0].notebook}: {len(cells)} execution(s)", flush=True)
        try:
            run_cells(cells, slots[:len(cells)], lambda e, s: execute_pinned(e, run, s), finished)
        except BaseException:
            run.update_info(executions=records, status="failed", seconds=round(time.perf_counter() - started, 1))
            raise
        after = next((s.after for s in profile.steps if s.notebook == cells[0].notebook), None)
        if after and run_after:
            AFTER_STEP[after](run)
    order = {e.name: i for i, e in enumerate(executions)}
    records.sort(key=lambda record: order[record["name"]])
    run.update_info(executions=records, status="complete", seconds=round(time.perf_counter() - started, 1))
    print(f"osteo: complete in {time.perf_counter() - started:.0f} s -> {run.path}", flush=True)


def collect_cells(sources: Sequence[str | Path], profile: Profile | str, parent: str | Path | None = None,
                  runs_dir: str | Path | None = None) -> runs.Run:
    """Gather the run folders of single grid cells (``osteo run --cell K``, e.g. a Slurm array's tasks) into one new
    run folder and run the ``after`` collection of their step, as a ``--jobs`` run would have; the later steps
    then continue from it (``osteo run --from 05 --parent <that folder>``)."""
    profile = load_profile(profile) if isinstance(profile, (str, Path)) else profile
    others = {str(s): runs.Run(Path(s)).info().get("profile") for s in sources}
    wrong = {s: p for s, p in others.items() if p is not None and p != profile.name}
    if wrong:
        raise ProfileError(f"osteo collect --profile {profile.name}: these cells ran another profile: {wrong}")
    try:
        run = runs.gather_runs(list(sources), profile.name, root=runs_dir, parent=parent)
    except ValueError as err:
        raise ProfileError(str(err)) from None
    notebooks = {e["notebook"] for e in run.info().get("executions", [])}
    for step in profile.steps:
        if step.notebook in notebooks and step.after:
            AFTER_STEP[step.after](run)
    print(f"osteo: {len(sources)} cell run(s) gathered into {run.path}; continue with "
          f"`osteo run --profile {profile.name} --from <next step> --parent {run.path}`", flush=True)
    return run


def latest_run(profile: str, runs_dir: str | Path | None = None) -> Path:
    root = Path(runs_dir) if runs_dir else runs.runs_root()
    candidates = sorted(p for p in root.glob(f"*-{profile}*") if (p / "run.json").is_file()) if root.is_dir() else []
    if not candidates:
        raise ProfileError(f"--from/--only need the outputs of earlier stages, but there is no earlier run of profile "
                           f"{profile!r} under {root}: run the whole profile first, or pass --parent RUN_FOLDER")
    return candidates[-1]


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ProfileError(f"--set expects NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


# Commands with a module of their own in osteolib.cli: name -> (module, help). Each module has
# add_arguments(parser) and run(args) -> exit status; it is imported only when its command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("osteolib.cli.predict", "apply a trained model of a run to new X-rays"),
    "init": ("osteolib.cli.init", "write a profile for a folder of X-rays"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="osteo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_text))
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
    run_p.add_argument("--jobs", "-j", type=int, default=1,
                       help="run each step's grid cells N at a time, each pinned to its share of the cores (or one "
                            "GPU); default 1: one after another")
    run_p.add_argument("--cell", type=int, help="run only the K-th (0-based) of the selected executions, as "
                                                "`osteo list` numbers them (e.g. $SLURM_ARRAY_TASK_ID)")
    list_p = sub.add_parser("list", help="list the profiles and their executions")
    list_p.add_argument("--profile", "-p")
    list_p.add_argument("--only", nargs="+", help="number the executions of these notebooks (for --cell)")
    collect_p = sub.add_parser("collect", help="gather the run folders of single grid cells (--cell) into one")
    collect_p.add_argument("cells", nargs="+", help="the cells' run folders")
    collect_p.add_argument("--profile", "-p", default="smoke", help="the profile the cells ran")
    collect_p.add_argument("--parent", help="the run with the earlier stages (default: the cells' common parent)")
    collect_p.add_argument("--runs-dir", help="where the new run folder goes (default: runs/ in the repository)")
    one_p = sub.add_parser("execute-one", help=argparse.SUPPRESS)  # a --jobs child: one notebook into a run
    one_p.add_argument("--run-dir", required=True)
    one_p.add_argument("--execution", required=True, help="JSON: notebook, name, parameters")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.command in COMMANDS:
            return int(importlib.import_module(COMMANDS[args.command][0]).run(args))
        if args.command == "list":
            from osteolib.cli.profiles import PROFILES_DIR

            names = [args.profile] if args.profile else sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
            for name in names:
                profile = load_profile(name)
                print(f"{profile.name}: {profile.description}")
                for k, execution in enumerate(select(profile, only=args.only)):
                    print(f"  [{k}] {execution.name}")
            return 0
        if args.command == "execute-one":
            spec = json.loads(args.execution)
            run = runs.Run(Path(args.run_dir))
            try:
                execute(Execution(spec["notebook"], spec["name"], spec["parameters"]), run)
            except RunFailed as err:
                # the parent's error message, whole (it names the cell and the kept executed copy)
                (run.dir("logs") / f"{spec['name']}.error").write_text(str(err))
                raise
            return 0
        if args.command == "collect":
            collect_cells(args.cells, args.profile, parent=args.parent, runs_dir=args.runs_dir)
            return 0
        overrides = parse_overrides(args.set)
        if args.data_root:
            overrides["data_root"] = str(Path(args.data_root).resolve())
        run_profile(args.profile, only=args.only, start=args.start, parent=args.parent, overrides=overrides,
                    runs_dir=args.runs_dir, log_output=not args.quiet, jobs=args.jobs, cell=args.cell)
    except (ProfileError, RunFailed, RuntimeError, FileNotFoundError) as err:
        print(f"osteo: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
