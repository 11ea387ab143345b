"""One run-folder layout for every result.

``runs/<timestamp>-<profile>/`` holds the executed notebooks, ``figures/``, ``tables/``, ``data/`` (the manifest and
split this run used), ``checkpoints/``, ``predictions/`` and a ``run.json`` (profile, parameters, package versions, git
commit, timings, status). A new run never writes into an earlier run's folder; a partial rerun (``osteo run --from``)
starts a new folder whose ``run.json`` names the earlier run as its ``parent``, and :meth:`Run.find` looks there for
outputs of stages it did not execute itself.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osteolib.paths import REPO_ROOT

SUBFOLDERS = ("notebooks", "figures", "tables", "data", "checkpoints", "predictions", "logs")
RUN_DIR_ENV = "OSTEOLIB_RUN_DIR"


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
        elif info.get("status") != "complete":
            problems.append(f"{folder}: status {info.get('status')!r}, not 'complete' (rerun that cell first)")
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
        for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "run.json"):
            relative = file.relative_to(folder)
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
    return {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.machine(),
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
