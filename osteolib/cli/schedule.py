"""Which executions of a plan may run side by side: steps (consecutive executions of one notebook) and waves
(steps whose notebooks do not read each other's outputs, after :data:`osteolib.study.NOTEBOOK_NEEDS`).

A wave is what ``--jobs`` hands to its slots at once. A step goes into the wave after the latest wave holding a
notebook it needs, so 03_rotation_proxy runs beside 02_shoulder_mae and 06_image_text beside 04_finetune; a
notebook the table does not know needs every notebook listed before it. Needs on notebooks outside the plan
(``--from``, ``--only``: the parent run has their outputs) are met already.
"""
from __future__ import annotations

from typing import Mapping, Sequence, TypeVar

from osteolib.study import NOTEBOOK_NEEDS

E = TypeVar("E")  # an execution (anything with a ``notebook`` attribute)


def steps_of(executions: Sequence[E]) -> list[list[E]]:
    """Consecutive executions of the same notebook: one step's cells."""
    groups: list[list[E]] = []
    for execution in executions:
        if groups and groups[-1][0].notebook == execution.notebook:
            groups[-1].append(execution)
        else:
            groups.append([execution])
    return groups


def waves_of(steps: Sequence[Sequence[E]], needs: Mapping[str, Sequence[str]] = NOTEBOOK_NEEDS) -> list[list[E]]:
    """The steps grouped into waves to run one after another; within a wave, executions keep the plan's order."""
    level: dict[str, int] = {}  # notebook -> its wave
    waves: list[list[E]] = []
    for cells in steps:
        notebook = cells[0].notebook
        # what it reads (unknown: every earlier notebook), and itself: a notebook listed twice (consecutive entries
        # form one step; a later entry is another step) never starts before its earlier executions
        wanted = [*(needs[notebook] if notebook in needs else level), notebook]
        wave = max((level[n] + 1 for n in wanted if n in level), default=0)
        level[notebook] = wave
        while len(waves) <= wave:
            waves.append([])
        waves[wave].extend(cells)
    return [w for w in waves if w]
