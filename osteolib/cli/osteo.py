"""The ``osteo`` command: execute the numbered notebooks of a profile with papermill into a new run folder.

    osteo run --profile smoke                 # the whole sequence on the synthetic default data
    osteo run --profile real --data-root ../shared/data
    osteo run --profile smoke --from 02_shoulder_mae      # a new run that reuses the earlier stages of the last run
    osteo run --profile smoke --only 00_data_audit
    osteo run --profile smoke --jobs 1        # one execution after another (default: auto, see below)
    osteo run --profile real --only 04 --cell 3 --parent runs/<run>   # exactly one grid cell (Slurm arrays)
    osteo collect --profile real runs/cells/*   # the cells' run folders gathered into one, tables written
    osteo run --resume runs/<run>             # continue a killed or failed run from its first unfinished execution
    osteo list                                # profiles and their executions

Each executed notebook (with its outputs) lands in ``<run>/notebooks/``; a failure stops the sequence with a message
naming the notebook and the cell, and everything produced before it stays in the run folder.

Before the first kernel starts, every parameter of every selected execution is checked
(:func:`osteolib.cli.profiles.check_profile`): names, types, ranges, backbones and scenarios (through the notebooks'
configuration dataclasses), paths that must exist (``data_root``, ``init_checkpoint``, ``--parent``); an error
names the profile line or the ``--set`` the value came from. ``--set`` wins over shared and step parameters and is
refused for a name a selected step varies (variants, grid). run.json keeps the plan (every execution with the
parameters it receives) and, per execution, what the notebook was given.

Interruptions: SIGTERM and SIGINT mark the run ``interrupted`` in run.json (the running kernels and --jobs children
are stopped); after a SIGKILL a reader sees ``running`` with a dead pid and reports ``interrupted``
(:attr:`osteolib.runs.Run.status`). ``--resume RUN`` keeps the executions completed at the run's last resume point,
moves whatever the unfinished ones wrote into ``<run>/unfinished/<attempt>/`` and continues with the same plan, so
it reaches the files an uninterrupted run writes. With ``--jobs N`` the resume point is taken between waves, so the
cells of an interrupted wave are all redone. ``--from`` without ``--parent`` takes the earlier stages from the latest
*complete* run of the same profile.

Parallel grid cells (``--jobs N``): the executions of one step (its variants x grid) are independent, so N of them
run at a time; so are steps whose notebooks do not read each other's outputs (:mod:`osteolib.cli.schedule`: 03 runs
beside 02, 06 beside 04). Such waves run in order, and a step's ``after`` collection runs once its wave is done. Each
job is a child process (``python -m osteolib.cli.osteo`` executing one notebook; its kernel inherits the pinning)
pinned to its share of this process's cores (``sched_setaffinity``, with ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``
= cores per job) and, when GPUs exist, to one GPU (``CUDA_VISIBLE_DEVICES``; at most one job per GPU). A job's
cell output goes to ``<run>/logs/<execution>.log``. When a cell fails, the running cells finish, no new one
starts, and the error names every failed notebook with its kept executed copy. A step with fewer executions than
jobs (a single notebook such as 00 or 05) shares all the cores among its executions. ``--jobs auto`` (the default)
is one job per GPU when GPUs are visible, else one per core up to :data:`osteolib.cli.jobs.MAX_AUTO_JOBS`; ``--jobs 1`` is the
sequential loop, unchanged. A cell's numbers depend on its seed and on its thread count (CPU reductions are split
by thread): ``--jobs 2`` on two cores reproduces ``--jobs 1`` on one core bit for bit.

Scheduler arrays: ``--cell K`` runs one cell into its own run folder; ``osteo collect`` gathers such folders into
one (:func:`osteolib.runs.gather_runs`) and runs the step's ``after`` collection.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from osteolib import runs
from osteolib.cli.kernel import KERNEL_NAME, check_kernel
from osteolib.cli.jobs import (MAX_AUTO_JOBS, RunFailed, Slot, execute_pinned, parse_jobs, plan_slots, run_cells,
                               step_slots)
from osteolib.cli.memory import PeakMemory
from osteolib.cli.schedule import steps_of, waves_of
from osteolib.study import notebook_matches
from osteolib.cli.profiles import (NOTEBOOKS_DIR, Execution, Profile, ProfileError, check_profile, check_values,
                                   load_profile, parameters_for, resolve_paths)



def _results_tables(run: runs.Run) -> None:
    from osteolib.report import write_results_tables

    for name, path in write_results_tables(run).items():
        print(f"osteo: {name}: {path}", flush=True)


def _recipe_search(run: runs.Run) -> None:
    from osteolib.stages.recipe_search import write_search_tables

    for name, path in write_search_tables(run).items():
        print(f"osteo: {name}: {path}", flush=True)


def _report(run: runs.Run) -> None:
    from osteolib.cli.report import NOTEBOOK, export_run_report
    from osteolib.report.export import free_stem

    # the runner executed notebook 07 into notebooks/07_report.ipynb; its HTML and PDF take the name "report"
    # unless an earlier report is there
    notebook = run.path / "notebooks" / f"{NOTEBOOK}.ipynb"
    stem = "report" if not any((run.path / f"report{x}").exists() for x in (".html", ".pdf")) else free_stem(run.path)
    files = export_run_report(run, notebook, stem)
    for line in files.summary().splitlines():
        print(f"osteo: {line}", flush=True)


# Collection steps a profile step may name with `after:`; each runs once all of the step's executions succeeded.
AFTER_STEP = {"results_tables": _results_tables, "recipe_search": _recipe_search, "report": _report}


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT reached the runner: the run is marked ``interrupted`` and can be resumed."""

    def __init__(self, signal_name: str = "SIGINT"):
        super().__init__(signal_name)
        self.signal_name = signal_name


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`RunInterrupted` in the main thread while the block runs, so the run is marked
    interrupted; a second signal takes the default action. Outside the main thread: nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise RunInterrupted(signal.Signals(signum).name)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _working_on(run: runs.Run) -> Iterator[None]:
    """``OSTEOLIB_ACTIVE_RUN`` = the run folder for this process and what it starts (kernels, --jobs children), so a
    later ``--resume`` can tell that one of them still writes there (:func:`osteolib.runs.live_processes`)."""
    before = os.environ.get(runs.ACTIVE_RUN_ENV)
    os.environ[runs.ACTIVE_RUN_ENV] = str(run.path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(runs.ACTIVE_RUN_ENV, None)
        else:
            os.environ[runs.ACTIVE_RUN_ENV] = before


def select(profile: Profile, only: Sequence[str] | None = None, start: str | None = None,
           cell: int | None = None) -> list[Execution]:
    """The executions to run: all, ``--only`` some notebooks, or ``--from`` one notebook onwards; ``cell`` K
    then keeps only the K-th (0-based) of them (one grid cell, e.g. one task of a Slurm array)."""
    executions = profile.executions()
    names = profile.notebooks

    def match(prefix: str) -> str:
        hits = [n for n in names if notebook_matches(n, prefix)]
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
                runs_dir: str | Path | None = None, log_output: bool = True, jobs: int = 1,
                cell: int | None = None) -> runs.Run:
    """Execute a profile's notebooks into a new run folder and return it.

    Everything is checked before the first kernel starts and before the run folder is made: the profile, every
    parameter of every selected execution, ``--parent``. ``overrides`` (``--set``; :func:`parse_overrides` keeps
    how each was written, for messages) win over shared and step parameters. ``jobs`` > 1 runs each step's cells
    that many at a time (pinned child processes, see the module docstring); ``cell`` K runs only the K-th selected
    execution (its step's ``after`` collection is left out: it needs all cells)."""
    profile = load_profile(profile) if isinstance(profile, (str, Path)) else profile
    if overrides:
        profile = dataclasses.replace(profile, overrides={**profile.overrides, **overrides},
                                      override_origins={**profile.override_origins,
                                                        **getattr(overrides, "origins", {})})
    unknown = [s.after for s in profile.steps if s.after and s.after not in AFTER_STEP]
    if unknown:
        raise ProfileError(f"profile {profile.source}: unknown `after` step(s) {unknown}; known: {sorted(AFTER_STEP)}")
    executions = [resolve_paths(e) for e in select(profile, only, start, cell)]
    if not executions:
        raise ProfileError(f"nothing to run in profile {profile.name} with only={only} from={start}")
    check_profile(profile, executions=executions)
    if parent is not None:
        parent = check_parent(parent)
    elif executions[0].notebook != profile.notebooks[0]:
        # the skipped earlier stages' outputs come from the latest complete run of this profile
        parent = latest_run(profile.name, runs_dir)
    slots = plan_slots(jobs) if jobs != 1 else None
    check_kernel()
    partial = bool(only or start or cell is not None)
    extra = {"cell": cell} if cell is not None else {}
    after = {s.notebook: s.after for s in profile.steps if s.after}
    run = runs.new_run(profile.name, root=runs_dir, parent=parent, profile_file=str(profile.source),
                       parameters=profile.effective_parameters, overrides=dict(profile.overrides), partial=partial,
                       status="running", plan=[e.record() for e in executions], after=after,
                       run_after=cell is None, **runs.owner(), **extra)
    runs.write_resume_point(run, [], [])
    print(f"osteo: run folder {run.path}" + (f" (earlier stages from {parent})" if parent else ""), flush=True)
    _execute_plan(run, executions, after, slots, log_output=log_output, run_after=cell is None)
    return run


