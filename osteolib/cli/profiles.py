"""Profiles: the one source of truth for a run's parameters.

A profile file (``profiles/<name>.yaml``) names the notebooks to execute, in order, and the parameters each receives:

.. code-block:: yaml

    name: smoke
    description: the whole sequence on the synthetic default data, in minutes on a laptop CPU
    parameters:            # given to every notebook that declares them in its `parameters` cell
      image_size: 64
    steps:
      - notebook: 00_data_audit
      - notebook: 02_shoulder_mae
        parameters: {epochs: 1}
        variants: [{crop_mode: random}, {crop_mode: center}]   # executed once per variant
      - notebook: 04_finetune
        grid: {scenario: [random, chest_mae], backbone: [densenet121], seed: [0, 1]}   # the cartesian product
        after: results_tables   # then collect the grid's results table (see osteolib.cli.osteo.AFTER_STEP)

Parameters are checked against each notebook's ``parameters`` cell before anything runs: a name the notebook does not
declare is an error naming the profile, the step and the parameter.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from osteolib.paths import REPO_ROOT

PROFILES_DIR = REPO_ROOT / "profiles"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


class ProfileError(ValueError):
    """A profile file is malformed or asks for something a notebook does not offer."""


@dataclass(frozen=True)
class Execution:
    """One notebook execution: which notebook, under which name, with which parameters."""

    notebook: str
    name: str
    parameters: dict[str, Any]

    @property
    def source(self) -> Path:
        return NOTEBOOKS_DIR / f"{self.notebook}.ipynb"


@dataclass
class Step:
    notebook: str
    parameters: dict[str, Any] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    after: str | None = None  # a collection step the runner calls once the step's executions are done

    def executions(self, shared: dict[str, Any]) -> list[Execution]:
        """The step expanded into executions: shared parameters < step parameters < variant / grid cell."""
        cells: list[dict[str, Any]] = [dict(v) for v in self.variants] or [{}]
        if self.grid:
            keys = list(self.grid)
            product = [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]
            cells = [{**cell, **point} for cell in cells for point in product]
        executions = []
        for cell in cells:
            suffix = "-".join(f"{k}={_short(v)}" for k, v in cell.items())
            name = self.notebook + (f"-{suffix}" if suffix else "")
            executions.append(Execution(self.notebook, name, {**shared, **self.parameters, **cell}))
        return executions


@dataclass
class Profile:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    source: Path | None = None

    def executions(self) -> list[Execution]:
        return [e for step in self.steps for e in step.executions(self.parameters)]

    @property
    def notebooks(self) -> list[str]:
        return [s.notebook for s in self.steps]


def _short(value: Any) -> str:
    text = str(value).replace(os.sep, "_").replace(" ", "")
    return text if len(text) <= 40 else text[:40]


def profile_path(name_or_path: str | os.PathLike) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    named = PROFILES_DIR / f"{name_or_path}.yaml"
    if named.is_file():
        return named
    known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
    raise ProfileError(f"unknown profile {str(name_or_path)!r}: known profiles are {known} (in {PROFILES_DIR}), "
                       f"or pass the path of a .yaml file")


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """Read and check a profile file; every problem is reported with the file and the step it is in."""
    path = profile_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ProfileError(f"{path}: not valid YAML: {err}") from err
    unknown = set(raw) - {"name", "description", "parameters", "steps"}
    if unknown:
        raise ProfileError(f"{path}: unknown top-level key(s) {sorted(unknown)}; allowed: name, description, "
                           f"parameters, steps")
    steps = []
    for i, entry in enumerate(raw.get("steps") or []):
        if not isinstance(entry, dict) or "notebook" not in entry:
            raise ProfileError(f"{path}: step {i} must be a mapping with a 'notebook' key, got {entry!r}")
        bad = set(entry) - {"notebook", "parameters", "variants", "grid", "after"}
        if bad:
            raise ProfileError(f"{path}: step {i} ({entry['notebook']}): unknown key(s) {sorted(bad)}")
        grid = entry.get("grid") or {}
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ProfileError(f"{path}: step {i} ({entry['notebook']}): grid entry {key!r} must be a non-empty "
                                   f"list, got {values!r}")
        steps.append(Step(entry["notebook"], dict(entry.get("parameters") or {}),
                          [dict(v) for v in entry.get("variants") or []], dict(grid), entry.get("after")))
    if not steps:
        raise ProfileError(f"{path}: no steps: list the notebooks to execute under 'steps'")
    return Profile(name=raw.get("name", path.stem), description=raw.get("description", ""),
                   parameters=dict(raw.get("parameters") or {}), steps=steps, source=path)


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, Any]:
    """The parameters a notebook declares in its `parameters` cell (name -> inferred type and default)."""
    import papermill

    path = Path(notebook) if str(notebook).endswith(".ipynb") else NOTEBOOKS_DIR / f"{notebook}.ipynb"
    if not path.is_file():
        raise ProfileError(f"notebook {path} does not exist; known notebooks: "
                           f"{sorted(p.stem for p in NOTEBOOKS_DIR.glob('*.ipynb'))}")
    return papermill.inspect_notebook(str(path))


def check_profile(profile: Profile, injected: tuple[str, ...] = ("run_dir",), data: bool = True) -> None:
    """Fail before anything runs if a step names a missing notebook or passes a parameter it does not declare.

    Shared ``parameters`` are offered to every notebook and only passed to those that declare them. ``data``:
    also check the specs of one's own data sets (:func:`check_datasets`: folders, tables, columns, patterns).
    """
    problems = []
    declared_anywhere: set[str] = set()
    for step in profile.steps:
        try:
            declared = set(notebook_parameters(step.notebook))
        except ProfileError as err:
            problems.append(str(err))
            continue
        declared_anywhere |= declared
        if "run_dir" not in declared:
            problems.append(f"notebook {step.notebook} has no `run_dir` parameter in its parameters cell")
        own = set(step.parameters) | {k for v in step.variants for k in v} | set(step.grid)
        for name in sorted(own - declared):
            problems.append(f"step {step.notebook}: parameter {name!r} is not declared in the notebook's "
                            f"parameters cell (declared: {sorted(declared)})")
    for name in sorted(set(profile.parameters) - declared_anywhere - set(injected)):
        problems.append(f"shared parameter {name!r} is declared by none of the profile's notebooks")
    if data:
        problems += check_datasets(profile)
    if problems:
        raise ProfileError(f"profile {profile.source}:\n  " + "\n  ".join(problems))


# Notebook parameters naming data sets: notebook -> (parameter, is it the target data set (one) or a pool (a list))
DATASET_PARAMETERS = {"00_data_audit": ("dataset", True), "01_chest_mae": ("chest_datasets", False)}


def check_datasets(profile: Profile) -> list[str]:
    """Check every data set a profile names (built-in names and specs of one's own data) before anything runs.

    Each problem reads ``profile <name>, step <notebook>, <place in the step>: <problem>. What to do: ...``; the
    target's ``classes`` / ``positive_class`` / ``label_map`` are checked against a spec's classes too.
    """
    import json

    from osteolib.data.audit import class_order
    from osteolib.data.manifest import ManifestError
    from osteolib.data.sources import check_dataset_spec, with_label_map
    from osteolib.data.splits import COPY_POLICIES

    problems: list[str] = []
    seen: set[str] = set()
    for step in profile.steps:
        if step.notebook not in DATASET_PARAMETERS:
            continue
        name, target = DATASET_PARAMETERS[step.notebook]
        for execution in step.executions(profile.parameters):
            params = execution.parameters
            policy = params.get("near_duplicates", COPY_POLICIES[0])
            if target and policy not in COPY_POLICIES:
                problems.append(f"profile {profile.name}, step {step.notebook}, near_duplicates: {policy!r} is not a "
                                f"policy for copies of one radiograph. What to do: use one of {list(COPY_POLICIES)}")
            if name not in params:
                continue
            value = params[name]
            if target:
                if isinstance(value, dict) and params.get("dataset_options"):
                    value = {**value, **params["dataset_options"]}
                if isinstance(value, dict):  # 00 joins its label_map to the spec's (merging case variants too)
                    value = with_label_map(value, params.get("label_map"))
                entries = [(name, value)]
            else:
                values = value if isinstance(value, list) else [value]
                entries = [(f"{name}[{i}]", v) for i, v in enumerate(values)]
            for where, entry in entries:
                if isinstance(entry, str):
                    continue  # a built-in name: its notebook reports an unknown name or a missing folder, as before
                key = json.dumps([step.notebook, where, entry, params.get("data_root"), params.get("classes"),
                                  params.get("positive_class"), params.get("label_map")], sort_keys=True, default=str)
                if key in seen:
                    continue
                seen.add(key)
                prefix = f"profile {profile.name}, step {step.notebook}, "
                try:
                    info = check_dataset_spec(entry, params.get("data_root"), where=where, target=target)
                    if target:
                        class_order(info["classes"], params.get("classes"), params.get("positive_class"))
                except ManifestError as err:
                    problems.append(prefix + str(err))
    return problems


def parameters_for(execution: Execution) -> dict[str, Any]:
    """Only the parameters the notebook declares (shared ones are offered to all)."""
    declared = notebook_parameters(execution.notebook)
    return {k: v for k, v in execution.parameters.items() if k in declared}
