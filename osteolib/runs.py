"""One run-folder layout for every result.

``runs/<timestamp>-<profile>/`` holds the executed notebooks, ``figures/``, ``tables/``, ``data/`` (the manifest and
split this run used), ``checkpoints/``, ``predictions/`` and a ``run.json`` (profile, parameters, package versions, git
commit, timings, status). A new run never writes into an earlier run's folder; a partial rerun (``osteo run --from``)
starts a new folder whose ``run.json`` names the earlier run as its ``parent``, and :meth:`Run.find` looks there for
outputs of stages it did not execute itself.

While ``osteo run`` works on a folder, ``run.json`` says ``status: running`` with the runner's ``pid``, ``host`` and
the process's start time; a signal (SIGTERM, SIGINT) makes it ``interrupted``, and a reader that finds ``running``
with a dead process on this host reports ``interrupted`` too (:attr:`Run.status`: a SIGKILL leaves no chance to
write). ``logs/resume_point.json`` lists the files present the last time nothing was executing and which
executions had completed by then: ``osteo run --resume`` keeps exactly those and moves everything else (what the
unfinished execution had written) into ``unfinished/<attempt>/`` before it continues (:func:`set_aside_unfinished`).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osteolib.paths import REPO_ROOT

SUBFOLDERS = ("notebooks", "figures", "tables", "data", "checkpoints", "predictions", "logs")
RUN_DIR_ENV = "OSTEOLIB_RUN_DIR"
# set by the runner while it works on a run folder, inherited by its kernels and children: a process that carries it
# still writes there (see live_processes)
ACTIVE_RUN_ENV = "OSTEOLIB_ACTIVE_RUN"
RESUME_POINT = "logs/resume_point.json"
UNFINISHED = "unfinished"  # where --resume moves what unfinished executions had written: unfinished/<attempt>/
_NOT_OUTPUTS = ("run.json", "run.json.tmp", RESUME_POINT, RESUME_POINT + ".tmp")


def runs_root() -> Path:
    return Path(os.environ.get("OSTEOLIB_RUNS_DIR", REPO_ROOT / "runs"))


@dataclass
class Run:
    """A run folder. Create with :func:`new_run`, open an existing one with :func:`open_run`."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path).resolve()

    # -- layout ---------------------------------------------------------------------------------------------
    def dir(self, name: str) -> Path:
        """A sub-folder of the run (created on demand)."""
        folder = self.path / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @property
    def figures(self) -> Path:
        return self.dir("figures")

    @property
    def tables(self) -> Path:
        return self.dir("tables")

    @property
    def data(self) -> Path:
        return self.dir("data")

    @property
    def checkpoints(self) -> Path:
        return self.dir("checkpoints")

    @property
    def predictions(self) -> Path:
        return self.dir("predictions")

    # -- metadata -------------------------------------------------------------------------------------------
    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    def info(self) -> dict[str, Any]:
        return json.loads(self.info_path.read_text()) if self.info_path.is_file() else {}

    def update_info(self, **fields: Any) -> dict[str, Any]:
        info = self.info()
        info.update(fields)
        tmp = self.info_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2, default=str))
        os.replace(tmp, self.info_path)
        return info

    @property
    def status(self) -> str | None:
        """``run.json``'s status, except that ``running`` whose runner process is gone (on this host) reads
        ``interrupted``."""
        return effective_status(self.info())

    @property
    def parent(self) -> Run | None:
        parent = self.info().get("parent")
        return Run(Path(parent)) if parent else None

    def find(self, relative: str | os.PathLike) -> Path:
        """The file ``relative`` from this run, or else from its parent chain (for partial reruns).

        Raises FileNotFoundError naming every folder searched and which stage writes the file.
        """
        searched = []
        run: Run | None = self
        while run is not None:
            candidate = run.path / relative
            if candidate.exists():
                return candidate
            searched.append(str(run.path))
            run = run.parent
        raise FileNotFoundError(
            f"{relative} not found in run folder(s) {searched}. It is written by an earlier notebook of the sequence: "
            f"run that one first (e.g. `osteo run --profile <name>` or `--from` an earlier step)."
        )

    def find_all(self, pattern: str) -> list[Path]:
        """Files matching the glob ``pattern`` in this run and its parent chain, one per file name (the nearest
        run's): this run's first, each folder's sorted by name."""
        found: dict[str, Path] = {}
        run: Run | None = self
        while run is not None:
            for path in sorted(run.path.glob(pattern)):
                found.setdefault(path.name, path)
            run = run.parent
        return list(found.values())

    def find_optional(self, relative: str | os.PathLike) -> Path | None:
        """:meth:`find`, or None when no run of the chain has the file (an output only some profiles write)."""
        try:
            return self.find(relative)
        except FileNotFoundError:
            return None

    def __str__(self) -> str:
        return str(self.path)


