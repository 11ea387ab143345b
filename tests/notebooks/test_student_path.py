"""The student's path: the numbered notebooks run top to bottom with their own defaults, as in JupyterLab.

No profile and no runner: notebook 00 starts an interactive run folder and every later notebook attaches to the
latest one, exactly as when a student opens them one after another. ``pytest --nbval-lax`` executes each
notebook's cells in order in the ``osteolib`` kernel and fails on the first cell that raises (outputs are not
compared: they hold timings and random numbers). It runs in a child pytest so the run folders go to a temporary
``$OSTEOLIB_RUNS_DIR`` and the suite's own options (import mode, markers) stay apart from nbval's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from osteolib.paths import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("0[0-6]_*.ipynb"))


def test_the_notebooks_run_in_order_with_their_own_defaults(tmp_path):
    assert [p.name[:2] for p in NOTEBOOKS] == ["00", "01", "02", "03", "04", "05", "06"]
    env = {**os.environ, "OSTEOLIB_RUNS_DIR": str(tmp_path / "runs")}
    for name in ("OSTEOLIB_RUN_DIR", "OSTEOLIB_ACTIVE_RUN"):  # a run set from outside would take the writes
        env.pop(name, None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
               "--nbval-cell-timeout=900", "-o", "addopts=", "-o", "testpaths=", *map(str, NOTEBOOKS)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    # one interactive run folder holds what every notebook wrote, in the order a student ran them
    (run,) = [p for p in (tmp_path / "runs").iterdir() if (p / "run.json").is_file()]
    assert run.name.endswith("-interactive")
    for made in ("data/manifest.csv", "data/audit.json", "predictions", "tables"):
        assert (run / made).exists(), f"{made} missing from the student's run folder {run}"
    assert list((run / "predictions").glob("*.csv")), "notebook 04 wrote no predictions"
    assert json.loads((run / "run.json").read_text())["profile"] == "interactive"

