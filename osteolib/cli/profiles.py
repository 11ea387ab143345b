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
declare is an error naming the profile, the step and the parameter. The values are checked too (:func:`check_values`),
for every execution the runner will start: types and ranges through the stage's own configuration dataclass where the
notebook builds one (``config_from(...)`` in its code: ``PretrainConfig``, ``FinetuneConfig``, ``MultimodalConfig``,
which know the backbones and scenarios), otherwise against the type of the notebook's default; paths that must exist
(``data_root``, ``init_checkpoint``). Each problem names the profile line or the ``--set`` the value came from.

Precedence, lowest first: shared ``parameters`` < a step's ``parameters`` < ``--set`` < a variant < a grid cell. A
``--set`` of a name a selected step varies over (its variants or grid) is refused, naming the step: it would make the
executions of that step identical while their names still differ.
"""
from __future__ import annotations

import ast
import functools
import importlib
import inspect
import itertools
import json
import math
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

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
    # parameter name -> where its value came from: a profile line, a `--set`, the command line (for messages)
    origins: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def source(self) -> Path:
        return NOTEBOOKS_DIR / f"{self.notebook}.ipynb"

    def origin(self, name: str) -> str:
        return self.origins.get(name, f"the default in notebooks/{self.notebook}.ipynb's parameters cell")

    def record(self) -> dict[str, Any]:
        """The execution as run.json's ``plan`` keeps it (and ``--resume`` rebuilds it)."""
        return {"notebook": self.notebook, "name": self.name, "parameters": self.parameters,
                "origins": self.origins}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Execution:
        return cls(record["notebook"], record["name"], dict(record["parameters"]), dict(record.get("origins") or {}))


@dataclass
class Step:
    notebook: str
    parameters: dict[str, Any] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    after: str | None = None  # a collection step the runner calls once the step's executions are done
    # where each value stands in the profile file: ("parameters", name) | ("variants", j, name) | ("grid", name)
    # -> line; filled by load_profile
    lines: dict[tuple, int] = field(default_factory=dict, repr=False)
    source: Path | None = field(default=None, repr=False)

    @property
    def varied(self) -> set[str]:
        """The names this step's variants or grid set (one value per execution)."""
        return {k for v in self.variants for k in v} | set(self.grid)

    def executions(self, shared: dict[str, Any], overrides: dict[str, Any] | None = None,
                   origins: dict[str, str] | None = None) -> list[Execution]:
        """The step expanded into executions: shared parameters < step parameters < ``overrides`` (``--set``) <
        variant / grid cell. ``origins``: where the shared and overriding values came from (for messages)."""
        overrides, origins = dict(overrides or {}), dict(origins or {})
        cells: list[tuple[dict[str, Any], dict[str, str]]] = [
            (dict(v), {k: self._where(("variants", j, k), f"variants[{j}]: {k}") for k in v})
            for j, v in enumerate(self.variants)] or [({}, {})]
        if self.grid:
            keys = list(self.grid)
            product = [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]
            grid_origins = {k: self._where(("grid", k), f"grid: {k}") for k in keys}
            cells = [({**cell, **point}, {**where, **grid_origins}) for cell, where in cells for point in product]
        step_origins = {k: self._where(("parameters", k), f"parameters: {k}") for k in self.parameters}
        executions = []
        for cell, cell_origins in cells:
            suffix = "-".join(f"{k}={_short(v)}" for k, v in cell.items())
            name = self.notebook + (f"-{suffix}" if suffix else "")
            where = {**{k: origins.get(k, f"shared parameter {k}") for k in shared}, **step_origins,
                     **{k: origins.get(k, f"--set {k}={_yaml(v)}") for k, v in overrides.items()}, **cell_origins}
            executions.append(Execution(self.notebook, name, {**shared, **self.parameters, **overrides, **cell},
                                        where))
        return executions

    def _where(self, key: tuple, what: str) -> str:
        line = self.lines.get(key)
        place = f"{display_path(self.source)} line {line}" if self.source and line else \
            (display_path(self.source) if self.source else "the profile")
        return f"{place} (step {self.notebook}, {what})"


