"""Profiles, run folders and the papermill runner."""
from __future__ import annotations

import json
import textwrap

import pytest

from osteolib import runs
from osteolib.cli.profiles import ProfileError, Step, check_profile, load_profile, notebook_parameters
from osteolib.cli.osteo import RunFailed, main, run_profile, select


def write_profile(tmp_path, body: str):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_every_shipped_profile_matches_its_notebooks():
    from osteolib.cli.profiles import PROFILES_DIR

    names = sorted(path.stem for path in PROFILES_DIR.glob("*.yaml"))
    assert {"smoke", "real", "paper", "label_efficiency"} <= set(names)
    for name in names:
        profile = load_profile(name)
        # raises on a parameter a notebook does not declare; own_data's data-set root is a placeholder to fill in
        check_profile(profile, data=name != "own_data")
        assert profile.executions(), name


def test_every_notebook_has_a_tagged_parameters_cell_with_run_dir_and_no_outputs():
    import nbformat

    from osteolib.cli.profiles import NOTEBOOKS_DIR

    notebooks = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), f"{path.name}: first code cell is not tagged"
        assert "run_dir" in notebook_parameters(path), path.name
        assert not any(c.get("outputs") for c in code), f"{path.name} is committed with outputs"


def test_grid_and_variants_expand_to_named_executions():
    step = Step("04_finetune", {"epochs": 1}, [{"crop": "a"}], {"backbone": ["d", "v"], "seed": [0, 1]})
    executions = step.executions({"image_size": 64, "epochs": 9})
    assert [e.name for e in executions] == [
        "04_finetune-crop=a-backbone=d-seed=0", "04_finetune-crop=a-backbone=d-seed=1",
        "04_finetune-crop=a-backbone=v-seed=0", "04_finetune-crop=a-backbone=v-seed=1"]
    # step parameters override shared ones, grid cells override both
    assert executions[0].parameters == {"image_size": 64, "epochs": 1, "crop": "a", "backbone": "d", "seed": 0}


def test_profile_errors_name_the_problem(tmp_path):
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):
        load_profile("nope")
    bad_key = write_profile(tmp_path, """
        name: t
        steps:
          - notebook: 00_data_audit
            parameters: {no_such_parameter: 1}
        """)
    with pytest.raises(ProfileError, match="'no_such_parameter' is not declared"):
        check_profile(load_profile(bad_key))
    missing_nb = write_profile(tmp_path, """
        steps:
          - notebook: 99_missing
        """)
    with pytest.raises(ProfileError, match="99_missing.ipynb does not exist"):
        check_profile(load_profile(missing_nb))
    bad_grid = write_profile(tmp_path, """
        steps:
          - notebook: 00_data_audit
            grid: {split_seed: 3}
        """)
    with pytest.raises(ProfileError, match="must be a non-empty list"):
        load_profile(bad_grid)
    # two entries of one notebook told apart only by a step parameter: same execution names, colliding outputs
    same_names = write_profile(tmp_path, """
        steps:
          - notebook: 04_finetune
            parameters: {backbone: vit_small}
            grid: {seed: [0]}
          - notebook: 04_finetune
            parameters: {backbone: densenet121}
            grid: {seed: [0, 1]}
        """)
    with pytest.raises(ProfileError, match="2 executions are named '04_finetune-seed=0'.*put the value"):
        check_profile(load_profile(same_names), data=False)
    told_apart = same_names.read_text().replace("parameters: {backbone: vit_small}", "variants: [{backbone: vit_small}]")
    check_profile(load_profile(write_profile(tmp_path, told_apart)), data=False)


def test_select_only_and_from():
    profile = load_profile("smoke")
    assert [e.notebook for e in select(profile, only=["00"])] == ["00_data_audit"]
    with pytest.raises(ProfileError, match="matches no notebook"):
        select(profile, start="77")


