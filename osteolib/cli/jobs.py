"""``--jobs``: the runner's parallel executions. Each job is a child process (``python -m osteolib.cli.osteo
execute-one``) pinned to a :class:`Slot` (its share of the cores, at most one GPU); :func:`run_cells` keeps N of them
running and names every failure; :func:`_stop_children` ends them when the runner is interrupted.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from osteolib import runs
from osteolib.cli.memory import PeakMemory
from osteolib.cli.profiles import Execution, ProfileError
from osteolib.utils import end_with_parent


class RunFailed(RuntimeError):
    """A notebook of the sequence failed; the message names the notebook, the cell and the run folder."""


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


# --jobs auto on a CPU machine: one job per core, but no more than this many at once (each is a kernel with its own
# copy of the model and image cache; beyond a few, memory grows faster than throughput)
MAX_AUTO_JOBS = 4


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def auto_jobs(cores: Sequence[int] | None = None, gpus: int | None = None) -> int:
    """``--jobs auto``: one job per visible GPU, else one per core of this process up to :data:`MAX_AUTO_JOBS`."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else list(cores)
    gpus = _visible_gpus() if gpus is None else gpus
    return gpus if gpus else max(1, min(len(cores), MAX_AUTO_JOBS))


def parse_jobs(value: str | int) -> int:
    """``--jobs`` as given: ``auto`` or an int >= 1."""
    if str(value).strip().lower() == "auto":
        return auto_jobs()
    try:
        jobs = int(value)
    except (TypeError, ValueError):
        jobs = 0
    if jobs < 1 or str(jobs) != str(value).strip():
        raise ProfileError(f"--jobs {value!r}: give `auto` or a whole number >= 1")
    return jobs


def step_slots(slots: Sequence[Slot], executions: int) -> list[Slot]:
    """The slots a step with ``executions`` executions runs on: all of them, or, for a step with fewer executions
    than slots, every core shared among its executions (a single notebook gets all the cores, not one job's share)."""
    if executions >= len(slots):
        return list(slots)
    gpus = sum(s.gpu is not None for s in slots)
    return plan_slots(executions, cores=[c for s in slots for c in s.cores], gpus=gpus)


def plan_slots(jobs: int, cores: Sequence[int] | None = None, gpus: int | None = None) -> list[Slot]:
    """Split this process's cores (``sched_getaffinity``) into ``jobs`` equal, disjoint shares, each with its own
    GPU when GPUs exist. ``cores``/``gpus`` default to this machine's."""
    if not isinstance(jobs, int) or jobs < 1:
        raise ProfileError(f"--jobs must be an int >= 1 (got {jobs!r})")
    cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
    if gpus is None:
        gpus = _visible_gpus()
    if jobs > len(cores):
        raise ProfileError(f"--jobs {jobs} but this process may use {len(cores)} core(s) {cores}: at most one job "
                           f"per core")
    if gpus and jobs > gpus:
        raise ProfileError(f"--jobs {jobs} but {gpus} GPU(s) are visible: one job per GPU, so use --jobs <= {gpus}")
    per_job = len(cores) // jobs
    return [Slot(tuple(cores[k * per_job:(k + 1) * per_job]), k if gpus else None) for k in range(jobs)]


def execute_pinned(execution: Execution, run: runs.Run, slot: Slot) -> dict[str, Any]:
    """Execute one notebook in a child process pinned to ``slot``; its cell output goes to ``<run>/logs/``.
    Returns the fields it adds to the execution's record (its kernel's peak resident memory)."""
    log_path = run.dir("logs") / f"{execution.name}.log"
    command = [sys.executable, "-m", "osteolib.cli.osteo", "execute-one", "--run-dir", str(run.path),
               "--execution", json.dumps({"notebook": execution.notebook, "name": execution.name,
                                          "parameters": execution.parameters})]
    env = {**os.environ, **slot.environment()}
    with open(log_path, "w") as log:
        # The affinity is set in the child before it starts Python; the notebook kernel inherits it. The child gets
        # SIGTERM when this runner dies (even by SIGKILL), and its kernel follows it (ipykernel's parent poller).
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=lambda: _child_setup(slot.cores))
        _CHILDREN.add(child)
        try:
            with PeakMemory(child.pid) as peak:
                returncode = child.wait()
        finally:
            _CHILDREN.discard(child)
    if returncode != 0:
        error_path = log_path.with_suffix(".error")
        reason = error_path.read_text() if error_path.is_file() else \
            f"notebook {execution.name} failed (exit status {returncode})"
        raise RunFailed(f"{reason}\n  its log: {log_path}")
    return {"peak_rss_mb": peak.mb}


_CHILDREN: set[subprocess.Popen] = set()  # the --jobs children running now


def _child_setup(cores: Sequence[int]) -> None:
    """In a --jobs child before it starts Python: its cores, and SIGTERM when its parent dies (Linux)."""
    os.sched_setaffinity(0, cores)
    end_with_parent()


def _stop_children(grace: float = 10.0) -> None:
    """SIGTERM to the running --jobs children (their kernels follow), SIGKILL to any still alive after ``grace``."""
    children = list(_CHILDREN)
    for child in children:
        with contextlib.suppress(OSError):
            child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()


def run_cells(executions: Sequence[Execution], slots: Sequence[Slot],
              execute_cell: Callable[[Execution, Slot], Any],
              on_done: Callable[[Execution, dict[str, Any]], None] = lambda e, r: None) -> list[dict[str, Any]]:
    """Run independent executions ``len(slots)`` at a time, each on a free slot; records in the given order.
    A dict that ``execute_cell`` returns adds its fields to the execution's record.

    ``on_done(execution, record)`` is called (in this thread) as each finishes. After a failure no new execution
    starts; the running ones finish; then :class:`RunFailed` names every failure.
    """
    records: dict[int, dict[str, Any]] = {}
    free = list(slots)
    pending = list(enumerate(executions))
    running: dict[Future, tuple[int, Execution, Slot, float]] = {}
    failures: list[str] = []

    def record_of(execution: Execution, slot: Slot, t0: float) -> dict[str, Any]:
        return {"name": execution.name, "notebook": execution.notebook, "parameters": execution.parameters,
                "seconds": round(time.perf_counter() - t0, 1), "cores": list(slot.cores), "gpu": slot.gpu}

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        try:
            while pending or running:
                while pending and free and not failures:
                    index, execution = pending.pop(0)
                    slot = free.pop(0)
                    running[pool.submit(execute_cell, execution, slot)] = (index, execution, slot,
                                                                          time.perf_counter())
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    index, execution, slot, t0 = running.pop(future)
                    free.append(slot)
                    record = record_of(execution, slot, t0)
                    error = future.exception()
                    if error is None:
                        record["status"] = "ok"
                        if isinstance(future.result(), dict):
                            record.update(future.result())
                    else:
                        record.update(status="failed", error=str(error))
                        failures.append(str(error))
                    records[index] = record
                    on_done(execution, record)
        except BaseException as error:
            # interrupted (a signal) while cells run: stop them, so the pool does not wait for them to finish
            _stop_children()
            for index, execution, slot, t0 in running.values():
                records[index] = record_of(execution, slot, t0)
                records[index].update(status="interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
                                      error=f"{type(error).__name__}: {error}")
                on_done(execution, records[index])
            raise
    ordered = [records[i] for i in sorted(records)]
    if failures:
        raise RunFailed("\n".join(failures))
    return ordered