@dataclass
class Profile:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    source: Path | None = None
    # `--set NAME=VALUE` (and --data-root): win over shared and step parameters, never over a variant or grid value
    overrides: dict[str, Any] = field(default_factory=dict)
    override_origins: dict[str, str] = field(default_factory=dict, repr=False)
    lines: dict[tuple, int] = field(default_factory=dict, repr=False)  # ("parameters", name) -> line

    def executions(self) -> list[Execution]:
        origins = {k: self._where(k) for k in self.parameters}
        origins.update({k: self.override_origins.get(k, f"--set {k}={_yaml(v)}") for k, v in self.overrides.items()})
        return [e for step in self.steps for e in step.executions(self.parameters, self.overrides, origins)]

    def set(self, overrides: dict[str, Any], origins: dict[str, str] | None = None) -> Profile:
        """Apply ``--set`` values (``origins``: how each was written, e.g. ``--set epochs=1``); returns self."""
        self.overrides.update(overrides)
        self.override_origins.update(origins or {})
        return self

    @property
    def effective_parameters(self) -> dict[str, Any]:
        """The shared parameters with the ``--set`` values applied."""
        return {**self.parameters, **self.overrides}

    def _where(self, name: str) -> str:
        line = self.lines.get(("parameters", name))
        place = display_path(self.source) if self.source else "the profile"
        return f"{place}{f' line {line}' if line else ''} (parameters: {name})"

    @property
    def notebooks(self) -> list[str]:
        """The notebooks in step order, each once (consecutive entries of one notebook run as one step)."""
        return list(dict.fromkeys(s.notebook for s in self.steps))


def display_path(path: str | os.PathLike | None) -> str:
    """``path`` relative to the current folder when it lies below it (as a user typed it), else absolute."""
    if path is None:
        return "?"
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _yaml(value: Any) -> str:
    """A value as it would be written after ``--set NAME=``."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Every key's (and list item's) 1-based line in a YAML document: ``("steps", 3, "parameters", "epochs") -> 41``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[path + (key.value,)] = key.start_mark.line + 1
                walk(value, path + (key.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    if root is not None:
        walk(root, ())
    return lines


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
    """Read and check a profile file; every problem is reported with the file, the line and the step it is in."""
    path = profile_path(name_or_path)
    shown = display_path(path)
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ProfileError(f"{shown}: not valid YAML: {err}") from err
    lines = _yaml_lines(text)

    def at(*key: Any) -> str:
        return f"{shown} line {lines[key]}" if key in lines else shown

    if not isinstance(raw, dict):
        raise ProfileError(f"{shown}: a profile is a mapping with the keys name, description, parameters, steps; "
                           f"this file holds a {type(raw).__name__}")
    unknown = set(raw) - {"name", "description", "parameters", "steps"}
    if unknown:
        raise ProfileError(f"{shown}: unknown top-level key(s) {sorted(unknown)}; allowed: name, description, "
                           f"parameters, steps")
    shared = raw.get("parameters")
    if shared is not None and not isinstance(shared, dict):
        raise ProfileError(f"{at('parameters')}: `parameters` must be a mapping of NAME: VALUE (e.g. `image_size: 64` "
                           f"on its own line), not a {type(shared).__name__}: {_yaml(shared)[:120]}")
    entries = raw.get("steps")
    if entries is not None and not isinstance(entries, list):
        raise ProfileError(f"{at('steps')}: `steps` must be a list of steps (`- notebook: NAME`), not a "
                           f"{type(entries).__name__}")
    steps = []
    for i, entry in enumerate(entries or []):
        if not isinstance(entry, dict) or "notebook" not in entry:
            raise ProfileError(f"{at('steps', i)}: step {i} must be a mapping with a 'notebook' key, got {entry!r}")
        where = f"{at('steps', i)}: step {i} ({entry['notebook']})"
        bad = set(entry) - {"notebook", "parameters", "variants", "grid", "after"}
        if bad:
            raise ProfileError(f"{where}: unknown key(s) {sorted(bad)}")
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ProfileError(f"{at('steps', i, 'parameters')}: step {i} ({entry['notebook']}): `parameters` must be "
                               f"a mapping of NAME: VALUE, not a {type(parameters).__name__}")
        variants = entry.get("variants") or []
        if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
            raise ProfileError(f"{at('steps', i, 'variants')}: step {i} ({entry['notebook']}): `variants` must be a "
                               f"list of mappings (one per execution), got {variants!r}")
        grid = entry.get("grid") or {}
        if not isinstance(grid, dict):
            raise ProfileError(f"{at('steps', i, 'grid')}: step {i} ({entry['notebook']}): `grid` must be a mapping "
                               f"of NAME: [values], got {grid!r}")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ProfileError(f"{at('steps', i, 'grid', key)}: step {i} ({entry['notebook']}): grid entry "
                                   f"{key!r} must be a non-empty list, got {values!r}")
        steps.append(Step(entry["notebook"], dict(parameters), [dict(v) for v in variants], dict(grid),
                          entry.get("after"), lines=_step_lines(lines, i), source=path))
    if not steps:
        raise ProfileError(f"{shown}: no steps: list the notebooks to execute under 'steps'")
    return Profile(name=raw.get("name", path.stem), description=raw.get("description", ""),
                   parameters=dict(shared or {}), steps=steps, source=path,
                   lines={k: v for k, v in lines.items() if len(k) == 2 and k[0] == "parameters"})


def _step_lines(lines: dict[tuple, int], i: int) -> dict[tuple, int]:
    """Step ``i``'s lines keyed as :class:`Step` looks them up: ("parameters", name), ("variants", j, name),
    ("grid", name)."""
    out = {}
    for key, line in lines.items():
        if key[:2] != ("steps", i) or len(key) < 4:
            continue
        kind, rest = key[2], key[3:]
        if kind in ("parameters", "grid") and len(rest) == 1:
            out[(kind, rest[0])] = line
        elif kind == "variants" and len(rest) == 2:
            out[(kind, rest[0], rest[1])] = line
    return out


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, Any]:
    """The parameters a notebook declares in its `parameters` cell (name -> inferred type and default)."""
    path = _notebook_path(notebook)
    return dict(_inspect(str(path), path.stat().st_mtime_ns))


def _notebook_path(notebook: str | os.PathLike) -> Path:
    path = Path(notebook) if str(notebook).endswith(".ipynb") else NOTEBOOKS_DIR / f"{notebook}.ipynb"
    if not path.is_file():
        raise ProfileError(f"notebook {path} does not exist; known notebooks: "
                           f"{sorted(p.stem for p in NOTEBOOKS_DIR.glob('*.ipynb'))}")
    return path


@functools.lru_cache(maxsize=64)
def _inspect(path: str, mtime_ns: int) -> dict[str, Any]:
    import papermill

    return papermill.inspect_notebook(path)


def notebook_defaults(notebook: str | os.PathLike) -> dict[str, Any]:
    """The defaults of a notebook's `parameters` cell as Python values (those written as literals)."""
    defaults = {}
    for name, info in notebook_parameters(notebook).items():
        try:
            defaults[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError, TypeError):
            continue
    return defaults