def _timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def new_run(profile: str, root: str | os.PathLike | None = None, parent: str | os.PathLike | None = None,
            **info: Any) -> Run:
    """Create a fresh run folder ``<root>/<timestamp>-<profile>`` (never an existing one)."""
    root = Path(root) if root else runs_root()
    root.mkdir(parents=True, exist_ok=True)
    base = f"{_timestamp()}-{profile}"
    for attempt in range(1000):
        path = root / (base if attempt == 0 else f"{base}-{attempt}")
        try:
            path.mkdir()  # atomic: fails if another run took the name
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - a thousand runs in one second
        raise RuntimeError(f"could not create a new run folder under {root}")
    run = Run(path)
    for name in SUBFOLDERS:
        run.dir(name)
    run.update_info(profile=profile, created=_dt.datetime.now().isoformat(timespec="seconds"),
                    parent=str(Path(parent).resolve()) if parent else None, environment=environment_info(), **info)
    return run


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux ``/proc``), or None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` exists, is not a zombie and (when ``started`` is known) is the same process, not a
    later one that reused its number."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OSError, ValueError, TypeError):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    current = process_start(int(pid))
    return started is None or current is None or current == started


def owner() -> dict[str, Any]:
    """What run.json records of the process working on a run: pid, host, start time."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "pid_started": process_start(os.getpid())}


def effective_status(info: dict[str, Any]) -> str | None:
    """A run's status as a reader should take it: ``running`` with a dead runner on this host is ``interrupted``."""
    status = info.get("status")
    if status == "running" and info.get("pid") and info.get("host") == socket.gethostname() \
            and not process_alive(info["pid"], info.get("pid_started")):
        return "interrupted"
    return status


def live_processes(run_path: str | os.PathLike, exclude: tuple[int, ...] = ()) -> list[int]:
    """Processes of this user that still work on the run (their environment carries ``OSTEOLIB_ACTIVE_RUN`` = the
    run folder: the runner, its kernels and --jobs children, also orphaned ones). Linux; elsewhere empty."""
    marker = f"{ACTIVE_RUN_ENV}={Path(run_path).resolve()}".encode()
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in (os.getpid(), *exclude):
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and process_alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return sorted(found)


def wait_for_processes(run_path: str | os.PathLike, seconds: float = 15.0) -> list[int]:
    """Wait up to ``seconds`` for the run's processes to end (an orphaned kernel notices its runner's death within
    about a second); the ones still alive."""
    deadline = time.monotonic() + seconds
    alive = live_processes(run_path)
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = live_processes(run_path)
    return alive


def latest_complete_run(profile: str, root: str | os.PathLike | None = None) -> tuple[Path | None, dict[str, int]]:
    """The newest run folder under ``root`` whose run.json names ``profile`` and whose status is complete (a single
    grid cell, ``--cell``, does not count: it holds one cell of a step); and how many others were passed over, by
    status."""
    root = Path(root) if root else runs_root()
    candidates = []
    for folder in (root.iterdir() if root.is_dir() else []):
        info = Run(folder).info() if (folder / "run.json").is_file() else {}
        if info.get("profile") == profile:
            candidates.append((str(info.get("created", "")), folder.name, folder, info))
    skipped: dict[str, int] = {}
    for _, _, folder, info in sorted(candidates, key=lambda c: (c[0], _natural(c[1])), reverse=True):
        status = effective_status(info)
        if status == "complete" and info.get("cell") is None:
            return folder, skipped
        key = "single cell" if status == "complete" else str(status)
        skipped[key] = skipped.get(key, 0) + 1
    return None, skipped


def _natural(name: str) -> list[Any]:
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# -- resume ----------------------------------------------------------------------------------------------------


def output_files(run: Run) -> dict[str, list[int]]:
    """Every file of the run folder (relative path -> [size, mtime_ns]) except run.json, the resume point and what
    earlier resumes set aside."""
    files = {}
    for path in run.path.rglob("*"):
        relative = path.relative_to(run.path).as_posix()
        if relative in _NOT_OUTPUTS or relative.split("/", 1)[0] == UNFINISHED or not path.is_file():
            continue
        stat = path.stat()
        files[relative] = [stat.st_size, stat.st_mtime_ns]
    return files


def write_resume_point(run: Run, completed: list[str], after_done: list[str]) -> None:
    """Record, at a moment when no execution is running, the executions (and ``after`` collections) done and every
    file they left: what ``--resume`` keeps."""
    payload = {"completed": list(completed), "after_done": list(after_done), "files": output_files(run)}
    path = run.path / RESUME_POINT
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=0, sort_keys=True))
    os.replace(tmp, path)


def read_resume_point(run: Run) -> dict[str, Any]:
    path = run.path / RESUME_POINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {run.path} was not made by a runner that records where to resume "
                                f"(or its logs/ were removed); start a new run, or --from the first missing step "
                                f"with --parent {run.path}")
    return json.loads(path.read_text())


def changed_outputs(run: Run, point: dict[str, Any]) -> list[str]:
    """Files the resume point keeps that are gone or were rewritten since (a resume cannot restore them)."""
    now = output_files(run)
    return sorted(f for f, (size, mtime) in point["files"].items() if now.get(f) != [size, mtime])


def set_aside_unfinished(run: Run, point: dict[str, Any]) -> Path | None:
    """Move every file the resume point does not keep (an unfinished execution's executed notebook, checkpoints,
    predictions, logs ...) into ``unfinished/<attempt>/`` at the same relative place; that folder (None: nothing
    to move). Completed outputs are never touched."""
    extra = sorted(set(output_files(run)) - set(point["files"]))
    if not extra:
        return None
    attempt = 1
    while (run.path / UNFINISHED / str(attempt)).exists():
        attempt += 1
    target = run.path / UNFINISHED / str(attempt)
    for relative in extra:
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(run.path / relative, destination)
    # folders emptied by the move go too (the run's own subfolders stay)
    emptied = {parent for relative in extra for parent in Path(relative).parents if parent != Path(".")}
    for folder in sorted(emptied, key=lambda p: len(p.parts), reverse=True):
        place = run.path / folder
        if folder.as_posix() not in SUBFOLDERS and place.is_dir() and not any(place.iterdir()):
            place.rmdir()
    return target


def gather_runs(sources: list[str | os.PathLike], profile: str, root: str | os.PathLike | None = None,
                parent: str | os.PathLike | None = None) -> Run:
    """A new run folder holding the outputs of several complete runs of single grid cells.

    A scheduler array (``osteo run --cell K``, one task per cell) leaves one run folder per cell; the collection
    steps (results tables, notebook 05) need them in one. Every file of every source is hard-linked (copied
    across file systems) to the same place in the new folder, whose parent is the cells' common parent (the
    run with the earlier stages). Refused, before anything is linked, when a source is not a complete run, when
    the sources have different parents, or when two sources hold the same file with different contents.
    """
    folders = list(dict.fromkeys(Path(s).resolve() for s in sources))  # a folder named twice counts once
    if not folders:
        raise ValueError("gather_runs: no cell run folders given")
    problems, parents = [], set()
    for folder in folders:
        info = Run(folder).info()
        if not info:
            problems.append(f"{folder}: not a run folder (no run.json)")
        elif effective_status(info) != "complete":
            problems.append(f"{folder}: status {effective_status(info)!r}, not 'complete' (rerun that cell first)")
        else:
            parents.add(info.get("parent"))
    if problems:
        raise ValueError("gather_runs: cannot gather these runs:\n  " + "\n  ".join(problems))
    if parent is None and len(parents) > 1:
        raise ValueError(f"gather_runs: the cells have different parents {sorted(map(str, parents))}: gather the "
                         f"cells of one parent run at a time, or name the parent with parent=/--parent")
    parent = parent if parent is not None else parents.pop()
    owner: dict[Path, Path] = {}  # relative path -> the source file it comes from
    for folder in folders:
        for relative in sorted(Path(f) for f in output_files(Run(folder))):  # not run.json, the resume point
            file = folder / relative
            first = owner.setdefault(relative, file)
            if first != file and not _same_bytes(first, file):
                raise ValueError(f"gather_runs: {relative} differs between {first.parent} and {file.parent}: "
                                 f"the same output from two cells (was one cell run twice?)")
    run = new_run(profile, root=root, parent=parent, partial=True, status="running",
                  gathered_from=[str(f) for f in folders])
    for relative, file in owner.items():
        target = run.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target)
        except OSError:  # another file system (or no hard links): a copy
            shutil.copy2(file, target)
    executions = [e for f in folders for e in Run(f).info().get("executions", [])]
    run.update_info(executions=executions, status="complete")
    return run


def _same_bytes(a: Path, b: Path) -> bool:
    import filecmp

    return filecmp.cmp(a, b, shallow=False)


def open_run(run_dir: str | os.PathLike | None = None, profile: str = "interactive", create: bool = False) -> Run:
    """The run folder a notebook writes into.

    ``run_dir`` given (the runner always passes it): that folder. Otherwise ``$OSTEOLIB_RUN_DIR``; otherwise, for a
    student stepping through the notebooks, ``create=True`` (notebook 00) starts a new ``-interactive`` run and the
    later notebooks (``create=False``) attach to the most recent run folder.
    """
    chosen = run_dir or os.environ.get(RUN_DIR_ENV)
    if chosen:
        path = Path(chosen)
        if not path.is_dir():
            raise FileNotFoundError(f"run folder {path} does not exist; start a run with `osteo run` or notebook 00")
        return Run(path)
    if create:
        return new_run(profile)
    existing = sorted(p for p in runs_root().glob("*-*") if (p / "run.json").is_file()) if runs_root().is_dir() else []
    if not existing:
        raise FileNotFoundError(f"no run folder under {runs_root()}: run notebook 00_data_audit first")
    return Run(existing[-1])


def environment_info() -> dict[str, Any]:
    """Package versions, interpreter, machine and git commit: what a reader needs to rerun a result."""
    versions = {}
    for name in ("osteolib", "torch", "torchvision", "timm", "fastai", "pytorch_grad_cam", "numpy", "pandas",
                 "scikit-learn", "statsmodels", "papermill", "pydicom"):
        versions[name] = _version(name)
    from osteolib.utils import cpu_has_bf16_flags, cpu_model

    return {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.machine(),
            "cpu_model": cpu_model(), "cpu_bf16": cpu_has_bf16_flags(),
            "cpu_count": os.cpu_count(), "packages": versions, "git_commit": git_commit()}


def _version(name: str) -> str | None:
    from importlib import metadata

    dist = {"pytorch_grad_cam": "grad-cam"}.get(name, name)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