def resume_run(run_dir: str | Path, jobs: int = 1, log_output: bool = True, wait_seconds: float = 15.0) -> runs.Run:
    """Continue a killed, interrupted or failed run in its own folder: the executions completed at its resume point
    are kept, whatever else is in the folder (an unfinished execution's notebook, checkpoints, predictions) moves
    to ``<run>/unfinished/<attempt>/``, and the rest of the recorded plan runs with the recorded parameters."""
    path = Path(run_dir)
    run = runs.Run(path)
    info = run.info()
    if not info:
        raise ProfileError(f"--resume {run_dir}: not a run folder (no run.json in {path.resolve()})")
    if "plan" not in info:
        raise ProfileError(f"--resume {run_dir}: run.json has no plan (the run was made before --resume existed); "
                           f"continue it with `osteo run --profile {info.get('profile')} --from <step> --parent "
                           f"{run.path}`")
    status = run.status
    if status == "complete":
        raise ProfileError(f"--resume {run_dir}: the run is complete; nothing to resume")
    if status == "running":
        raise ProfileError(f"--resume {run_dir}: the run is still running (pid {info.get('pid')} on "
                           f"{info.get('host')}); stop it first (kill -TERM {info.get('pid')}) or let it finish")
    alive = runs.wait_for_processes(run.path, wait_seconds)
    if alive:
        raise ProfileError(f"--resume {run_dir}: process(es) {alive} still write into this run (a kernel or --jobs "
                           f"child of the stopped runner); end them first")
    point = runs.read_resume_point(run)
    changed = runs.changed_outputs(run, point)
    if changed:
        raise ProfileError(f"--resume {run_dir}: output(s) of completed executions were changed or removed after "
                           f"they completed, so the run cannot be continued as it was: {changed[:5]}"
                           + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
                           + "; start a new run (or --from that step with --parent)")
    plan = [Execution.from_record(r) for r in info["plan"]]
    completed = [name for name in point["completed"] if any(e.name == name for e in plan)]
    remaining = [e for e in plan if e.name not in completed]
    problems = check_values(remaining, info.get("profile", "?"))
    if problems:
        raise ProfileError("\n".join(problems))
    slots = plan_slots(jobs) if jobs != 1 else None
    check_kernel()
    moved = runs.set_aside_unfinished(run, point)
    kept = [r for r in info.get("executions", []) if r.get("name") in completed and r.get("status") == "ok"]
    attempt = {"at": datetime.datetime.now().isoformat(timespec="seconds"), "previous_status": status,
               "kept": completed, "set_aside": str(moved) if moved else None,
               "git_commit": runs.git_commit(), **runs.owner()}
    run.update_info(status="running", executions=kept, resumed=info.get("resumed", []) + [attempt], **runs.owner())
    print(f"osteo: resuming {run.path}: {len(completed)} of {len(plan)} execution(s) kept, {len(remaining)} to run"
          + (f"; what the unfinished ones wrote is in {moved}" if moved else ""), flush=True)
    _execute_plan(run, plan, info.get("after", {}), slots, log_output=log_output,
                  run_after=info.get("run_after", True), done=set(completed), after_done=set(point["after_done"]),
                  records=kept)
    return run