@dataclass(frozen=True)
class NotebookConfig:
    """The configuration dataclass a notebook builds with ``config_from(Class, globals(), **fixed)``."""

    cls: type
    fixed: dict[str, Any]
    derived: dict[str, str]  # field -> template over notebook parameters (osteolib.study.NOTEBOOK_SCENARIO)


def notebook_config(notebook: str | os.PathLike) -> NotebookConfig | None:
    """The dataclass the notebook's code passes to ``config_from`` (found in its cells, imported), or None."""
    path = _notebook_path(notebook)
    return _notebook_config(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _notebook_config(path: str, mtime_ns: int) -> NotebookConfig | None:
    from osteolib.study import NOTEBOOK_SCENARIO

    cells = json.loads(Path(path).read_text()).get("cells", [])
    modules: dict[str, str] = {}
    call: ast.Call | None = None
    for cell in cells:
        if cell.get("cell_type") != "code":
            continue
        source = "".join(cell.get("source", []))
        source = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    modules[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.Call) and call is None and getattr(node.func, "id", getattr(
                    node.func, "attr", None)) == "config_from" and node.args:
                call = node
    if call is None:
        return None
    target = call.args[0]
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
        module_name, class_name = modules.get(target.value.id), target.attr
    elif isinstance(target, ast.Name) and "." in modules.get(target.id, ""):
        module_name, class_name = modules[target.id].rsplit(".", 1)
    else:
        return None
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, TypeError):
        return None
    fixed = {}
    for keyword in call.keywords:
        try:
            fixed[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            continue
    stem = Path(path).stem
    derived = {"scenario": NOTEBOOK_SCENARIO[stem]} if stem in NOTEBOOK_SCENARIO and "scenario" not in fixed else {}
    return NotebookConfig(cls, fixed, derived)


def check_profile(profile: Profile, injected: tuple[str, ...] = ("run_dir",), data: bool = True,
                  executions: Sequence[Execution] | None = None) -> None:
    """Fail before anything runs if a step names a missing notebook, passes a parameter it does not declare, or
    gives one a value it cannot take.

    Shared ``parameters`` are offered to every notebook and only passed to those that declare them. ``executions``:
    the ones that will run (default: all of the profile), whose values are checked (:func:`check_values`) and whose
    steps may not vary a ``--set`` name. ``data``: also check the specs of one's own data sets
    (:func:`check_datasets`: folders, tables, columns, patterns). The message's first line is the first problem;
    every problem names the profile line or the ``--set`` its value came from.
    """
    problems = []
    declared_anywhere: set[str] = set()
    where = f"profile {profile.name} ({display_path(profile.source)})"
    for step in profile.steps:
        try:
            declared = set(notebook_parameters(step.notebook))
        except ProfileError as err:
            problems.append(f"{where}: {err}")
            continue
        declared_anywhere |= declared
        if "run_dir" not in declared:
            problems.append(f"{where}: notebook {step.notebook} has no `run_dir` parameter in its parameters cell")
        own = set(step.parameters) | step.varied
        for name in sorted(own - declared):
            line = step.lines.get(("parameters", name)) or step.lines.get(("grid", name)) or next(
                (v for k, v in step.lines.items() if k[0] == "variants" and k[-1] == name), None)
            problems.append(f"{where}{f' line {line}' if line else ''}, step {step.notebook}: parameter {name!r} is "
                            f"not declared in the notebook's parameters cell (declared: {sorted(declared)})")
    for name in sorted(set(profile.effective_parameters) - declared_anywhere - set(injected)):
        origin = profile.override_origins.get(name) if name in profile.overrides else profile._where(name)
        problems.append(f"{where}: shared parameter {name!r} ({origin or f'--set {name}'}) is declared by none of "
                        f"the profile's notebooks")
    if not problems:
        named: dict[str, int] = {}
        for execution in profile.executions():
            named[execution.name] = named.get(execution.name, 0) + 1
        problems += [f"{where}: {count} executions are named {name!r}: their outputs would collide. Two entries of "
                     f"one notebook must differ in a value their variants or grid set (put the value that tells them "
                     f"apart in `variants`, not in `parameters`)" for name, count in named.items() if count > 1]
    if not problems:
        executions = profile.executions() if executions is None else list(executions)
        problems += check_overrides(profile, executions)
        if not problems:
            problems += check_values(executions, profile.name)
    if data:
        problems += check_datasets(profile, executions)
    if problems:
        raise ProfileError("\n".join(problems))


def check_overrides(profile: Profile, executions: Sequence[Execution]) -> list[str]:
    """``--set`` of a name that a selected step varies over its variants or grid: refused, naming the step.

    The override would make the step's executions identical while their names (and run.json) still said otherwise;
    a shared or step-level value it simply replaces."""
    problems = []
    selected = {e.notebook for e in executions}
    for step in profile.steps:
        if step.notebook not in selected:
            continue
        for name in sorted(set(profile.overrides) & step.varied):
            kind = "grid" if name in step.grid else "variants"
            values = step.grid[name] if name in step.grid else [v[name] for v in step.variants if name in v]
            origin = profile.override_origins.get(name, f"--set {name}={_yaml(profile.overrides[name])}")
            key = ("grid", name) if kind == "grid" else next(
                (k for k in sorted(step.lines, key=str) if k[0] == "variants" and k[-1] == name), ())
            place = step._where(key, f"{kind}: {name}")
            problems.append(
                f"profile {profile.name}, step {step.notebook}: {origin} is refused: this step runs one execution per "
                f"{name} in its {kind} {values}, at {place}; --set replaces shared and step parameters, never a value "
                f"an execution is named after. Edit the step's {kind} in the profile, or leave the step out "
                f"(--only / --from)")
    return problems


# Ranges checked where the configuration dataclass does not report them (a notebook without one, a name that is not
# a field, or a field it takes unchecked, such as PretrainConfig.image_size): name -> (test on a number, what it
# must be)
RANGES: dict[str, tuple[Any, str]] = {
    "image_size": (lambda v: v >= 16, "an int >= 16 pixels"),
    "epochs": (lambda v: v >= 1, "an int >= 1"),
    "align_epochs": (lambda v: v >= 1, "an int >= 1"),
    "seed": (lambda v: v >= 0, "an int >= 0"),
    "split_seed": (lambda v: v >= 0, "an int >= 0"),
    "n_boot": (lambda v: v >= 1, "an int >= 1"),
    "alpha": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "val_fraction": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "max_cam_images": (lambda v: v >= 1, "an int >= 1"),
    "samples_per_class": (lambda v: v >= 0, "an int >= 0"),
}
# Parameters naming a path that must exist when set: name -> (a folder?, what it is)
PATHS = {"data_root": (True, "the folder of the real data sets"),
         "init_checkpoint": (False, "the weights file to start from")}
# Parameters whose type the data-set checks own (a built-in name, a spec mapping, or a list of them)
_CHECKED_ELSEWHERE = {"run_dir", "dataset", "chest_datasets"}


def _is_int(value: Any) -> bool:
    import numpy as np

    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    import numpy as np

    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple))