def test_new_runs_never_share_a_folder_and_find_follows_parents(tmp_path):
    first = runs.new_run("t", root=tmp_path)
    second = runs.new_run("t", root=tmp_path, parent=first.path)
    assert first.path != second.path
    (first.data / "manifest.csv").write_text("x")
    assert second.find("data/manifest.csv") == first.data / "manifest.csv"
    with pytest.raises(FileNotFoundError, match="written by an earlier notebook"):
        second.find("data/nothing.csv")
    info = json.loads((second.path / "run.json").read_text())
    assert info["parent"] == str(first.path) and info["environment"]["packages"]["torch"]


@pytest.mark.slow
def test_failing_notebook_stops_the_run_naming_the_cell_and_keeps_outputs(tmp_path):
    profile = write_profile(tmp_path, """
        name: failing
        steps:
          - notebook: 00_data_audit
            parameters: {dataset: no_such_dataset}
        """)
    with pytest.raises(RunFailed, match=r"00_data_audit failed in cell \d+ .*unknown data set 'no_such_dataset'"):
        run_profile(profile, runs_dir=tmp_path / "runs", log_output=False)
    (run_dir,) = (tmp_path / "runs").iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and info["executions"][0]["status"] == "failed"
    assert (run_dir / "notebooks" / "00_data_audit.ipynb").is_file()  # the executed copy, with the traceback
    # the command-line entry point reports the same as an error exit
    assert main(["run", "--profile", str(profile), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 1
    assert len(list((tmp_path / "runs").iterdir())) == 2  # a second, separate run folder


@pytest.mark.slow
def test_smoke_audit_runs_end_to_end(tmp_path):
    run = run_profile("smoke", only=["00"], parent=None, runs_dir=tmp_path / "runs", log_output=False,
                      overrides={"image_size": 48})
    def strict(constant):
        raise AssertionError(f"audit.json holds {constant}, which is not JSON")

    summary = json.loads((run.path / "data" / "audit.json").read_text(), parse_constant=strict)
    assert summary["n_images"] > 100 and set(summary["images_per_split"]) == {"train", "val", "test"}
    assert 0.0 < summary["normalisation"]["mean"] < 1.0
    assert (run.path / "figures" / "00_sample_grid.png").is_file()
    assert (run.path / "data" / "split.csv").is_file()
    assert json.loads((run.path / "run.json").read_text())["status"] == "complete"


@pytest.mark.slow
@pytest.mark.real_data
def test_real_profile_audits_the_nih_subset(tmp_path, real_data_root):
    run = run_profile("real", only=["00"], runs_dir=tmp_path / "runs", log_output=False,
                      overrides={"data_root": str(real_data_root)})
    summary = json.loads((run.path / "data" / "audit.json").read_text())
    assert summary["n_images"] == 1000 and summary["n_patients"] == 682
    assert summary["with_expert_region"] == 44  # the 49 radiologist boxes fall on 44 images
    assert (run.path / "figures" / "00_sample_grid.png").is_file()
    # the external test set: half of Kermany's patients (each image its own patient there), mapped to NIH's classes
    import pandas as pd

    from osteolib.data import read_manifest

    external = read_manifest(run.path / "data" / "external_manifest.csv")
    flow = pd.read_csv(run.path / "tables" / "00_flow.csv").set_index("box")
    assert flow.loc["external_records", "images"] == 2921 and len(external) == 1460
    assert set(external["label"]) == {"no_finding", "pneumonia"} and set(external["source"]) == {"kermany"}
    partitions = pd.read_csv(run.path / "tables" / "00_partitions.csv").set_index("characteristic")
    assert partitions.loc["images", "external"] == "1460" and partitions.loc["sex: F", "test"].startswith("53 (")


# ---------------------------------------------------------------------------------------------- --jobs and --cell


def test_plan_slots_splits_cores_and_gives_each_job_one_gpu():
    from osteolib.cli.jobs import plan_slots

    slots = plan_slots(2, cores=[4, 5, 6, 7, 8], gpus=0)
    assert [s.cores for s in slots] == [(4, 5), (6, 7)] and [s.gpu for s in slots] == [None, None]
    assert slots[0].environment() == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    gpu_slots = plan_slots(2, cores=range(8), gpus=2)
    assert [s.gpu for s in gpu_slots] == [0, 1] and gpu_slots[1].environment()["CUDA_VISIBLE_DEVICES"] == "1"
    with pytest.raises(ProfileError, match="one job per GPU"):
        plan_slots(3, cores=range(8), gpus=2)
    with pytest.raises(ProfileError, match="at most one job per core"):
        plan_slots(3, cores=[0, 1], gpus=0)
    with pytest.raises(ProfileError, match="--jobs must be"):
        plan_slots(0, cores=[0], gpus=0)


def test_jobs_auto_is_one_per_gpu_else_per_core_and_a_small_step_gets_every_core(monkeypatch):
    import osteolib.cli.jobs as jobs
    from osteolib.cli.jobs import MAX_AUTO_JOBS, Slot, auto_jobs, parse_jobs, step_slots

    assert auto_jobs(cores=[0, 1], gpus=0) == 2
    assert auto_jobs(cores=range(32), gpus=0) == MAX_AUTO_JOBS
    assert auto_jobs(cores=range(32), gpus=3) == 3
    assert auto_jobs(cores=[0], gpus=0) == 1
    monkeypatch.setattr(jobs, "auto_jobs", lambda: 7)
    assert parse_jobs("auto") == 7 and parse_jobs("3") == 3 and parse_jobs(2) == 2
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ProfileError, match="give `auto` or a whole number"):
            parse_jobs(bad)
    slots = [Slot((0, 1)), Slot((2, 3))]
    assert step_slots(slots, 5) == slots
    assert step_slots(slots, 1) == [Slot((0, 1, 2, 3))]  # a single notebook (00, 05) is not left on half the cores
    gpu_slots = [Slot((0,), 0), Slot((1,), 1), Slot((2,), 2)]
    assert step_slots(gpu_slots, 1) == [Slot((0, 1, 2), 0)]


def test_run_cells_keeps_n_running_never_shares_a_slot_and_stops_starting_after_a_failure():
    import threading
    import time

    from osteolib.cli.profiles import Execution
    from osteolib.cli.jobs import Slot, run_cells

    executions = [Execution("04_finetune", f"cell{k}", {"seed": k}) for k in range(6)]
    slots = [Slot((0,)), Slot((1,))]
    lock, busy, peak, started = threading.Lock(), set(), [0], []

    def fake(execution, slot):
        with lock:
            assert slot not in busy, "two jobs on one slot"
            busy.add(slot)
            started.append(execution.name)
            peak[0] = max(peak[0], len(busy))
        time.sleep(0.05 if execution.name != "cell0" else 0.15)
        with lock:
            busy.discard(slot)
        if execution.name == "cell2":
            raise RunFailed("notebook cell2 failed in cell 3: boom")

    done = []
    with pytest.raises(RunFailed, match="cell2 failed in cell 3"):
        run_cells(executions, slots, fake, lambda e, r: done.append(r))
    assert peak[0] == 2
    # cell2 failed while cell0 was still running: cell0 finished, nothing after cell2 started
    assert started == ["cell0", "cell1", "cell2"]
    assert {r["name"]: r["status"] for r in done} == {"cell0": "ok", "cell1": "ok", "cell2": "failed"}
    records = run_cells(executions[:3], slots, lambda e, s: None)
    assert [r["name"] for r in records] == ["cell0", "cell1", "cell2"]  # in the given order
    assert all(r["status"] == "ok" and len(r["cores"]) == 1 for r in records)


def test_an_interrupted_runner_stops_its_jobs_children_and_kills_one_that_ignores_sigterm():
    import subprocess
    import sys

    import osteolib.cli.jobs as jobs

    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
                                 "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"  # its SIGTERM handler is in place
    jobs._CHILDREN.update({polite, stubborn})
    try:
        jobs._stop_children(grace=2.0)
        assert polite.wait(timeout=5) == -15 and stubborn.wait(timeout=5) == -9  # SIGTERM, then SIGKILL
    finally:
        jobs._CHILDREN.difference_update({polite, stubborn})
        for child in (polite, stubborn):
            if child.poll() is None:
                child.kill()


def test_run_profile_with_jobs_runs_waves_in_order_and_collects_after_all_cells(tmp_path, monkeypatch):
    import osteolib.cli.osteo as runner

    events = []
    monkeypatch.setattr(runner, "check_kernel", lambda: None)
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(runner, "execute_pinned", lambda e, run, slot: events.append((e.notebook, e.name, slot)))
    monkeypatch.setattr(runner, "execute", lambda *a, **k: pytest.fail("--jobs 2 must not run the sequential path"))
    monkeypatch.setitem(runner.AFTER_STEP, "results_tables", lambda run: events.append(("after", len(events))))
    monkeypatch.setitem(runner.AFTER_STEP, "report", lambda run: events.append(("report", len(events))))
    profile = load_profile("smoke")
    expected = [e.name for e in select(profile, start="03")]
    run = run_profile(profile, start="03", parent=tmp_path, runs_dir=tmp_path / "runs", log_output=False, jobs=2)
    assert events[-1][0] == "report" and events[-2][0] == profile.notebooks[-1]  # the report after its notebook
    events = events[:-1]
    names = [e[1] for e in events if e[0] != "after"]
    assert sorted(names) == sorted(expected)
    notebooks = [e[0] for e in events]
    # 04 and 06 wait for 03 (06's encoder may start from any pretraining checkpoint), then run in one wave
    first_04 = notebooks.index("04_finetune")
    assert set(notebooks[:first_04]) == {"03_rotation_proxy"}
    assert notebooks.index("06_image_text") < notebooks.index("after")  # beside 04's cells, before their tables
    # the collection after all 04 cells and before 05, which reads its tables
    after_at = notebooks.index("after")
    assert all(n != "04_finetune" for n in notebooks[after_at:]) and notebooks[after_at + 1] == "04b_clinical_fusion"
    assert notebooks[after_at + 2] == "05_gradcam_statistics"  # alone, on every core (04b is seconds of work)
    assert notebooks[-1] == profile.notebooks[-1]  # the report notebook waits for every other one
    wave_cores = {e[2].cores for e in events if e[0] in ("03_rotation_proxy", "04_finetune", "06_image_text")}
    single_cores = {e[2].cores for e in events if e[0] in ("04b_clinical_fusion", "05_gradcam_statistics",
                                                            "07_report")}
    assert wave_cores == {(0, 1), (2, 3)} and single_cores == {(0, 1, 2, 3)}  # a one-notebook wave on every core
    info = json.loads((run.path / "run.json").read_text())
    assert info["status"] == "complete"
    assert [r["name"] for r in info["executions"]] == expected and all(r["status"] == "ok" for r in info["executions"])


def test_jobs_1_is_the_sequential_path_and_cell_runs_one_execution_without_the_collection(tmp_path, monkeypatch):
    import osteolib.cli.osteo as runner

    ran, collected = [], []
    monkeypatch.setattr(runner, "check_kernel", lambda: None)
    monkeypatch.setattr(runner, "execute_pinned", lambda *a: pytest.fail("--jobs 1 must not start child processes"))
    monkeypatch.setattr(runner, "execute", lambda e, run, log_output=True: ran.append(e.name))
    monkeypatch.setitem(runner.AFTER_STEP, "results_tables", lambda run: collected.append(run))
    profile = load_profile("smoke")
    grid = [e.name for e in select(profile, only=["04"])]
    run_profile(profile, only=["04"], parent=tmp_path, runs_dir=tmp_path / "runs", log_output=False)
    assert ran == grid and len(collected) == 1
    ran.clear()
    run = run_profile(profile, only=["04"], cell=3, parent=tmp_path, runs_dir=tmp_path / "runs", log_output=False)
    assert ran == [grid[3]] and len(collected) == 1  # one cell: no results table from a partial grid
    assert json.loads((run.path / "run.json").read_text())["cell"] == 3
    with pytest.raises(ProfileError, match="--cell 6 is out of range.*6 execution"):
        select(profile, only=["04"], cell=6)


def test_collect_gathers_cell_runs_into_one_folder_and_runs_the_step_collection(tmp_path, monkeypatch):
    import osteolib.cli.osteo as runner

    collected = []
    monkeypatch.setattr(runner, "check_kernel", lambda: None)

    def fake_execute(execution, run, log_output=True):  # what a 04 cell leaves: predictions, summary, checkpoint
        (run.predictions / f"{execution.name}.csv").write_text(execution.name)
        (run.dir("logs") / f"{execution.name}-summary.json").write_text("{}")
        (run.dir(f"checkpoints/finetune/{execution.name}") / "best.pt").write_bytes(b"weights")

    monkeypatch.setattr(runner, "execute", fake_execute)
    monkeypatch.setitem(runner.AFTER_STEP, "results_tables", lambda run: collected.append(run.path))
    profile = load_profile("smoke")
    grid = [e.name for e in select(profile, only=["04"])]
    base = runs.new_run("smoke", root=tmp_path / "runs")
    cells = [run_profile(profile, only=["04"], cell=k, parent=base.path, runs_dir=tmp_path / "cells",
                         log_output=False).path for k in range(len(grid))]
    assert not collected  # a single cell never writes the tables

    gathered = runner.collect_cells(cells, "smoke", runs_dir=tmp_path / "runs")
    assert collected == [gathered.path]  # the step's `after` ran once, on the gathered folder
    info = gathered.info()
    assert info["parent"] == str(base.path) and info["status"] == "complete"
    assert [e["name"] for e in info["executions"]] == grid
    assert sorted(p.stem for p in gathered.predictions.glob("*.csv")) == sorted(grid)
    linked = gathered.path / "checkpoints" / "finetune" / grid[0] / "best.pt"
    assert linked.samefile(cells[0] / "checkpoints" / "finetune" / grid[0] / "best.pt")  # a link, not a copy

    # the same output from two cells with different contents is refused before anything is written
    (cells[1] / "predictions" / f"{grid[0]}.csv").write_text("another result")
    before = sorted((tmp_path / "runs").iterdir())
    with pytest.raises(ProfileError, match=f"predictions/{grid[0]}.csv differs between"):
        runner.collect_cells(cells[:2], "smoke", runs_dir=tmp_path / "runs")
    assert sorted((tmp_path / "runs").iterdir()) == before
    # an unfinished cell is named, not skipped
    runs.Run(cells[2]).update_info(status="running")
    assert main(["collect", "--profile", "smoke", "--runs-dir", str(tmp_path / "runs"), *map(str, cells[2:])]) == 1
    with pytest.raises(ProfileError, match=f"{cells[2].name}: status 'running'"):
        runner.collect_cells(cells[2:], "smoke", runs_dir=tmp_path / "runs")
    with pytest.raises(ProfileError, match="ran another profile"):
        runner.collect_cells(cells[3:], "real", runs_dir=tmp_path / "runs")


def test_notebook_markdown_is_markdown_not_commented_python():
    """A markdown cell whose lines all start with '# ' renders every line as a heading (a jupytext slip)."""
    from osteolib.cli.profiles import NOTEBOOKS_DIR

    for path in sorted(NOTEBOOKS_DIR.glob("*.ipynb")):
        for k, cell in enumerate(json.loads(path.read_text())["cells"]):
            if cell["cell_type"] == "markdown":
                lines = "".join(cell["source"]).split("\n")
                bad = [line for line in lines if line == "#" or line.startswith("# #")]
                assert not bad, f"{path.name} cell {k}: {bad[:2]}"