def _peak_text(record: dict[str, Any]) -> str:
    return f", peak memory {record['peak_rss_mb'] / 1024:.1f} GiB" if record.get("peak_rss_mb") else ""


def _execute_plan(run: runs.Run, plan: Sequence[Execution], after: dict[str, str], slots: list[Slot] | None,
                  log_output: bool = True, run_after: bool = True, done: set[str] | None = None,
                  after_done: set[str] | None = None, records: list[dict[str, Any]] | None = None) -> None:
    """Run the executions of ``plan`` not in ``done``, step by step, each step's ``after`` collection once all its
    executions are done; a resume point after each execution (with --jobs: after each step) and each collection.
    A signal marks the run ``interrupted``, an error ``failed``; both re-raise."""
    done, after_done = set(done or ()), set(after_done or ())
    records = list(records or [])
    order = {e.name: i for i, e in enumerate(plan)}
    todo_total = sum(e.name not in done for e in plan)
    started = time.perf_counter()
    counter = 0

    def save(**fields: Any) -> None:
        records.sort(key=lambda r: order.get(r["name"], len(order)))
        run.update_info(executions=records, **fields)

    def resume_point() -> None:
        runs.write_resume_point(run, [e.name for e in plan if e.name in done],
                                [n for n in dict.fromkeys(e.notebook for e in plan) if n in after_done])

    def record_of(execution: Execution) -> dict[str, Any]:
        record = {"name": execution.name, "notebook": execution.notebook, "parameters": parameters_for(execution)}
        given = {k: v for k, v in record["parameters"].items() if execution.origins.get(k, "").startswith("--")}
        if given:
            record["command_line"] = given  # the values --set / --data-root gave this execution
        return record

    if slots is not None:
        print(f"osteo: {len(slots)} jobs at a time: " + "; ".join(
            f"cores {list(s.cores)}" + (f", GPU {s.gpu}" if s.gpu is not None else "") for s in slots), flush=True)
    with _working_on(run), _interruptible():
        try:
            # one notebook's step at a time, or with --jobs a wave: steps that do not read each other's outputs
            for group in (steps_of(plan) if slots is None else waves_of(steps_of(plan))):
                todo = [e for e in group if e.name not in done]
                if slots is None:
                    for execution in todo:
                        counter += 1
                        print(f"osteo: [{counter}/{todo_total}] {execution.name} ...", flush=True)
                        t0 = time.perf_counter()
                        record = record_of(execution)
                        try:
                            with PeakMemory(os.getpid()) as peak:
                                execute(execution, run, log_output=log_output)
                        except BaseException as err:
                            record.update(status="interrupted" if isinstance(err, KeyboardInterrupt) else "failed",
                                          seconds=round(time.perf_counter() - t0, 1),
                                          error=str(err) or type(err).__name__)
                            records.append(record)
                            raise
                        record.update(status="ok", seconds=round(time.perf_counter() - t0, 1),
                                      peak_rss_mb=peak.mb)
                        records.append(record)
                        done.add(execution.name)
                        save()
                        resume_point()
                        print(f"osteo: [{counter}/{todo_total}] {execution.name} done in {record['seconds']:.0f} s"
                              f"{_peak_text(record)}", flush=True)
                elif todo:
                    print(f"osteo: {' + '.join(dict.fromkeys(e.notebook for e in todo))}: {len(todo)} execution(s)",
                          flush=True)

                    def finished(execution: Execution, record: dict[str, Any]) -> None:
                        nonlocal counter
                        counter += 1
                        record = {**record_of(execution), **{k: v for k, v in record.items() if k != "parameters"}}
                        records.append(record)
                        if record["status"] == "ok":
                            done.add(execution.name)
                        save()
                        print(f"osteo: [{counter}/{todo_total}] {execution.name} "
                              f"{'done' if record['status'] == 'ok' else record['status'].upper()} in "
                              f"{record['seconds']:.0f} s{_peak_text(record)}", flush=True)

                    run_cells(todo, step_slots(slots, len(todo)), lambda e, s: execute_pinned(e, run, s), finished)
                    resume_point()  # nothing runs now: every finished cell is kept from here on
                for notebook in dict.fromkeys(e.notebook for e in group):
                    if after.get(notebook) and run_after and notebook not in after_done \
                            and all(e.name in done for e in group if e.notebook == notebook):
                        AFTER_STEP[after[notebook]](run)
                        after_done.add(notebook)
                        resume_point()
        except BaseException as err:
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            save(status=status, seconds=round(time.perf_counter() - started, 1))
            if status == "interrupted":
                print(f"osteo: interrupted ({getattr(err, 'signal_name', type(err).__name__)}); continue with "
                      f"`osteo run --resume {run.path}`", file=sys.stderr, flush=True)
            raise
    save(status="complete", seconds=round(time.perf_counter() - started, 1))
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
    """The latest complete run of ``profile`` (by its run.json, not the folder name): the default parent of
    ``--from``. A failed, interrupted or still running run, another profile's run or a single ``--cell`` is never
    chosen silently."""
    root = Path(runs_dir) if runs_dir else runs.runs_root()
    found, skipped = runs.latest_complete_run(profile, root)
    if found is None:
        passed = "; passed over: " + ", ".join(f"{n} {s}" for s, n in sorted(skipped.items())) if skipped else ""
        raise ProfileError(f"--from/--only need the outputs of earlier stages, but there is no complete run of profile "
                           f"{profile!r} under {root}{passed}: run the whole profile first, resume the unfinished "
                           f"one (--resume RUN), or pass --parent RUN_FOLDER")
    return found