_KINDS: dict[str, tuple[str, Any]] = {
    "int": ("an int", _is_int), "float": ("a number", _is_number), "bool": ("true or false", lambda v: isinstance(
        v, bool)), "str": ("a string", lambda v: isinstance(v, str)), "None": ("null", lambda v: v is None),
    "NoneType": ("null", lambda v: v is None), "tuple": ("a list", _is_sequence), "list": ("a list", _is_sequence),
    "Sequence": ("a list", _is_sequence), "dict": ("a mapping", lambda v: isinstance(v, dict)),
    "Mapping": ("a mapping", lambda v: isinstance(v, dict)),
}


def _split_union(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[("
        depth -= char in "])"
        if char == "|" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in parts + [current] if p.strip()]


def type_problem(value: Any, type_text: str) -> str | None:
    """What ``value`` should be when it does not match ``type_text`` (a dataclass annotation such as
    ``"int | None"`` or a default's type name), else None; a type this check does not know passes."""
    kinds = []
    for part in _split_union(str(type_text)):
        base = part.split("[", 1)[0].strip()
        if base not in _KINDS:
            return None
        kinds.append(_KINDS[base])
    if not kinds or any(ok(value) for _, ok in kinds):
        return None
    return " or ".join(dict.fromkeys(text for text, _ in kinds))


def resolve_paths(execution: Execution, base: str | os.PathLike | None = None) -> Execution:
    """The execution with relative ``data_root`` / ``init_checkpoint`` made absolute against ``base`` (default:
    the current folder, as ``--data-root`` is): a notebook runs in notebooks/, where a relative path would mean
    something else than where the user typed it."""
    base = Path(base) if base is not None else Path.cwd()
    changed = {}
    for name in PATHS:
        value = execution.parameters.get(name)
        if isinstance(value, str) and value.strip() and not Path(value).expanduser().is_absolute():
            changed[name] = str((base / Path(value).expanduser()).resolve())
    if not changed:
        return execution
    return Execution(execution.notebook, execution.name, {**execution.parameters, **changed}, execution.origins)


def check_values(executions: Sequence[Execution], profile_name: str = "?") -> list[str]:
    """Every parameter value of every execution, before any kernel starts; the problems (empty: all good).

    Types: a field of the notebook's configuration dataclass against its annotation, any other parameter against
    the type of the notebook's default (a null default takes anything). Ranges and names (backbones, scenarios):
    the dataclass itself (its ``__post_init__``, then ``train_config()`` and ``check_init_checkpoint()`` where it
    has them), and :data:`RANGES` for the rest. Paths (:data:`PATHS`) must exist. A problem found in several
    executions of one step is reported once, with how many it concerns.
    """
    import dataclasses

    from osteolib.paths import DATA_ROOT_ENV

    found: dict[str, list[Execution]] = {}

    def problem(execution: Execution, text: str) -> None:
        found.setdefault(text, []).append(execution)

    for execution in executions:
        declared = notebook_parameters(execution.notebook)
        defaults = notebook_defaults(execution.notebook)
        config = notebook_config(execution.notebook)
        fields = {f.name: f for f in dataclasses.fields(config.cls)} if config else {}
        values = {k: v for k, v in execution.parameters.items() if k in declared}
        error = None
        if config is not None and not any(
                name in fields and type_problem(value, fields[name].type) for name, value in values.items()):
            error = _config_error(config, execution, {**defaults, **values})
            if error:
                problem(execution, error)
        for name, value in values.items():
            if name in _CHECKED_ELSEWHERE:
                continue
            if name in fields:
                expected, source = type_problem(value, fields[name].type), \
                    f"{config.cls.__name__}.{name}: {fields[name].type}"
            elif name in defaults and defaults[name] is not None:
                expected = type_problem(value, type(defaults[name]).__name__)
                source = f"the notebook's default is {defaults[name]!r}"
            else:
                expected = None
            if expected:
                problem(execution, f"{name}={_yaml(value)} from {execution.origin(name)}: must be {expected} "
                                   f"({source})")
                continue
            # a range the dataclass does not check itself (or a notebook without one); not twice
            if name in RANGES and _is_number(value) and not (error and re.search(rf"\b{name}\b", error)):
                test, what = RANGES[name]
                if not test(value):
                    problem(execution, f"{name}={_yaml(value)} from {execution.origin(name)}: must be {what}")
            if name in PATHS and value is not None:
                folder, what = PATHS[name]
                path = Path(str(value)).expanduser()
                if not (path.is_dir() if folder else path.is_file()):
                    problem(execution, f"{name}={_yaml(value)} from {execution.origin(name)}: no such "
                                       f"{'folder' if folder else 'file'} ({path}); give {what}")
        if "data_root" in values and values["data_root"] is None and os.environ.get(DATA_ROOT_ENV) and \
                not Path(os.environ[DATA_ROOT_ENV]).expanduser().is_dir():
            problem(execution, f"data_root is null, so the notebooks would read ${DATA_ROOT_ENV}="
                               f"{os.environ[DATA_ROOT_ENV]!r}, which is no folder; set it to the folder of the real "
                               f"data sets, unset it, or give --data-root")
    problems = []
    for text, where in found.items():
        steps = sorted({e.notebook for e in where})
        names = [e.name for e in where]
        cells = f" (execution {names[0]})" if len(names) == 1 and names[0] != steps[0] else \
            (f" ({len(names)} executions)" if len(names) > 1 else "")
        problems.append(f"profile {profile_name}, step {', '.join(steps)}{cells}: {text}")
    return problems


def _config_error(config: NotebookConfig, execution: Execution, values: dict[str, Any]) -> str | None:
    """The error of building the notebook's configuration from these values (None: it builds), with the origin of
    every parameter the error names."""
    from osteolib.utils import config_from

    fixed, sources = dict(config.fixed), {}
    for name, template in config.derived.items():
        keys = [k for _, k, _, _ in string.Formatter().parse(template) if k]
        try:
            fixed[name] = template.format(**{k: values.get(k) for k in keys})
        except (KeyError, IndexError, ValueError):
            continue
        sources[name] = keys
    try:
        built = config_from(config.cls, values, **fixed)
        for method in ("train_config", "check_init_checkpoint"):
            function = getattr(built, method, None)
            if function is not None and not any(p.default is p.empty for p in inspect.signature(
                    function).parameters.values()):
                function()
        return None
    except (ValueError, TypeError, FileNotFoundError) as error:
        text = str(error)
    named = [n for n in values if n in execution.parameters and re.search(rf"\b{re.escape(n)}\b", text)]
    for name, keys in sources.items():
        if re.search(rf"\b{name}\b", text):
            named += [k for k in keys if k in execution.parameters and k not in named]
    origins = "; ".join(f"{n} from {execution.origin(n)}" for n in named)
    return f"{text}" + (f" [{origins}]" if origins else "")


# Notebook parameters naming data sets: notebook -> (parameter, is it the target data set (one) or a pool (a list))
DATASET_PARAMETERS = {"00_data_audit": ("dataset", True), "01_chest_mae": ("chest_datasets", False)}


def check_datasets(profile: Profile, executions: Sequence[Execution] | None = None) -> list[str]:
    """Check every data set a profile names (built-in names and specs of one's own data) before anything runs.

    Each problem reads ``profile <name>, step <notebook>, <place in the step>: <problem>. What to do: ...``; the
    target's ``classes`` / ``positive_class`` / ``label_map`` are checked against a spec's classes too.
    """
    from osteolib.data.audit import class_order
    from osteolib.data.manifest import ManifestError
    from osteolib.data.sources import check_dataset_spec, with_label_map
    from osteolib.data.splits import COPY_POLICIES

    problems: list[str] = []
    seen: set[str] = set()
    executions = profile.executions() if executions is None else executions
    for step in profile.steps:
        if step.notebook not in DATASET_PARAMETERS:
            continue
        name, target = DATASET_PARAMETERS[step.notebook]
        for execution in [e for e in executions if e.notebook == step.notebook]:
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
