"""Small helpers every layer may use (a leaf: imports nothing from osteolib).

- ``to_json`` / ``write_json``: the one way results become JSON (numpy and torch scalars as Python numbers).
- ``eval_mode``: a model in eval mode inside a block, its own mode back after.
- ``size_pair``: an image size as a checked (height, width) pair.
- ``config_from``: a stage's dataclass built from a notebook's or profile's parameters (the names it knows).
- ``end_with_parent``: in a child process before it starts Python, SIGTERM when its parent dies.
- ``usable_cores``: how many cores this process may run on (a pinned ``osteo run --jobs`` child has its share).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np


def to_json(value: Any) -> Any:
    """``value`` with numpy / torch scalars and arrays as Python numbers and lists, dict keys as strings, tuples as
    lists and paths as strings; NaN becomes None (JSON has no NaN: an undefined statistic is null)."""
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else str(to_json(k)): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, np.generic) or (hasattr(value, "item") and getattr(value, "ndim", None) == 0):
        value = value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_json(path: str | Path, payload: Any, indent: int = 2, sort_keys: bool = True) -> Path:
    """Write ``payload`` (through ``to_json``) as JSON with a final newline."""
    path = Path(path)
    path.write_text(json.dumps(to_json(payload), indent=indent, sort_keys=sort_keys) + "\n")
    return path


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that compute bf16 natively


def usable_cores() -> int:
    """The cores this process may run on: its affinity where the OS has one (a pinned `osteo run --jobs` child
    has its share), else every core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_has_bf16_flags() -> bool:
    """Whether /proc/cpuinfo lists a native-bf16 flag (AVX512-BF16 or AMX); False where it cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else the platform's word for it): every measured figure names it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """``model`` in eval mode inside the block (BatchNorm statistics frozen, dropout off), its own mode back after,
    also when the block raises: figures, checks and predictions must not change a model that is still training."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def size_pair(size: int | tuple[int, int] | list[int], what: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{what} must be a positive int or a (height, width) pair, got {size!r}")
    return pair  # type: ignore[return-value]


def config_from(cls: type, parameters: Mapping[str, Any], **fixed: Any) -> Any:
    """An instance of the dataclass ``cls`` from the entries of ``parameters`` that name its fields (a notebook
    passes ``globals()``, the torchrun entry a profile's parameters), then ``fixed``. A new option is typed once
    in the dataclass and once in the notebook's parameters cell; its checks live in the dataclass."""
    names = {f.name for f in dataclasses.fields(cls)}
    chosen = {k: v for k, v in parameters.items() if k in names}
    chosen.update(fixed)
    # YAML and papermill give lists where the dataclasses keep tuples
    for f in dataclasses.fields(cls):
        if f.name in chosen and isinstance(chosen[f.name], list) and "tuple" in str(f.type):
            chosen[f.name] = tuple(chosen[f.name])
    return cls(**chosen)


def end_with_parent() -> None:
    """In a child process, before it starts Python (a ``preexec_fn``): SIGTERM when its parent dies, even by SIGKILL
    (Linux ``PR_SET_PDEATHSIG``; elsewhere nothing), so no worker outlives the process that started it."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