def check_parent(parent: str | Path) -> Path:
    """``--parent`` must be an existing folder; one whose run did not complete is named (its missing outputs are
    reported by the notebook that needs them)."""
    path = Path(parent).expanduser()
    if not path.is_dir():
        raise ProfileError(f"--parent {parent}: no such run folder ({path.resolve()}); give the run folder whose "
                           f"outputs the skipped stages come from (runs/<timestamp>-<profile>)")
    status = runs.Run(path).status if (path / "run.json").is_file() else None
    if status not in (None, "complete"):
        print(f"osteo: note: the parent {path} has status {status!r}", flush=True)
    return path


class Overrides(dict):
    """``--set`` values by name, with how each was written (``origins``) for the runner's messages."""

    def __init__(self, values: dict[str, Any] | None = None, origins: dict[str, str] | None = None):
        super().__init__(values or {})
        self.origins = dict(origins or {})


def parse_overrides(items: Sequence[str]) -> Overrides:
    import yaml

    out = Overrides()
    for item in items:
        if "=" not in item:
            raise ProfileError(f"--set expects NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ProfileError(f"--set {item}: the value is not valid YAML ({err})") from None
        out.origins[key.strip()] = f"--set {item}"
    return out


# Commands with a module of their own in osteolib.cli: name -> (module, help). Each module has
# add_arguments(parser) and run(args) -> exit status; it is imported only when its command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("osteolib.cli.predict", "apply a trained model of a run to new X-rays"),
    "init": ("osteolib.cli.init", "write a profile for a folder of X-rays"),
    "report": ("osteolib.cli.report", "(re)build the HTML and PDF report of a run folder"),
    "bench": ("osteolib.cli.bench", "measure osteolib's speed beside plain references (bench/results/)"),
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
    run_p.add_argument("--jobs", "-j", default="auto",
                       help="run each step's grid cells N at a time, each pinned to its share of the cores (or one "
                            f"GPU); 1: one after another; default auto: one per GPU, else one per core (at most "
                            f"{MAX_AUTO_JOBS})")
    run_p.add_argument("--cell", type=int, help="run only the K-th (0-based) of the selected executions, as "
                                                "`osteo list` numbers them (e.g. $SLURM_ARRAY_TASK_ID)")
    run_p.add_argument("--resume", metavar="RUN", help="continue this killed, interrupted or failed run folder from "
                                                       "its first unfinished execution, with its own parameters")
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
        if args.resume:
            given = [flag for flag, value in (("--only", args.only), ("--from", args.start), ("--parent", args.parent),
                                              ("--data-root", args.data_root), ("--set", args.set),
                                              ("--cell", args.cell is not None), ("--runs-dir", args.runs_dir))
                     if value]
            if given:
                raise ProfileError(f"--resume continues a run with its own parameters and selection; drop "
                                   f"{', '.join(given)}")
            resume_run(args.resume, jobs=parse_jobs(args.jobs), log_output=not args.quiet)
            return 0
        overrides = parse_overrides(args.set)
        if args.data_root:
            overrides["data_root"] = str(Path(args.data_root).expanduser().resolve())
            overrides.origins["data_root"] = f"--data-root {args.data_root}"
        run_profile(args.profile, only=args.only, start=args.start, parent=args.parent, overrides=overrides,
                    runs_dir=args.runs_dir, log_output=not args.quiet, jobs=parse_jobs(args.jobs), cell=args.cell)
    except (ProfileError, RunFailed, RuntimeError, FileNotFoundError) as err:
        print(f"osteo: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        name = getattr(err, "signal_name", "SIGINT")
        return 128 + int(getattr(signal, name, signal.SIGINT))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
